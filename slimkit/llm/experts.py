"""Mixture-of-experts blocks whose experts are fused 3-D tensors (transformers 5's Mixtral,
Qwen2-MoE, Qwen3-MoE ``*Experts`` modules: ``gate_up_proj`` [experts, 2 I, H] and ``down_proj``
[experts, H, I]), made quantizable expert by expert.

:func:`install_expert_linears` gives such a module one :class:`ExpertLinear` per expert and
projection: a module with no parameters of its own whose ``weight`` is that expert's slice of
the fused tensor (a view: what a method writes lands in the checkpoint's tensor, so the saved
model is an ordinary one that transformers reads back). The module then runs an eager loop
that calls those linears on the tokens routed to each expert, the same computation as
transformers' eager experts loop (checked on a probe when installed), so every method sees each
expert's own inputs: GPTQ's Hessian of an expert is built from the tokens routed to it. An
expert that no calibration token reaches has no statistics; GPTQ (and CBQ's GPTQ start) then
round it to nearest and the report lists it under ``rtn_fallback``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError

ROLES = (("gate_up_proj", "gate_up"), ("down_proj", "down"))
_LOOPED: dict[type, type] = {}  # experts class -> its subclass running the per-expert loop


class ExpertLinear(nn.Module):
    """One expert's slice ``owner.<param>[index]`` of a fused expert tensor, used as a linear."""

    def __init__(self, owner: nn.Module, param: str, index: int):
        super().__init__()
        self.__dict__["_owner"] = owner  # not a child module: the owner holds us
        self.param = param
        self.index = index
        self.bias = None
        self.tokens_seen = 0  # calibration tokens routed here (counted whatever runs forward)
        self.register_forward_pre_hook(_count_tokens)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._owner, self.param).data[self.index]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.param}[{self.index}], in={self.in_features}, out={self.out_features}"


def _count_tokens(module: ExpertLinear, args) -> None:
    module.tokens_seen += args[0].numel() // max(args[0].shape[-1], 1)


def unseen_experts(model: nn.Module) -> list[str]:
    """Names of the expert linears that no token reached since :func:`reset_counts`."""
    return [
        n for n, m in model.named_modules() if isinstance(m, ExpertLinear) and not m.tokens_seen
    ]


def reset_counts(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, ExpertLinear):
            m.tokens_seen = 0


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop, through the per-expert linears."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    for e in range(self.num_experts):
        top_k_pos, token_idx = torch.where(mask[e])
        if token_idx.numel() == 0:
            continue
        x = hidden_states[token_idx]
        gate, up = self.gate_up[e](x).chunk(2, dim=-1)
        h = self.down[e](self.act_fn(gate) * up)
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


def is_fused_experts(m: nn.Module) -> bool:
    p = [getattr(m, name, None) for name, _ in ROLES]
    return all(isinstance(t, torch.Tensor) and t.ndim == 3 for t in p)


def install_expert_linears(m: nn.Module, path: str) -> None:
    """Give the fused experts module ``m`` per-expert linears and the eager loop over them."""
    if isinstance(getattr(m, "gate_up", None), nn.ModuleList):
        return  # installed already
    missing = [a for a in ("num_experts", "act_fn") if not hasattr(m, a)]
    extra = [n for n, p in m.named_parameters() if n not in ("gate_up_proj", "down_proj")]
    if missing or extra or getattr(m, "has_bias", False):
        raise SlimkitError(
            f"{path} ({type(m).__name__}) is a fused-experts module of an unknown form "
            f"(missing {missing}, extra tensors {extra}); its experts cannot be quantized"
        )
    n, h = m.num_experts, m.gate_up_proj.shape[2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, h, generator=g).to(m.gate_up_proj)
    idx = torch.stack([torch.arange(6) % n, (torch.arange(6) + 1) % n], 1).to(x.device)
    wts = torch.rand(6, 2, generator=g).to(x)
    with torch.no_grad():
        want = m(x, idx, wts)
    for param, role in ROLES:
        m.add_module(role, nn.ModuleList(ExpertLinear(m, param, e) for e in range(n)))
    cls = type(m)
    if cls not in _LOOPED:
        _LOOPED[cls] = type(cls.__name__, (cls,), {"forward": _experts_forward})
    m.__class__ = _LOOPED[cls]
    with torch.no_grad():
        got = m(x, idx, wts)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise SlimkitError(
            f"{path} ({cls.__name__}): the per-expert loop does not reproduce its forward pass"
        )
