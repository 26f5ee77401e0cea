"""llama.cpp's GGUF block types as quantization grids: what a method optimises is what the file
stores, bit for bit.

Every type stores blocks of consecutive weights along the input dimension of one row. A weight's
value is one of two forms, computed in fp32 exactly as llama.cpp (and the ``gguf`` package's
dequantizer) computes it:

- symmetric: ``w = S * (q - Z)``, Z a constant (Q4_0: 8, Q5_0: 16, Q8_0: 128, Q3_K: 4, Q6_K: 32);
- with a minimum: ``w = S * q - M``, S and M per sub-block (Q4_1 / Q5_1: M = -m; K-quants:
  M = dmin * m_j).

Legacy types (blocks of 32): S = d (fp16), M = -m (fp16). K-quants (super-blocks of 256): one
fp16 ``d`` (and ``dmin``) per super-block and small integer sub-block scales ``sc_j`` (and mins
``m_j``), so S = d * sc_j and M = dmin * m_j; the fp32 products are exact (an fp16 mantissa
times a <= 8-bit integer), which is why the file reproduces them:

| type | sub-block | codes | sub-block scale (min) | bytes / 256 weights |
|---|---|---|---|---|
| Q2_K | 16 | 0..3 | 4-bit sc, 4-bit m | 84 |
| Q3_K | 16 | 0..7 (q - 4) | 6-bit signed sc - 32 | 110 |
| Q4_K | 32 | 0..15 | 6-bit sc, 6-bit m | 144 |
| Q5_K | 32 | 0..31 | 6-bit sc, 6-bit m | 176 |
| Q6_K | 16 | 0..63 (q - 32) | int8 sc | 210 |

Fitting, by ``clip``:

- ``llama.cpp`` (the default of ``slimkit quantize --grid``, and of the export's embedding and
  output tensors): llama.cpp's reference quantizer. K-quants search each sub-block's scale (and
  min) as ``quantize_row_qN_K_ref`` does (:mod:`slimkit.quant.kquant_search`; bit-identical to
  ``ggml_quantize_chunk`` without an importance matrix in the tests). Q4_1 / Q5_1 take the fp16
  range and min, with no integer zero point.
- ``minmax`` / ``mse``: each sub-block's float scale (and min) from its range (or slimkit's
  ``mse`` range search for the min types). Then the super-block scale d = the largest sub-block
  scale / the largest sub-block code (fp16), sc_j = round(s_j / d), and the codes on the
  resulting grid.

Symmetric types take llama.cpp's convention: the value of largest magnitude lands on the grid's
extreme negative code (-8 of Q4_0, -4 of Q3_K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimkit.core.errors import SlimkitError

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    name: str  # lower case, as in --grid gguf:NAME
    bits: int
    block: int  # weights per stored block (32 or 256)
    sub: int  # weights per scale
    offset: bool  # w = S q - M (else w = S (q - zero))
    zero: int  # the constant zero of the symmetric form
    block_bytes: int
    sc_max: int = 0  # K-quants: largest sub-block scale code (unsigned, or the negative end)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def is_k(self) -> bool:
        return self.block == QK_K

    @property
    def ggml(self) -> str:
        return self.name.upper()


TYPES = {
    t.name: t
    for t in (
        GGMLType("q4_0", 4, 32, 32, False, 8, 18),
        GGMLType("q4_1", 4, 32, 32, True, 0, 20),
        GGMLType("q5_0", 5, 32, 32, False, 16, 22),
        GGMLType("q5_1", 5, 32, 32, True, 0, 24),
        GGMLType("q8_0", 8, 32, 32, False, 128, 34),
        GGMLType("q2_k", 2, QK_K, 16, True, 0, 84, 15),
        GGMLType("q3_k", 3, QK_K, 16, False, 4, 110, 32),
        GGMLType("q4_k", 4, QK_K, 32, True, 0, 144, 63),
        GGMLType("q5_k", 5, QK_K, 32, True, 0, 176, 63),
        GGMLType("q6_k", 6, QK_K, 16, False, 32, 210, 128),
    )
}
# llama.cpp's tensor_type_fallback: a width that is not a multiple of 256
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def ggml_type(name: str) -> GGMLType:
    try:
        return TYPES[name.lower()]
    except KeyError:
        raise SlimkitError(
            f"unknown GGUF block type {name!r}; choose one of: {', '.join(TYPES)}"
        ) from None


def with_fallback(name: str, width: int) -> str | None:
    """The type llama.cpp stores a tensor of input width ``width`` in when asked for ``name``
    (None: not even the fallback fits; llama.cpp then keeps F16)."""
    if width % ggml_type(name).block == 0:
        return name
    fb = FALLBACK.get(name)
    return fb if fb is not None and width % TYPES[fb].block == 0 else None


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim, sign kept (first one on ties)."""
    i = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, i).squeeze(-1)


