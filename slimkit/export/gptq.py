"""GPTQ checkpoints (transformers through gptqmodel / optimum, gptqmodel, vLLM ``gptq`` /
``gptq_marlin``, SGLang, TGI): ``qweight`` [in*b/32, out], ``qzeros`` [groups, out*b/32],
``scales`` [groups, out] fp16, ``g_idx`` [in], for 2, 3, 4 and 8 bits, in one of two
checkpoint formats that differ only in what ``qzeros`` holds:

- ``gptq`` (v1, the original GPTQ / AutoGPTQ layout) stores ``zero - 1`` (readers add 1 back). A
  zero point of 0 cannot be written; such a group is shifted exactly (codes + 1, zero + 1) when no
  code of the group is at the top of the range, and refused otherwise. gptqmodel's loader refuses
  an asymmetric v1 file unless its ``meta.quantizer`` names gptqmodel >= 0.9.0 as the producer
  (``Loading of a sym=False model with format=FORMAT.GPTQ is only supported if produced by
  gptqmodel version >= 0.9.0``); slimkit does not claim to be gptqmodel.
- ``gptq_v2`` stores the zero point itself. gptqmodel loads it for any ``sym``, and so does
  transformers through optimum (whose GPTQ path itself saves asymmetric models as ``gptq_v2``).

``checkpoint_format: auto`` (the default) writes v1 for symmetric runs (every GPTQ reader) and
v2 for asymmetric ones (what gptqmodel and transformers accept).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.export.base import (
    FORMATS,
    ExportConfig,
    Exporter,
    QuantizedModel,
    check_activations,
    copy_side_files,
    plain_model,
)
from slimkit.export.compressed_tensors import dense_tensors
from slimkit.export.packing import pack_rows, unpack_rows_bitstream
from slimkit.quant.quantizer import QuantizedWeight

log = logging.getLogger("slimkit")
# checkpoint format -> what qzeros holds minus the zero point (v1 stores zero - 1)
QZERO_OFFSET = {"gptq": -1, "gptq_v2": 0}


def checkpoint_format(cfg: ExportConfig, sym: bool) -> str:
    """The GPTQ checkpoint format to write: ``cfg.checkpoint_format``, where ``auto`` is v1 for a
    symmetric run and v2 for an asymmetric one."""
    if cfg.checkpoint_format == "auto":
        return "gptq" if sym else "gptq_v2"
    return cfg.checkpoint_format


def v1_codes(qw: QuantizedWeight, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(codes, zero) with every zero point >= 1, shifting groups whose zero is 0 (exact)."""
    codes, zero = qw.codes.clone(), qw.zero.clone()
    bad = zero == 0  # (out, groups)
    if not bad.any():
        return codes, zero, 0
    top = 2**qw.spec.bits - 1
    per_col = bad[:, qw.g_idx.long()]  # (out, in): columns in a zero-0 group
    if (per_col & (codes == top)).any():
        raise SlimkitError(
            f"GPTQ v1 stores zero - 1 and {name} has a group with zero point 0 that also uses the "
            f"top code {top}: it cannot be written exactly. Quantize with --sym (zero 2^(b-1)) or "
            "export to --format compressed-tensors."
        )
    codes[per_col] += 1
    zero[bad] += 1
    return codes, zero, int(bad.sum())


