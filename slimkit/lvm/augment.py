"""Long-tail augmentation (DeLVM ``data_generation/vqgan/load.py``): new pairs of a data-poor
task made from its own sources by six-crop, flips and random resized crops.

The geometric transform is applied to the *source* (and its instance map, with nearest
resampling), and the task then re-makes the pair, so input and target stay pixel-aligned.

- six-crop: crops of 3/4 of the side at the four corners and at the top and bottom of the
  vertical centre line, resized back (DeLVM: six 800 x 800 crops of an SA-1B image);
- flips: horizontal or vertical; rotations by a multiple of 90 degrees [our default: DeLVM
  rotates by up to 180 degrees, which leaves empty corners on a 32 x 32 image];
- random resized crop: scale 0.35-1 of the area, aspect 3/4-4/3, resized back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("six-crop", "flip", "resized-crop")


def _crop(x: torch.Tensor, m: torch.Tensor, y0: int, x0: int, h: int, w: int):
    s = x.shape[-1]
    xc = F.interpolate(x[None, :, y0 : y0 + h, x0 : x0 + w], size=(s, s), mode="bilinear",
                       align_corners=False, antialias=True)[0]  # fmt: skip
    mc = F.interpolate(m[None, None, y0 : y0 + h, x0 : x0 + w].float(), size=(s, s),
                       mode="nearest")[0, 0].to(m.dtype)  # fmt: skip
    return xc.clamp(0, 1), mc


def six_crop(x: torch.Tensor, m: torch.Tensor, i: int):
    """The i-th (0-5) of the six 3/4-side crops of image x [3, S, S] and map m [S, S]."""
    s = x.shape[-1]
    c = (3 * s) // 4
    r = s - c
    y0, x0 = [(0, 0), (0, r), (r, 0), (r, r), (0, r // 2), (r, r // 2)][i]
    return _crop(x, m, y0, x0, c, c)


def augment_source(x: torch.Tensor, m: torch.Tensor, g: torch.Generator):
    """One random augmentation of image x [3, S, S] in [0, 1] and instance map m [S, S]."""
    kind = KINDS[int(torch.randint(len(KINDS), (1,), generator=g))]
    if kind == "six-crop":
        x, m = six_crop(x, m, int(torch.randint(6, (1,), generator=g)))
    elif kind == "resized-crop":
        s = x.shape[-1]
        area = float(torch.empty(1).uniform_(0.35, 1.0, generator=g)) * s * s
        ratio = math.exp(
            float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
        )
        w = max(2, min(s, round(math.sqrt(area * ratio))))
        h = max(2, min(s, round(math.sqrt(area / ratio))))
        y0, x0 = (
            int(torch.randint(s - h + 1, (1,), generator=g)),
            int(torch.randint(s - w + 1, (1,), generator=g)),
        )
        x, m = _crop(x, m, y0, x0, h, w)
    # a flip and a rotation by k x 90 degrees on top of every kind (identity with probability 1/8)
    if bool(torch.rand(1, generator=g) < 0.5):
        x, m = x.flip(-1), m.flip(-1)
    k = int(torch.randint(4, (1,), generator=g))
    return x.rot90(k, (-2, -1)).contiguous(), m.rot90(k, (-2, -1)).contiguous()
