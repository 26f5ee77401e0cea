"""Promptable prediction on one image: ``set_image`` once, then ``predict`` with points, a box
and / or a previous low-resolution mask, as SAM's predictor does (resize the longest side to the
model's input size, normalise, pad; masks upsampled back to the original size)."""

from __future__ import annotations

import numpy as np
import torch

from slimkit.core.errors import SlimkitError
from slimkit.sam.model import Sam


def resized_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class SamPredictor:
    def __init__(self, model: Sam):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.features: torch.Tensor | None = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """``image``: H x W x 3 uint8 RGB."""
        from torchvision.transforms.functional import resize, to_pil_image

        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise SlimkitError("set_image expects an H x W x 3 RGB uint8 array")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise SlimkitError("the image is empty (0 pixels)")
        self.original_size = image.shape[:2]
        self.input_size = resized_shape(*self.original_size, self.model.cfg.img_size)
        resized = np.array(resize(to_pil_image(image.astype(np.uint8)), self.input_size))
        x = torch.as_tensor(resized).permute(2, 0, 1)[None].float().to(self.device)
        self.features = self.model.image_encoder(self.model.preprocess(x))

    def _coords(self, xy: np.ndarray) -> torch.Tensor:
        h, w = self.original_size
        nh, nw = self.input_size
        c = torch.as_tensor(np.asarray(xy, dtype=np.float32)).clone()
        c[..., 0] *= nw / w
        c[..., 1] *= nh / h
        return c.to(self.device)

    @torch.no_grad()
    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output: bool = True, return_logits: bool = False):  # fmt: skip
        """Returns (masks C x H x W, iou C, low-res logits C x 4g x 4g) as numpy arrays."""
        if self.features is None:
            raise SlimkitError("call set_image first")
        h, w = self.original_size
        points = None
        if point_coords is not None:
            pc = np.asarray(point_coords, dtype=np.float32).reshape(-1, 2)
            if point_labels is None or len(point_labels) != len(pc):
                raise SlimkitError("give one label (1 foreground, 0 background) per point")
            out = (pc[:, 0] < 0) | (pc[:, 0] >= w) | (pc[:, 1] < 0) | (pc[:, 1] >= h)
            if out.any():
                raise SlimkitError(f"point {pc[out][0].tolist()} lies outside the {w} x {h} image")
            points = (
                self._coords(pc)[None],
                torch.as_tensor(np.asarray(point_labels), dtype=torch.int64)[None].to(self.device),
            )
        boxes = None
        if box is not None:
            b = np.asarray(box, dtype=np.float32).reshape(-1, 4)
            if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
                raise SlimkitError("a box is x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
            boxes = self._coords(b.reshape(-1, 2, 2)).reshape(-1, 4)
        if points is None and boxes is None and mask_input is None:
            raise SlimkitError("give at least one prompt: points, a box or a mask")
        masks_in = (
            None
            if mask_input is None
            else torch.as_tensor(mask_input, dtype=torch.float32)
            .reshape(1, 1, *np.shape(mask_input)[-2:])
            .to(self.device)
        )
        low, iou = self.model.decode(self.features, points, boxes, masks_in, multimask_output)
        up = self.model.postprocess(low, self.input_size, self.original_size)
        masks = up if return_logits else up > self.model.mask_threshold
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low[0].cpu().numpy()
