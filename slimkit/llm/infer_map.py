"""Block maps inferred from the model itself, for decoder families without a hand-written map.

:func:`infer_block_map` reads the structure of a standard decoder from one forward pass of a
few token ids, with hooks:

- the decoder-layer list: the ``nn.ModuleList`` whose blocks are of a class in the model's
  ``_no_split_modules`` (else the longest list of identical blocks that hold linears);
- the modules that run before the first block and after the last (embeddings, rotary tables;
  final norm, head), in call order;
- the block's linears (``nn.Linear`` or GPT-2's ``Conv1D``), found by walking block 0, grouped by
  the tensor they read (q/k/v read one norm output: one GPTQ group) in call order;
- which module produced each linear's input: a norm whose output only the linears of one group
  read is a candidate norm -> linears fold; a linear whose output reaches another linear
  channel for channel (value -> output projection, up -> down projection) is a candidate linear
  pair; a linear whose output enters the residual directly is a residual writer, one whose output
  passes through a norm first (Gemma-2/3 post-norms) is recorded as such (the residual rotation
  is refused for those).

Every candidate fold is then *tried*: on a copy of block 0 with fresh, well-scaled random
weights, random per-channel scales (of either sign for linear pairs: the pair must be linear,
not merely positively homogeneous) are folded with the very functions the methods use, and the
block's output must not move beyond round-off. A fold that is not exact is dropped, so AWQ,
SmoothQuant and CFP never change the function of a model they do not know.

Mixture-of-experts blocks whose experts are fused 3-D tensors get one linear per expert first
(:mod:`slimkit.llm.experts`); each expert is a GPTQ group of its own.

Refused with a message that names what is missing: no decoder-layer list, 3-D weights that are
not fused experts of a known form, linears that one forward pass does not reach (other than
experts no token was routed to), a mix of Linear and Conv1D.
"""

from __future__ import annotations

import copy
import re
import weakref

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.llm.experts import ExpertLinear, install_expert_linears, is_fused_experts
from slimkit.llm.folds import (
    _first,
    fold_linear_scales,
    fold_scales,
    linear_pair_repeat,
)

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# linears whose outputs enter the attention scores (AWQ's clip search leaves them alone)
_SCORE = re.compile(r"(^|_)(q|k|qk|qkv|query|key|query_key_value|c_attn|wqkv|w_pack)(_proj)?$")
_PASS_THROUGH = (nn.Dropout, nn.Identity)
# autograd nodes between a residual writer and the block output: additions, reshapes, copies
_THROUGH = ("AddBackward", "ViewBackward", "UnsafeViewBackward", "CloneBackward", "ToCopyBackward")


class _Stop(Exception):
    pass


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, ExpertLinear)) or type(m).__name__ == "Conv1D"


def is_norm(m: nn.Module) -> bool:
    """A LayerNorm / RMSNorm-like module with a per-channel weight."""
    w = getattr(m, "weight", None)
    return "norm" in type(m).__name__.lower() and isinstance(w, torch.Tensor) and w.ndim == 1


