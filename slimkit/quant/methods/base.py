"""What every weight / activation quantization method shares: its config fields, the method
registry, and the per-block steps (attach activation quantizers, write a quantized weight)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import set_weight, weight_of
from slimkit.llm.compress import COMPRESSION_METHODS, register_compression_method
from slimkit.llm.compress import method_for_config as compression_method_for_config
from slimkit.llm.pipeline import BlockwiseMethod, BlockwisePipeline, PipelineFields, Window
from slimkit.quant import activations as acts
from slimkit.quant.activations import GRANULARITIES, ActSpec
from slimkit.quant.quantizer import CLIP_METHODS, QuantizedWeight, QuantSpec, validate_bits
from slimkit.quant.rotation import ROTATIONS

# the quantization methods of the one compression-method registry
METHODS = COMPRESSION_METHODS.where("method", kind="quantization")


def rotation_field(help: str):
    return field(default="none", metadata={"help": help, "choices": list(ROTATIONS)})


@dataclass
class QuantConfig(PipelineFields):
    """Fields shared by all quantization methods (each method's config extends it)."""

    wbits: int = field(default=4, metadata={"help": "weight bits, 2..8"})
    group_size: int = field(
        default=128,
        metadata={
            "help": "input columns per weight scale; -1 = per output channel, 0 = per tensor"
        },
    )
    sym: bool = field(
        default=False, metadata={"help": "symmetric weight grid (default asymmetric min-max)"}
    )
    clip: str = field(
        default="auto",
        metadata={
            "help": "weight range search: minmax, mse (slimkit's range shrink), llama.cpp (GGUF "
            "grids: llama.cpp's own scale search, what llama_model_quantize stores without an "
            "importance matrix); auto = llama.cpp on a GGUF --grid, minmax otherwise",
            "choices": ["auto", *CLIP_METHODS],
        },
    )
    abits: int = field(
        default=16, metadata={"help": "activation bits, 2..8, or 16 for unquantized activations"}
    )
    act_granularity: str = field(
        default="per-token", metadata={"help": "activation scales", "choices": list(GRANULARITIES)}
    )
    act_sym: bool = field(default=True, metadata={"help": "symmetric activation grid"})
    rotate: str = rotation_field(
        "rotate the residual stream first (QuaRot / SpinQuant R1; RMSNorm families): random "
        "orthogonal or random-sign Hadamard (power-of-two widths)"
    )
    rotate_down: str = rotation_field(
        "online rotation of the down projection's input (QuaRot R4; for 4-bit activations); the "
        "run then needs slimkit to load, no export format carries it"
    )
    rotate_seed: int = field(default=0, metadata={"help": "seed of the rotations"})
    grid: str = field(
        default="uniform",
        metadata={
            "help": "weight grid: uniform (--wbits / --group-size / --sym), gguf:TYPE (every linear "
            "on one llama.cpp block type: q4_k, q3_k, q2_k, q5_k, q6_k, q4_0, q4_1, q5_0, q5_1, "
            "q8_0, with llama.cpp's fallback for widths not a multiple of 256) or llama.cpp:FTYPE "
            "(llama.cpp's per-tensor mix of a file type: q4_k_m, q3_k_m, q2_k, ...); a GGUF grid "
            "sets bits, group size and symmetry itself"
        },
    )

    def __post_init__(self) -> None:
        for name in ("rotate", "rotate_down"):
            if getattr(self, name) not in ROTATIONS:
                raise SlimkitError(
                    f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; "
                    f"choose one of: {', '.join(ROTATIONS)}"
                )
        validate_bits(self.wbits, "--wbits")
        from slimkit.quant.gguf_grids import default_type

        gguf_grid = default_type(self.grid) is not None
        if self.clip == "auto":
            self.clip = "llama.cpp" if gguf_grid else "minmax"
        if self.clip == "llama.cpp" and not gguf_grid:
            raise SlimkitError(
                "--clip llama.cpp is llama.cpp's scale search for its GGUF block types; it needs "
                "--grid gguf:TYPE or llama.cpp:FTYPE (use minmax or mse on the uniform grid)"
            )

        if default_type(self.grid) is not None and self.abits != 16:
            raise SlimkitError("a GGUF --grid stores weights only; use --abits 16")
        if self.abits != 16:
            validate_bits(self.abits, "--abits")
        self.weight_spec()
        self.act_spec()

    def weight_spec(self) -> QuantSpec:
        """The grid of every linear (a GGUF grid: of the file type's default tensors; see
        :func:`layer_specs` for each linear's own)."""
        from slimkit.quant.gguf_grids import default_type

        t = default_type(self.grid)
        if t is not None:
            return QuantSpec.for_ggml(t, self.clip)
        return QuantSpec(bits=self.wbits, group_size=self.group_size, sym=self.sym, clip=self.clip)

    def act_spec(self) -> ActSpec | None:
        if self.abits == 16:
            return None
        return ActSpec(bits=self.abits, granularity=self.act_granularity, sym=self.act_sym)

    def scheme(self) -> str:
        if self.grid != "uniform":
            return self.grid
        g = (
            ""
            if self.group_size == -1
            else ("pt" if self.group_size == 0 else f"g{self.group_size}")
        )
        rot = "" if self.rotate == "none" else "R1 "
        rot += "" if self.rotate_down == "none" else "R4 "
        return f"{rot}W{self.wbits}A{self.abits}{g}"


def register_method(name: str, config_cls: type, help: str):
    """Register a :class:`BlockwiseMethod` class under ``name`` with its config class."""

    return register_compression_method(name, config_cls, kind="quantization", help=help)


def config_class(method: str) -> type:
    return METHODS.meta(method)["config"]


def method_for_config(config: QuantConfig) -> str:
    return compression_method_for_config(config, kind="quantization")


def check_widths(pipe: BlockwisePipeline, spec: QuantSpec) -> None:
    """Fail before any work if the group size does not divide some linear's input width."""
    for b in range(len(pipe.blocks)):
        for name, m in pipe.named_linears(b).items():
            spec.check_width(weight_of(m, pipe.bmap.transposed).shape[1], name)


def layer_specs(
    model: nn.Module, config: QuantConfig, bm=None, blocks=None
) -> dict[str, QuantSpec]:
    """{block linear name: its grid} under a GGUF grid, each linear's type chosen as llama.cpp's
    quantizer does for the file type (including the fallback to a 32-block type where the input
    width is not a multiple of 256); empty for a uniform grid (every linear takes
    ``config.weight_spec()``). ``bm`` / ``blocks``: the pipeline's block map and blocks (default:
    the model family's)."""
    from slimkit.llm.block_maps import block_map_for, get_blocks, get_module
    from slimkit.quant.gguf_grids import default_type, tensor_type

    if default_type(config.grid) is None:
        return {}
    bm = bm or block_map_for(model)
    blocks = blocks if blocks is not None else get_blocks(model, bm)
    c = getattr(model, "config", None)
    heads = getattr(c, "num_attention_heads", 1) or 1
    n_gqa = heads // (getattr(c, "num_key_value_heads", None) or heads)
    out = {}
    for i, block in enumerate(blocks):
        for rel in bm.linears():
            m = get_module(block, rel)
            if m is None:
                continue
            name = f"{bm.blocks}.{i}.{rel}"
            width = weight_of(m, bm.transposed).shape[1]
            t = tensor_type(config.grid, rel, width, i, len(blocks), n_gqa)
            if t is None:
                raise SlimkitError(
                    f"{name}: input width {width} is not a multiple of 32, which every GGUF "
                    "block type needs (llama.cpp keeps such a tensor in F16); use --grid uniform"
                )
            out[name] = QuantSpec.for_ggml(t, config.clip)
    return out


class WeightQuantMethod(BlockwiseMethod):
    """Base of RTN / GPTQ: activation quantizers first, then each linear's weight."""

    def __init__(self, config: QuantConfig):
        self.config = config
        self.wspec = config.weight_spec()
        self.aspec = config.act_spec()

    def on_start(self, pipe: BlockwisePipeline) -> None:
        self.specs = layer_specs(pipe.model, self.config, pipe.bmap, pipe.blocks)
        for b in range(len(pipe.blocks)):
            for name, m in pipe.named_linears(b).items():
                spec = self.specs.get(name, self.wspec)
                spec.check_width(weight_of(m, pipe.bmap.transposed).shape[1], name)
        self.spec_by_module = {
            id(m): self.specs[n]
            for b in range(len(pipe.blocks))
            for n, m in pipe.named_linears(b).items()
            if n in self.specs
        }

    def spec_of(self, module: nn.Module) -> QuantSpec:
        """The grid of one block linear (its GGUF type under a per-tensor mix)."""
        return getattr(self, "spec_by_module", {}).get(id(module), self.wspec)

    def attach_activation_quantizers(self, win: Window, block_id: int) -> None:
        if self.aspec is None:
            return
        pipe = win.pipe
        linears = win.named_linears(block_id)
        hooks = {n: acts.attach(m, self.aspec) for n, m in linears.items()}
        if self.aspec.granularity == "per-tensor":  # static ranges from the calibration inputs
            for h in hooks.values():
                h.observe = True
            pipe.run_blocks(
                [pipe.blocks[block_id]],
                win.inputs_of(block_id),
            )
            for h in hooks.values():
                h.absmax = pipe.all_reduce_max(h.absmax.clone())
                h.observe = False

    def write(
        self, pipe: BlockwisePipeline, name: str, module: nn.Module, qw: QuantizedWeight
    ) -> None:
        """Store the integer form and put the dequantized weight into the model."""
        if not torch.isfinite(qw.scale).all():
            raise SlimkitError(
                f"{name}: quantization produced non-finite scales (NaN/Inf in weights or inputs)"
            )
        pipe.records[name] = qw
        set_weight(module, qw.dequantize().to(module.weight.dtype), pipe.bmap.transposed)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative layer output error tr(dW H dW^T) / tr(W H W^T) for the Hessian H = E[x x^T]."""
    d = (w - w_hat).double()
    num = torch.einsum("oi,ij,oj->", d, H.double(), d)
    den = torch.einsum("oi,ij,oj->", w.double(), H.double(), w.double()).clamp(min=1e-30)
    return float(num / den)


def check_model_widths(model: nn.Module, config: QuantConfig) -> None:
    """Validate the weight grid against every block linear of ``model`` before any work."""
    from slimkit.llm.block_maps import block_map_for, get_blocks, get_module

    bm = block_map_for(model)
    specs = layer_specs(model, config, bm)
    for i, block in enumerate(get_blocks(model, bm)):
        for rel in bm.linears():
            m = get_module(block, rel)
            name = f"{bm.blocks}.{i}.{rel}"
            if m is not None:
                specs.get(name, config.weight_spec()).check_width(
                    weight_of(m, bm.transposed).shape[1], name
                )
