"""Distillation: losses against hand computations, OFA branches, CKA, trainer resume and DDP."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port
from safetensors.torch import load_file

from slimkit.core.errors import SlimkitError
from slimkit.distill import losses as L
from slimkit.distill.cka import cka_matrix, linear_cka
from slimkit.distill.distiller import Distiller
from slimkit.distill.train import DistillConfig, TrainConfig, run_training
from slimkit.vision.models import create_model

ROOT = Path(__file__).resolve().parents[1]
S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
T = torch.tensor([[1.5, 1.0, -0.5], [-1.0, 0.0, 2.0]])
Y = torch.tensor([0, 2])


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_ce_with_label_smoothing_by_hand():
    eps = 0.1
    want = 0.0
    for row, y in zip(S.tolist(), Y.tolist()):
        p = softmax(row)
        want += -(1 - eps) * math.log(p[y]) - eps * sum(math.log(v) for v in p) / 3
    assert L.cross_entropy(S, Y, eps).item() == pytest.approx(want / 2, abs=1e-6)


def test_kd_by_hand_with_temperature():
    tau = 2.0
    want = 0.0
    for s, t in zip(S.tolist(), T.tolist()):
        ps, pt = softmax([v / tau for v in s]), softmax([v / tau for v in t])
        want += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert L.kd_loss(S, T, tau).item() == pytest.approx(want / 2 * tau**2, abs=1e-6)


def test_dkd_by_hand():
    alpha, beta = 1.0, 2.0
    want = 0.0
    for s, t, y in zip(S.tolist(), T.tolist(), Y.tolist()):
        ps, pt = softmax(s), softmax(t)
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        tckd = sum(a * math.log(a / b) for a, b in zip(bt, bs))
        rs = [v for i, v in enumerate(ps) if i != y]
        rt = [v for i, v in enumerate(pt) if i != y]
        rs, rt = [v / sum(rs) for v in rs], [v / sum(rt) for v in rt]
        nckd = sum(a * math.log(a / b) for a, b in zip(rt, rs))
        want += alpha * tckd + beta * nckd
    assert L.dkd_loss(S, T, Y, alpha, beta).item() == pytest.approx(want / 2, abs=1e-6)


def test_dist_by_hand():
    import numpy as np

    ps, pt = F.softmax(S, 1).numpy(), F.softmax(T, 1).numpy()
    inter = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(ps, pt)])
    intra = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(ps.T, pt.T)])
    assert L.dist_loss(S, T).item() == pytest.approx(inter + intra, abs=1e-5)


def test_ofa_weights_and_gamma_one_is_ce_plus_kd():
    g = 1.5
    w = L.ofa_weights(T, Y, g)
    pt = F.softmax(T, 1)
    assert w[0, 0].item() == pytest.approx((1 + pt[0, 0].item()) ** g - 1, abs=1e-6)
    assert w[0, 1].item() == pytest.approx(pt[0, 1].item() ** g, abs=1e-6)
    # gamma = 1: w = p_t, so the OFA term is CE(p_t, p_s) = KD at tau 1 + H(p_t), and the
    # OFA objective without branches (ce + ofa) is CE + KD up to that constant
    entropy = -(pt * pt.log()).sum(1).mean()
    assert L.ofa_loss(S, T, Y, 1.0).item() == pytest.approx(
        (L.kd_loss(S, T, 1.0) + entropy).item(), abs=1e-6
    )
    b = L.Batch(labels=Y, student_logits=S, teacher_logits=T)
    st = L.LossSettings(ofa_gamma=1.0)
    ofa, _ = L.total_loss(L.parse_losses("ofa"), b, st)
    ce_kd, _ = L.total_loss(L.parse_losses("kd"), b, st)
    assert ofa.item() == pytest.approx((ce_kd + entropy).item(), abs=1e-6)


def test_losses_finite_at_fp16_range_logits():
    s = torch.tensor([[60.0, -60.0, 0.0]]).half()
    t = torch.tensor([[-60.0, 60.0, 0.0]]).half()
    y = torch.tensor([0])
    for v in (
        L.ofa_loss(s, t, y, 1.4),
        L.kd_loss(s, t),
        L.dkd_loss(s, t, y),
        L.cross_entropy(s, y, 0.1),
    ):
        assert torch.isfinite(v)


def test_parse_losses():
    assert L.parse_losses("ofa") == {"ce": 1.0, "ofa": 1.0}
    assert L.parse_losses("ce=1,kd=0.5") == {"ce": 1.0, "kd": 0.5}
    with pytest.raises(SlimkitError, match="unknown distillation loss"):
        L.parse_losses("crd")
    with pytest.raises(SlimkitError, match="not a number"):
        L.parse_losses("kd=x")


@pytest.mark.parametrize("arch", ["tiny-resnet", "tiny-vit", "tiny-mixer", "tiny-swin"])
def test_ofa_branches_give_logits_for_every_stage(arch):
    student = create_model(arch, num_classes=7, in_chans=1, img_size=32)
    teacher = create_model("tiny-resnet", num_classes=7, in_chans=1, img_size=32)
    d = Distiller(student, teacher, {"ce": 1, "ofa": 1}, 7, 1, 32)
    b = d(torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 2]))
    assert len(b.branch_logits) == 4 and all(z.shape == (3, 7) for z in b.branch_logits)
    loss, parts = L.total_loss({"ce": 1, "ofa": 1}, b, L.LossSettings())
    loss.backward()
    assert all(p.grad is not None for p in d.branches.parameters())
    assert not any(k.startswith("branches") for k in student.state_dict())


def test_cka_self_orthogonal_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    y = x @ torch.randn(20, 8, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        64, 8, generator=g, dtype=torch.float64
    )
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x @ q * 3.0, y) == pytest.approx(linear_cka(x, y), abs=1e-9)
    assert linear_cka(x, torch.randn(64, 20, generator=g, dtype=torch.float64)) < 0.5


def test_cka_matrix_of_a_model_with_itself_has_unit_diagonal():
    m = create_model("tiny-resnet", num_classes=10, in_chans=1, img_size=32)
    x = torch.randn(40, 1, 32, 32)
    cka = cka_matrix(m, m, x, batch_size=20)
    assert torch.allclose(cka.diagonal(), torch.ones(4), atol=1e-5)


def small(cfg_cls, **kw):
    base = dict(data="digits", epochs=2, batch_size=32, train_subset=96, warmup_epochs=0.5)
    return cfg_cls(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kd") / "teacher"
    run_training(small(TrainConfig, arch="tiny-vit", epochs=1), out=out)
    return out


def test_distilled_student_is_saved_without_branches(tmp_path, teacher_run):
    r = run_training(small(DistillConfig, arch="tiny-resnet", teacher=str(teacher_run), loss="ofa"),
                     out=tmp_path / "s")  # fmt: skip
    assert r["training_only_parameters"] > 0
    saved = load_file(tmp_path / "s" / "model.safetensors")
    plain = create_model("tiny-resnet", num_classes=10, in_chans=1, img_size=32)
    assert saved.keys() == plain.state_dict().keys()
    plain.load_state_dict(saved)  # strict: exactly the plain timm model
    assert sum(p.numel() for p in plain.parameters()) == r["student_parameters"]
    assert set(r["best"]) >= {"top1", "top5", "epoch"} and len(r["history"]) == 2


def test_resume_after_a_crash_is_exact(tmp_path, teacher_run, monkeypatch):
    from conftest import Crash

    import slimkit.distill.train as tr

    cfg = small(DistillConfig, arch="tiny-resnet", teacher=str(teacher_run), loss="ce,kd", epochs=3)
    run_training(cfg, out=tmp_path / "full")
    calls = {"n": 0}
    original = tr.evaluate

    def crash_in_third_eval(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash
        return original(*a, **k)

    monkeypatch.setattr(tr, "evaluate", crash_in_third_eval)
    with pytest.raises(Crash):
        run_training(cfg, out=tmp_path / "cut")
    monkeypatch.undo()
    run_training(cfg, out=tmp_path / "cut", resume=True)
    a, b = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs():
    with pytest.raises(SlimkitError, match="unknown model"):
        create_model("no-such-net", num_classes=2)
    with pytest.raises(SlimkitError, match="needs --teacher"):
        run_training(small(DistillConfig, arch="tiny-resnet", loss="kd"), out="/tmp/never-written")
    with pytest.raises(SlimkitError, match="unknown image dataset"):
        run_training(small(TrainConfig, data="nope"), out="/tmp/never-written")


def test_distill_under_torchrun_matches_one_process(tmp_path, teacher_run):
    """Two ranks each take half of every global batch; with a BatchNorm-free student and
    batch-decomposable losses, DDP's averaged gradient equals the one-process gradient."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["distill", "--arch", "tiny-vit", "--data", "digits", "--epochs", "1", "--batch-size", "32",
            "--train-subset", "64", "--teacher", str(teacher_run), "--loss", "ce,kd", "--shift", "0"]  # fmt: skip
    one = [sys.executable, "-m", "slimkit", *args, "--out", str(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "slimkit", *args, "--out", str(tmp_path / "two")]  # fmt: skip
    for cmd in (one, two):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_image_sets_are_deterministic_and_split_cleanly(tmp_path):
    import numpy as np

    from slimkit.vision.data import draw_shapes, load_images, random_shift, stratified_split

    a, ya = draw_shapes(40, 16, seed=3)
    b, yb = draw_shapes(40, 16, seed=3)
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and len(set(ya.tolist())) == 8
    assert not np.array_equal(a, draw_shapes(40, 16, seed=4)[0])
    y = np.repeat(np.arange(4), 25)
    tr, te = stratified_split(y, 0.2)
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == 100
    assert all((y[te] == c).sum() == 5 for c in range(4))
    d = load_images("digits", 16)
    assert (d.num_classes, d.in_chans, d.img_size) == (10, 1, 16) and len(d.test) == 599
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)
    shifted = random_shift(x.repeat(8, 1, 1, 1), 1, torch.Generator().manual_seed(0))
    assert all((s == 0).sum() in (0, 4, 7) for s in shifted)  # zero rows / columns came in
    assert any((s == 0).sum() > 0 for s in shifted)
    with pytest.raises(SlimkitError, match="not a directory"):
        load_images(f"imagefolder:{tmp_path / 'none'}")
