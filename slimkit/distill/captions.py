"""Caption records keyed by stable sample ids, never by list position.

A caption file is JSON lines, one record per image of one split::

    {"id": "digits/0042", "caption": "a bold seven slanted right", "split": "3f0c9a1e57d2b6c4"}

``id`` is the image's stable id (``ImageData.train_ids``: a dataset index or a path relative to
the image folder) and ``split`` the fingerprint of the split the file was made for (data set
kind, split name and the sorted ids, see :func:`split_fingerprint`). A file is only ever paired
with images by id, and :func:`check_ids` refuses a file that misses ids, adds ids or was made for
another split, naming the ids (the official GPT4Image code pairs a list with ImageFolder order
and would silently mis-pair after any change of listing).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from slimkit.core.errors import SlimkitError


def data_kind(name: str) -> str:
    """``imagefolder:/data/train`` -> ``imagefolder`` (a moved folder keeps its ids)."""
    return name.split(":", 1)[0]


def split_fingerprint(data_name: str, split: str, ids: Sequence[str]) -> str:
    """16 hex digits naming (data set kind, split, the set of ids)."""
    blob = json.dumps([data_kind(data_name), split, sorted(ids)]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_captions(path: str | Path, ids: Sequence[str], captions: Sequence[str], split: str,
                   labels: Sequence[int] | None = None) -> Path:  # fmt: skip
    """Write the records atomically (temporary file, then rename)."""
    if len(ids) != len(captions):
        raise SlimkitError(f"{len(ids)} ids but {len(captions)} captions")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w") as f:
        for i, (k, c) in enumerate(zip(ids, captions)):
            rec = {"id": k, "caption": c, "split": split}
            if labels is not None:
                rec["label"] = int(labels[i])
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, p)
    return p


def read_captions(path: str | Path) -> tuple[list[str], list[str], str]:
    """(ids, captions, split fingerprint) of a caption file, with one-line errors for a file
    that is not JSON lines, lacks a field, repeats an id or mixes splits."""
    p = Path(path)
    if not p.is_file():
        raise SlimkitError(f"caption file {p} does not exist")
    ids, caps, splits = [], [], set()
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            k, c, s = rec["id"], rec["caption"], rec["split"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SlimkitError(
                f"{p} line {n}: not a caption record (JSON with id, caption, split)"
            ) from None
        if not isinstance(c, str):
            raise SlimkitError(f"{p} line {n}: caption of {k!r} is not a string")
        ids.append(str(k))
        caps.append(c)
        splits.add(s)
    if not ids:
        raise SlimkitError(f"caption file {p} has no records")
    if len(splits) > 1:
        raise SlimkitError(f"{p} mixes records of several splits: {sorted(splits)}")
    dup = sorted({k for k in ids if ids.count(k) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise SlimkitError(f"{p} repeats ids: {_some(dup)}")
    return ids, caps, splits.pop()


def _some(ids: Sequence[str], n: int = 5) -> str:
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more


def check_ids(what: str, have: Sequence[str], have_split: str, want: Sequence[str],
              want_split: str) -> None:  # fmt: skip
    """Refuse ``have`` (the ids of a caption / embedding file) unless it holds exactly the ids
    ``want`` of the images being trained on, made for the same split; the message names the
    missing and extra ids."""
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} training images have no text ({_some(missing)})")
        if extra:
            parts.append(f"{len(extra)} ids are not training images ({_some(extra)})")
        raise SlimkitError(
            f"{what} does not match the training images: {'; '.join(parts)}. Make it for this "
            "data and split (slimkit describe with the same --data and --train-subset)"
        )
    if have_split != want_split:
        raise SlimkitError(
            f"{what} was made for split {have_split}, this run trains on split {want_split}; "
            "make it again for this split"
        )
