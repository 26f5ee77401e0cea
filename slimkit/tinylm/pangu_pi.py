"""PanGu-π (Wang et al. 2023, arXiv 2312.17276): a Llama-style decoder (RMSNorm, RoPE, GQA,
SwiGLU) with two switchable nonlinearity-compensation modules.

- SIAF, series informed activation (Eq. 7) on the SwiGLU gate branch:
  gate = sum_i SiLU(a_i * (x W_g) + b_i), per-channel a_i, b_i (fp32), W_g shared by the terms
  [our default: per-term projections would multiply FFN parameters]. ``siaf_terms = 1`` with
  a_1 = 1, b_1 = 0 is the plain SwiGLU.
- AS, augmented shortcut (Eq. 4 with a bottleneck): in parallel to attention,
  AS(z) = W_up GELU(W_down z + c) + d on the attention's (normalised) input, width d / ``as_ratio``
  (paper: 32), output Linear zero-initialised so training starts from the vanilla Transformer
  [our defaults: one shortcut, zero init, biases, GELU].

The classes subclass transformers' Llama ones, so generation, KV caches, attention backends,
``save_pretrained`` / ``from_pretrained`` (safetensors) work unchanged; importing slimkit
registers ``pangu_pi`` with ``AutoConfig`` and ``AutoModelForCausalLM``. Every weight keeps its
Llama name; AS adds ``self_attn.as_down`` / ``self_attn.as_up`` and SIAF ``mlp.siaf_a`` /
``mlp.siaf_b``. Causal neighbour mixing of the SIAF output (the VanillaNet depthwise
convolution) is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers import initialization as init
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
)

SIAF_INITS = ("identity_plus_small", "identity")


class PanguPiConfig(LlamaConfig):
    """LlamaConfig plus: ``siaf`` (bool), ``siaf_terms`` (n, paper 2), ``siaf_init``,
    ``augmented_shortcut`` (bool), ``as_ratio`` (bottleneck d / r, paper 32)."""

    model_type = "pangu_pi"

    def __init__(self, siaf: bool = True, siaf_terms: int = 2, siaf_init: str = "identity_plus_small",
                 augmented_shortcut: bool = True, as_ratio: int = 32, **kwargs):  # fmt: skip
        self.siaf = siaf
        self.siaf_terms = siaf_terms
        self.siaf_init = siaf_init
        self.augmented_shortcut = augmented_shortcut
        self.as_ratio = as_ratio
        super().__init__(**kwargs)
        if siaf_terms < 1:
            raise ValueError(f"siaf_terms must be >= 1 (got {siaf_terms})")
        if siaf_init not in SIAF_INITS:
            raise ValueError(f"siaf_init must be one of {SIAF_INITS} (got {siaf_init!r})")
        if as_ratio < 1 or self.hidden_size // as_ratio < 1:
            raise ValueError(
                f"as_ratio {as_ratio} leaves no bottleneck width for hidden size {self.hidden_size}"
            )


class PanguPiMLP(LlamaMLP):
    def __init__(self, config: PanguPiConfig):
        super().__init__(config)
        self.use_siaf = config.siaf
        if self.use_siaf:
            n, f = config.siaf_terms, config.intermediate_size
            self.siaf_a = nn.Parameter(torch.ones(n, f))
            self.siaf_b = nn.Parameter(torch.zeros(n, f))

    def siaf(self, g: torch.Tensor) -> torch.Tensor:
        a, b = self.siaf_a.float(), self.siaf_b.float()  # kept in fp32 under low-precision training
        gf = g.float()
        out = sum(F.silu(a[i] * gf + b[i]) for i in range(a.shape[0]))
        return out.to(g.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        act = self.siaf(g) if self.use_siaf else self.act_fn(g)
        return self.down_proj(act * self.up_proj(x))


class PanguPiAttention(LlamaAttention):
    def __init__(self, config: PanguPiConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.use_as = config.augmented_shortcut
        if self.use_as:
            width = config.hidden_size // config.as_ratio
            self.as_down = nn.Linear(config.hidden_size, width, bias=True)
            self.as_up = nn.Linear(width, config.hidden_size, bias=True)
            self.as_up._slimkit_zero_init = True  # start from the vanilla Transformer

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out, weights = super().forward(hidden_states, *args, **kwargs)
        if self.use_as:
            out = out + self.as_up(F.gelu(self.as_down(hidden_states)))
        return out, weights


class PanguPiDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: PanguPiConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = PanguPiAttention(config, layer_idx)
        self.mlp = PanguPiMLP(config)


class PanguPiPreTrainedModel(LlamaPreTrainedModel):
    config_class = PanguPiConfig
    config: PanguPiConfig
    _no_split_modules = ["PanguPiDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PanguPiMLP) and module.use_siaf:
            n = module.siaf_a.shape[0]
            a = torch.zeros_like(module.siaf_a)
            a[0] = 1.0
            if (
                self.config.siaf_init == "identity_plus_small"
            ):  # distinct small slopes break symmetry
                for i in range(1, n):
                    a[i] = 0.01 * i
            init.copy_(module.siaf_a, a)
            init.zeros_(module.siaf_b)
        if isinstance(module, nn.Linear) and getattr(module, "_slimkit_zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)


class PanguPiModel(PanguPiPreTrainedModel, LlamaModel):
    def __init__(self, config: PanguPiConfig):
        LlamaModel.__init__(self, config)
        self.layers = nn.ModuleList(
            [PanguPiDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.post_init()


class PanguPiForCausalLM(PanguPiPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: PanguPiConfig):
        LlamaForCausalLM.__init__(self, config)
        self.model = PanguPiModel(config)
        self.post_init()


AutoConfig.register("pangu_pi", PanguPiConfig, exist_ok=True)
AutoModelForCausalLM.register(PanguPiConfig, PanguPiForCausalLM, exist_ok=True)


def count_extra_parameters(config: PanguPiConfig) -> dict[str, int]:
    """Parameters SIAF and AS add to a Llama model of the same shape (the spec's formulas)."""
    d, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    w = d // config.as_ratio
    return {
        "siaf": L * 2 * config.siaf_terms * f if config.siaf else 0,
        "as": L * (2 * d * w + w + d) if config.augmented_shortcut else 0,
    }
