"""Residual diffusion of SRDiff and the structure-modulated forward process of SAM-DiffSR.

- Residual target: x_0 = clip(2 (y_HR - U(y_LR)), -1, 1); reconstruction y = clip(x_0)/2 + U.
- Schedule: T steps, cosine (s = 0.008), beta <= 0.999 (``Schedule``).
- Modulated forward process (training only): eps' = eps + c_t E with c_t = sqrt(1 - abar_t) beta_t
  (the official ``mask_coefficient``), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps', so
  q(x_t | x_0) = N(sqrt(abar_t) x_0 + (1 - abar_t) beta_t E, (1 - abar_t) I). The denoiser learns
  eps' with an L1 loss and never sees E.
- Samplers (no mask argument: identical for SRDiff and SAM-DiffSR): ``ddpm`` (all T ancestral
  steps, x0 clipped every step, posterior variance with clipped log), ``ddim`` (K evenly strided
  deterministic steps, eta = 0, x0 clipped; the faster one).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from slimkit.core.errors import SlimkitError

RES_RESCALE = 2.0
COEFFICIENTS = ("code", "strong")  # c_t = sqrt(1-abar) beta (official), phi_t = sqrt(1-abar)
SAMPLERS = ("ddpm", "ddim")


def cosine_betas(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule as SRDiff evaluates it (float64, clipped to 0.999)."""
    n = timesteps + 1
    x = np.linspace(0, n, n)
    acp = np.cos(((x / n) + s) / (1 + s) * np.pi * 0.5) ** 2
    acp = acp / acp[0]
    return np.clip(1 - acp[1:] / acp[:-1], 0, 0.999)


class Schedule(nn.Module):
    """The per-step constants (buffers, not saved: they follow from ``timesteps``)."""

    def __init__(self, timesteps: int):
        super().__init__()
        if timesteps < 2:
            raise SlimkitError(f"timesteps must be >= 2 (got {timesteps})")
        self.T = timesteps
        b = cosine_betas(timesteps)
        acp = np.cumprod(1 - b)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = b * (1 - acp_prev) / (1 - acp)
        consts = {
            "betas": b,
            "alphas_cumprod": acp,
            "alphas_cumprod_prev": acp_prev,
            "sqrt_alphas_cumprod": np.sqrt(acp),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - acp),
            "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": b * np.sqrt(acp_prev) / (1 - acp),
            "posterior_mean_coef2": (1 - acp_prev) * np.sqrt(1 - b) / (1 - acp),
            "mask_coefficient": np.sqrt(1 - acp) * b,  # c_t of SAM-DiffSR
            "strong_coefficient": np.sqrt(1 - acp),  # phi_t of the spec's ablation (4)
        }
        for k, v in consts.items():
            self.register_buffer(k, torch.tensor(v, dtype=torch.float32), persistent=False)

    def at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``name``[t] shaped [B, 1, 1, 1] for broadcasting over images."""
        return getattr(self, name)[t].view(-1, 1, 1, 1)


def img2res(hr: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
    """x_0 = clip(2 (y_HR - U(y_LR)), -1, 1)."""
    return ((hr - lr_up) * RES_RESCALE).clamp(-1, 1)


def res2img(x0: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
    """y = clip(x_0, -1, 1) / 2 + U(y_LR)."""
    return x0.clamp(-1, 1) / RES_RESCALE + lr_up


def modulated_noise(sched: Schedule, t: torch.Tensor, noise: torch.Tensor,
                    e_map: torch.Tensor | None, coefficient: str = "code") -> torch.Tensor:  # fmt: skip
    """eps' = eps + c_t E (E [B, 1, H, W] broadcast over RGB); eps itself when E is None."""
    if e_map is None:
        return noise
    if coefficient not in COEFFICIENTS:
        raise SlimkitError(f"coefficient must be one of {COEFFICIENTS} (got {coefficient!r})")
    name = "mask_coefficient" if coefficient == "code" else "strong_coefficient"
    return noise + sched.at(name, t) * e_map


