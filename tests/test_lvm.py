"""DeLVM: the VQ tokenizer, visual sentences, the AR model's labels and KD loss, long-tail
augmentation, prompting with a budget, and the trained model as a plain transformers causal LM
that `slimkit quantize` accepts. (Resume, roll-back and torchrun of the three trainers are enrolled
in tests/test_trainer.py through slimkit.train.TRAINERS.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.lvm.losses import IGNORE, masked_kd_loss, sentence_labels
from slimkit.lvm.prompt import generate_codes, mask_miou
from slimkit.lvm.sentences import (
    Sentences,
    SentencesConfig,
    decode_sentence,
    make_sentences,
    to_float,
)
from slimkit.lvm.train import LVMTask, LVMTrainConfig, TokenizerConfig, train_lvm, train_tokenizer
from slimkit.lvm.vq import VQVAE, VQConfig, load_vq, round_trip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 100-step tokenizer (16 px images, 4 x 4 codes), sentences, and a 30-step LVM."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("lvm")
    train_tokenizer(TokenizerConfig(n_images=256, image_size=16, codebook=32, embed_dim=8, channels=16,
                                    steps=100, batch_size=16, eval_images=32, checkpoint_every=0),
                    out=d / "vq")  # fmt: skip
    make_sentences(SentencesConfig(tokenizer=str(d / "vq"), tasks="colorize,inpaint,segment", sentences=12,
                                   eval_sentences=3, rare_task="segment", rare_fraction=0.1), out=d / "sent")  # fmt: skip
    train_lvm(LVMTrainConfig(sentences=str(d / "sent"), hidden_size=32, intermediate_size=64, layers=1,
                             heads=2, kv_heads=2, batch_size=8, steps=30, eval_every=30,
                             checkpoint_every=0), out=d / "lvm")  # fmt: skip
    return d


def test_tokenizer_round_trip_is_deterministic_and_learnt(work):
    """Catches a broken encoder / decoder / codebook lookup or a collapsed codebook (the PSNR
    stays at the untrained model's, few codes used) and any batch dependence or randomness in
    encode (DeLVM#2-style bad codes)."""
    vq = load_vq(work / "vq")
    from slimkit.lvm.images import load_images

    x = load_images("scenes", 32, 16, seed=99)
    rt = round_trip(vq, x)
    torch.manual_seed(0)
    untrained = round_trip(VQVAE(vq.cfg), x)
    assert rt["psnr"] > untrained["psnr"] + 2.0, (rt, untrained)
    assert rt["codebook_usage"] > 0.4
    a = vq.encode(x)
    assert torch.equal(a, vq.encode(x)) and torch.equal(a[3:4], vq.encode(x[3:4]))
    assert a.shape == (32, 4, 4) and 0 <= int(a.min()) and int(a.max()) < 32
    with pytest.raises(SlimkitError, match="code ids must lie in"):
        vq.decode(torch.full((1, 4, 4), 32))


def test_ema_codebook_is_the_mean_of_its_assigned_vectors():
    """With decay 0 a used code becomes exactly the mean of the encoder outputs assigned to it;
    catches an EMA update that does not move the codebook (or moves it to the wrong mean)."""
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(codebook=8, embed_dim=4, channels=4, image_size=8, decay=0.0)).train()
    vq.initialized.fill_(1)  # keep the random codebook (no data-dependent start)
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        z = vq.encoder(x)
        codes = vq.codes_of(z)
    vq(x)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for k in codes.unique().tolist():
        want = flat[codes.reshape(-1) == k].mean(0)
        assert torch.allclose(vq.codebook[k], want, atol=1e-4)


def test_commitment_term_is_beta_times_the_encoder_to_code_distance():
    """Catches a dropped commitment loss (the encoder's outputs then drift from the codebook)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    losses = {}
    for beta in (0.0, 1.0):
        torch.manual_seed(1)
        vq = VQVAE(VQConfig(codebook=8, embed_dim=4, channels=4, image_size=8, beta=beta)).eval()
        _, loss, parts = vq(x)
        losses[beta] = (float(loss.detach()), parts)
    assert losses[1.0][0] - losses[0.0][0] == pytest.approx(losses[0.0][1]["commit"], rel=1e-5)
    assert losses[0.0][1]["commit"] > 0


def test_dead_codes_restart_next_to_live_codes_the_same_way_on_every_rank():
    """Catches restarts that never fire (collapsed codebooks stay collapsed) and restarts that
    depend on the rank's data (ranks would then diverge)."""
    torch.manual_seed(0)
    vqs = [VQVAE(VQConfig(codebook=8, embed_dim=4, channels=4, image_size=8)) for _ in range(2)]
    vqs[1].load_state_dict(vqs[0].state_dict())
    for vq in vqs:
        vq.usage.copy_(torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0]))
    before = vqs[0].codebook.clone()
    assert vqs[0].restart_dead_codes(step=7) == 6
    vqs[1].restart_dead_codes(step=7)
    assert torch.equal(vqs[0].codebook, vqs[1].codebook)
    cb = vqs[0].codebook
    assert torch.equal(cb[:2], before[:2]) and not torch.equal(cb[2:], before[2:])
    near = torch.cdist(cb[2:], before[:2]).min(1).values
    assert (near < 0.5 * torch.cdist(before[2:], before[:2]).min(1).values).all()
    assert vqs[0].restart_dead_codes(step=8) == 0  # all alive now


