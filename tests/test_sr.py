"""SAM-DiffSR / SRDiff (slimkit.sr): the modulated forward process, the residual target, the
mask-free sampler, the structural position encoding, aligned crops, the metric protocols, the
official checkpoint layout, and the ``slimkit sr`` commands end to end on tiny models."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.sr import diffusion as D
from slimkit.sr.data import HRImage, PairedPatches, e_maps_for, load_hr_images, make_pair
from slimkit.sr.degrade import degrade, imresize
from slimkit.sr.metrics import psnr_ssim, rgb_to_y
from slimkit.sr.models import RRDBNet, SRDiff, SRModelConfig, Unet, load_official, load_run
from slimkit.sr.structural_position_encoding import encode_labels, encode_masks, rope_pattern

TINY = SRModelConfig(
    rrdb_blocks=2, rrdb_feat=8, rrdb_growth=4, hidden=8, dim_mults=[1, 2], timesteps=20
)


# ---------------------------------------------------------------------------------------
# schedule, modulated forward process, residual target
# ---------------------------------------------------------------------------------------
def test_mask_coefficient_matches_the_spec_table():
    """c_t = sqrt(1 - abar_t) beta_t and the x_t mean shift (1 - abar_t) beta_t on T = 100 cosine
    against the spec's measured table; catches a missing or different coefficient (e.g. beta_t
    alone, or sqrt(1 - abar_t) of ablation (4)) and a wrong schedule (s, clipping)."""
    s = D.Schedule(100)
    c = {25: 0.0055, 50: 0.023, 75: 0.070, 90: 0.19, 95: 0.36, 99: 0.999}
    shift = {25: 0.002, 50: 0.017, 75: 0.065, 90: 0.19, 95: 0.36, 99: 0.999}
    for t, v in c.items():
        assert s.mask_coefficient[t].item() == pytest.approx(v, rel=0.06, abs=2e-4), t
        got = (s.sqrt_one_minus_alphas_cumprod[t] * s.mask_coefficient[t]).item()
        assert got == pytest.approx(shift[t], rel=0.1, abs=1e-3), t
    assert s.betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("t", [60, 95, 99])
def test_modulated_forward_process_mean_and_variance_monte_carlo(t):
    """E[x_t - sqrt(abar) x0] = (1 - abar) beta_t E and Var = 1 - abar (spec 2.4); catches the E
    term dropped, E added outside the sqrt(1 - abar) factor, or a wrong coefficient."""
    s = D.Schedule(100)
    g = torch.Generator().manual_seed(0)
    n, hw = 40000, 4
    e = torch.tensor([[0.35, -0.02], [0.1, 0.0]]).view(1, 1, 2, 2).expand(1, 1, hw // 2, hw // 2)
    e = e.repeat(1, 1, 2, 2)[:, :, :hw, :hw]
    x0 = torch.rand(1, 3, hw, hw, generator=g) * 2 - 1
    tt = torch.full((n,), t)
    noise = torch.randn(n, 3, hw, hw, generator=g)
    xt = D.q_sample(s, x0, tt, D.modulated_noise(s, tt, noise, e))
    d = xt - s.sqrt_alphas_cumprod[t] * x0
    abar, beta = s.alphas_cumprod[t].item(), s.betas[t].item()
    want = (1 - abar) * beta * e.expand(1, 3, hw, hw)
    se = math.sqrt((1 - abar) / n)
    assert (d.mean(0, keepdim=True) - want).abs().max().item() < 5 * se
    assert d.var(0).mean().item() == pytest.approx(1 - abar, rel=0.02)
    if t == 99:  # large enough to see: the unmodulated process has another mean
        plain = D.q_sample(s, x0, tt, noise) - s.sqrt_alphas_cumprod[t] * x0
        assert (plain.mean(0, keepdim=True) - want).abs().max().item() > 20 * se


def test_x0_estimate_with_the_true_noise_reproduces_x0():
    """predict_x0(x_t, t, eps') = x0 for every t when eps' is the (modulated) noise that made
    x_t: the unchanged reverse process is exact if the network predicts eps'."""
    s = D.Schedule(100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(100, 3, 8, 8, generator=g) * 2 - 1
    t = torch.arange(100)
    e = torch.rand(100, 1, 8, 8, generator=g) * 0.3
    eps = D.modulated_noise(s, t, torch.randn(100, 3, 8, 8, generator=g), e)
    rec = D.predict_x0(s, D.q_sample(s, x0, t, eps), t, eps)
    assert torch.allclose(
        rec, x0, atol=2e-3
    )  # t = 99: 1/sqrt(abar) ~ 2e2 amplifies float32 rounding
    assert torch.allclose(rec[:95], x0[:95], atol=1e-5)


def test_residual_round_trip_is_exact():
    """y_HR -> x0 = clip(2 (y - U)) -> clip(x0)/2 + U gives y back where |y - U| <= 1/2, and the
    clip acts beyond; catches a missing res_rescale or a rescale applied on one side only."""
    g = torch.Generator().manual_seed(2)
    up = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    hr = (up + (torch.rand(2, 3, 16, 16, generator=g) - 0.5) * 0.9).clamp(-1, 1)
    assert torch.allclose(D.res2img(D.img2res(hr, up), up), hr, atol=1e-6)
    assert D.img2res(up + 0.9, up).max().item() == 1.0


def test_the_loss_target_is_the_modulated_noise():
    """With a denoiser that predicts 0, the L1 loss is mean |eps + c_t E|: catches the E term
    removed from the target (SRDiff's loss) or c_t forgotten."""
    torch.manual_seed(0)
    m = SRDiff(TINY)
    m.denoise_fn.forward = lambda x, t, c: torch.zeros_like(x)
    hr = torch.rand(2, 3, 16, 16) * 2 - 1
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    t = torch.tensor([19, 10])
    noise = torch.randn(2, 3, 16, 16)
    e = torch.full((2, 1, 16, 16), 0.3)
    got = D.diffusion_loss(m, hr, lr, hr, t, noise, e)
    want = (noise + m.schedule.mask_coefficient[t].view(-1, 1, 1, 1) * e).abs().flatten(1).mean(1)
    assert torch.allclose(got, want)
    assert not torch.allclose(got, D.diffusion_loss(m, hr, lr, hr, t, noise, None))


# ---------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------
def test_the_sampler_takes_no_mask_and_is_the_same_for_sam_diffsr_and_srdiff(tmp_path):
    """Inference is mask-free: ``sample`` has no mask argument, and a SAM-DiffSR run and an SRDiff
    model holding the same weights sample bit-identical images."""
    names = set(inspect.signature(D.sample).parameters)
    assert not names & {"e", "e_map", "mask", "masks", "spe"}
    torch.manual_seed(0)
    a = SRDiff(TINY).eval()
    b = SRDiff(TINY).eval()
    b.load_state_dict(a.state_dict())
    lr = torch.rand(1, 3, 4, 6) * 2 - 1
    up = imresize(lr, 4)
    for sampler, steps in (("ddpm", 0), ("ddim", 5)):
        x = D.sample(
            a, lr, up, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(3)
        )
        y = D.sample(
            b, lr, up, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(3)
        )
        assert torch.equal(x, y)


def test_ddpm_sampler_matches_a_float64_reference_loop():
    """The DDPM loop (x0 clipped, posterior mean, exp(0.5 log var) noise, none at t = 0) against
    a float64 re-derivation from the betas; catches swapped posterior coefficients or noise at
    the last step."""
    torch.manual_seed(0)
    m = SRDiff(TINY).eval()
    lr = torch.rand(1, 3, 4, 4) * 2 - 1
    up = imresize(lr, 4)
    got = D.sample(m, lr, up, sampler="ddpm", generator=torch.Generator().manual_seed(5))
    b = D.cosine_betas(20)
    acp = np.cumprod(1 - b)
    prev = np.append(1, acp[:-1])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(up.shape, generator=g)
    cond = m.encode(lr)
    for i in reversed(range(20)):
        eps = m.denoise_fn(x, torch.tensor([i]), cond).double()
        x0 = ((x.double() - math.sqrt(1 - acp[i]) * eps) / math.sqrt(acp[i])).clamp(-1, 1)
        mean = (
            b[i] * math.sqrt(prev[i]) / (1 - acp[i]) * x0
            + (1 - prev[i]) * math.sqrt(1 - b[i]) / (1 - acp[i]) * x.double()
        )
        var = b[i] * (1 - prev[i]) / (1 - acp[i])
        z = torch.randn(up.shape, generator=g).double() if i > 0 else 0
        x = (mean + math.sqrt(max(var, 1e-20)) * z).float()
    want = x.clamp(-1, 1) / 2 + up
    assert torch.allclose(got, want, atol=1e-4)


def test_sampler_bad_steps_are_one_line_errors():
    m = SRDiff(TINY)
    lr = torch.zeros(1, 3, 4, 4)
    with pytest.raises(SlimkitError, match="ddpm sampler runs all 20 steps"):
        D.sample(m, lr, imresize(lr, 4), sampler="ddpm", steps=5)
    with pytest.raises(SlimkitError, match="steps must be in 1..20"):
        D.sample(m, lr, imresize(lr, 4), sampler="ddim", steps=50)


def test_tile_windows_cover_the_image_with_the_overlap():
    """Every pixel is in some window and neighbours share at least the overlap; catches a last
    window that stops short of the border or a stride that leaves gaps."""
    for n in range(4, 60, 3):
        for tile, ov in ((8, 0), (8, 3), (12, 4), (16, 8)):
            starts = D.tile_starts(n, tile, ov)
            covered = np.zeros(n, bool)
            for a in starts:
                covered[a : a + tile] = True
            assert covered.all() and starts[-1] + min(tile, n) == n
            for a, b in zip(starts, starts[1:]):
                assert a + tile - b >= ov


def test_tiled_denoiser_blends_windows_without_seams():
    """With a denoiser that is local (noise prediction from the pixel and its own LR pixel), the
    windowed sampler must give the untiled image: catches windows whose HR crop and LR
    conditioning disagree, blending weights that do not sum to one, or uncovered borders."""
    from types import SimpleNamespace

    s = TINY.scale

    def local(x, t, cond):
        up = torch.repeat_interleave(torch.repeat_interleave(cond[0], s, 2), s, 3)
        return 0.3 * x + up * (t.float().view(-1, 1, 1, 1) + 1) / 20

    m = SimpleNamespace(cfg=TINY, schedule=SRDiff(TINY).schedule, encode=lambda lr: [lr],
                        denoise_fn=local)  # fmt: skip
    lr = torch.rand(1, 3, 12, 20) * 2 - 1
    up = imresize(lr, s)
    whole = D.sample(m, lr, up, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(1))
    for tile, ov in ((4, 0), (4, 2), (8, 3)):
        tiled = D.sample(m, lr, up, sampler="ddim", steps=4, tile=tile, tile_overlap=ov,
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert torch.allclose(tiled, whole, atol=1e-5), (tile, ov)
    one = D.TiledDenoiser(m, lr, 20, 4)  # one window: exactly the plain denoiser
    x, t = torch.randn(up.shape), torch.tensor([3])
    assert len(one.windows) == 1 and torch.equal(one(x, t), m.denoise_fn(x, t, [lr]))


def test_tiled_sampling_of_a_real_unet_stays_close_and_bad_tiles_are_refused():
    """The real U-Net sees less context per window, so tiling changes the image a little, not a
    lot (a wrong window offset changes it by the image's own scale)."""
    torch.manual_seed(0)
    m = SRDiff(TINY).eval()
    lr = torch.rand(1, 3, 8, 12) * 2 - 1
    up = imresize(lr, m.cfg.scale)
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    whole = D.sample(m, lr, up, sampler="ddim", steps=3, generator=g())
    tiled = D.sample(m, lr, up, sampler="ddim", steps=3, tile=8, tile_overlap=4, generator=g())
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    assert (tiled - whole).abs().mean() < 0.25 * (whole - up).abs().mean() + 1e-3
    with pytest.raises(SlimkitError, match="multiple of"):
        D.sample(m, lr, up, sampler="ddim", steps=3, tile=6, generator=g())


# ---------------------------------------------------------------------------------------
# structural position encoding
# ---------------------------------------------------------------------------------------
def test_spe_hand_worked_example():
    """H = 2, W = 3 (odd width), rows = positions: P = [[1, 1, 1], [c - s, c + s, 1]] with
    c, s = cos 1, sin 1. Mask A = left column, mask B = bottom-left two pixels (overlapping A at
    (1, 0)); e = sum of P over the mask / 6 (whole image); B is painted last; the rest is 0."""
    c, s = math.cos(1), math.sin(1)
    a = np.array([[1, 0, 0], [1, 0, 0]], bool)
    b = np.array([[0, 0, 0], [1, 1, 0]], bool)
    ea = (1 + (c - s)) / 6
    eb = ((c - s) + (c + s)) / 6
    want = np.array([[ea, 0, 0], [eb, eb, 0]])
    np.testing.assert_allclose(encode_masks([a, b]), want, rtol=1e-6)
    # last writer wins: the other order paints (1, 0) with A's value
    np.testing.assert_allclose(encode_masks([b, a])[1, 0], ea, rtol=1e-6)
    assert encode_masks([], (2, 3)).sum() == 0  # no masks -> E = 0


def test_rope_pattern_is_a_rotary_embedding_of_ones():
    """P against the complex form of a 1-D rotary embedding over rows ((1 + 1j) e^{i p w_k}
    gives cos - sin and cos + sin); catches columns as positions, 10000^(-k/W) frequencies or a
    last odd column that is rotated."""
    h, w = 7, 9
    k = np.arange(w // 2)
    rot = (1 + 1j) * np.exp(1j * np.arange(h)[:, None] * 10000.0 ** (-2 * k / w))
    p = rope_pattern(h, w)
    np.testing.assert_allclose(p[:, 0:8:2], rot.real)
    np.testing.assert_allclose(p[:, 1:8:2], rot.imag)
    np.testing.assert_allclose(p[:, -1], 1.0)


# ---------------------------------------------------------------------------------------
# data: aligned crops, degradation
# ---------------------------------------------------------------------------------------
def _flat_segments(size=64, seed=0):
    """An image of flat-coloured Voronoi cells: its edges are exactly the segment boundaries."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    seeds = rng.uniform(0, size, (6, 2))
    labels = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    colours = rng.permutation(np.linspace(20, 235, 6)).astype(np.uint8)
    return np.repeat(colours[labels][..., None], 3, 2), labels


def test_image_and_mask_crops_stay_aligned_under_random_crops_and_flips():
    """Boundaries of the painted SPE map coincide with the image's edges in every patch, under
    flips; the LR patch is the HR window's LR, flipped alike (catches E cut with LR coordinates,
    the official data-path bug, or a flip applied to the image only)."""
    img, labels = _flat_segments()
    im = HRImage("x", img, labels)
    maps = e_maps_for([im], "segments")
    assert len(np.unique(maps[0])) == len(np.unique(labels))  # one distinct value per segment
    data = PairedPatches([im], maps, scale=4, patch=32, flips=True)
    lr_full = torch.from_numpy(degrade(img, 4)).permute(2, 0, 1).float() / 127.5 - 1
    full = make_pair(img, 4)
    rng = np.random.default_rng(0)

    def aligned(hr, e):
        return torch.equal(hr[:, 1:] != hr[:, :-1], e[:, 1:] != e[:, :-1]) and torch.equal(
            hr[1:] != hr[:-1], e[1:] != e[:-1]
        )

    for _ in range(20):
        y, x = (rng.integers(0, 9, 2) * 4).tolist()
        fh, fv = rng.integers(0, 2, 2).astype(bool).tolist()
        w = data.window(0, y, x, fh, fv)
        assert aligned(w["hr"][0], w["e"][0])
        dims = ([-1] if fh else []) + ([-2] if fv else [])
        want = lr_full[:, y // 4 : y // 4 + 8, x // 4 : x // 4 + 8]
        assert torch.equal(w["lr"], want.flip(dims) if dims else want)
        # U(LR) of the patch is the crop of the whole image's U(LR) (no patch-border effects)
        up = full["lr_up"][:, y : y + 32, x : x + 32]
        assert torch.allclose(w["lr_up"], up.flip(dims) if dims else up, atol=1e-5)
    b = data.batch(16, torch.Generator().manual_seed(0))
    assert all(aligned(b["hr"][i, 0], b["e"][i, 0]) for i in range(16))
    plain = PairedPatches([im], maps, scale=4, patch=32, flips=False).batch(
        16, torch.Generator().manual_seed(0)
    )
    assert not torch.equal(
        b["hr"], plain["hr"]
    )  # flips were drawn (else nothing above tested them)


def test_crops_with_the_official_lr_coordinates_would_misalign():
    """Guards the test above: cutting E at (y/4, x/4) and zooming it back (the official data
    path) breaks the edge alignment on the same image."""
    img, labels = _flat_segments()
    e = torch.from_numpy(encode_labels(labels))
    y, x = 28, 16
    bad = torch.nn.functional.interpolate(e[None, None, y // 4 : (y + 32) // 4, x // 4 : (x + 32) // 4],
                                          size=(32, 32), mode="nearest")[0, 0]  # fmt: skip
    hr = torch.from_numpy(img[y : y + 32, x : x + 32, 0]).float()
    assert not torch.equal(hr[:, 1:] != hr[:, :-1], bad[:, 1:] != bad[:, :-1])


def test_matlab_bicubic_antialiases_and_keeps_linear_ramps():
    """A 1-pixel checkerboard shrunk x4 becomes flat grey (antialiasing: an unwidened kernel
    aliases it); a ramp stays a ramp sampled at the output pixel centres (MATLAB's u mapping)."""
    cb = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).double()[None]
    assert torch.allclose(
        imresize(cb, 0.25)[0, 2:6, 2:6], torch.full((4, 4), 0.5, dtype=torch.float64)
    )
    ramp = torch.arange(32.0).repeat(32, 1)[None].double()
    np.testing.assert_allclose(imresize(ramp, 0.25)[0, 4, 2:6].numpy(), [9.5, 13.5, 17.5, 21.5])
    assert imresize(torch.ones(3, 8, 10), 4).shape == (3, 32, 40)


# ---------------------------------------------------------------------------------------
# metric protocols
# ---------------------------------------------------------------------------------------
def _photo_pair():
    hr = load_hr_images("photos:astronaut")[0].hr[100:228, 180:308]
    lr = degrade(hr, 4)
    t = torch.from_numpy(lr).permute(2, 0, 1).double() / 255
    sr = (imresize(t, 4).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return sr, hr


def test_basicsr_protocol_matches_scikit_image():
    """PSNR / SSIM on BT.601 Y with crop = scale equal scikit-image's (Gaussian sigma 1.5,
    population covariance, data range 255) on a bundled photo; catches BGR weights on RGB input,
    a missing crop, or 'same' instead of 'valid' filtering."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    sr, hr = _photo_pair()
    r = psnr_ssim(sr, hr, "basicsr", 4)
    a, b = rgb_to_y(sr / 255.0)[4:-4, 4:-4], rgb_to_y(hr / 255.0)[4:-4, 4:-4]
    assert r["protocol"] == "basicsr-y-crop4"
    assert r["psnr"] == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255), abs=1e-9)
    ref = structural_similarity(
        b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert r["ssim"] == pytest.approx(ref, abs=1e-9)
    assert psnr_ssim(sr[..., ::-1].copy(), hr[..., ::-1].copy(), "basicsr", 4)[
        "psnr"
    ] != pytest.approx(r["psnr"], abs=1e-6)


def test_pyiqa_protocol_matches_a_float64_reference():
    """pyiqa-style: float [0, 1], Y of ycbcr, no crop, PSNR with eps 1e-8, SSIM on the rounded
    255-scaled Y with 'valid' Gaussian filtering; reference written with torch conv2d in float64."""
    sr, hr = _photo_pair()
    r = psnr_ssim(sr.astype(np.float64) / 255, hr.astype(np.float64) / 255, "pyiqa")

    def y(x):
        x = torch.from_numpy(x.astype(np.float64) / 255).permute(2, 0, 1)
        return 16 / 255 + (65.481 * x[0] + 128.553 * x[1] + 24.966 * x[2]) / 255

    a, b = y(sr), y(hr)
    assert r["psnr"] == pytest.approx(
        10 * math.log10(1 / (((a - b) ** 2).mean().item() + 1e-8)), abs=1e-9
    )
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2)).double()
    w = (g / g.sum())[:, None] * (g / g.sum())[None]
    a, b = (a * 255).round()[None, None], (b * 255).round()[None, None]

    def f(x):
        return torch.nn.functional.conv2d(x, w[None, None])

    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim = (
        ((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        .mean()
        .item()
    )
    # (a Y value at x.5 may round either way with another order of the float operations)
    assert r["ssim"] == pytest.approx(ssim, abs=1e-5)
    assert r["protocol"] == "pyiqa-y-ycbcr-nocrop"
    assert r["psnr"] != pytest.approx(psnr_ssim(sr, hr, "basicsr", 4)["psnr"], abs=1e-3)  # no crop


# ---------------------------------------------------------------------------------------
# official checkpoint layout
# ---------------------------------------------------------------------------------------
def test_official_sizes_match_the_measured_parameter_counts():
    """SRDiff's official configuration (17 RRDB blocks, 64 / 32, U-Net 64 with (1, 2, 3, 4)) has
    12.94 M U-Net and 12.38 M RRDB parameters [spec, measured on the official modules]."""
    cfg = SRModelConfig(
        rrdb_blocks=17, rrdb_feat=64, rrdb_growth=32, hidden=64, dim_mults=[1, 2, 3, 4]
    )
    assert sum(p.numel() for p in Unet(cfg).parameters()) / 1e6 == pytest.approx(12.94, abs=0.006)
    assert sum(p.numel() for p in RRDBNet(cfg).parameters()) / 1e6 == pytest.approx(
        12.38, abs=0.006
    )


def _official_ckpt(tmp_path, cfg):
    torch.manual_seed(0)
    m = SRDiff(cfg)
    sd = {k: torch.randn_like(v) * 0.05 for k, v in m.state_dict().items()}
    s = D.Schedule(cfg.timesteps)
    sd.update(
        {
            k: getattr(s, k).clone()
            for k in ("betas", "alphas_cumprod", "posterior_mean_coef1", "mask_coefficient")
        }
    )
    path = tmp_path / "model_ckpt_steps_400000.ckpt"
    torch.save({"global_step": 400000, "state_dict": {"model": sd}}, path)
    return path, sd


def test_official_checkpoint_layout_loads_strictly(tmp_path):
    """Random weights saved in the official layout ({"state_dict": {"model": ...}}, denoise_fn.* /
    rrdb.* keys, schedule buffers) load with the sizes read from the shapes, and give the same
    outputs; a missing or an unexpected weight fails loudly (an untrained model is never used
    silently: LeiaLi/SRDiff#14)."""
    cfg = SRModelConfig(
        rrdb_blocks=5, rrdb_feat=8, rrdb_growth=4, hidden=8, dim_mults=[1, 2, 3], timesteps=100
    )
    path, sd = _official_ckpt(tmp_path, cfg)
    for k in ("denoise_fn.cond_proj.weight", "denoise_fn.downs.0.0.mlp.1.weight",
              "denoise_fn.downs.0.0.block1.block.1.weight", "denoise_fn.ups.0.2.conv.0.weight",
              "denoise_fn.mid_block1.block2.block.1.bias", "denoise_fn.final_conv.1.weight",
              "rrdb.RRDB_trunk.4.RDB3.conv5.weight", "rrdb.HRconv.weight", "rrdb.conv_last.bias"):  # fmt: skip
        assert k in sd, k
    m = load_official(path)
    assert m.cfg == cfg
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    feats = m.encode(torch.zeros(1, 3, 4, 4))
    assert len(feats) == 6 and m.denoise_fn(
        torch.zeros(1, 3, 16, 16), torch.tensor([3]), feats
    ).shape == (1, 3, 16, 16)
    # the official RRDB pre-training checkpoint (a bare RRDBNet state dict) as --rrdb
    rrdb_sd = {k.removeprefix("rrdb."): v for k, v in sd.items() if k.startswith("rrdb.")}
    torch.save({"state_dict": {"model": rrdb_sd}}, tmp_path / "rrdb.ckpt")
    rrdb, info = load_run(tmp_path / "rrdb.ckpt", "rrdb")
    assert info["model"]["rrdb_blocks"] == 5 and torch.equal(
        rrdb.conv_last.bias, rrdb_sd["conv_last.bias"]
    )
    for broken, msg in ((lambda d: d.pop("denoise_fn.final_conv.1.weight"), "lacks denoise_fn.final_conv.1.weight"),
                        (lambda d: d.__setitem__("denoise_fn.extra.weight", torch.zeros(1)), "keys the model does not")):  # fmt: skip
        bad = dict(sd)
        broken(bad)
        torch.save({"state_dict": {"model": bad}}, tmp_path / "bad.ckpt")
        with pytest.raises(SlimkitError, match=msg):
            load_official(tmp_path / "bad.ckpt")


# ---------------------------------------------------------------------------------------
# the commands, end to end on tiny models
# ---------------------------------------------------------------------------------------
def test_sr_commands_end_to_end(tmp_path, capsys):
    """make-masks (slic) -> train --stage rrdb -> train with --masks -> upscale -> eval: the files
    each step promises exist, the SR image is x4, the metrics name their protocol; an RRDB of
    another size is refused (LeiaLi/SRDiff#10)."""
    from PIL import Image

    from slimkit.cli import main
    from slimkit.sr.data import synthetic_image

    imgs = tmp_path / "hr"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(synthetic_image(48, rng)[0]).save(imgs / f"im{i}.png")
    tiny = ["--rrdb-blocks", "2", "--rrdb-feat", "8", "--rrdb-growth", "4", "--hidden", "8", "--dim-mults", "1,2",
            "--timesteps", "10", "--patch", "16", "--batch-size", "2", "--steps", "2", "--val-images", "1",
            "--val-steps", "2", "--image-size", "32", "--images", str(imgs)]  # fmt: skip
    assert (
        main(
            [
                "sr",
                "make-masks",
                "--images",
                str(imgs),
                "--mask-source",
                "slic:20",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "im0.npy",
        "im1.npy",
        "im2.npy",
        "index.json",
    ]
    assert main(["sr", "train", "--stage", "rrdb", *tiny, "--out", str(tmp_path / "rrdb")]) == 0
    run = tmp_path / "sam"
    assert (
        main(
            [
                "sr",
                "train",
                *tiny,
                "--masks",
                str(tmp_path / "m"),
                "--rrdb",
                str(tmp_path / "rrdb"),
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert (run / "model.safetensors").is_file() and (run / "report.json").is_file()
    Image.fromarray(synthetic_image(12, rng)[0][:10]).save(tmp_path / "lr.png")
    assert (
        main(
            [
                "sr",
                "upscale",
                str(tmp_path / "lr.png"),
                "--model",
                str(run),
                "--steps",
                "2",
                "--out",
                str(tmp_path / "x4.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "x4.png").size == (48, 40)
    up = ["sr", "upscale", str(tmp_path / "lr.png"), "--model", str(run), "--steps", "2"]
    assert main([*up, "--samples", "2", "--out", str(tmp_path / "x4m.png")]) == 0
    from slimkit.sr.data import read_image, to_signed
    from slimkit.sr.evaluate import super_resolve, to_uint8

    lr = to_signed(read_image(tmp_path / "lr.png"))
    m = load_run(run)[0]
    want = to_uint8(torch.stack([super_resolve(m, lr, 4, steps=2, seed=j) for j in (0, 1)]).mean(0))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x4m.png")), want)
    assert main([*up, "--samples", "0", "--out", str(tmp_path / "x4z.png")]) == 2
    assert (
        main(
            [
                "sr",
                "eval",
                str(run),
                "--images",
                "synthetic",
                "--n",
                "1",
                "--steps",
                "2",
                "--samples",
                "2",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    table = (tmp_path / "ev" / "metrics.md").read_text()
    assert "basicsr-y-crop4" in table and "pyiqa-y-ycbcr-nocrop" in table and "SAM-DiffSR" in table
    assert "| SAM-DiffSR (mean of 2) |" in table and "2 samples per image" in table
    ev = ["sr", "eval", str(run), "--images", "synthetic", "--n", "1", "--steps", "2"]
    assert main([*ev, "--protocol", "srdiff", "--out", str(tmp_path / "ev2")]) == 0
    table = (tmp_path / "ev2" / "metrics.md").read_text()
    assert "pyiqa-y-ycbcr-nocrop" in table and "basicsr-y-crop4" not in table
    assert len(list((tmp_path / "ev").glob("*.png"))) == 1
    capsys.readouterr()
    other = [
        *tiny,
        "--rrdb-feat",
        "16",
        "--rrdb",
        str(tmp_path / "rrdb"),
        "--out",
        str(tmp_path / "bad"),
    ]
    assert main(["sr", "train", *other]) == 2
    assert "rrdb_feat=8, this run asks for 16" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("spec,msg", [("sam:/no/such.pth", "needs an existing SAM checkpoint"),
                                      ("watershed", "unknown mask source"), ("slic:many", "bad argument")])  # fmt: skip
def test_bad_mask_sources_are_one_line_errors(spec, msg):
    from slimkit.sr.masks import mask_source

    with pytest.raises(SlimkitError, match=msg):
        mask_source(spec)


def test_slic_masks_cover_the_image_and_encode():
    from slimkit.sr.masks import mask_source

    img = load_hr_images("photos:chelsea")[0].hr[:64, :96]
    masks = mask_source("slic:30")(img)
    assert len(masks) > 5 and np.logical_or.reduce(masks).all()
    e = encode_masks(masks)
    assert e.shape == (64, 96) and np.isfinite(e).all() and (e != 0).all()


def test_make_masks_sam_source_filters_and_empty_warning(tmp_path, caplog):
    """A slimkit SAM source takes the everything filters from the command line: SAM's strict
    defaults keep nothing from a random tiny SAM (an all-zero SPE map, with a warning naming the
    flags), open filters keep segments; index.json records the filters used."""
    import json

    from PIL import Image

    from slimkit.cli import main
    from slimkit.sam.tinysam.train import tiny_teacher

    run = tiny_teacher(tmp_path / "sam")
    imgs = tmp_path / "hr"
    imgs.mkdir()
    Image.fromarray(load_hr_images("photos:chelsea")[0].hr[:64, :96]).save(imgs / "cat.png")
    common = ["sr", "make-masks", "--images", str(imgs), "--mask-source", f"slimkit-sam:{run}",
              "--points-per-side", "8"]  # fmt: skip
    with caplog.at_level("WARNING", logger="slimkit"):
        assert main([*common, "--pred-iou-thresh", "2", "--out", str(tmp_path / "strict")]) == 0
    assert "cat: no segment" in caplog.text and "--pred-iou-thresh 2.0" in caplog.text
    assert not np.load(tmp_path / "strict" / "cat.npy").any()
    open_ = ["--pred-iou-thresh=-1e9", "--stability-thresh", "0"]
    assert main([*common, *open_, "--out", str(tmp_path / "open")]) == 0
    index = json.loads((tmp_path / "open" / "index.json").read_text())
    assert index["images"]["cat"]["segments"] > 0
    assert (
        index["everything"]["pred_iou_thresh"] == -1e9
        and index["everything"]["points_per_side"] == 8
    )


def test_eps_l1_by_t_against_a_hand_computation():
    """With a denoiser that predicts 0, the per-band L1 is mean |eps + c_t E| over the band's
    steps, on the noise drawn from seed + i: each band by hand, for the strong coefficient and a
    constant E (a wrong coefficient, a dropped E, or shifted bands change the numbers)."""
    from slimkit.sr.evaluate import eps_l1_by_t

    class Zero(torch.nn.Module):
        def forward(self, x, t, cond):
            return torch.zeros_like(x)

    m = SRDiff(TINY).eval()
    m.denoise_fn = Zero()
    images = [
        HRImage(f"k{i}", np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8))
        for i in range(2)
    ]
    e = [np.full((16, 16), 0.3, np.float32) for _ in images]
    T = m.schedule.T
    got = eps_l1_by_t(m, images, 4, e_maps=e, coefficient="strong", buckets=4, seed=7)
    phi = m.schedule.strong_coefficient
    per_t = torch.zeros(T, dtype=torch.float64)
    for i in range(2):
        n = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(7 + i))
        per_t += torch.stack([(n + phi[t] * 0.3).abs().mean() for t in range(T)]).double()
    per_t /= 2
    want = [float(per_t[b * T // 4 : (b + 1) * T // 4].mean()) for b in range(4)]
    assert got == pytest.approx(want, rel=1e-5)
    assert got[-1] > got[0]  # phi_t grows with t
    plain = eps_l1_by_t(m, images, 4, buckets=4, seed=7)  # SRDiff: eps itself, the same at every t
    assert plain == pytest.approx([plain[0]] * 4, rel=1e-6) and plain[0] < got[-1]


def test_validation_curve_is_recorded_and_leaves_the_weights_unchanged(tmp_path):
    """--eval-every adds the validation PSNR at steps 2 and 4 (the final evaluation at 6 last),
    writes it into the report and the card, and the run's weights are bit-identical to a run
    without it: evaluating mid-run must not change what the run trains."""
    import json

    from safetensors.torch import load_file

    from slimkit.sr.train import SRTrainConfig, train_sr

    tiny = dict(images="synthetic", n_images=6, image_size=32, patch=16, rrdb_blocks=2, rrdb_feat=8,
                rrdb_growth=4, hidden=8, dim_mults="1,2", timesteps=10, steps=6, batch_size=2,
                val_images=1, val_steps=2, checkpoint_every=0, device="cpu", lr=1e-3)  # fmt: skip
    train_sr(SRTrainConfig(stage="rrdb", **{**tiny, "steps": 2}), out=tmp_path / "rrdb")
    runs = {}
    for every in (0, 2):
        out = tmp_path / f"d{every}"
        rep = train_sr(SRTrainConfig(stage="diffusion", rrdb=str(tmp_path / "rrdb"), masks="segments",
                                     eval_every=every, **tiny), out=out)  # fmt: skip
        runs[every] = load_file(out / "model.safetensors")
        curve = json.loads((out / "report.json").read_text())["validation_curve"]
        assert [p["step"] for p in curve] == ([2, 4, 6] if every else [6])
        assert curve[-1]["psnr"] == rep["validation"]["SAM-DiffSR"]["basicsr-y-crop4"]["psnr"]
        assert ("Validation during training" in (out / "README.md").read_text()) == bool(every)
    assert runs[0].keys() == runs[2].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[2][k]), k
    with pytest.raises(SlimkitError, match="eval-every"):
        SRTrainConfig(eval_every=-1)


def test_evaluate_with_several_samples_scores_each_and_their_mean():
    """samples=3: the model's row is the mean of the three samples' scores (each scored on its
    own, seeds 0, 1, 2), and '(mean of 3)' scores the pixel average of the three samples; an
    RRDB regressor gets one row; samples=0 is refused."""
    from slimkit.sr.degrade import crop_to_multiple
    from slimkit.sr.evaluate import evaluate_images, super_resolve, to_uint8
    from slimkit.sr.metrics import psnr_ssim

    torch.manual_seed(0)
    model = SRDiff(TINY).eval()
    rrdb = RRDBNet(TINY).eval()
    im = load_hr_images("synthetic", n=1, size=32, seed=5)
    res = evaluate_images(
        {"d": model, "r": rrdb}, im, 4, protocols=("basicsr",), steps=3, samples=3
    )
    hr = crop_to_multiple(im[0].hr, 4)
    lr = make_pair(hr, 4)["lr"]
    srs = [super_resolve(model, lr, 4, steps=3, seed=j) for j in range(3)]
    each = [psnr_ssim(to_uint8(x), hr, "basicsr", 4)["psnr"] for x in srs]
    mean = psnr_ssim(to_uint8(torch.stack(srs).mean(0)), hr, "basicsr", 4)["psnr"]
    s = res["summary"]
    assert s["d"]["basicsr-y-crop4"]["psnr"] == pytest.approx(np.mean(each), abs=1e-9)
    assert s["d (mean of 3)"]["basicsr-y-crop4"]["psnr"] == pytest.approx(mean, abs=1e-9)
    assert len(set(np.round(each, 6))) == 3  # the samples differ
    assert set(s) == {"bicubic", "d", "d (mean of 3)", "r"}
    with pytest.raises(SlimkitError, match="samples"):
        evaluate_images({"d": model}, im, 4, samples=0)


def test_ema_weights_are_what_the_run_saves(tmp_path):
    """--ema: the run saves the weight average. A decay near 1 keeps the initial denoiser (the
    average barely moves), a decay near 0 the raw trained weights; the frozen RRDB is the
    pre-trained one either way."""
    from safetensors.torch import load_file

    from slimkit.sr.train import SRTrainConfig, train_sr

    tiny = dict(images="synthetic", n_images=6, image_size=32, patch=16, rrdb_blocks=2, rrdb_feat=8,
                rrdb_growth=4, hidden=8, dim_mults="1,2", timesteps=10, steps=6, batch_size=2,
                val_images=1, val_steps=2, checkpoint_every=0, device="cpu", lr=1e-2)  # fmt: skip
    train_sr(SRTrainConfig(stage="rrdb", **{**tiny, "steps": 2}), out=tmp_path / "rrdb")
    w = {}
    for ema in (0.0, 1e-9, 0.999999):
        out = tmp_path / f"d{ema}"
        train_sr(
            SRTrainConfig(stage="diffusion", rrdb=str(tmp_path / "rrdb"), ema=ema, **tiny), out=out
        )
        w[ema] = load_file(out / "model.safetensors")
    torch.manual_seed(0)
    init = SRDiff(SRTrainConfig(**tiny).model_config()).state_dict()
    den = [k for k in w[0.0] if k.startswith("denoise_fn.") and w[0.0][k].is_floating_point()]
    moved = max((w[0.0][k] - init[k]).abs().max().item() for k in den)
    assert moved > 1e-3
    assert max((w[1e-9][k] - w[0.0][k]).abs().max().item() for k in den) < 1e-6
    assert max((w[0.999999][k] - init[k]).abs().max().item() for k in den) < 1e-3 * moved
    rr = [k for k in w[0.0] if k.startswith("rrdb.")]
    assert all(torch.equal(w[0.999999][k], w[0.0][k]) for k in rr)
    with pytest.raises(SlimkitError, match="--ema"):
        SRTrainConfig(ema=1.0)