def q_sample(
    sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (``noise`` = eps or the modulated eps')."""
    return (
        sched.at("sqrt_alphas_cumprod", t) * x0
        + sched.at("sqrt_one_minus_alphas_cumprod", t) * noise
    )


def predict_x0(
    sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (exact for the noise that made x_t)."""
    return (x_t - sched.at("sqrt_one_minus_alphas_cumprod", t) * eps) / sched.at(
        "sqrt_alphas_cumprod", t
    )


def diffusion_loss(model, hr: torch.Tensor, lr: torch.Tensor, lr_up: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, e_map: torch.Tensor | None = None,
                   coefficient: str = "code") -> torch.Tensor:  # fmt: skip
    """SRDiff's L1 noise-prediction loss; with ``e_map`` the SAM-DiffSR modulated target
    ``|eps' - eps_theta(x_t, t, RRDB(lr))|``. Returns the per-sample loss [B]."""
    x0 = img2res(hr, lr_up)
    target = modulated_noise(model.schedule, t, noise, e_map, coefficient)
    x_t = q_sample(model.schedule, x0, t, target)
    pred = model.denoise_fn(x_t, t, model.encode(lr))
    return (target - pred).abs().flatten(1).mean(1)


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` covering [0, n) with at least ``overlap`` shared
    between neighbours (the last window ends at n)."""
    if tile >= n:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride)) + [n - tile]
    return sorted(set(starts))


def _ramp(n: int, ramp: int, lo: bool, hi: bool) -> torch.Tensor:
    """1-D blending weight: 1 inside, rising linearly over ``ramp`` pixels at the edges that
    border another window (``lo`` / ``hi``), never 0."""
    i = torch.arange(n, dtype=torch.float32) + 0.5
    w = torch.ones(n)
    if lo:
        w = torch.minimum(w, i / ramp)
    if hi:
        w = torch.minimum(w, (n - i) / ramp)
    return w


class TiledDenoiser:
    """The denoiser run window by window over a large image, MultiDiffusion-style: at every
    sampling step each window of the current x_t gets its own noise prediction (conditioned on
    the RRDB features of its LR window, computed once), and the predictions are averaged where
    windows overlap with linear ramps. Memory follows the window, not the image; with one window
    it is exactly the untiled denoiser. ``tile`` / ``overlap`` are in LR pixels (``tile`` a
    multiple of the U-Net's LR multiple)."""

    def __init__(self, model, lr: torch.Tensor, tile: int, overlap: int):
        self.model, self.s = model, model.cfg.scale
        h, w = lr.shape[2:]
        self.windows = []
        ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        weight = torch.zeros(1, 1, h * self.s, w * self.s, device=lr.device)
        ramp = max(1, overlap * self.s)
        for y in ys:
            for x in xs:
                th, tw = min(tile, h), min(tile, w)
                wy = _ramp(th * self.s, ramp, y > 0, y + th < h)
                wx = _ramp(tw * self.s, ramp, x > 0, x + tw < w)
                wt = (wy[:, None] * wx[None]).to(lr.device)[None, None]
                cond = model.encode(lr[:, :, y : y + th, x : x + tw])
                box = (y * self.s, (y + th) * self.s, x * self.s, (x + tw) * self.s)
                self.windows.append((box, cond, wt))
                weight[:, :, box[0] : box[1], box[2] : box[3]] += wt
        self.weight = weight

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for (y0, y1, x0, x1), cond, wt in self.windows:
            out[:, :, y0:y1, x0:x1] += wt * self.model.denoise_fn(x[:, :, y0:y1, x0:x1], t, cond)
        return out / self.weight


@torch.no_grad()
def sample(model, lr: torch.Tensor, lr_up: torch.Tensor, *, sampler: str = "ddim", steps: int = 0,
           generator: torch.Generator | None = None, tile: int = 0,
           tile_overlap: int = 8) -> torch.Tensor:  # fmt: skip
    """Super-resolve ``lr`` [B, 3, h, w] (in [-1, 1], ``lr_up`` its bicubic upsampling): start
    from x_T ~ N(0, I) and denoise. ``ddpm``: all T steps (``steps`` 0 or T); ``ddim``: ``steps``
    evenly strided steps (0 = T). No mask, no SAM: the same for SRDiff and SAM-DiffSR.
    ``tile`` > 0: the denoiser runs on overlapping LR windows of that size (see
    :class:`TiledDenoiser`; the noise is drawn for the whole image, so the result does not
    depend on where the windows fall beyond the U-Net's receptive field).
    Returns the SR image in [-1, 1] (not clipped)."""
    sched = model.schedule
    T = sched.T
    steps = steps or T
    if sampler not in SAMPLERS:
        raise SlimkitError(f"sampler must be one of {SAMPLERS} (got {sampler!r})")
    if sampler == "ddpm" and steps != T:
        raise SlimkitError(f"the ddpm sampler runs all {T} steps; use --sampler ddim for {steps}")
    if not 1 <= steps <= T:
        raise SlimkitError(f"steps must be in 1..{T} (got {steps})")
    if tile and tile < max(lr.shape[2:]):
        m = model.cfg.multiple
        if tile % m or not 0 <= tile_overlap < tile:
            raise SlimkitError(f"tile must be a multiple of {m} LR pixels and the overlap in "
                               f"0..tile-1 (got tile {tile}, overlap {tile_overlap})")  # fmt: skip
        denoise = TiledDenoiser(model, lr, tile, tile_overlap)
    else:
        cond = model.encode(lr)

        def denoise(x, t):
            return model.denoise_fn(x, t, cond)

    dev = lr_up.device
    x = torch.randn(lr_up.shape, generator=generator, device="cpu").to(dev)
    b = x.shape[0]
    if sampler == "ddpm":
        x0 = x
        for i in reversed(range(T)):
            t = torch.full((b,), i, dtype=torch.long, device=dev)
            x0 = predict_x0(sched, x, t, denoise(x, t)).clamp(-1, 1)
            mean = (
                sched.at("posterior_mean_coef1", t) * x0 + sched.at("posterior_mean_coef2", t) * x
            )
            if i > 0:
                z = torch.randn(x.shape, generator=generator, device="cpu").to(dev)
                x = mean + (0.5 * sched.at("posterior_log_variance_clipped", t)).exp() * z
            else:
                x = mean
        return res2img(x, lr_up)
    ts = np.unique(np.round(np.linspace(T - 1, 0, steps)).astype(int))[::-1]
    x0 = x
    for j, i in enumerate(ts):
        t = torch.full((b,), int(i), dtype=torch.long, device=dev)
        eps = denoise(x, t)
        x0 = predict_x0(sched, x, t, eps).clamp(-1, 1)
        if j == len(ts) - 1:
            break
        # re-derive eps from the clipped x0 so that the step stays on the data manifold
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = sched.alphas_cumprod[int(ts[j + 1])]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return res2img(x0, lr_up)