def test_a_sentence_decodes_back_to_its_images(work):
    """Catches a wrong token order (pairs, images or raster), a lost BOS or document boundary."""
    vq, data = load_vq(work / "vq"), Sentences(work / "sent")
    sp = data.split("train")
    L = data.meta["sentence_tokens"]
    assert L == 1 + 2 * 2 * 16 and torch.equal(sp["offsets"], torch.arange(len(sp["task"]) + 1) * L)
    for i in (0, len(sp["task"]) - 1):
        s = data.sentence("train", i)
        assert int(s[0]) == data.meta["bos"] and (s[1:] < data.meta["codebook"]).all()
        imgs = to_float(sp["pairs"][i]).reshape(-1, 3, 16, 16)  # in, out, in, out
        assert torch.equal(decode_sentence(vq, s), vq.decode(vq.encode(imgs)))
    counts = data.meta["counts"]["train"]
    assert counts == {"colorize": 12, "inpaint": 12, "segment": 3}  # 10 % of 27 sentences
    assert torch.bincount(sp["task"]).tolist() == [12, 12, 3]


def test_code_0_is_supervised():
    """The reference collator drops every label whose token is <= 0, so VQ code 0 is never
    learnt. Here only padding and (with supervise=targets) input images are ignored."""
    ids = torch.tensor([[9, 0, 0, 3, 0, 0, 5, 0, 1]])  # BOS + two 2-token images x 2
    valid = torch.ones_like(ids, dtype=torch.bool)
    assert torch.equal(sentence_labels(ids, valid, 2, "all"), ids[:, 1:])
    t = sentence_labels(ids, valid, 2, "targets")
    assert t.tolist() == [[IGNORE, IGNORE, 3, 0, IGNORE, IGNORE, 0, 1]]
    valid[0, -2:] = False  # padding is ignored whatever its value
    assert sentence_labels(ids, valid, 2, "all")[0, -2:].tolist() == [IGNORE, IGNORE]


def test_the_trainer_loss_learns_code_0(work):
    """End to end: the task's CE on a sentence of code-0 targets is the CE of every position
    (catches a collator / loss that masks token 0)."""
    cfg = LVMTrainConfig(sentences=str(work / "sent"), hidden_size=16, intermediate_size=32, layers=1, heads=2,
                         kv_heads=1, batch_size=2, steps=1)  # fmt: skip
    task = LVMTask(cfg, torch.device("cpu"))
    ids = torch.zeros(2, 65, dtype=torch.long)
    ids[:, 0] = task.bos
    ce, logits, labels = task._ce(ids)
    assert (labels == 0).all()
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    assert float(ce.detach()) == pytest.approx(float(want.detach()), rel=1e-6)


