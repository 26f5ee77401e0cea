"""Declarative block maps: where a model family keeps its decoder blocks, norms and linears.

A family is supported by one :class:`BlockMap` entry here, never by forked code. Names inside a
block are dotted paths relative to the block. ``sequential`` lists the block's linears in data
flow order; linears in one inner tuple read the same input (GPTQ's true-sequential groups).
``smooth`` lists (norm, consumers) pairs whose scale can be folded exactly (SmoothQuant, AWQ).
``smooth_linear`` lists (producer, consumer, kind) linear pairs where a per-channel scale of the
consumer's input can be folded into the producer's output rows exactly: ``ffn`` when the consumer
reads ``act(gate) * up`` channel for channel, ``attn`` for value -> output projections, whose input
columns repeat the value channels once per query head of a KV group (GQA). ``inspect`` names, for
a norm of ``smooth``, the sub-module whose output AWQ compares while it searches that pair's
scales (the attention, the MLP); a pair without one compares its consumers' own outputs.
``score_linears`` are the linears whose outputs enter the attention scores (q, k; GPT-2's fused
q/k/v), which AWQ's clipping search leaves alone. ``residual_writers`` are the linears whose
outputs are added to the residual stream (what a residual rotation turns on the output side).

A block map is also the pipeline's model adapter: ``feed`` runs the model on a batch of
calibration inputs (the pipeline stops it at the first block and caches that block's input),
``check_calib`` refuses calibration data of the wrong form before anything runs. The defaults
feed token ids to a causal LM; :func:`encoder_block_map` builds the adapter of any encoder that
keeps its blocks in one ``nn.ModuleList`` (a ViT image encoder such as SAM's), whose linears are
found by walking the block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry

BLOCK_MAPS = Registry("model family")


def feed_token_ids(model: nn.Module, ids: torch.Tensor) -> None:
    """The causal-LM feed: token ids into the model, no KV cache."""
    model(input_ids=ids, use_cache=False)


def check_token_ids(calib: torch.Tensor) -> None:
    if calib.ndim != 2 or calib.shape[0] < 1 or calib.shape[1] < 2:
        raise SlimkitError(
            f"calibration ids must be [n_samples >= 1, seq_len >= 2]; got {tuple(calib.shape)}"
        )


def feed_inputs(model: nn.Module, x: torch.Tensor) -> None:
    """An encoder's feed: the batch is the model's one positional input (e.g. images)."""
    model(x)


def check_batch(calib: torch.Tensor) -> None:
    if not isinstance(calib, torch.Tensor) or calib.ndim < 2 or calib.shape[0] < 1:
        raise SlimkitError(
            "calibration inputs must be one tensor [n_samples >= 1, ...]; got "
            + (str(tuple(calib.shape)) if isinstance(calib, torch.Tensor) else type(calib).__name__)
        )


@dataclass(frozen=True)
class BlockMap:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the ModuleList of decoder blocks
    pre_blocks: tuple[str, ...]  # modules that run before block 0 (moved to the device to capture)
    post_blocks: tuple[str, ...]  # modules after the last block, in order (final norm, head)
    sequential: tuple[tuple[str, ...], ...]
    smooth: tuple[tuple[str, tuple[str, ...]], ...] = ()
    smooth_linear: tuple[tuple[str, str, str], ...] = ()
    inspect: tuple[
        tuple[str, str], ...
    ] = ()  # (norm of ``smooth``, module whose output AWQ compares)
    score_linears: tuple[str, ...] = ()
    residual_writers: tuple[str, ...] = ()  # linears whose outputs are added to the residual
    # (linear, norm): linears that reach the residual only through a norm (Gemma-2/3 post-norms)
    post_norms: tuple[tuple[str, str], ...] = ()
    # other operations that write into the residual (an MoE block's routed sum): no rotation
    residual_other: tuple[str, ...] = ()
    transposed: bool = False  # GPT-2's Conv1D keeps weights as (in, out)
    # FFN channels for structured pruning: (linears producing the hidden channels, the linear
    # consuming them, the config field holding the FFN width)
    ffn: tuple[tuple[str, ...], str, str] | None = None
    # attention heads for structured pruning: (q, k, v, o) linears; only where the model reads
    # the head count and head_dim from its config (Llama family)
    attn: tuple[str, str, str, str] | None = None
    smooth_ok: Callable[[object], bool] = field(default=lambda config: True)
    # the model adapter: how a calibration batch enters the model, and what a batch must be
    feed: Callable[[nn.Module, torch.Tensor], object] = feed_token_ids
    check_calib: Callable[[torch.Tensor], None] = check_token_ids

    def linears(self) -> list[str]:
        return [n for group in self.sequential for n in group]


def _register(bm: BlockMap) -> None:
    BLOCK_MAPS.register(bm.family, bm, help=", ".join(bm.model_types))


_LLAMA_SEQ = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_SMOOTH = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_LLAMA_INSPECT = (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))
_LLAMA_SCORE = ("self_attn.q_proj", "self_attn.k_proj")
_LLAMA_SMOOTH_LINEAR = (
    ("self_attn.v_proj", "self_attn.o_proj", "attn"),
    ("mlp.up_proj", "mlp.down_proj", "ffn"),
)
_register(
    BlockMap(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        blocks="model.layers",
        pre_blocks=("model.embed_tokens", "model.rotary_emb"),
        post_blocks=("model.norm", "lm_head"),
        sequential=_LLAMA_SEQ,
        smooth=_LLAMA_SMOOTH,
        smooth_linear=_LLAMA_SMOOTH_LINEAR,
        inspect=_LLAMA_INSPECT,
        score_linears=_LLAMA_SCORE,
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        ffn=(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size"),
        attn=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    )
)
_register(
    BlockMap(
        family="pangu_pi",
        model_types=("pangu_pi",),
        blocks="model.layers",
        pre_blocks=("model.embed_tokens", "model.rotary_emb"),
        post_blocks=("model.norm", "lm_head"),
        # the augmented shortcut reads the attention input (as_down) and its own GELU (as_up)
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.as_down"),
            ("self_attn.as_up",),
            ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",),
        ),
        smooth=(
            (
                "input_layernorm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.as_down"),
            ),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        smooth_linear=_LLAMA_SMOOTH_LINEAR,  # the down projection reads siaf(gate) * up
        inspect=_LLAMA_INSPECT,  # the augmented shortcut lives inside self_attn
        score_linears=_LLAMA_SCORE,
        residual_writers=("self_attn.o_proj", "self_attn.as_up", "mlp.down_proj"),
        # no structured FFN map: SIAF's per-channel a_i, b_i would have to be sliced too
    )
)
_register(
    BlockMap(
        family="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        pre_blocks=(
            "model.decoder.embed_tokens",
            "model.decoder.embed_positions",
            "model.decoder.project_in",
        ),
        post_blocks=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        smooth=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
        smooth_linear=(("self_attn.v_proj", "self_attn.out_proj", "attn"),),
        inspect=(("self_attn_layer_norm", "self_attn"),),  # fc1 has no parent module
        score_linears=_LLAMA_SCORE,
        residual_writers=("self_attn.out_proj", "fc2"),
        ffn=(("fc1",), "fc2", "ffn_dim"),
        # post-LN OPT (350m) normalises after the residual: no norm feeds the linears directly.
        smooth_ok=lambda config: bool(getattr(config, "do_layer_norm_before", True)),
    )
)
_register(
    BlockMap(
        family="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        pre_blocks=("transformer.wte", "transformer.wpe", "transformer.drop"),
        post_blocks=("transformer.ln_f", "lm_head"),
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        smooth=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        inspect=(("ln_1", "attn"), ("ln_2", "mlp")),
        score_linears=("attn.c_attn",),  # fused q/k/v: AWQ's reference skips it too
        residual_writers=("attn.c_proj", "mlp.c_proj"),
        transposed=True,
        ffn=(("mlp.c_fc",), "mlp.c_proj", "n_inner"),
    )
)


def block_map_for(model: nn.Module) -> BlockMap:
    """The block map of ``model``'s family: the hand-written map of ``config.model_type`` where
    there is one, else the map inferred from the model (:func:`~slimkit.llm.infer_map.
    infer_block_map`), which refuses, naming what is missing, a layout it cannot read."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for _, bm in BLOCK_MAPS.items():
        if mt in bm.model_types:
            return bm
    from slimkit.llm.infer_map import infer_block_map

    supported = sorted(t for _, bm in BLOCK_MAPS.items() for t in bm.model_types)
    if not type(model).__name__.endswith("ForCausalLM"):
        raise SlimkitError(
            f"unsupported model family {mt!r}: {type(model).__name__} is not a causal LM (block "
            f"maps are inferred for *ForCausalLM decoders; written by hand for {', '.join(supported)})"
        )
    try:
        return infer_block_map(model)
    except SlimkitError as e:
        raise SlimkitError(f"unsupported model family {mt!r}: {e}") from None


