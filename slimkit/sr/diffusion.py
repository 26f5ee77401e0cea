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


@torch.no_grad()
def sample(model, lr: torch.Tensor, lr_up: torch.Tensor, *, sampler: str = "ddim", steps: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Super-resolve ``lr`` [B, 3, h, w] (in [-1, 1], ``lr_up`` its bicubic upsampling): start
    from x_T ~ N(0, I) and denoise. ``ddpm``: all T steps (``steps`` 0 or T); ``ddim``: ``steps``
    evenly strided steps (0 = T). No mask, no SAM: the same for SRDiff and SAM-DiffSR.
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
    cond = model.encode(lr)
    dev = lr_up.device
    x = torch.randn(lr_up.shape, generator=generator, device="cpu").to(dev)
    b = x.shape[0]
    if sampler == "ddpm":
        x0 = x
        for i in reversed(range(T)):
            t = torch.full((b,), i, dtype=torch.long, device=dev)
            x0 = predict_x0(sched, x, t, model.denoise_fn(x, t, cond)).clamp(-1, 1)
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
        eps = model.denoise_fn(x, t, cond)
        x0 = predict_x0(sched, x, t, eps).clamp(-1, 1)
        if j == len(ts) - 1:
            break
        # re-derive eps from the clipped x0 so that the step stays on the data manifold
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = sched.alphas_cumprod[int(ts[j + 1])]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return res2img(x0, lr_up)
