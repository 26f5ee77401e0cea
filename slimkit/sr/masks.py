"""Mask sources behind one interface: ``source(image uint8 [H, W, 3]) -> list of bool masks``
(in the generator's output order, which SPE's last-writer-wins painting depends on).

Sources, named by a spec string:

- ``slic`` / ``felzenszwalb``: scikit-image superpixels (offline, no weights; a SAM stand-in);
- ``slimkit-sam:RUN``: a ``slimkit sam train`` run in segment-everything mode;
- ``sam:CKPT``: an official SAM / MobileSAM / TinySAM checkpoint through slimkit's SAM loader,
  segment-everything with SAM's ``amg.py`` defaults (32 x 32 points, IoU 0.88, stability 0.95,
  box NMS 0.7), as the SAM-DiffSR authors ran it.

The two SAM sources take an ``EverythingConfig`` (``mask_source(spec, everything=...)``; ``sr
make-masks --pred-iou-thresh / --stability-thresh / --points-per-side``): a small SAM trained
here predicts IoUs and logits on another scale than SAM's, and SAM's filters can keep nothing
(``benchmarks/sam_everything.py`` calibrates them on validation scenes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

MaskSource = Callable[[np.ndarray], list[np.ndarray]]
MASK_SOURCES = Registry("mask source")  # name -> factory(argument: str) -> MaskSource


def _labels_to_masks(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == v for v in np.unique(labels)]


@MASK_SOURCES.register("slic")
def _slic(arg: str, everything=None) -> MaskSource:
    from skimage.segmentation import slic

    n = int(arg) if arg else 100

    def run(img: np.ndarray) -> list[np.ndarray]:
        return _labels_to_masks(slic(img, n_segments=n, compactness=10, start_label=0))

    return run


@MASK_SOURCES.register("felzenszwalb")
def _felzenszwalb(arg: str, everything=None) -> MaskSource:
    from skimage.segmentation import felzenszwalb

    k = float(arg) if arg else 100.0

    def run(img: np.ndarray) -> list[np.ndarray]:
        return _labels_to_masks(felzenszwalb(img, scale=k, sigma=0.8, min_size=20))

    return run


def _everything(model, cfg=None) -> MaskSource:
    from slimkit.sam.everything import EverythingConfig, sam_predict_fn, segment_everything

    cfg = cfg or EverythingConfig(mode="dense", points_per_side=32)

    def run(img: np.ndarray) -> list[np.ndarray]:
        predict, _ = sam_predict_fn(model, img)
        res = segment_everything(predict, img.shape[:2], cfg)
        return [np.asarray(m["segmentation"], bool) for m in res["masks"]]

    return run


@MASK_SOURCES.register("slimkit-sam")
def _slimkit_sam(arg: str, everything=None) -> MaskSource:
    from slimkit.sam.train import load_trained

    if not arg:
        raise SlimkitError("slimkit-sam:RUN needs the run directory of `slimkit sam train`")
    return _everything(load_trained(arg).eval(), everything)


@MASK_SOURCES.register("sam")
def _sam(arg: str, everything=None) -> MaskSource:
    from slimkit.sam.checkpoint import load_sam

    if not arg or not Path(arg).is_file():
        raise SlimkitError(f"sam:CKPT needs an existing SAM checkpoint file (got {arg!r})")
    return _everything(load_sam(arg).eval(), everything)


SAM_SOURCES = ("slimkit-sam", "sam")


def mask_source(spec: str, everything=None) -> MaskSource:
    """The mask source a spec string names: ``slic``, ``slic:200``, ``felzenszwalb``,
    ``slimkit-sam:RUN``, ``sam:CKPT``. ``everything``: the ``EverythingConfig`` of the SAM
    sources (default: SAM's dense 32 x 32 grid with its ``amg.py`` filters)."""
    name, _, arg = spec.partition(":")
    if name not in MASK_SOURCES:
        raise SlimkitError(
            f"unknown mask source {spec!r}; one of: slic[:N], felzenszwalb[:SCALE], "
            "slimkit-sam:RUN, sam:CKPT"
        )
    try:
        return MASK_SOURCES.get(name)(arg, everything)
    except ValueError:
        raise SlimkitError(f"mask source {spec!r}: bad argument {arg!r}") from None
