"""What every export format shares: the canonical quantized model read from a slimkit run
directory, the format registry, the fit checks, and ``--verify``.

An exporter only re-encodes the integer codes, scales and zero points a slimkit method produced
(``quant_state.safetensors``); it never re-quantizes. When a run's grid does not fit a format,
the export is refused with a message that names the quantization settings that would fit.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry
from slimkit.llm.block_maps import get_module
from slimkit.quant.api import QUANT_JSON, QUANT_STATE
from slimkit.quant.quantizer import QuantizedWeight, QuantSpec, trivial_g_idx

log = logging.getLogger("slimkit")
FORMATS = Registry("export format")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
VERIFY_PROMPTS = (
    "The history of the city begins in the early middle ages, when a small market grew",
    "Quantized models are smaller and, with the right kernels, faster than their originals.",
)
# --verify passes when the reloaded model's logits differ from slimkit's reference by at most
# this fraction of the reference logits' standard deviation (fp16 scales, fp16 / fp32 arithmetic).
LOGIT_TOL = 2e-2


@dataclass
class ExportConfig:
    format: str = field(
        default="compressed-tensors",
        metadata={"help": "compressed-tensors | gptq | gguf (slimkit list formats)"},
    )
    dtype: str = field(
        default="float16",
        metadata={
            "help": "dtype of scales and unquantized tensors (GPTQ and GGUF scales are always float16)",
            "choices": list(DTYPES),
        },
    )
    verify: bool = field(
        default=False,
        metadata={"help": "reload through an independent reader and compare codes and logits"},
    )
    weights_only: bool = field(
        default=False,
        metadata={
            "help": "export the weights of a run with quantized activations and drop the activation "
            "quantizers (deploy W4A4 / W4A8 as W4A16); re-measure accuracy"
        },
    )
    checkpoint_format: str = field(
        default="auto",
        metadata={
            "help": "GPTQ checkpoint format: gptq (v1, qzeros hold zero - 1), gptq_v2 (the zero "
            "itself), or auto: v1 for symmetric runs (every GPTQ reader), v2 for asymmetric ones "
            "(gptqmodel refuses asymmetric v1 files that gptqmodel did not write)",
            "choices": ["auto", "gptq", "gptq_v2"],
        },
    )
    gguf_embeddings: str = field(
        default="llama.cpp",
        metadata={
            "help": "GGUF type of the token embedding and output matrix: llama.cpp (its default for "
            "the file type: the output, or a tied embedding, in Q6_K where the width divides by 256, "
            "else Q8_0; an untied embedding in the file's type), q8_0, or f16 (unquantized)",
            "choices": ["llama.cpp", "q8_0", "f16"],
        },
    )
    gguf_pre: str = field(
        default="",
        metadata={
            "help": "GGUF tokenizer pre-tokenizer name (llama.cpp's tokenizer.ggml.pre); "
            "default: guessed from the model name, else 'default'"
        },
    )

    def __post_init__(self) -> None:
        FORMATS.get(self.format)
        if self.dtype not in DTYPES:
            raise SlimkitError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.checkpoint_format not in ("auto", "gptq", "gptq_v2"):
            raise SlimkitError(
                f"--checkpoint-format must be auto, gptq or gptq_v2 (got {self.checkpoint_format!r})"
            )
        if self.checkpoint_format != "auto" and self.format != "gptq":
            raise SlimkitError(
                f"--checkpoint-format {self.checkpoint_format} applies to --format gptq only "
                f"(got --format {self.format})"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class QuantizedModel:
    """A slimkit run read back: the fake-quant model and the exact integer form of its linears."""

    path: Path
    model: nn.Module
    tokenizer: object
    meta: dict  # quantization.json
    layers: dict[str, QuantizedWeight]
    act_params: dict[str, dict[str, torch.Tensor]]
    run: dict  # report.json of the run (may be empty)

    @property
    def config(self) -> dict:
        return self.meta["config"]

    def specs(self) -> set[QuantSpec]:
        return {qw.spec for qw in self.layers.values()}

    def act_order(self, name: str) -> bool:
        qw = self.layers[name]
        return not torch.equal(qw.g_idx, trivial_g_idx(qw.codes.shape[1], qw.spec.group_size))


def load_quantized(run_dir: str | Path) -> QuantizedModel:
    """Read a ``slimkit quantize`` / ``slimkit prune --then`` run directory."""
    from slimkit.llm.models import load_model

    p = Path(run_dir)
    if not (p / QUANT_JSON).is_file():
        hint = (
            f" ({p} did not finish; resume it with --resume)"
            if p.with_name(p.name + ".partial").exists()
            else ""
        )
        raise SlimkitError(
            f"{p} is not a quantized slimkit run: no {QUANT_JSON}{hint}. Export takes the --out "
            "directory of `slimkit quantize` (or `slimkit prune ... --then METHOD`)."
        )
    meta = json.loads((p / QUANT_JSON).read_text())
    if meta.get("config", {}).get("rotate_down", "none") != "none":
        raise SlimkitError(
            f"{p} was quantized with --rotate-down: its down projections expect an online rotation "
            "of their input, which no export format here carries (slimkit eval / generate load it). "
            "Quantize with --rotate alone for an exportable rotated model."
        )
    state = load_file(str(p / QUANT_STATE))
    model, tok = load_model(str(p))
    layers, act_params = {}, {}
    for name, spec in meta["layers"].items():
        qw = QuantizedWeight.from_tensors(state, name, QuantSpec(**spec))
        module = get_module(model, name)
        if module is None and ".experts." in name:
            raise SlimkitError(
                f"{p}: {name} is one expert of a fused mixture-of-experts tensor; no export "
                "format here writes fused experts yet (the saved fake-quant model loads as is)"
            )
        if module is not None and not isinstance(module, nn.Linear):
            raise SlimkitError(
                f"exports write nn.Linear layers; {name} is a {type(module).__name__} "
                f"({model.config.model_type}), which no export format here handles yet"
            )
        if module is None or tuple(module.weight.shape) != tuple(qw.codes.shape):
            raise SlimkitError(f"{p}: layer {name} of {QUANT_STATE} does not match the model")
        if not torch.equal(module.weight.detach().float(), qw.dequantize()):
            raise SlimkitError(
                f"{p}: the weights of {name} are not the dequantized codes of {QUANT_STATE}; "
                "was the model changed after quantization?"
            )
        layers[name] = qw
        params = {k.split(".")[-1]: v for k, v in state.items() if k.startswith(f"{name}.act_")}
        if params:
            act_params[name] = params
    run = json.loads((p / "report.json").read_text()) if (p / "report.json").is_file() else {}
    return QuantizedModel(p, model, tok, meta, layers, act_params, run)


class Exporter:
    """One export format. Subclasses register with ``FORMATS.register(name, help=...)``."""

    name = ""
    single_file = False  # GGUF writes one file, the others a directory

    def load_source(self, run_dir: str | Path) -> QuantizedModel:
        """The run this format exports (a quantized run unless the format says otherwise)."""
        return load_quantized(run_dir)

    def check(self, qm: QuantizedModel, cfg: ExportConfig) -> None:
        """Raise SlimkitError naming the settings that would fit when ``qm`` does not fit."""
        raise NotImplementedError

    def write(self, qm: QuantizedModel, cfg: ExportConfig, out: Path) -> dict:
        raise NotImplementedError

    def reference_weight(self, qw: QuantizedWeight, cfg: ExportConfig) -> torch.Tensor:
        """The fp32 weight a correct reader reconstructs (slimkit's grid with stored-dtype scales)."""
        idx = qw.g_idx.long()
        scale = qw.scale.to(self.scale_dtype(cfg)).float()
        return scale[:, idx] * (qw.codes.float() - qw.zero[:, idx])

    def scale_dtype(self, cfg: ExportConfig) -> torch.dtype:
        return cfg.torch_dtype

    def other_dtype(self, name: str, cfg: ExportConfig) -> torch.dtype:
        """dtype the format stores an unquantized tensor in."""
        return cfg.torch_dtype

    def stored_tensor(
        self, name: str, t: torch.Tensor, qm: QuantizedModel, cfg: ExportConfig
    ) -> torch.Tensor:
        """The fp32 values a correct reader gets back for ``name``, a tensor outside the
        quantized linears (an embedding, a norm): ``t`` in the dtype the format stores it in."""
        return t.to(self.other_dtype(name, cfg)).float()

    def read_codes(self, out: Path, qm: QuantizedModel) -> dict[str, torch.Tensor]:
        """Integer codes per layer (slimkit's unsigned convention), decoded from the files."""
        raise NotImplementedError

    def load(self, out: Path) -> nn.Module:
        """The exported model as a consumer loads it (fp32 weights on the CPU)."""
        raise NotImplementedError

    def extra_checks(self, out: Path, qm: QuantizedModel) -> dict:
        """Format-specific checks for --verify; a key ``ok`` False fails the verification."""
        return {}


def check_activations(qm: QuantizedModel, cfg: ExportConfig, allowed: str) -> None:
    """Refuse quantized activations a format cannot represent unless --weights-only."""
    c = qm.config
    if c["abits"] == 16 or cfg.weights_only:
        if c["abits"] != 16:
            log.warning(
                "exporting the weights only: the W%dA%d run is deployed as W%dA16; its activation "
                "quantizers are dropped, so re-measure accuracy on the exported model",
                c["wbits"],
                c["abits"],
                c["wbits"],
            )
        return
    clipped = [
        n for n, p in qm.act_params.items() if "act_clip" in p and (p["act_clip"] != 1).any()
    ]
    why = None
    if allowed == "none":
        why = "this format stores weights only"
    elif c["abits"] != 8 or c["act_granularity"] != "per-token" or not c["act_sym"]:
        why = "only 8-bit dynamic per-token symmetric activations have a deployment kernel"
    elif clipped:
        why = f"learned activation clipping ({len(clipped)} layers, e.g. {clipped[0]}) has no deployment kernel"
    if why:
        raise SlimkitError(
            f"the run quantizes activations (W{c['wbits']}A{c['abits']}, {c['act_granularity']}) and {why}. "
            "Export with --weights-only to deploy its weights as W"
            f"{c['wbits']}A16 (re-measure accuracy), or quantize with --abits 8 --act-granularity per-token"
            " (no learned activation clipping) for an int8-activation export."
        )


def unsupported(qm: QuantizedModel, fmt: str, problem: str, fits: str) -> SlimkitError:
    c = qm.config
    return SlimkitError(
        f"{fmt} cannot store this run exactly ({problem}; run: {c['wbits']}-bit, group size "
        f"{c['group_size']}, {'symmetric' if c['sym'] else 'asymmetric'}). slimkit never re-quantizes "
        f"on export: quantize again with settings that fit, e.g. {fits}."
    )


def copy_side_files(qm: QuantizedModel, out: Path) -> None:
    """Tokenizer files, generation config and the resolved recipe travel with the export."""
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
    ):
        if (qm.path / name).is_file():
            shutil.copy2(qm.path / name, out / name)
    if (qm.path / "config.yaml").is_file():
        shutil.copy2(qm.path / "config.yaml", out / "recipe.yaml")


