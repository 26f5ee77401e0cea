"""PSNR / SSIM as two protocols define them; every number slimkit prints carries its protocol.

``basicsr`` (XPixelGroup/BasicSR ``psnr_ssim.py``, slimkit's default; the classic SR tables):
    uint8 images (rounded), ``crop_border = scale`` pixels cut from every edge, Y of ITU-R BT.601
    (Y = 16 + 65.481 R + 128.553 G + 24.966 B, RGB in [0, 1]) in [0, 255] float64;
    PSNR = 10 log10(255^2 / MSE); SSIM with an 11 x 11 Gaussian window (sigma 1.5),
    C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, 'valid' filtering, mean of the map.
``pyiqa`` (chaofengc/IQA-PyTorch ``psnr`` with ``test_y_channel=True, color_space='ycbcr'`` and
    ``ssim``, as SAM-DiffSR's ``tools/caculate_iqa.py`` calls them): float RGB in [0, 1], no
    border crop; PSNR on the float Y in [0, 1] with eps 1e-8; SSIM on the Y channel scaled to
    [0, 255] and rounded, same window and constants as above, 'valid' filtering.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import convolve2d

PROTOCOLS = ("basicsr", "pyiqa")


def rgb_to_y(rgb01: np.ndarray) -> np.ndarray:
    """BT.601 luma of RGB in [0, 1] ([H, W, 3]) in [16, 235] (float64)."""
    rgb = rgb01.astype(np.float64)
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def ssim_map_mean(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM of two [H, W] float64 images ('valid' Gaussian filtering, mean of the map)."""
    w = _gaussian_window()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def f(x):
        return convolve2d(x, w, mode="valid")

    mu_a, mu_b = f(a), f(b)
    va = f(a * a) - mu_a**2
    vb = f(b * b) - mu_b**2
    cov = f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(s.mean())


def psnr_ssim(sr: np.ndarray, hr: np.ndarray, protocol: str = "basicsr", scale: int = 4) -> dict:
    """PSNR (dB) and SSIM of ``sr`` against ``hr`` (both RGB [H, W, 3]: uint8, or float in
    [0, 1]) under ``protocol``; returns ``{"psnr", "ssim", "protocol"}``.

    Example:
        >>> x = np.zeros((32, 32, 3), np.uint8); psnr_ssim(x, x)["ssim"]
        1.0
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS} (got {protocol!r})")
    if sr.shape != hr.shape:
        raise ValueError(f"shapes differ: {sr.shape} vs {hr.shape}")

    def as01(x):
        return x.astype(np.float64) / 255 if x.dtype == np.uint8 else x.astype(np.float64)

    if protocol == "basicsr":

        def as_u8(x):
            return x if x.dtype == np.uint8 else np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)

        a, b = rgb_to_y(as_u8(sr) / 255.0), rgb_to_y(as_u8(hr) / 255.0)
        if scale:
            a, b = a[scale:-scale, scale:-scale], b[scale:-scale, scale:-scale]
        mse = np.mean((a - b) ** 2)
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
        return {
            "psnr": float(psnr),
            "ssim": ssim_map_mean(a, b),
            "protocol": f"basicsr-y-crop{scale}",
        }
    a, b = rgb_to_y(np.clip(as01(sr), 0, 1)) / 255, rgb_to_y(np.clip(as01(hr), 0, 1)) / 255
    psnr = 10 * np.log10(1.0 / (np.mean((a - b) ** 2) + 1e-8))
    ssim = ssim_map_mean(np.round(a * 255), np.round(b * 255))
    return {"psnr": float(psnr), "ssim": ssim, "protocol": "pyiqa-y-ycbcr-nocrop"}
