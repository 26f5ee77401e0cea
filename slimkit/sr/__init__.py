"""Diffusion super-resolution: SRDiff (Li et al., 2022) and SAM-DiffSR (Wang et al., 2024),
whose forward-process noise is shifted per segment by a structural position encoding of
segment-anything masks during training only.

- ``degrade.py``: MATLAB-compatible antialiased bicubic resizing (the LR degradation);
- ``structural_position_encoding.py``: masks -> the SPE map E (rotary pattern, per-segment
  whole-image mean, last writer wins); ``masks.py``: the mask sources (SAM, slimkit SAM runs,
  SLIC, Felzenszwalb) behind one interface;
- ``models.py``: RRDBNet encoder + conditional U-Net in the official SRDiff / SAM-DiffSR key
  layout, official checkpoint loading;
- ``diffusion.py``: cosine schedule, residual target, the modulated forward process and loss,
  the mask-free DDPM and DDIM-style samplers;
- ``data.py``: paired HR / LR patches with E cut in HR coordinates, flips; synthetic
  piecewise-textured images with known segments; the bundled photos;
- ``metrics.py``: PSNR / SSIM under the BasicSR and pyiqa protocols;
- ``train.py``: the RRDB and diffusion trainers on the shared loop; ``evaluate.py``:
  super-resolve, score, side-by-side pictures.
"""