def test_kd_loss_is_zero_at_masked_positions_and_a_hand_computation_elsewhere():
    """Catches the reference KD bug (KL averaged over ignored positions too), a missing tau^2, a
    swapped KL direction."""
    torch.manual_seed(0)
    s = torch.randn(1, 3, 4, requires_grad=True)
    t = torch.randn(1, 3, 4)
    labels = torch.tensor([[1, IGNORE, 2]])
    for tau, direction in ((1.0, "forward"), (2.0, "forward"), (2.0, "reverse")):
        loss = masked_kd_loss(s, t, labels, tau, direction)
        want = 0.0
        for pos in (0, 2):
            ps = torch.softmax(s[0, pos].detach() / tau, -1).double()
            pt = torch.softmax(t[0, pos] / tau, -1).double()
            p, q = (pt, ps) if direction == "forward" else (ps, pt)
            want += float((p * (p / q).log()).sum())
        assert float(loss) == pytest.approx(want / 2 * tau**2, rel=1e-5)
    (g,) = torch.autograd.grad(masked_kd_loss(s, t, labels), s)
    assert torch.all(g[0, 1] == 0) and g[0, 0].abs().sum() > 0
    t2 = t.clone()
    t2[0, 1] += 100 * torch.randn(4)  # anything at the ignored position changes nothing
    assert float(masked_kd_loss(s, t2, labels)) == float(masked_kd_loss(s, t, labels))


def test_kd_term_reaches_the_loss(work):
    """The student's loss is CE + KL; with kd_weight 0 the KL part vanishes (catches a teacher
    that is loaded but never used)."""
    base = dict(sentences=str(work / "sent"), hidden_size=16, intermediate_size=32, layers=1, heads=2,
                kv_heads=1, batch_size=4, steps=1, teacher=str(work / "lvm"))  # fmt: skip
    ids = Sentences(work / "sent").rows("train")[:4]
    losses = {}
    for w in (0.0, 1.0):
        task = LVMTask(LVMTrainConfig(**base, kd_weight=w), torch.device("cpu"))
        loss, parts = task.loss(ids)
        losses[w] = (float(loss), parts)
    assert losses[1.0][1]["kd"] > 0
    assert losses[1.0][0] == pytest.approx(losses[0.0][0] + losses[1.0][1]["kd"], rel=1e-5)


def test_long_tail_augmentation_brings_the_rare_task_to_parity(work):
    """Catches an augmentation that picks the wrong task, adds nothing, or adds exact copies."""
    cfg = LVMTrainConfig(sentences=str(work / "sent"), hidden_size=16, intermediate_size=32, layers=1, heads=2,
                         kv_heads=1, batch_size=2, steps=1, augment="long-tail")  # fmt: skip
    task = LVMTask(cfg, torch.device("cpu"))
    assert torch.bincount(task.row_task).tolist() == [12, 12, 12] and task.augmented == 9
    original = Sentences(work / "sent").rows("train")
    new = task.rows[len(original) :]
    assert not any(torch.equal(n, o) for n in new for o in original)
    from slimkit.lvm.augment import six_crop

    x, m = torch.rand(3, 16, 16), torch.randint(0, 3, (16, 16))
    xc, mc = six_crop(x, m, 0)  # the top-left 12 x 12 crop, resized back
    assert torch.equal(mc[::4, ::4], m[:12:3, :12:3]) and xc.shape == x.shape


def test_generation_respects_the_token_budget(work):
    """Catches generation that runs past the budget (or emits BOS / ids outside the codebook)."""
    from slimkit.lvm.train import load_lvm

    model, info = load_lvm(work / "lvm")
    seen = []
    orig = model.forward

    def spy(input_ids=None, cache=None, **kw):
        past = cache.get_seq_length() if cache is not None else 0
        seen.append(past + input_ids.shape[1])
        return orig(input_ids=input_ids, cache=cache, **kw)

    model.forward = spy
    prompt = torch.cat([torch.tensor([info["bos"]]), torch.randint(0, 32, (40,))])
    codes = generate_codes(model, prompt, 16, info["codebook"], budget=len(prompt) + 5)
    assert len(codes) == 5 and max(seen) <= len(prompt) + 5
    assert (codes < info["codebook"]).all()
    assert len(generate_codes(model, prompt, 16, info["codebook"])) == 16
    with pytest.raises(SlimkitError, match="leaves no room"):
        generate_codes(model, prompt, 16, info["codebook"], budget=len(prompt))


