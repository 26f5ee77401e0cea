"""Data registry: text corpora by name, deterministic splits, calibration and evaluation windows."""

from slimkit.data.text import (
    CORPORA,
    Document,
    calibration_windows,
    eval_windows,
    fingerprint,
    load_documents,
    split_documents,
)

__all__ = [
    "CORPORA",
    "Document",
    "calibration_windows",
    "eval_windows",
    "fingerprint",
    "load_documents",
    "split_documents",
]
