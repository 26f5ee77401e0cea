"""Regenerate kquant_llamacpp.npz: weights and llama.cpp's own quantization of them.

The bytes come from ``ggml_quantize_chunk`` (no importance matrix, i.e. the ``*_ref`` quantizers
that ``llama_model_quantize`` uses) in the libggml shipped with llama-cpp-python (``make
llamacpp``; the npz in the repository was made with 0.3.36):

    python tests/data/make_kquant_reference.py

The weights are fp16 values (llama.cpp quantizes an F16 file's tensors), 8 rows of 512: Gaussian
rows of different scales, heavy tails, an all-positive row, an all-negative row, and a row with a
zero sub-block, a constant sub-block and a single outlier.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

# ggml_type enum values
TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11,
         "q4_k": 12, "q5_k": 13, "q6_k": 14}  # fmt: skip


def ggml_quantizer():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]  # fmt: skip
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(w: np.ndarray, name: str) -> np.ndarray:
        """llama.cpp's bytes of ``w`` (rows, n) as ``name``: (rows, row bytes) uint8."""
        tid = TYPES[name]
        x = np.ascontiguousarray(w, dtype=np.float32)
        rows, n = x.shape
        row = lib.ggml_row_size(tid, n)
        dst = np.zeros(rows * row, dtype=np.uint8)
        lib.ggml_quantize_init(tid)
        got = lib.ggml_quantize_chunk(tid, x.ctypes.data, dst.ctypes.data, 0, rows, n, None)
        assert got == rows * row
        return dst.reshape(rows, row)

    return quantize


def weights() -> np.ndarray:
    rng = np.random.default_rng(20261207)
    w = np.stack([
        rng.normal(0, 0.02, 512),
        rng.normal(0, 1.0, 512),
        rng.standard_t(2, 512) * 0.01,
        np.abs(rng.normal(0.05, 0.02, 512)),
        -np.abs(rng.normal(0.05, 0.02, 512)),
        rng.normal(0.003, 0.01, 512) ** 3 * 100,
        rng.laplace(0, 0.05, 512),
        rng.normal(0, 0.02, 512),
    ])  # fmt: skip
    w[7, 0:32] = 0.0  # a zero sub-block
    w[7, 64:96] = 0.0125  # a constant sub-block
    w[7, 300] = 0.9  # an outlier
    return w.astype(np.float16)


def main() -> None:
    import llama_cpp

    quantize = ggml_quantizer()
    w = weights()
    out = {"weights": w, "llama_cpp_version": np.array(llama_cpp.__version__)}
    for name in TYPES:
        out[name] = quantize(w.astype(np.float32), name)
    path = Path(__file__).with_name("kquant_llamacpp.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
