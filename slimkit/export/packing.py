"""Dense little-endian bit packing of unsigned codes into int32 words (the GPTQ layout).

Element i of a packed run of b-bit values occupies bits [i*b, (i+1)*b) of the run's bit
stream, word j holding stream bits [32 j, 32 j + 32). For b in {2, 4, 8} that is 32/b values per
word; for b = 3 it is the GPTQ reference layout of 32 values in 3 words with values 10 and 21
straddling word boundaries.
"""

from __future__ import annotations

import numpy as np
import torch


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0: (n, m) unsigned codes -> (ceil(n*bits/32), m) int32 (zero padding)."""
    n, m = codes.shape
    words = -(-n * bits // 32)
    c = codes.to(torch.int64)
    pad = -(-words * 32 // bits) - n  # rows that fill the last word
    if pad > 0:
        c = torch.cat([c, torch.zeros(pad, m, dtype=torch.int64)])
    out = torch.zeros(words, m, dtype=torch.int64)
    for i in range(c.shape[0]):
        start = i * bits
        w, off = divmod(start, 32)
        if w >= words:
            break
        out[w] |= (c[i] << off) & 0xFFFFFFFF
        if off + bits > 32 and w + 1 < words:  # straddles into the next word
            out[w + 1] |= c[i] >> (32 - off)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_rows_bitstream(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Independent reader: (words, m) int32 -> (n, m) codes, through numpy's bit unpacking.

    Written from the format description (not from :func:`pack_rows`): each column's words are
    laid out as little-endian bytes, expanded to a bit stream, and cut into b-bit values."""
    words, m = packed.shape
    le = packed.astype("<i4").T.copy()  # (m, words): each column's stream
    stream = np.unpackbits(le.view(np.uint8), axis=1, bitorder="little")  # (m, words*32)
    vals = stream[:, : n * bits].reshape(m, n, bits).astype(np.int64)
    codes = (vals << np.arange(bits)).sum(-1)
    return codes.T.astype(np.uint8)
