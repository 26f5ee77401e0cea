"""Data registry: text corpora by name, deterministic splits, calibration and evaluation windows."""

from slimkit.data.text import (
    CORPORA,
    Document,
    calibration_windows,
    check_corpus,
    eval_windows,
    fingerprint,
    load_documents,
    split_documents,
)

__all__ = [
    "CORPORA",
    "Document",
    "calibration_windows",
    "check_corpus",
    "eval_windows",
    "fingerprint",
    "load_documents",
    "split_documents",
]