def find_blocks(model: nn.Module) -> str:
    """Dotted path of the decoder-layer ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple | None = None
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        cls = type(m[0])
        if not all(type(b) is cls for b in m):
            continue
        if not any(_is_linear(x) for x in m[0].modules()):
            continue
        key = (cls.__name__ in names, len(m), -path.count("."))
        if best is None or key > best[0]:
            best = (key, path)
    if best is None:
        raise SlimkitError(
            f"{type(model).__name__} has no decoder-layer list (an nn.ModuleList of identical "
            "blocks holding linears) to quantize block by block"
        )
    return best[1]


def _tensor_of(args, kwargs) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    x = kwargs.get("hidden_states", kwargs.get("x"))
    return x if isinstance(x, torch.Tensor) else None


def _trace_model(model: nn.Module, blocks_path: str, ids: torch.Tensor):
    """One forward pass: the modules called before block 0 and after the last block (topmost
    ones only), and block 0's positional args / kwargs."""
    from slimkit.llm.block_maps import get_module

    blocks = get_module(model, blocks_path)
    ancestors = {blocks_path.rsplit(".", i)[0] for i in range(1, blocks_path.count(".") + 1)}
    ancestors |= {""}
    order: list[tuple[str, str]] = []  # (phase, module name)
    state = {"phase": "pre", "done": 0}
    caught: dict = {}
    inside = blocks_path + "."
    handles = []

    def pre_hook(name):
        def fn(mod, args, kwargs):
            if name not in ancestors and not name.startswith(inside) and name != blocks_path:
                order.append((state["phase"], name))

        return fn

    def block_pre(i):
        def fn(mod, args, kwargs):
            if i == 0:
                caught["args"], caught["kwargs"] = args, dict(kwargs)
                state["phase"] = "in"

        return fn

    def block_post(i):
        def fn(mod, args, kwargs, out):
            if i == len(blocks) - 1:
                state["phase"] = "post"

        return fn

    for name, m in model.named_modules():
        if name and not name.startswith(inside):
            handles.append(m.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(block_pre(i), with_kwargs=True))
        handles.append(b.register_forward_hook(block_post(i), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if "args" not in caught:
        raise SlimkitError(
            f"a forward pass of {type(model).__name__} never reached {blocks_path}.0"
        )

    def topmost(phase):
        names = [n for p, n in order if p == phase]
        out: list[str] = []
        for n in names:
            if n not in out and not any(n.startswith(o + ".") for o in out):
                out.append(n)
        return tuple(out)

    return topmost("pre"), topmost("post"), caught["args"], caught["kwargs"]


def _run(block: nn.Module, args, kwargs) -> torch.Tensor:
    return _first(block(*args, **kwargs))


class _BlockTrace:
    """Who reads and writes which tensor inside one forward pass of a block."""

    def __init__(self, block: nn.Module, args, kwargs):
        self.calls: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
        keep: list[torch.Tensor] = []  # keeps ids unique while the trace lives
        handles = []
        for name, m in block.named_modules():
            if not name:
                continue

            def hook(mod, a, kw, out, _n=name):
                x, y = _tensor_of(a, kw), _first(out)
                keep.extend(t for t in (x, y) if t is not None)
                self.calls.append((_n, x, y))

            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        args = tuple(args)
        if args and isinstance(args[0], torch.Tensor):  # autograd records the data flow
            args = (args[0].detach().float().requires_grad_(True), *args[1:])
        else:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        try:
            with torch.enable_grad():
                out = _run(block, args, kwargs)
        finally:
            for h in handles:
                h.remove()
        self.out = out
        self._keep = keep + [out]
        self.modules = dict(block.named_modules())
        # pass-through modules (dropout, identity) hand their input on: follow them
        self.alias: dict[int, int] = {}
        for n, x, y in self.calls:
            if isinstance(self.modules[n], _PASS_THROUGH) and x is not None and y is not None:
                self.alias[id(y)] = self._root(id(x))

    def _root(self, i: int) -> int:
        return self.alias.get(i, i)

    def producer(self, x: torch.Tensor | None) -> str | None:
        """The innermost module whose output is ``x`` (``self_attn.o_proj``, not ``self_attn``:
        forward hooks fire inner modules first)."""
        if x is None:
            return None
        want = self._root(id(x))
        for n, _, y in self.calls:
            if y is not None and self._root(id(y)) == want:
                if not isinstance(self.modules[n], _PASS_THROUGH):
                    return n
        return None

    def residual_writers(self, linears: list[str]) -> tuple[tuple, tuple]:
        """(linears whose output is added to the residual stream, (linear, norm) pairs where a
        linear's output reaches it only through a norm), read from the autograd graph of the
        block's output: from the output, through additions only."""
        lin_node = {}
        norm_node = {}
        for n, x, y in self.calls:
            if y is None or y.grad_fn is None:
                continue
            if n in linears:
                lin_node.setdefault(y.grad_fn, n)
            elif is_norm(self.modules[n]) and x is not None:
                norm_node.setdefault(y.grad_fn, (n, x.grad_fn))
        writers, post, other = [], [], set()
        seen = set()
        stack = [self.out.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in lin_node:
                writers.append(lin_node[node])
            elif node in norm_node:
                norm, src = norm_node[node]
                if src in lin_node:
                    post.append((lin_node[src], norm))
            elif type(node).__name__.startswith(_THROUGH):
                stack.extend(f for f, _ in node.next_functions)
            elif type(node).__name__ != "AccumulateGrad":  # (the block input)
                other.add(type(node).__name__)
        order = {n: i for i, n in enumerate(linears)}
        return (
            tuple(sorted(writers, key=order.get)),
            tuple(sorted(post, key=lambda p: order[p[0]])),
            tuple(sorted(other)),
        )

    def readers(self, y: torch.Tensor) -> list[str]:
        want = self._root(id(y))
        return [
            n
            for n, x, _ in self.calls
            if x is not None
            and self._root(id(x)) == want
            and not isinstance(self.modules[n], _PASS_THROUGH)
        ]


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _randomized(block: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``block`` with well-scaled random weights (so that every branch matters)."""
    c = copy.deepcopy(block).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in c.modules():
            w = getattr(m, "weight", None)
            if not isinstance(w, torch.Tensor):
                continue
            if _is_linear(m):
                fan_in = w.shape[0] if type(m).__name__ == "Conv1D" else w.shape[1]
                w.copy_(torch.randn(w.shape, generator=g) / fan_in**0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif is_norm(m):
                w.copy_(1 + 0.2 * torch.randn(w.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return c


def _float(v):
    if isinstance(v, torch.Tensor):
        return v.float() if v.is_floating_point() else v
    if isinstance(v, tuple):
        return tuple(_float(x) for x in v)
    if isinstance(v, dict):
        return {k: _float(x) for k, x in v.items()}
    return v


def _exact(block: nn.Module, args, kwargs, change, tol: float = 1e-3) -> bool:
    """Does ``change(copy)`` leave the block's output delta (output - input) unchanged?"""
    ref_block = _randomized(block)
    x = _tensor_of(args, kwargs).float()
    a, kwargs = _float(args), _float(kwargs)
    with torch.no_grad():
        ref = _run(ref_block, a, kwargs) - x
        trial = copy.deepcopy(ref_block)
        try:
            change(trial)
        except SlimkitError:
            return False
        out = _run(trial, a, kwargs) - x
    scale = float(ref.abs().max()) or 1.0
    return bool(torch.isfinite(out).all()) and float((out - ref).abs().max()) <= tol * scale


def infer_block_map(model: nn.Module):
    """The :class:`~slimkit.llm.block_maps.BlockMap` of a standard decoder, read from the model
    (cached per model object)."""
    if model in _CACHE:
        return _CACHE[model]
    bm = _infer(model)
    _CACHE[model] = bm
    return bm


def _infer(model: nn.Module):
    from slimkit.llm.block_maps import BlockMap, get_module

    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None) or type(model).__name__
    blocks_path = find_blocks(model)
    blocks = get_module(model, blocks_path)
    block = blocks[0]
    for i, blk in enumerate(blocks):
        for n, m in blk.named_modules():
            if n and is_fused_experts(m):
                install_expert_linears(m, f"{blocks_path}.{i}.{n}")
    fused = {n for n, m in block.named_modules() if n and is_fused_experts(m)}
    for n, p in block.named_parameters():
        if p.ndim > 2 and n.rsplit(".", 1)[0] not in fused:
            raise SlimkitError(
                f"{mt}: {blocks_path}.0.{n} is a {p.ndim}-D parameter {tuple(p.shape)} "
                "(mixture-of-experts weights kept outside nn.Linear modules); per-expert "
                "quantization of fused expert tensors is not implemented"
            )
    linears = [n for n, m in block.named_modules() if _is_linear(m)]
    kinds = {type(m).__name__ == "Conv1D" for n, m in block.named_modules() if _is_linear(m)}
    if len(kinds) > 1:
        raise SlimkitError(f"{mt}: blocks mix nn.Linear and Conv1D layers")
    transposed = kinds == {True}
    vocab = int(getattr(cfg, "vocab_size", 2) or 2)
    dev = next(model.parameters()).device
    ids = torch.randint(0, max(vocab, 2), (1, 8), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        pre, post, args, kwargs = _trace_model(model, blocks_path, ids.to(dev))
        trace = _BlockTrace(block, args, kwargs)
    finally:
        model.train(was_training)
    first_call: dict[str, int] = {}
    input_of: dict[str, torch.Tensor] = {}
    output_of: dict[str, torch.Tensor] = {}
    for i, (n, x, y) in enumerate(trace.calls):
        if n in linears and n not in first_call:
            first_call[n] = i
            input_of[n], output_of[n] = x, y
    experts = {n for n in linears if isinstance(trace.modules[n], ExpertLinear)}
    missing = [n for n in linears if n not in first_call and n not in experts]
    if missing:
        raise SlimkitError(
            f"{mt}: a forward pass does not reach {', '.join(missing[:4])} of "
            f"{blocks_path}.0 (routed or conditional linears are not supported)"
        )
    # GPTQ's groups: linears reading the same tensor, in call order; each expert is a group of
    # its own (it reads the tokens routed to it), placed with the first expert of its role
    role_first: dict[str, int] = {}
    for n in experts:
        role = n.rsplit(".", 1)[0]
        if n in first_call:
            role_first[role] = min(role_first.get(role, first_call[n]), first_call[n])

    def order(n: str) -> tuple:
        if n in experts:
            role, idx = n.rsplit(".", 1)
            if role not in role_first:
                raise SlimkitError(f"{mt}: no token reached any expert of {blocks_path}.0.{role}")
            return (role_first[role], int(idx))
        return (first_call[n], -1)

    groups: list[list[str]] = []
    key_of: dict[int, int] = {}
    for n in sorted(linears, key=order):
        if n in experts:
            groups.append([n])
            continue
        k = trace._root(id(input_of[n]))
        if k in key_of:
            groups[key_of[k]].append(n)
        else:
            key_of[k] = len(groups)
            groups.append([n])
    score = tuple(
        n for n in sorted(linears, key=order) if _SCORE.search(n.rsplit(".", 1)[-1].lower())
    )
    # norm -> consumers: the group's input is a norm's output that nothing else reads
    smooth, inspect = [], []
    norm_fed: set[str] = set()
    for g in groups:
        if g[0] in experts:
            continue
        prod = trace.producer(input_of[g[0]])
        if prod is None or not is_norm(trace.modules[prod]):
            continue
        others = [
            r
            for r in trace.readers(input_of[g[0]])
            if r not in g and not any(c.startswith(r + ".") for c in g)
        ]
        if others:  # the norm's output also goes elsewhere (e.g. into the residual)
            continue

        def fold(blk, _p=prod, _g=tuple(g)):
            w = get_module(blk, _p).weight
            s = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(1)) * 1.5 + 0.5
            fold_scales(get_module(blk, _p), [get_module(blk, c) for c in _g], s, transposed)

        if _exact(block, args, kwargs, fold):
            smooth.append((prod, tuple(g)))
            norm_fed.update(g)
            parent = _common_parent(list(g))
            if parent:
                inspect.append((prod, parent))
    # linear -> linear pairs, tried in call order; the first exact producer of a consumer wins
    heads = getattr(cfg, "num_attention_heads", None)
    smooth_linear = []
    dense = [n for n in sorted(linears, key=order) if n not in experts]
    for c in dense:
        if c in norm_fed:
            continue
        c_in = trace.modules[c].weight.shape[0 if transposed else 1]
        for p in dense:
            if first_call[p] >= first_call[c] or p == c:
                continue
            p_out = trace.modules[p].weight.shape[1 if transposed else 0]
            in_score_group = any(p in g and set(g) & set(score) for g in groups)
            kind = "attn" if in_score_group else "ffn"
            try:
                layout = linear_pair_repeat(kind, p_out, c_in, heads or 1)
            except SlimkitError:
                continue

            def fold(blk, _p=p, _c=c, _lay=layout, _n=p_out):
                gen = torch.Generator().manual_seed(2)
                sign = torch.randint(0, 2, (_n,), generator=gen) * 2 - 1
                s = (torch.rand(_n, generator=gen) * 1.5 + 0.5) * sign
                fold_linear_scales(get_module(blk, _p), get_module(blk, _c), s, _lay, transposed)

            if _exact(block, args, kwargs, fold):
                smooth_linear.append((p, c, kind))
                break
    writers, post_norms, other = trace.residual_writers([n for n in linears if n in first_call])
    return BlockMap(
        family=f"{mt} (inferred)",
        model_types=(),
        blocks=blocks_path,
        pre_blocks=pre,
        post_blocks=post,
        sequential=tuple(tuple(g) for g in groups),
        smooth=tuple(smooth),
        smooth_linear=tuple(smooth_linear),
        inspect=tuple(inspect),
        score_linears=score,
        residual_writers=tuple(writers),
        post_norms=tuple(post_norms),
        residual_other=other,
        transposed=transposed,
    )