def test_mask_miou_by_hand():
    a = torch.zeros(3, 4, 4)
    b = torch.zeros(3, 4, 4)
    a[:, :2] = 1  # 8 foreground pixels
    b[:, :1] = 1  # 4, inside a's
    assert mask_miou(a, b) == pytest.approx((4 / 8 + 8 / 12) / 2)
    assert mask_miou(a, a) == 1.0


def test_trained_lvm_loads_in_plain_transformers(work):
    """A process that never imports slimkit loads the model and tokenizer and gives the same
    logits (catches a custom class or a config transformers cannot read)."""
    from slimkit.lvm.train import load_lvm

    model, info = load_lvm(work / "lvm")
    ids = Sentences(work / "sent").rows("test")[:1]
    want = model(input_ids=ids).logits[0, -1]
    code = ("import sys, json, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"d = {str(work / 'lvm')!r}\nm = AutoModelForCausalLM.from_pretrained(d).eval()\n"
            "tok = AutoTokenizer.from_pretrained(d)\nassert 'slimkit' not in sys.modules\n"
            f"ids = torch.tensor([{ids[0].tolist()}])\n"
            "assert tok.convert_tokens_to_ids('<c0>') == 0 and tok.bos_token_id == m.config.vocab_size - 1\n"
            "print(json.dumps([type(m).__name__, m(input_ids=ids).logits[0, -1].tolist()]))\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    name, logits = json.loads(r.stdout.strip().splitlines()[-1])
    assert name == "LlamaForCausalLM"
    assert torch.allclose(torch.tensor(logits), want, atol=1e-4)


def test_slimkit_quantize_accepts_the_lvm(work, tmp_path):
    """W4 GPTQ of the LVM calibrated on its training sentences, perplexity on the test sentences
    (catches a model or a token-shard corpus the LLM pipeline cannot read)."""
    from slimkit.cli import main

    sent = work / "sent"
    rc = main(["quantize", str(work / "lvm"), "--method", "gptq", "--wbits", "4", "--group-size", "16",
               "--calib", f"sentences:{sent}", "--n-calib", "4", "--calib-seq-len", "64",
               "--ppl", f"sentences:{sent}", "--seq-len", "65", "--eval-fp", "--out", str(tmp_path / "w4")])  # fmt: skip
    assert rc == 0
    rep = json.loads((tmp_path / "w4" / "report.json").read_text())
    text = json.dumps(rep)
    assert "sentences:" in text
    ppl = [v for k, v in _walk(rep) if k == "ppl"]
    assert ppl and all(math.isfinite(p) and p < 2 * 33 for p in ppl)


def _walk(d, key=None):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, k)
    elif isinstance(d, list):
        for v in d:
            yield from _walk(v, key)
    else:
        yield key, d


def test_prompt_command_writes_the_answer_and_refuses_odd_examples(work, tmp_path):
    from PIL import Image

    from slimkit.cli import main

    data = Sentences(work / "sent")
    pairs = data.split("test")["pairs"][0]  # [P, 2, 3, S, S] uint8
    files = []
    for j, im in enumerate(pairs.reshape(-1, 3, 16, 16)):
        f = tmp_path / f"{j}.png"
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(f)
        files.append(str(f))
    out = tmp_path / "answer.png"
    args = ["lvm", "prompt", str(work / "lvm"), "--query", files[2], "--out", str(out)]
    assert main([*args, "--examples", ",".join(files[:2]), "--grid", str(tmp_path / "g.png")]) == 0
    assert Image.open(out).size == (16, 16) and (tmp_path / "g.png").is_file()
    assert main([*args, "--examples", ",".join(files[:3])]) == 2
    assert main(["lvm", "prompt", str(work / "lvm"), "--sentences", str(work / "sent"), "--n", "3",
                 "--json", str(tmp_path / "m.json")]) == 0  # fmt: skip
    res = json.loads((tmp_path / "m.json").read_text())
    assert {r["metric"] for r in res.values()} <= {"psnr", "miou"} and res


