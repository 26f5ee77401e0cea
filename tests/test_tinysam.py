"""TinySAM: distillation losses, hard prompt sampling, hard mask weighting, the embedding cache,
Q-TinySAM W8A8 and its int8 safetensors round trip. (Resume / NaN roll-back / gloo of the
``sam-distill`` trainer are enrolled in tests/test_trainer.py.)"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.sam.tinysam import losses as L
from slimkit.sam.tinysam import quant as Q
from slimkit.sam.tinysam.prompts import sample_error_points
from slimkit.sam.tinysam.train import DistillConfig, SamDistillTask, tiny_teacher

# ---------------------------------------------------------------- losses vs hand computations


def test_embedding_token_and_output_losses_by_hand():
    # catches: l1 replaced by MSE (or the reverse), a sum instead of a mean, per-prompt terms
    # averaged over the wrong axis
    s = torch.tensor([[[[1.0, -2.0]]]])
    t = torch.tensor([[[[0.0, 1.0]]]])
    assert float(L.embedding_loss(s, t, "l1")) == pytest.approx((1 + 3) / 2)
    assert float(L.embedding_loss(s, t, "mse")) == pytest.approx((1 + 9) / 2)
    st = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    tt = torch.zeros(2, 2, 2)
    assert L.token_loss(st, tt).tolist() == pytest.approx([2.5, 0.0])
    so = torch.tensor([[[[2.0]], [[-4.0]], [[0.0]]]])
    assert L.output_loss(so, torch.zeros_like(so)).tolist() == pytest.approx([2.0])
    with pytest.raises(SlimkitError, match="embedding loss"):
        L.embedding_loss(s, t, "kl")


def test_focal_dice_and_iou_l1_by_hand():
    # catches: a wrong focal modulation (gamma / alpha), dice without its +1 smoothing, and an
    # IoU target computed from probabilities instead of binarised masks
    logits = torch.tensor([[[[2.0, -1.0]], [[-3.0, 0.5]]]])  # K=1, M=2, 1x2
    target = torch.tensor([[[1.0, 0.0]]])
    focal, dice = L.focal_dice(logits, target)

    def fl(z, y):
        p = 1 / (1 + math.exp(-z))
        ce = -math.log(p) if y else -math.log(1 - p)
        pt = p if y else 1 - p
        return (0.25 if y else 0.75) * (1 - pt) ** 2 * ce

    for m, (z0, z1) in enumerate([(2.0, -1.0), (-3.0, 0.5)]):
        assert float(focal[0, m]) == pytest.approx((fl(z0, 1) + fl(z1, 0)) / 2, rel=1e-5)
        p0, p1 = 1 / (1 + math.exp(-z0)), 1 / (1 + math.exp(-z1))
        assert float(dice[0, m]) == pytest.approx(1 - (2 * p0 + 1) / (p0 + p1 + 1 + 1), rel=1e-5)
    iou_pred = torch.tensor([[0.9, 0.2]])
    # mask 0 = {pixel 0} == target -> IoU 1; mask 1 = {pixel 1} vs {pixel 0} -> IoU 0
    assert L.iou_l1(iou_pred, logits, target)[0].tolist() == pytest.approx([0.1, 0.2])


def test_hard_mask_weight_by_hand():
    # catches: teacher and student swapped (the paper's prose does so), a missing "- 1", or the
    # weight taken from one fixed mask instead of each model's best of three
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    big, small = 5.0, -5.0
    t_logits = torch.tensor([[[[big, big, small, small]], [[small] * 4], [[small] * 4]]])  # IoU 1
    s_logits = torch.tensor([[[[small] * 4], [[big, small, small, small]], [[small] * 4]]])  # 0.5
    h = L.hard_mask_weights(t_logits, s_logits, target, eps=1e-6)
    assert float(h[0]) == pytest.approx(1 / (1 + math.exp(-(1 / (0.5 + 1e-6) - 1))), rel=1e-5)
    assert float(L.hard_mask_weights(t_logits, t_logits, target)[0]) == pytest.approx(0.5, abs=1e-5)
    worse = L.hard_mask_weights(s_logits, t_logits, target)  # student better than teacher
    assert 1 / (1 + math.e) <= float(worse[0]) < 0.5


# ---------------------------------------------------------------- hard prompt sampling


def test_sampler_draws_only_from_error_pixels():
    # property test over random masks; catches: points drawn from the whole image or the ground
    # truth, labels not taken from the ground truth at the point, and a point drawn although the
    # prediction is already right (must be padding, label -1)
    rng = np.random.default_rng(0)
    for trial in range(200):
        k, h, w = 3, int(rng.integers(1, 12)), int(rng.integers(1, 12))
        gt = rng.random((k, h, w)) < rng.random()
        pred = rng.random((k, h, w)) < rng.random()
        if trial % 7 == 0:
            pred[0] = gt[0]  # no error left in mask 0
        for region in ("xor", "fn"):
            c, lab = sample_error_points(gt, pred, rng, region)
            for i in range(k):
                err = gt[i] ^ pred[i] if region == "xor" else gt[i] & ~pred[i]
                if not err.any():
                    assert lab[i] == -1
                    continue
                x, y = int(c[i, 0]), int(c[i, 1])
                assert err[y, x] and lab[i] == int(gt[i, y, x])
                if region == "fn":
                    assert lab[i] == 1


def _task(tmp_path, **kw):
    cfg = DistillConfig(teacher=str(tiny_teacher(tmp_path / "teacher")), scenes=4, batch_size=2,
                        prompts_per_image=2, val_scenes=1, device="cpu", **kw)  # fmt: skip
    return SamDistillTask(cfg, torch.device("cpu"))


def test_hard_points_add_error_region_points_per_round(tmp_path):
    # catches: extra rounds that ignore the per-prompt draw of the number of rounds, or points
    # whose label disagrees with the ground truth
    task = _task(tmp_path, hard_prompts=True, max_rounds=4)
    img, masks = task.scene(0)
    gt = np.stack(masks[:3])
    coords0 = np.stack([np.argwhere(m)[0][::-1] for m in gt]).astype(np.float32)[:, None]
    emb = task.model.image_encoder(
        task.model.preprocess(torch.as_tensor(img).permute(2, 0, 1)[None].float())
    )
    rng = np.random.default_rng(3)
    rounds = np.random.default_rng(3).integers(0, 5, 3)
    coords, labels = task.hard_points(emb.detach(), gt, coords0, rng)
    assert coords.shape == (3, 1 + rounds.max(), 2)
    real = (labels[:, 1:] != -1).sum(1)
    assert (real <= rounds).all() and real.sum() > 0
    for k in range(3):
        for (x, y), lab in zip(coords[k], labels[k]):
            if lab != -1:
                assert lab == int(gt[k, int(y), int(x)])


def test_total_loss_combines_every_weighted_term(tmp_path, monkeypatch):
    # each defining piece of the objective: removing a term (or its weight, or the hard mask
    # weight) changes this sum; catches a term dropped or weighted twice in the composition
    consts = {
        "emb": 0.5,
        "tok": 0.25,
        "out": 2.0,
        "focal": 0.01,
        "dice": 0.3,
        "iou": 0.125,
        "h": 0.7,
    }
    monkeypatch.setattr(L, "embedding_loss", lambda s, t, kind: (s * 0).sum() + consts["emb"])
    monkeypatch.setattr(L, "token_loss", lambda s, t: s.flatten(1)[:, 0] * 0 + consts["tok"])
    monkeypatch.setattr(L, "output_loss", lambda s, t: s.flatten(1)[:, 0] * 0 + consts["out"])
    monkeypatch.setattr(
        L,
        "focal_dice",
        lambda lg, t: (
            lg.flatten(2)[..., 0] * 0 + consts["focal"],
            lg.flatten(2)[..., 0] * 0 + consts["dice"],
        ),
    )
    monkeypatch.setattr(L, "iou_l1", lambda p, lg, t: p * 0 + consts["iou"])
    monkeypatch.setattr(
        L, "hard_mask_weights", lambda t, s, g: s.flatten(1)[:, 0] * 0 + consts["h"]
    )
    w = {
        "w_embedding": 2.0,
        "w_token": 3.0,
        "w_output": 5.0,
        "w_focal": 7.0,
        "w_dice": 11.0,
        "w_iou": 13.0,
    }
    for hmw in (False, True):
        task = _task(tmp_path, hard_mask_weighting=hmw, **w)
        loss, parts = task.loss((0, [0, 1], None))
        h = consts["h"] if hmw else 1.0
        per_prompt = (w["w_token"] * consts["tok"] + w["w_output"] * h * consts["out"]
                      + w["w_focal"] * consts["focal"] + w["w_dice"] * consts["dice"]
                      + w["w_iou"] * consts["iou"])  # fmt: skip
        assert float(loss) == pytest.approx(w["w_embedding"] * consts["emb"] + per_prompt, rel=1e-6)
    emb_only = _task(tmp_path, mode="embedding", **w)
    loss, _ = emb_only.loss((0, [0, 1], None))
    assert float(loss) == pytest.approx(w["w_embedding"] * consts["emb"])


def test_embedding_mode_trains_only_the_encoder_and_decoder_starts_from_teacher(tmp_path):
    # catches: MobileSAM's recipe that still updates the decoder, or a student decoder that
    # does not start from the teacher's
    task = _task(tmp_path, mode="embedding")
    assert not any(p.requires_grad for p in task.model.mask_decoder.parameters())
    assert all(p.requires_grad for p in task.model.image_encoder.parameters())
    for k, v in task.teacher.mask_decoder.state_dict().items():
        torch.testing.assert_close(task.model.mask_decoder.state_dict()[k], v)


# ---------------------------------------------------------------- embedding cache


def test_cache_matches_the_teacher_and_a_stale_cache_is_refused(tmp_path):
    # catches: cached targets that differ from the teacher's embeddings, and a cache made from
    # another teacher (or another image list) silently used
    from slimkit.sam.tinysam.cache import CacheConfig, cache_embeddings

    teacher = tiny_teacher(tmp_path / "teacher")
    cache_embeddings(CacheConfig(teacher=str(teacher), scenes=4, shard_size=3, device="cpu"),
                     out=tmp_path / "emb")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]  # fmt: skip
    cached = _task(tmp_path, embeddings=str(tmp_path / "emb"))
    plain = _task(tmp_path)
    torch.manual_seed(0)
    a = cached.loss((0, [0, 3], None))[0]
    b = plain.loss((0, [0, 3], None))[0]
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    with pytest.raises(SlimkitError, match="stale"):  # another image list
        _task(tmp_path, embeddings=str(tmp_path / "emb")).__class__(
            DistillConfig(teacher=str(teacher), scenes=5, embeddings=str(tmp_path / "emb")),
            torch.device("cpu"),
        )
    other = tiny_teacher(tmp_path / "other", seed=1)
    with pytest.raises(SlimkitError, match="stale"):
        SamDistillTask(DistillConfig(teacher=str(other), scenes=4, embeddings=str(tmp_path / "emb")),
                       torch.device("cpu"))  # fmt: skip
    bad = tmp_path / "pickled.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": Path("x")}, bad)
    with pytest.raises(SlimkitError):
        SamDistillTask(DistillConfig(teacher=str(bad), scenes=4), torch.device("cpu"))


# ---------------------------------------------------------------- Q-TinySAM


def test_twin_uniform_quantizers_by_hand():
    # catches: a twin-softmax that uses one step for both ranges, and a post-GELU quantizer whose
    # negative part is calibrated (or clipped to zero) instead of the fixed 0.16997 / 128 step
    s = torch.tensor(0.001)
    x = torch.tensor([0.0004, 0.05, 0.5, 1.0])
    y = Q.fq_twin_softmax(x, s, 8)
    assert y[0] == pytest.approx(0.0)  # fine step: round(0.4) = 0
    assert y[1] == pytest.approx(0.05, abs=1e-7)  # 50 fine steps
    assert y[2] == pytest.approx(round(0.5 * 127) / 127)  # above the split: 1/127 grid
    assert y[3] == pytest.approx(1.0)
    g = Q.fq_twin_gelu(torch.tensor([-0.17, -0.05, 0.3, 10.0]), torch.tensor(0.01), 8)
    neg = 0.16997 / 128
    assert g[0] == pytest.approx(-128 * neg) and g[1] == pytest.approx(round(-0.05 / neg) * neg)
    assert g[2] == pytest.approx(0.3) and g[3] == pytest.approx(1.27)
    # on softmax-like data the twin quantizer beats one uniform grid
    p = torch.softmax(torch.randn(64, 64) * 3, -1).flatten()
    uni = Q.fq_uniform(p, p.max() / 127, 8)
    twin = Q.fq_twin_softmax(p, Q.search_step(p, "twin_softmax", 8, 50), 8)
    assert (twin - p).pow(2).sum() < (uni - p).pow(2).sum() / 4


def test_quantized_model_reloads_identically_with_int8_weights(tmp_path, one_thread):
    # catches: scales or codes lost in the file (outputs differ after reload), weights stored as
    # floats, activation quantizers not re-attached, and any pickle in the output
    from safetensors.torch import load_file

    from slimkit.sam.train import load_trained

    run = tiny_teacher(tmp_path / "teacher")
    # the encoder's linears alone (the decoder's linears are counted in the next test, the
    # convolutions in tests/test_q_tinysam_convs.py)
    cfg = Q.SamQuantConfig(calib_images=2, search_points=10, decoder=False, search="minmax",
                           quantize_convs=False)  # fmt: skip
    Q.quantize_sam(run, cfg, out=tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "quant.json", "quant.safetensors", "sam_config.json"]  # fmt: skip
    t = load_file(str(tmp_path / "q" / "quant.safetensors"))
    ints = [k for k, v in t.items() if v.dtype == torch.int8]
    assert len(ints) == 4 * 4  # 4 blocks x (qkv, proj, lin1, lin2)
    model = load_trained(run)
    Q.quantize_model(model, cfg)
    loaded = Q.load_quantized(tmp_path / "q")
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        a, b = model.image_encoder(x), loaded.image_encoder(x)
        fp = load_trained(run).image_encoder(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert 0 < float((a - fp).abs().max())  # the activations really are quantized
    w = loaded.image_encoder.blocks[0].attn.qkv.weight
    assert len(torch.unique(w[0])) <= 256


def test_twin_gelu_beats_one_uniform_grid_on_post_gelu_activations():
    # catches: a post-GELU quantizer that spends half of its codes on GELU's tiny negative range
    # (one signed grid over [-max, max]) instead of the fixed fine step there
    x = torch.nn.functional.gelu(torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 2)
    uni = Q.fq_uniform(x, Q.search_step(x, "uniform", 8, 50), 8)
    twin = Q.fq_twin_gelu(x, Q.search_step(x, "twin_gelu", 8, 50), 8)
    assert (twin - x).pow(2).sum() < (uni - x).pow(2).sum() / 1.5


def test_task_aware_search_weights_the_output_error_by_the_task_gradient():
    # catches: a "task" search that ignores g (then it equals the plain MSE search) and a search
    # that can return steps worse than min-max for its own objective
    torch.manual_seed(0)
    a = torch.randn(256, 16)
    a[:8] *= 6  # a few outlier tokens: the MSE search keeps them on the grid ...
    w = torch.randn(8, 16)
    g = torch.ones(256, 8)
    g[:8] = 0.01  # ... but the task loss hardly depends on them: clip them, refine the rest
    p = Q.Place("linear", "l", "l", "l", "uniform")
    cfg = dict(wbits=4, abits=4, search_points=60, rounds=2)
    sa_m, sw_m = Q.search_place(p, a, w, g, Q.SamQuantConfig(search="mse", **cfg))
    sa_t, sw_t = Q.search_place(p, a, w, g, Q.SamQuantConfig(search="task", **cfg))
    sa_0, sw_0 = Q.search_place(p, a, w, g, Q.SamQuantConfig(search="minmax", **cfg))
    assert sa_t < sa_m / 2  # a finer grid that clips the outliers

    def task_err(sa, sw):
        o_hat = Q.fq_uniform(a, sa, 4) @ Q.fq_uniform(w, sw, 4).T
        return float(((a @ w.T - o_hat) * g).pow(2).sum())

    def mse(sa, sw):
        return float((a @ w.T - Q.fq_uniform(a, sa, 4) @ Q.fq_uniform(w, sw, 4).T).pow(2).sum())

    assert task_err(sa_t, sw_t) < 0.8 * task_err(sa_m, sw_m)
    assert task_err(sa_t, sw_t) <= task_err(sa_0, sw_0) and mse(sa_m, sw_m) <= mse(sa_0, sw_0)
    assert sw_t.shape == (8, 1) and not torch.allclose(sw_t, sw_0)  # per-channel weight search


def test_task_search_gives_a_lower_task_distance_than_mse_search(
    tmp_path, one_thread, search_distances
):
    # catches: the task gradients not reaching the search (wrong rows, lost Fisher sampling), on a
    # fixed model and calibration set at W4A4 where the differences are visible
    dist = search_distances(tiny_teacher(tmp_path / "teacher"))
    assert dist["task"] < 0.9 * dist["mse"], dist


def test_decoder_and_matmuls_are_quantized_and_reload_identically(tmp_path, one_thread):
    # catches: decoder linears left in float, matmul operands (q, k, probabilities, v) without a
    # quantizer, steps of those places lost in the file, and a decoder that reloads differently
    from safetensors.torch import load_file

    run = tiny_teacher(tmp_path / "teacher")
    cfg = Q.SamQuantConfig(calib_images=2, search_points=8, rounds=1, max_rows=128)
    r = Q.quantize_sam(run, cfg, out=tmp_path / "q")
    assert r["calib_task_kl"] > 0
    t = load_file(str(tmp_path / "q" / "quant.safetensors"))
    ints = {k for k, v in t.items() if v.dtype == torch.int8}
    assert "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight.int8" in ints
    assert "mask_decoder.iou_prediction_head.layers.0.weight.int8" in ints
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    for att in ("image_encoder.blocks.1.attn", "mask_decoder.transformer.layers.1.self_attn"):
        for op in ("q_in", "k_in", "softmax_out", "v_in"):
            assert f"{att}.{op}" in meta["acts"] and f"act.{att}.{op}.step" in t
    assert meta["acts"]["image_encoder.blocks.0.attn.softmax_out"] == "twin_softmax"
    assert meta["acts"]["mask_decoder.transformer.layers.0.mlp.lin2"] == "uniform"  # ReLU there

    from slimkit.sam.train import load_trained

    model = load_trained(run)
    calib = Q.calibration_set(model, 2, cfg.calib_prompts)
    Q.quantize_model(model, cfg, calib)
    loaded = Q.load_quantized(tmp_path / "q")
    fp = load_trained(run)
    with torch.no_grad():
        emb = loaded.image_encoder(calib[0][:1])
        pts = calib[1][0][:2]
        a, b = model.decode(emb, points=pts), loaded.decode(emb, points=pts)
        c = fp.decode(emb, points=pts)  # FP decoder on the same embedding
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float((a[0] - c[0]).abs().max()) > 0  # the decoder itself is quantized


def test_int8_kernels_match_fake_quant(tmp_path, one_thread):
    # catches: an integer path with a wrong scale (per channel x activation step), a twin-GELU
    # input rounded on one grid, and a silent fallback that never runs torch._int_mm
    run = tiny_teacher(tmp_path / "teacher")
    cfg = Q.SamQuantConfig(
        calib_images=2, search="minmax", decoder=False, matmuls=False, quantize_convs=False
    )  # the linears' kernels; convs: test_q_tinysam_convs
    Q.quantize_sam(run, cfg, out=tmp_path / "q")
    fake = Q.load_quantized(tmp_path / "q")
    real = Q.load_quantized(tmp_path / "q", int8_kernels=True)
    kinds = {type(m).__name__ for m in real.image_encoder.modules()}
    assert "Int8Linear" in kinds
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        a, b = fake.image_encoder(x), real.image_encoder(x)
    # float sums in another order flip a few codes downstream: close, not bit-identical
    assert float((a - b).abs().max()) < 0.02 * float(a.abs().max())
    assert Q.int8_kernel_report(real) == {"int_mm": 16}
    for name, kind in (("attn.qkv", "uniform"), ("mlp.lin2", "twin_gelu")):
        f = fake.image_encoder.blocks[0].get_submodule(name)
        r = real.image_encoder.blocks[0].get_submodule(name)
        assert r.kind == kind
        h = torch.randn(64, f.in_features) * 0.5
        with torch.no_grad():  # one layer: fake quant (hook + dequantized weight) = int path
            torch.testing.assert_close(r(h), f(h), rtol=1e-4, atol=1e-4)


def test_q_tinysam_is_dispatched_by_the_one_compression_registry(one_thread):
    # catches: Q-TinySAM living outside slimkit.compress (a second, parallel registry)
    import slimkit
    from slimkit.llm.compress import method_for_config
    from slimkit.sam.model import build_sam

    cfg = Q.SamQuantConfig(calib_images=1, calib_prompts=2, search_points=4, rounds=1,
                           search="mse", decoder=False, max_rows=64, quantize_convs=False)  # fmt: skip
    assert method_for_config(cfg) == "q-tinysam"
    torch.manual_seed(0)
    model, result = slimkit.compress(build_sam("vit_mini"), cfg)
    assert result["method"] == "q-tinysam" and result["scheme"] == "W8A8-twin-mse"
    assert len(result.records) == 16 and result.quantization["act_params"]


# ---------------------------------------------------------------- evaluation and SA-1B


def test_everything_matching_counts_one_to_one_at_iou_half():
    # catches: a ground-truth instance matched twice (duplicates counted as hits), matches below
    # IoU 0.5, and recall / precision computed over the wrong denominators
    from slimkit.sam.tinysam.evaluate import match_instances

    g1 = np.zeros((10, 10), bool)
    g1[:5, :5] = True  # 25 px
    g2 = np.zeros((10, 10), bool)
    g2[6:, 6:] = True  # 16 px
    g3 = np.zeros((10, 10), bool)
    g3[0, 9] = True
    p_dup = g1.copy()
    p_good = g1.copy()
    p_good[5, :5] = True  # IoU 25 / 30
    p_half = g2.copy()
    p_half[6:, :8] = True  # IoU 16 / 40 < 0.5
    assert match_instances([p_good, p_dup, p_half], [g1, g2, g3]) == (1, 3, 3)
    p_g2 = g2.copy()
    p_g2[5, 6:] = True  # IoU 16 / 20
    assert match_instances([p_g2, p_good], [g1, g2, g3]) == (2, 2, 3)
    assert match_instances([], [g1]) == (0, 0, 1)


def test_complexity_counts_macs_by_hand(one_thread):
    # catches: FLOPs reported as MACs (a factor 2), attention matmuls or the neck left out
    from slimkit.sam.model import build_sam
    from slimkit.sam.tinysam.evaluate import complexity

    m = build_sam("vit_mini")  # 256 px, 16 x 16 tokens, dim 128, 4 blocks, neck to 64 channels
    c = complexity(m)
    patch = 3 * 16 * 16 * 128 * 256
    linears = 256 * (128 * 384 + 128 * 128 + 2 * 128 * 512) * 4
    neck = 128 * 64 * 256 + 64 * 64 * 9 * 256
    window_attn = 16 * 4 * (2 * 16 * 16 * 32 + 2 * 4 * 4 * 4 * 32)  # windows x heads
    global_attn = 4 * (2 * 256 * 256 * 32 + 2 * 16 * 16 * 16 * 32)  # heads
    assert c["macs_encoder"] == patch + linears + neck + 2 * window_attn + 2 * global_attn
    assert c["flops_encoder"] == 2 * c["macs_encoder"]
    assert c["params_encoder"] == sum(p.numel() for p in m.image_encoder.parameters())
    assert 0 < c["macs_decoder_per_prompt"] < c["macs_encoder"]


def _write_sa1b(d: Path) -> list[np.ndarray]:
    """An SA-1B folder in the official layout: sa_1.jpg beside sa_1.json (COCO RLE strings)."""
    from PIL import Image

    mu = pytest.importorskip("pycocotools.mask")
    d.mkdir(parents=True)
    h, w = 60, 80
    masks = []
    for x0, y0, x1, y1 in ((5, 5, 30, 25), (40, 10, 75, 50), (10, 35, 30, 58)):
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        m[y0 + 3, x0 + 2] = False  # a hole: more than one run per column
        masks.append(m)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(d / "sa_1.jpg")
    anns = []
    for i, m in enumerate(masks):
        rle = mu.encode(np.asfortranarray(m.astype(np.uint8)))
        ys, xs = np.nonzero(m)
        anns.append({"id": i, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                     "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                     "area": int(m.sum()), "point_coords": [[float(xs.mean()), float(ys.mean())]],
                     "predicted_iou": 0.9, "stability_score": 0.95,
                     "crop_box": [0, 0, w, h]})  # fmt: skip
    info = {"image_id": 1, "file_name": "sa_1.jpg", "width": w, "height": h}
    (d / "sa_1.json").write_text(json.dumps({"image": info, "annotations": anns}))
    return masks


def test_sa1b_rle_decodes_to_the_masks_written_with_and_without_pycocotools(tmp_path, monkeypatch):
    # catches: row-major instead of column-major RLE, a broken own decoder for the compressed
    # strings (the path without pycocotools), and masks not letterboxed with the image
    import builtins

    from slimkit.sam.sa1b import decode_rle, load_sa1b_folder, read_sa1b_json

    masks = _write_sa1b(tmp_path / "sa1b")
    _, anns = read_sa1b_json(tmp_path / "sa1b" / "sa_1.json")
    for a, m in zip(anns, masks):
        assert np.array_equal(decode_rle(a["segmentation"]), m)
    real_import = builtins.__import__

    def no_pycocotools(name, *args, **kw):
        if name.startswith("pycocotools"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pycocotools)
    for a, m in zip(anns, masks):
        assert np.array_equal(decode_rle(a["segmentation"]), m)
    monkeypatch.undo()
    [(img, got)] = load_sa1b_folder(tmp_path / "sa1b", 160)
    assert img.shape == (160, 160, 3) and len(got) == 3
    assert got[0][10:50, 10:60].sum() > 0.9 * 40 * 50 and not got[0][130:].any()  # 2x, padded
    with pytest.raises(SlimkitError, match="no SA-1B annotation files"):
        load_sa1b_folder(tmp_path, 160)


def test_eval_reads_sa1b_and_reports_everything_and_complexity_columns(tmp_path, one_thread):
    # catches: --data sa1b: not reaching the reader, everything mode missing from sam eval, and
    # the complexity columns missing or unlabelled
    from slimkit.sam.tinysam.evaluate import EvalConfig, evaluate_model

    _write_sa1b(tmp_path / "sa1b")
    run = tiny_teacher(tmp_path / "teacher")
    cfg = EvalConfig(data=f"sa1b:{tmp_path / 'sa1b'}", prompts="box,everything",
                     points_per_side=8, everything_mode="dense")  # fmt: skip
    r = evaluate_model(run, cfg)
    assert r["images"] == 1 and r["instances"] == 3 and "miou_1pt" not in r
    assert 0 <= r["miou_box"] <= 1 and 0 <= r["everything_recall"] <= 1
    assert r["everything_prompts_per_image"] == 64 and r["everything_seconds_per_image"] > 0
    assert r["flops_encoder"] == 2 * r["macs_encoder"] and r["params_decoder"] > 0
    with pytest.raises(SlimkitError, match="--prompts"):
        EvalConfig(prompts="points")
    with pytest.raises(SlimkitError, match="--data"):
        EvalConfig(data="sa1b")