def plain_model(out: Path, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """The transformers model of ``out/config.json`` (quantization config dropped) with the
    already-decoded fp32 ``state``; strict apart from a tied LM head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SlimkitError(
            f"{out}: {what} checkpoint does not match its config ({(missing or unexpected)[:3]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def reference_model(qm: QuantizedModel, exporter: Exporter, cfg: ExportConfig) -> nn.Module:
    """slimkit's fake-quant model with exactly the numbers the format stores (fp32 arithmetic)."""
    ref = copy.deepcopy(qm.model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            mod = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and mod in qm.layers:
                p.copy_(exporter.reference_weight(qm.layers[mod], cfg))
            else:
                p.copy_(exporter.stored_tensor(name, p.detach(), qm, cfg))
    return ref


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def verify(qm: QuantizedModel, exporter: Exporter, cfg: ExportConfig, out: Path) -> dict:
    """Compare the export, read back independently, with slimkit's model."""
    codes = exporter.read_codes(out, qm)
    mismatched = [n for n, qw in qm.layers.items() if not torch.equal(codes[n], qw.codes)]
    loaded = exporter.load(out).eval()
    ref = reference_model(qm, exporter, cfg).eval()
    loaded_params = dict(loaded.named_parameters())
    w_err = 0.0
    for name in qm.layers:
        got = loaded_params[f"{name}.weight"].detach()
        want = exporter.reference_weight(qm.layers[name], cfg)
        w_err = max(w_err, (got - want).abs().max().item())
    tok = qm.tokenizer
    ids = [tok(t, return_tensors="pt").input_ids for t in VERIFY_PROMPTS] if tok else []
    ids = [i for i in ids if i.numel() > 1] or [torch.arange(16).unsqueeze(0) % 7]
    diff, spread, agree, n = 0.0, 0.0, 0, 0
    for x in ids:
        a, b = _logits(ref, x), _logits(loaded, x)
        diff = max(diff, (a - b).abs().max().item())
        spread = max(spread, a.std().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        n += a.shape[0] * a.shape[1]
    fq = _logits(qm.model, ids[0])
    res = {
        "reader": exporter.reader_name,
        "layers": len(qm.layers),
        "codes_identical": not mismatched,
        "layers_with_different_codes": mismatched[:5],
        "max_abs_weight_diff_vs_reference": w_err,
        "max_abs_logit_diff_vs_reference": diff,
        "logit_std": spread,
        "relative_logit_diff": diff / max(spread, 1e-12),
        "top1_agreement": agree / max(n, 1),
        "max_abs_logit_diff_vs_fp32_scales": (fq - _logits(loaded, ids[0])).abs().max().item(),
        "tolerance_relative": LOGIT_TOL,
    }
    extra = exporter.extra_checks(out, qm)
    res.update(extra)
    res["passed"] = (
        res["codes_identical"] and res["relative_logit_diff"] <= LOGIT_TOL and extra.get("ok", True)
    )
    return res