@FORMATS.register(
    "gptq",
    help="GPTQ directory (qweight/qzeros/scales/g_idx), 2/3/4/8 bit; v1, or v2 for asymmetric runs",
)
class GPTQExporter(Exporter):
    name = "gptq"
    reader_name = "slimkit's independent GPTQ v1 / v2 unpacker (numpy bit stream) into transformers"

    def scale_dtype(self, cfg: ExportConfig) -> torch.dtype:
        return torch.float16

    def other_dtype(self, name: str, cfg: ExportConfig) -> torch.dtype:
        return torch.float16

    def check(self, qm: QuantizedModel, cfg: ExportConfig) -> None:
        for name, qw in qm.layers.items():
            out, inp = qw.codes.shape
            b = qw.spec.bits
            if b not in (2, 3, 4, 8):
                raise SlimkitError(
                    f"GPTQ packs 2, 3, 4 or 8-bit codes; this run has {b}-bit weights. "
                    "Quantize with --wbits 4 (or 2/3/8)."
                )
            if qw.spec.group_size == 0:
                raise SlimkitError(
                    "GPTQ has per-group or per-channel scales, not one per tensor: quantize with "
                    "--group-size 128 (or 32/64, or -1 per channel)"
                )
            if (inp * b) % 32 or (out * b) % 32:
                raise SlimkitError(
                    f"GPTQ needs in*bits and out*bits divisible by 32; {name} is {out}x{inp} at {b} bits"
                )
        check_activations(qm, cfg, "none")

    def write(self, qm: QuantizedModel, cfg: ExportConfig, out: Path) -> dict:
        specs = qm.specs()
        if len({(s.bits, s.group_size, s.sym) for s in specs}) != 1:
            raise SlimkitError(
                "a GPTQ checkpoint has one bits/group/sym setting per model; this run mixes several"
            )
        spec = next(iter(specs))
        fmt = checkpoint_format(cfg, spec.sym)
        if fmt == "gptq" and not spec.sym:
            log.warning(
                "GPTQ v1 with asymmetric weights: transformers (optimum), vLLM and other v1 readers "
                "load it, gptqmodel's own loader refuses it (it accepts asymmetric v1 files only "
                "from gptqmodel); --checkpoint-format gptq_v2 (the default for asymmetric runs) loads in both"
            )
        tensors, shifted = {}, 0
        for name, qw in qm.layers.items():
            if fmt == "gptq":
                codes, zero, n = v1_codes(qw, name)
                shifted += n
            else:  # v2 stores any zero point as it is
                codes, zero = qw.codes, qw.zero
            b = qw.spec.bits
            stored = (zero + QZERO_OFFSET[fmt]).to(torch.int64).contiguous()
            tensors[f"{name}.qweight"] = pack_rows(codes.T.contiguous(), b)
            tensors[f"{name}.qzeros"] = pack_rows(stored, b).T
            tensors[f"{name}.scales"] = qw.scale.T.to(torch.float16)
            tensors[f"{name}.g_idx"] = qw.g_idx.to(torch.int32)
            bias = getattr(_module(qm.model, name), "bias", None)
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().to(torch.float16)
        skip = {f"{n}.{k}" for n in qm.layers for k in ("weight", "bias")}
        tensors.update(dense_tensors(qm.model, skip, torch.float16))
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(out / "model.safetensors"),
            metadata={"format": "pt"},
        )
        import slimkit

        config = qm.model.config.to_dict()
        config["dtype"] = "float16"
        config["quantization_config"] = {
            "quant_method": "gptq",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "desc_act": any(qm.act_order(n) for n in qm.layers),
            "sym": spec.sym,
            # current gptqmodel and transformers name it "format", older readers "checkpoint_format"
            "format": fmt,
            "checkpoint_format": fmt,
            "static_groups": bool(qm.config.get("static_groups", False)),
            "true_sequential": True,
            "damp_percent": qm.config.get("percdamp", qm.config.get("damp", 0.01)),
            "meta": {"quantizer": [f"slimkit:{slimkit.__version__}"]},
        }
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "quantize_config.json").write_text(
            json.dumps(config["quantization_config"], indent=2) + "\n"
        )
        copy_side_files(qm, out)
        if shifted:
            log.info("GPTQ v1: %d groups with zero point 0 shifted exactly to zero 1", shifted)
        return {"checkpoint_format": fmt, "zero_groups_shifted": shifted}

    def reference_weight(self, qw: QuantizedWeight, cfg: ExportConfig) -> torch.Tensor:
        idx = qw.g_idx.long()
        return qw.scale.half().float()[:, idx] * (qw.codes.float() - qw.zero[:, idx])

    def read_codes(self, out: Path, qm: QuantizedModel) -> dict[str, torch.Tensor]:
        res = {}
        for name, (codes, zero, _, g_idx) in read_gptq(out).items():
            if name in qm.layers:  # compare in slimkit's convention: undo the zero-0 shift
                qz = torch.as_tensor(zero)[:, torch.as_tensor(g_idx).long()]
                orig = qm.layers[name].zero[:, qm.layers[name].g_idx.long()]
                res[name] = (torch.as_tensor(codes).float() - (qz - orig)).to(torch.uint8)
        return res

    def load(self, out: Path) -> nn.Module:
        return load_gptq(out)


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def read_gptq(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Independent GPTQ v1 / v2 reader: name -> (codes [out, in], true zeros [out, groups],
    scales [out, groups] fp32, g_idx [in])."""
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    b = cfg["bits"]
    fmt = cfg.get("checkpoint_format", cfg.get("format", "gptq"))
    if fmt not in QZERO_OFFSET:
        raise SlimkitError(
            f"{out}: GPTQ checkpoint_format {fmt!r} is not one slimkit reads (gptq, gptq_v2)"
        )
    state = load_file(str(out / "model.safetensors"))
    res = {}
    for key in state:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        scales = state[f"{name}.scales"].float().numpy()  # (groups, out)
        groups, n_out = scales.shape
        g_idx = state[f"{name}.g_idx"].numpy()
        n_in = g_idx.shape[0]
        codes = unpack_rows_bitstream(state[key].numpy(), b, n_in).T  # (out, in)
        qz = unpack_rows_bitstream(state[f"{name}.qzeros"].numpy().T, b, n_out)  # (out, groups)
        zeros = qz.astype(np.int64) - QZERO_OFFSET[fmt]  # v1 stores zero - 1, v2 the zero
        res[name] = (codes, zeros, scales.T, g_idx)
    return res


def load_gptq(out: Path) -> nn.Module:
    """A GPTQ v1 / v2 directory dequantized into a plain transformers model (fp32, CPU)."""
    dense = {}
    for name, (codes, zeros, scales, g_idx) in read_gptq(out).items():
        g = torch.as_tensor(g_idx).long()
        s, z = torch.as_tensor(scales)[:, g], torch.as_tensor(zeros)[:, g].float()
        dense[f"{name}.weight"] = s * (torch.as_tensor(codes).float() - z)
    for k, v in load_file(str(out / "model.safetensors")).items():
        if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            dense[k] = v.float()
    return plain_model(out, dense, "GPTQ")