@dataclass
class GridParams:
    """Sub-block grid of one (out, in) weight: S, and Z or M (see the module docstring), each
    (out, in / sub); ``super`` (out, in / 256, 2) holds K-quants' fp16 d and dmin."""

    scale: torch.Tensor
    zero: torch.Tensor
    super: torch.Tensor | None


def fit(w: torch.Tensor, t: GGMLType, clip: str = "minmax") -> GridParams:
    """Grid parameters of ``w`` (out, in) on type ``t`` (in must be a multiple of t.block)."""
    out, inp = w.shape
    if inp % t.block:
        raise SlimkitError(f"{t.ggml} stores blocks of {t.block}; input width {inp} is not one")
    x = w.float().reshape(out, inp // t.sub, t.sub)
    if clip == "llama.cpp" and t.is_k:
        from slimkit.quant.kquant_search import fit_reference

        return fit_reference(w, t.name)
    if clip == "llama.cpp" and t.offset:  # quantize_row_q4_1_ref: fp16 step and min, no
        lo, hi = x.amin(-1), x.amax(-1)  # integer zero point (the range need not hold 0)
        return GridParams(_fp16((hi - lo) / t.qmax), _fp16(-lo), None)
    if t.offset:
        from slimkit.quant.quantizer import QuantSpec, fit_params

        s, z = fit_params(w.float(), QuantSpec(t.bits, t.sub, False, clip))
        mn = s * z  # value = s q - mn, mn >= 0 (the range includes 0)
        if not t.is_k:
            return GridParams(_fp16(s), _fp16(mn), None)
        s_sup = s.reshape(out, -1, QK_K // t.sub)
        m_sup = mn.reshape(out, -1, QK_K // t.sub)
        d = _fp16(s_sup.amax(-1) / t.sc_max)
        dmin = _fp16(m_sup.amax(-1) / t.sc_max)
        sc = torch.where(d[..., None] > 0, s_sup / d[..., None], 0).round().clamp(0, t.sc_max)
        m = torch.where(dmin[..., None] > 0, m_sup / dmin[..., None], 0).round()
        m = m.clamp(0, t.sc_max)
        S = (d[..., None] * sc).reshape(out, -1)
        M = (dmin[..., None] * m).reshape(out, -1)
        return GridParams(S, M, torch.stack([d, dmin], -1))
    if t.name == "q8_0":
        S = _fp16(x.abs().amax(-1) / 127)
        return GridParams(S, torch.full_like(S, t.zero), None)
    s = _signed_absmax(x) / -t.zero  # the largest magnitude lands on code 0 (value -zero * s)
    if not t.is_k:
        S = _fp16(s)
        return GridParams(S, torch.full_like(S, t.zero), None)
    s_sup = s.reshape(out, -1, QK_K // t.sub)
    d = _fp16(_signed_absmax(s_sup) / -t.sc_max)
    sc = torch.where(d[..., None] != 0, s_sup / d[..., None], 0).round()
    sc = sc.clamp(-t.sc_max, t.sc_max - 1)
    S = (d[..., None] * sc).reshape(out, -1)
    return GridParams(S, torch.full_like(S, t.zero), torch.stack([d, torch.zeros_like(d)], -1))


def quantize_codes(x: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """Nearest codes of ``x`` on the grid (S, Z-or-M broadcast against x); a zero step takes
    code 0 of the min form, the zero of the symmetric one (the value is the same for all)."""
    live = S != 0
    safe = torch.where(live, S, torch.ones_like(S))
    if t.offset:
        q = torch.round((x + Z) / safe)
        q = torch.where(live, q, torch.zeros_like(q))
    else:
        q = torch.round(x / safe) + Z
        q = torch.where(live, q, Z.expand_as(q) if Z.dim() else Z)
    return torch.clamp(q, 0, t.qmax)


def dequantize_codes(
    q: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, t: GGMLType
) -> torch.Tensor:
    """The fp32 value llama.cpp reads back (same operations in the same order)."""
    return S * q - Z if t.offset else S * (q - Z)


# ---- GGML block bytes ----------------------------------------------------------------------


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def _int_ratio(num: torch.Tensor, den: torch.Tensor, what: str) -> torch.Tensor:
    """num / den, which must be an exact integer where den != 0 (num == 0 elsewhere)."""
    r = torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)
    ri = r.round()
    if not torch.equal(r, ri) or not torch.equal(den * ri, torch.where(den != 0, num, 0)):
        raise SlimkitError(f"GGUF: {what} are not integer multiples of the super-block scale")
    return ri.to(torch.int64)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """(n, 256) 2-bit values -> (n, 64) bytes: byte h*32+l bits 2k..2k+1 = value h*128+32k+l."""
    n = q.shape[0]
    v = q.reshape(n, 2, 4, 32).astype(np.uint8)
    return (v[:, :, 0] | v[:, :, 1] << 2 | v[:, :, 2] << 4 | v[:, :, 3] << 6).reshape(n, 64)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 8 six-bit scales and mins -> 12 bytes (llama.cpp's get_scale_min_k4)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    b0 = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    b1 = m[:, :4] | (m[:, 4:] >> 4) << 6
    b2 = (sc[:, 4:] & 0x0F) | (m[:, 4:] & 0x0F) << 4
    return np.concatenate([b0, b1, b2], axis=1)


def encode(codes: torch.Tensor, p: GridParams, t: GGMLType) -> np.ndarray:
    """(out, in) codes on grid ``p`` -> (out, in / block * block_bytes) uint8 GGML blocks."""
    out, inp = codes.shape
    nb = out * inp // t.block
    q = codes.reshape(nb, t.block).numpy().astype(np.uint8)
    S = p.scale.reshape(nb, t.block // t.sub)
    Z = p.zero.reshape(nb, t.block // t.sub)
    if not t.is_k:
        d = _f16_bytes(S[:, 0])
        if t.name == "q8_0":
            parts = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
        else:
            qs = (q[:, :16] & 0x0F) | (q[:, 16:] & 0x0F) << 4
            parts = [d] if not t.offset else [d, _f16_bytes(-Z[:, 0])]
            if t.bits == 5:
                qh = np.packbits(q >> 4, axis=-1, bitorder="little")
                parts.append(qh)
            parts.append(qs)
        return np.concatenate(parts, axis=1).reshape(out, -1)
    sup = p.super.reshape(nb, 2)
    d, dmin = sup[:, 0], sup[:, 1]
    sc = _int_ratio(S, d[:, None], "sub-block scales").numpy()
    if t.name == "q2_k":
        m = _int_ratio(Z, dmin[:, None], "sub-block mins").numpy()
        scales = (sc.astype(np.uint8) & 0x0F) | (m.astype(np.uint8) & 0x0F) << 4
        return np.concatenate(
            [scales, _pack_2bit(q), _f16_bytes(d), _f16_bytes(dmin)], axis=1
        ).reshape(out, -1)
    if t.name == "q3_k":
        u = (sc + 32).astype(np.uint8)  # 0..63
        low = (u[:, :8] & 0x0F) | (u[:, 8:] & 0x0F) << 4
        hi = (u >> 4).reshape(nb, 4, 4)  # [k, j] = high bits of scale 4k + j
        high = hi[:, 0] | hi[:, 1] << 2 | hi[:, 2] << 4 | hi[:, 3] << 6
        hmask = np.zeros((nb, 32), dtype=np.uint8)
        for k in range(8):
            hmask |= ((q[:, 32 * k : 32 * k + 32] >> 2) & 1) << k
        return np.concatenate([hmask, _pack_2bit(q & 3), low, high, _f16_bytes(d)], axis=1).reshape(
            out, -1
        )
    if t.name in ("q4_k", "q5_k"):
        m = _int_ratio(Z, dmin[:, None], "sub-block mins").numpy()
        v = q.reshape(nb, 4, 2, 32)
        qs = ((v[:, :, 0] & 0x0F) | (v[:, :, 1] & 0x0F) << 4).reshape(nb, 128)
        parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m)]
        if t.name == "q5_k":
            qh = np.zeros((nb, 32), dtype=np.uint8)
            for i in range(8):
                qh |= ((q[:, 32 * i : 32 * i + 32] >> 4) & 1) << i
            parts.append(qh)
        return np.concatenate([*parts, qs], axis=1).reshape(out, -1)
    # q6_k
    v = q.reshape(nb, 2, 2, 64)  # [half, nibble, e]
    ql = ((v[:, :, 0] & 0x0F) | (v[:, :, 1] & 0x0F) << 4).reshape(nb, 128)
    h = (q >> 4).reshape(nb, 2, 4, 32)
    qh = (h[:, :, 0] | h[:, :, 1] << 2 | h[:, :, 2] << 4 | h[:, :, 3] << 6).reshape(nb, 64)
    return np.concatenate(
        [ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1
    ).reshape(out, -1)


def quantize_tensor(
    w: torch.Tensor, name: str, clip: str = "llama.cpp"
) -> tuple[np.ndarray, torch.Tensor]:
    """Round ``w`` (out, in) to nearest on type ``name`` (by default on the grid llama.cpp's own
    quantizer picks): (GGML block bytes, fp32 values)."""
    t = ggml_type(name)
    p = fit(w, t, clip)
    idx = torch.arange(w.shape[1]) // t.sub
    S, Z = p.scale[:, idx], p.zero[:, idx]
    q = quantize_codes(w.float(), S, Z, t)
    return encode(q.to(torch.uint8), p, t), dequantize_codes(q, S, Z, t)


# ---- llama.cpp's per-tensor type choice (llama_tensor_get_type) ----------------------------

# file type -> the type of every tensor without a rule (llama_ftype_get_default_type); the
# enum value is general.file_type
FILE_TYPES = {
    "q4_0": ("q4_0", 2),
    "q4_1": ("q4_1", 3),
    "q8_0": ("q8_0", 7),
    "q5_0": ("q5_0", 8),
    "q5_1": ("q5_1", 9),
    "q2_k": ("q2_k", 10),
    "q3_k_s": ("q3_k", 11),
    "q3_k_m": ("q3_k", 12),
    "q3_k_l": ("q3_k", 13),
    "q4_k_s": ("q4_k", 14),
    "q4_k_m": ("q4_k", 15),
    "q5_k_s": ("q5_k", 16),
    "q5_k_m": ("q5_k", 17),
    "q6_k": ("q6_k", 18),
}
# Hugging Face linear names -> llama.cpp's tensor categories
CATEGORIES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "c_attn": "attn_qkv",
    "o_proj": "attn_output",
    "out_proj": "attn_output",
    "attn.c_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "fc1": "ffn_up",
    "c_fc": "ffn_up",
    "down_proj": "ffn_down",
    "fc2": "ffn_down",
    "mlp.c_proj": "ffn_down",
}


def category(name: str) -> str:
    for suffix in sorted(CATEGORIES, key=len, reverse=True):
        if name == suffix or name.endswith("." + suffix):
            return CATEGORIES[suffix]
    return "other"


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(ftype: str, cat: str, i_layer: int, n_layers: int, n_gqa: int) -> str:
    """llama.cpp's choice for a block tensor of a Llama-like model (no experts, not Falcon,
    not 70B), before the width fallback. The counters llama.cpp keeps for attn_v / ffn_down
    equal the layer index (tensors are visited layer by layer, one of each per layer)."""
    new = FILE_TYPES[ftype][0]
    i, n = i_layer, n_layers
    if cat in ("attn_v", "attn_qkv"):  # category_is_attn_v: a fused qkv takes v's rules
        if ftype == "q2_k":
            new = "q4_k" if n_gqa >= 4 else "q3_k"
        elif ftype == "q3_k_m":
            new = "q5_k" if i < 2 else "q4_k"
        elif ftype == "q3_k_l":
            new = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            new = "q6_k"
        elif ftype == "q4_k_s" and i < 4:
            new = "q5_k"
    elif cat == "ffn_down":
        if ftype == "q2_k":
            new = "q3_k"
        elif ftype == "q3_k_m":
            new = "q5_k" if i < n // 16 else "q4_k"
        elif ftype == "q3_k_l":
            new = "q5_k"
        elif ftype == "q4_k_m":
            if use_more_bits(i, n):
                new = "q6_k"
        elif ftype == "q5_k_m" and use_more_bits(i, n):
            new = "q6_k"
        elif ftype == "q4_k_s" and i < n // 8:
            new = "q5_k"
    elif cat == "attn_output":
        if ftype == "q2_k":
            new = "q3_k"
        elif ftype == "q3_k_m":
            new = "q4_k"
        elif ftype == "q3_k_l":
            new = "q5_k"
    return new


def output_type(default: str, width: int) -> str | None:
    """The output matrix (and a tied token embedding): Q6_K, or Q8_0 when the width is not a
    multiple of the file's block or the file is Q8_0; then the width fallback."""
    if width % TYPES[default].block:
        return "q8_0" if width % 32 == 0 else None
    return with_fallback("q8_0" if default == "q8_0" else "q6_k", width)


def parse_grid(grid: str) -> tuple[str, str] | None:
    """``uniform`` -> None; ``gguf:TYPE`` -> ("pure", TYPE); ``llama.cpp:FTYPE`` -> ("mix", FTYPE)."""
    if grid in ("", "uniform"):
        return None
    kind, _, name = grid.partition(":")
    name = name.lower()
    if kind == "gguf" and name in TYPES:
        return "pure", name
    if kind == "llama.cpp" and name in FILE_TYPES:
        return "mix", name
    raise SlimkitError(
        f"unknown --grid {grid!r}; choose uniform, gguf:TYPE (every linear on one GGUF block "
        f"type: {', '.join(TYPES)}) or llama.cpp:FTYPE (llama.cpp's per-tensor mix of a file "
        f"type: {', '.join(FILE_TYPES)})"
    )


def default_type(grid: str) -> str | None:
    parsed = parse_grid(grid)
    if parsed is None:
        return None
    return parsed[1] if parsed[0] == "pure" else FILE_TYPES[parsed[1]][0]


def file_type(grid: str) -> int:
    """general.file_type of a grid (a pure type counts as the file type of that default)."""
    parsed = parse_grid(grid)
    if parsed[0] == "mix":
        return FILE_TYPES[parsed[1]][1]
    name = {"q2_k": "q2_k", "q3_k": "q3_k_s", "q4_k": "q4_k_s", "q5_k": "q5_k_s"}.get(
        parsed[1], parsed[1]
    )
    return FILE_TYPES[name][1]


def tensor_type(
    grid: str, name: str, width: int, i_layer: int, n_layers: int, n_gqa: int
) -> str | None:
    """The GGUF type a block linear ``name`` (Hugging Face name) of input width ``width`` is
    stored in under ``grid``; None where nothing fits (width not a multiple of 32)."""
    kind, which = parse_grid(grid)
    new = which if kind == "pure" else mix_type(which, category(name), i_layer, n_layers, n_gqa)
    return with_fallback(new, width)


def _unpack_2bit(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    v = b.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (v & 3).reshape(n, 256)


def decode_codes(raw: np.ndarray, name: str, n_in: int) -> np.ndarray:
    """Block reader: uint8 rows of GGML blocks -> (rows, n_in) codes in slimkit's unsigned
    convention (the inverse of :func:`encode`; the export's ``--verify`` compares them)."""
    t = ggml_type(name)
    rows = raw.shape[0]
    b = raw.reshape(rows * n_in // t.block, t.block_bytes)
    n = b.shape[0]
    if t.name == "q8_0":
        q = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    elif not t.is_k:
        qs = b[:, -16:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        if t.bits == 5:
            qh = b[:, -20:-16]
            q |= np.unpackbits(qh, axis=1, bitorder="little") << 4
    elif t.name == "q2_k":
        q = _unpack_2bit(b[:, 16:80])
    elif t.name == "q3_k":
        hm = b[:, :32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = _unpack_2bit(b[:, 32:96]) | ((hm & 1).reshape(n, 256) << 2)
    elif t.name in ("q4_k", "q5_k"):
        qs = b[:, -128:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(
            1, 1, 2, 1
        )
        q = (qs & 0x0F).reshape(n, 256)
        if t.name == "q5_k":
            qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            q |= (qh & 1).reshape(n, 256) << 4
    else:  # q6_k
        ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(
            1, 1, 4, 1
        )
        q = (ql & 0x0F).reshape(n, 256) | ((qh & 3).reshape(n, 256) << 4)
    return q.astype(np.uint8).reshape(rows, n_in)
