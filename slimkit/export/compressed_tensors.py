"""compressed-tensors checkpoints (vLLM, transformers, SGLang): ``pack-quantized`` for 4- and
8-bit weights (channel or group, symmetric or asymmetric; act-order only with static groups,
since compressed-tensors dropped ``g_idx``),
``int-quantized`` for W8A8 with dynamic per-token int8 activations.

Packing and the ``quantization_config`` come from the compressed-tensors package itself, so the
files are what its reader expects. Mapping from slimkit's unsigned codes: signed codes
``q - 2^(b-1)``, signed zero points ``z - 2^(b-1)`` (the difference, hence the weight, is unchanged);
a symmetric grid (z = 2^(b-1)) stores no zero point.

Asymmetric ``pack-quantized``: the zero points are packed along the output dimension, as the
package's own compressor packs them (what vLLM reads), but compressed-tensors 0.20's loader
registers them unpacked ([out, groups]) when it prepares a compressed model on the meta
device, so a plain ``AutoModelForCausalLM.from_pretrained(dir)`` fails with a size mismatch on
``weight_zero_point`` (checkpoints llm-compressor saves for an asymmetric scheme fail the same
way; vllm-project/llm-compressor#1618). Such exports declare ``"dequantize": true`` in their
``quantization_config``, which transformers' ``CompressedTensorsConfig`` reads (the weights are
then dequantized at load, the path that works) and compressed-tensors / vLLM ignore.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    unsupported,
)
from slimkit.quant.quantizer import QuantSpec


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise SlimkitError(
            "the compressed-tensors format needs the compressed-tensors package: "
            "pip install 'slimkit[export]' (or pip install compressed-tensors)"
        ) from None
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    return pack_to_int32, unpack_from_int32


def _args(spec: QuantSpec):
    from compressed_tensors.quantization import QuantizationArgs

    kw = dict(num_bits=spec.bits, type="int", symmetric=spec.sym)
    if spec.group_size == -1:
        kw["strategy"] = "channel"
    else:
        kw.update(strategy="group", group_size=spec.group_size)
    return QuantizationArgs(**kw)


@FORMATS.register(
    "compressed-tensors",
    help="compressed-tensors pack-quantized / int-quantized directory (vLLM, transformers)",
)
class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    reader_name = "transformers + compressed-tensors (dequantize at load)"

    def is_w8a8(self, qm: QuantizedModel, cfg: ExportConfig) -> bool:
        return qm.config["wbits"] == 8 and qm.config["abits"] == 8 and not cfg.weights_only

    def check(self, qm: QuantizedModel, cfg: ExportConfig) -> None:
        _ct()
        fits = "--wbits 4 --group-size 128 (or 32/64/-1), with or without --sym"
        for spec in qm.specs():
            if spec.bits not in (4, 8):
                raise unsupported(
                    qm,
                    self.name,
                    f"{spec.bits}-bit codes: compressed-tensors is exported at 4 and 8 bits here, "
                    "the widths vLLM has kernels for; 2/3-bit runs export to --format gptq",
                    fits,
                )
            if spec.group_size == 0:
                raise unsupported(qm, self.name, "one scale per tensor", fits)
        check_activations(qm, cfg, "int8-dynamic")
        shuffled = [n for n in qm.layers if qm.act_order(n)]
        if shuffled:
            raise unsupported(
                qm,
                self.name,
                f"act-order groups ({shuffled[0]} has a non-trivial g_idx, which compressed-tensors "
                "no longer stores); --format gptq stores g_idx",
                "--act-order --static-groups (groups stay consecutive)",
            )

    def scheme_groups(self, qm: QuantizedModel, cfg: ExportConfig) -> dict:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        acts = None
        if qm.config["abits"] == 8 and not cfg.weights_only:
            acts = QuantizationArgs(
                num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
            )
        by_args: dict[str, list[str]] = {}
        objs = {}
        for name, qw in qm.layers.items():
            a = _args(qw.spec)
            key = a.model_dump_json()
            by_args.setdefault(key, []).append(name)
            objs[key] = a
        groups = {}
        for i, (key, names) in enumerate(by_args.items()):
            targets = ["Linear"] if len(by_args) == 1 else names
            groups[f"group_{i}"] = QuantizationScheme(
                targets=targets, weights=objs[key], input_activations=acts
            )
        return groups

    def write(self, qm: QuantizedModel, cfg: ExportConfig, out: Path) -> dict:
        from compressed_tensors.quantization import QuantizationConfig

        pack, _ = _ct()
        w8a8 = self.is_w8a8(qm, cfg)
        tensors: dict[str, torch.Tensor] = {}
        for name, qw in qm.layers.items():
            b = qw.spec.bits
            signed = (qw.codes.to(torch.int16) - 2 ** (b - 1)).to(torch.int8)
            if w8a8:
                tensors[f"{name}.weight"] = signed
            else:
                tensors[f"{name}.weight_packed"] = pack(signed, b)
                tensors[f"{name}.weight_shape"] = torch.tensor(qw.codes.shape, dtype=torch.int32)
            tensors[f"{name}.weight_scale"] = qw.scale.to(cfg.torch_dtype)
            if not qw.spec.sym:
                zp = (qw.zero.to(torch.int16) - 2 ** (b - 1)).to(torch.int8)
                tensors[f"{name}.weight_zero_point"] = zp if w8a8 else pack(zp, b, packed_dim=0)
        skip = {f"{n}.weight" for n in qm.layers}
        tensors.update(dense_tensors(qm.model, skip, cfg.torch_dtype))
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(out / "model.safetensors"),
            metadata={"format": "pt"},
        )
        linears = {n for n, m in qm.model.named_modules() if isinstance(m, nn.Linear)}
        qcfg = QuantizationConfig(
            config_groups=self.scheme_groups(qm, cfg),
            format="int-quantized" if w8a8 else "pack-quantized",
            quantization_status="compressed",
            ignore=sorted(linears - set(qm.layers)),
        )
        config = qm.model.config.to_dict()
        config["dtype"] = cfg.dtype
        config["quantization_config"] = qcfg.model_dump(exclude_none=True)
        if not w8a8 and any(not qw.spec.sym for qw in qm.layers.values()):
            config["quantization_config"]["dequantize"] = True  # see the module docstring
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(qm, out)
        return {"format": config["quantization_config"]["format"]}

    def read_codes(self, out: Path, qm: QuantizedModel) -> dict[str, torch.Tensor]:
        _, unpack = _ct()
        state = load_file(str(out / "model.safetensors"))
        res = {}
        for name, qw in qm.layers.items():
            b = qw.spec.bits
            if f"{name}.weight_packed" in state:
                shape = torch.Size(state[f"{name}.weight_shape"].tolist())
                signed = unpack(state[f"{name}.weight_packed"], b, shape)
            else:
                signed = state[f"{name}.weight"]
            res[name] = (signed.to(torch.int16) + 2 ** (b - 1)).to(torch.uint8)
        return res

    def load(self, out: Path) -> nn.Module:
        return load_ct(out)


def load_ct(out: Path) -> nn.Module:
    """A compressed-tensors directory through transformers, dequantized at load (fp32, CPU)."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "quantization_config from the model will be used": intended
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )


def dense_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The unquantized tensors of ``model`` (tied weights once), floating ones cast to ``dtype``."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:  # tied (lm_head = embeddings): save_pretrained stores it once
            continue
        seen.add(key)
        out[name] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        out.pop("lm_head.weight", None)
    return out