def encoder_block_map(
    model: nn.Module,
    blocks: str,
    *,
    pre_blocks: tuple[str, ...] = (),
    post_blocks: tuple[str, ...] = (),
    family: str = "encoder",
) -> BlockMap:
    """The adapter of an encoder whose blocks form one ``nn.ModuleList`` at ``blocks`` (a dotted
    path), fed with one input tensor (images): the block's ``nn.Linear`` modules, found by walking
    block 0, each in its own sequential group in module order. No folds are declared, so the
    methods that need one (SmoothQuant, AWQ, CFP) are refused; RTN and GPTQ run.

    Example:
        >>> bmap = encoder_block_map(sam.image_encoder, "blocks", pre_blocks=("patch_embed",))  # doctest: +SKIP
        >>> BlockwisePipeline(sam.image_encoder, images, block_map=bmap).run(GPTQ(config))  # doctest: +SKIP
    """
    found = get_module(model, blocks)
    if not isinstance(found, nn.ModuleList) or len(found) == 0:
        raise SlimkitError(
            f"{type(model).__name__} has no non-empty ModuleList of blocks at {blocks!r}"
        )
    linears = tuple((n,) for n, m in found[0].named_modules() if isinstance(m, nn.Linear))
    if not linears:
        raise SlimkitError(f"the blocks at {blocks!r} hold no nn.Linear to compress")
    return BlockMap(
        family=family,
        model_types=(),
        blocks=blocks,
        pre_blocks=pre_blocks,
        post_blocks=post_blocks,
        sequential=linears,
        feed=feed_inputs,
        check_calib=check_batch,
    )


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    m: nn.Module | None = root
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def get_blocks(model: nn.Module, bm: BlockMap) -> nn.ModuleList:
    blocks = get_module(model, bm.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise SlimkitError(f"{bm.family} model has no decoder blocks at {bm.blocks!r}")
    return blocks


def weight_of(module: nn.Module, transposed: bool) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module stores."""
    return module.weight.data.t() if transposed else module.weight.data


def set_weight(module: nn.Module, w: torch.Tensor, transposed: bool) -> None:
    module.weight.data.copy_(w.t() if transposed else w)