def _tiny_vqgan_cfg():
    from slimkit.lvm.vqgan import VQGANConfig

    return VQGANConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=32,
                       resolution=16, embed_dim=8, n_embed=16)  # fmt: skip


def test_vqgan_checkpoint_in_taming_layout_loads_with_weights_only(tmp_path):
    """A Lightning-style {"state_dict": ...} of plain tensors with taming's key names (and its
    training-only loss.* keys) loads strictly and becomes a tokenizer directory; a missing key
    or a pickle holding an object is refused. Catches renamed modules (taming's names are the
    contract) and any unpickling of untrusted files."""
    import pickle

    from slimkit.cli import main
    from slimkit.lvm.vqgan import VQGAN, load_vqgan

    cfg = _tiny_vqgan_cfg()
    torch.manual_seed(0)
    ref = VQGAN(cfg).eval()
    sd = dict(ref.state_dict())
    for k in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.mid.attn_1.q.weight", "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.1.upsample.conv.weight",
              "decoder.up.1.attn.0.proj_out.weight", "quantize.embedding.weight", "quant_conv.weight",
              "post_quant_conv.weight"):  # fmt: skip
        assert k in sd, k
    sd["loss.discriminator.main.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd, "global_step": 10}, tmp_path / "last.ckpt")
    (tmp_path / "model.yaml").write_text(
        "model:\n  params:\n    embed_dim: 8\n    n_embed: 16\n    ddconfig:\n      double_z: false\n"
        "      z_channels: 32\n      resolution: 16\n      in_channels: 3\n      out_ch: 3\n      ch: 32\n"
        "      ch_mult: [1, 2]\n      num_res_blocks: 1\n      attn_resolutions: [8]\n      dropout: 0.0\n"
    )
    m = load_vqgan(tmp_path / "last.ckpt", tmp_path / "model.yaml")
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(m.encode(x), ref.encode(x)) and m.encode(x).shape == (2, 8, 8)
    assert main(["lvm", "import-vqgan", str(tmp_path / "last.ckpt"), "--config", str(tmp_path / "model.yaml"),
                 "--out", str(tmp_path / "tok")]) == 0  # fmt: skip
    tok = load_vq(tmp_path / "tok")
    assert type(tok).__name__ == "VQGAN" and torch.equal(tok.encode(x), ref.encode(x))
    assert torch.allclose(tok.decode(tok.encode(x)), ref.decode(ref.encode(x)))
    del sd["quant_conv.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(SlimkitError, match="missing keys"):
        load_vqgan(tmp_path / "broken.pth", tmp_path / "model.yaml")
    marker = tmp_path / "boom"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": _Boom(marker)}))
    with pytest.raises(SlimkitError, match="never unpickles|not a readable"):
        load_vqgan(tmp_path / "evil.pth", tmp_path / "model.yaml")
    assert not marker.exists()


class _Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (Path.touch, (self.marker,))


def test_image_sources_read_a_folder_and_refuse_bad_ones(tmp_path):
    """`--images DIR` crops the folder's files; an empty or missing folder is one clear error."""
    import numpy as np
    from PIL import Image

    from slimkit.lvm.images import load_images

    for i in range(2):
        Image.fromarray(np.full((40, 60, 3), 80 * i, np.uint8)).save(tmp_path / f"{i}.png")
    x = load_images(str(tmp_path), 6, 16, seed=1)
    assert x.shape == (6, 3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x, load_images(str(tmp_path), 6, 16, seed=1))  # seeded
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimkitError, match="no .png"):
        load_images(str(tmp_path / "empty"), 2, 16)
    with pytest.raises(SlimkitError, match="not a directory"):
        load_images(str(tmp_path / "nope"), 2, 16)
