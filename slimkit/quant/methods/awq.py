"""AWQ (Lin et al., arXiv 2306.00978), following mit-han-lab/llm-awq ``auto_scale.py`` and
``auto_clip.py``.

Per decoder block, on the block's calibration inputs:

1. **Scale search.** For each foldable pair (norm -> q/k/v, norm -> gate/up, and the linear pairs
   value -> output and up -> down where one value channel feeds one output column, as in the
   reference), with s_x = mean |x_j| over the calibration tokens: for alpha = 0, 1/n, ...,
   (n-1)/n, s = max(s_x^alpha, 1e-4) / sqrt(max(s) min(s)); replace each consumer weight W by
   Q(W diag(s)) diag(s)^-1 and measure the mean squared error of the compared output (the
   attention or MLP module named by the block map's ``inspect``, else the consumers' own outputs).
   With ``duo_scaling`` (AutoAWQ's and llm-compressor's default), s = s_x^alpha / s_w^(1-alpha)
   with s_w the mean |W| normalised per quantization group, on llm-compressor's grid (identity,
   then alpha = 0 .. 1). Every pair is searched on the unscaled block; then the best scales are
   folded into the producer (norm weight, or the producer's output rows) and the consumers'
   columns, which leaves the function unchanged.
2. **Clip search.** For every linear except those feeding attention scores (q, k), per output row
   and group: max_val = max|w| (1 - i/20) for i = 0..9; clamp to [-max_val, max_val], quantize,
   and keep the max_val with the lowest output error on the (scaled) inputs.
3. Round to nearest on the scaled and clipped weights.

Choices that differ from the reference (documented in the README):
- the output errors of linears (the clip search, and the scale search of pairs compared on their
  consumers' outputs) are computed exactly from the inputs' second moment H = X^T X / n, over every
  calibration token (the reference sub-samples 512 tokens): err = dW_g H_g dW_g^T;
- inputs come from the pipeline's quantized stream (earlier blocks already quantized), as for GPTQ
  here; the reference propagates the unquantized model.
- ``search_tokens`` (off by default) re-runs the compared module of the scale search on the first
  calibration batches only, for long calibration sets; statistics and clip search use every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.llm.block_maps import get_module, set_weight, weight_of
from slimkit.llm.pipeline import BlockwisePipeline, Window
from slimkit.quant.methods.base import (
    QuantConfig,
    WeightQuantMethod,
    output_error,
    register_method,
)
from slimkit.quant.methods.smoothquant import (
    fold_linear_scales,
    fold_scales,
    foldable_linear_pairs,
)
from slimkit.quant.obs import HessianAccumulator
from slimkit.quant.quantizer import QuantSpec, quantize_weight


@dataclass
class AWQConfig(QuantConfig):
    """AWQ options on top of the shared quantization fields (reference defaults: W4 g128).

    Example:
        >>> cfg = AWQConfig(wbits=4, group_size=128)
        >>> model, report = slimkit.quantize(model, cfg, calib)  # doctest: +SKIP
    """

    n_grid: int = field(
        default=20,
        metadata={
            "help": "scale candidates: alpha = i / n for i < n (llm-awq); with --duo-scaling "
            "llm-compressor's grid (the identity, then alpha = i / (n - 2) for i < n - 1)"
        },
    )
    duo_scaling: bool = field(
        default=False,
        metadata={
            "help": "s = s_x^alpha / s_w^(1-alpha), s_w = mean |W| normalised per group (AutoAWQ / "
            "llm-compressor default); off: s = s_x^alpha (the llm-awq reference)"
        },
    )
    scale_linear_pairs: bool = field(
        default=True,
        metadata={"help": "also search value -> output and up -> down scales (where they fold)"},
    )
    auto_clip: bool = field(
        default=True, metadata={"help": "search a clipping range per row and group (not q/k)"}
    )
    clip_grid: int = field(default=20, metadata={"help": "clip search steps: max|w| (1 - i/grid)"})
    max_shrink: float = field(
        default=0.5, metadata={"help": "clip search: shrink the range by at most this fraction"}
    )
    search_tokens: int = field(
        default=0,
        metadata={
            "help": "scale search of pairs compared on an attention or MLP module's output: re-run "
            "the module on the first calibration batches holding at least this many tokens "
            "(0: all of them, as the reference; ours: a cap for long calibration sets; the "
            "input statistics and the clip search still use every token)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 1:
            raise SlimkitError(f"--n-grid must be >= 1 (got {self.n_grid})")
        if self.clip_grid < 1:
            raise SlimkitError(f"--clip-grid must be >= 1 (got {self.clip_grid})")
        if self.search_tokens < 0:
            raise SlimkitError(f"--search-tokens must be >= 0 (got {self.search_tokens})")
        if not 0 <= self.max_shrink < 1:
            raise SlimkitError(f"--max-shrink must be in [0, 1) (got {self.max_shrink})")
        if self.group_size == 0:
            raise SlimkitError("AWQ needs per-channel (-1) or grouped weights, not per-tensor (0)")

    def scheme(self) -> str:
        return "AWQ " + super().scheme()


def awq_scales(
    x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """s = max(s_x^ratio, 1e-4) (llm-awq ``auto_scale``), or with ``w_mean`` the duo form
    max(s_x^ratio / (s_w^(1-ratio) + 1e-4), 1e-4); normalised by sqrt(max(s) min(s))."""
    if w_mean is None:
        s = x_mean.float().pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.float().pow(ratio) / (w_mean.float().pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_means(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel: mean over the rows of all ``weights`` of |W| divided by the max |W|
    of its quantization group (the duo-scaling statistic of AutoAWQ / llm-compressor)."""
    total, rows = 0, 0
    for w in weights:
        g = w.shape[1] if group_size == -1 else group_size
        a = w.float().abs().reshape(-1, g)
        a = (a / (a.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape)
        total = total + a.sum(0)
        rows += w.shape[0]
    return total / rows


def scale_grid(n_grid: int, duo: bool) -> list[tuple[float, bool]]:
    """(alpha, duo form) candidates: llm-awq's alpha = i / n for i < n; with ``duo``,
    llm-compressor's grid: the identity first, then alpha = i / (n - 2) for i < n - 1."""
    if not duo:
        return [(i / n_grid, False) for i in range(n_grid)]
    if n_grid < 3:
        return [(0.0, False)] + [(1.0, True)] * (n_grid - 1)
    return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]


def fake_quant_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return quantize_weight(w, spec).dequantize().to(w)


def grouped_error(dw: torch.Tensor, H: torch.Tensor, group_size: int) -> torch.Tensor:
    """Output error of each (row, group): dW_g H_gg dW_g^T -> (rows, groups).

    ``H`` is the input second moment (in, in); equal, up to a constant, to the mean over tokens
    of (x_g . dW_g)^2, the reference's per-group error.
    """
    out, inp = dw.shape
    g = inp if group_size == -1 else group_size
    n = inp // g
    d = dw.reshape(out, n, g)
    blocks = H.reshape(n, g, n, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n, g, g)
    return torch.einsum("rgi,gij,rgj->rg", d, blocks.to(d), d)


def search_clip(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, grid: int, max_shrink: float):
    """Best max_val per (row, group) (llm-awq ``auto_clip_layer``, errors from ``H``)."""
    out, inp = w.shape
    g = inp if spec.group_size == -1 else spec.group_size
    wg = w.reshape(out, inp // g, g)
    org_max = wg.abs().amax(dim=-1)
    best = org_max.clone()
    best_err = torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * grid)):
        mv = (org_max * (1 - i / grid)).unsqueeze(-1)
        cur = torch.clamp(wg, -mv, mv).reshape(out, inp)
        err = grouped_error(fake_quant_weight(cur, spec) - w, H, spec.group_size)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, mv.squeeze(-1), best)
    return best


class _ParentInputs:
    """The (args, kwargs) each calibration batch passes to an inspected module, so it can be
    re-run alone while its consumers' weights are tried; with ``max_tokens`` > 0 only the first
    calls holding at least that many tokens are kept."""

    def __init__(self, module: nn.Module, max_tokens: int = 0):
        self.module = module
        self.max_tokens = max_tokens
        self.tokens = 0
        self.calls: list[tuple[tuple, dict]] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.max_tokens and self.tokens >= self.max_tokens:
            return
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor):
            x = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.tokens += x.numel() // x.shape[-1]
        args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        self.calls.append((args, dict(kwargs)))

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        outs = []
        for args, kwargs in self.calls:
            y = self.module(*args, **kwargs)
            outs.append(y[0] if isinstance(y, tuple) else y)
        return outs


@register_method("awq", AWQConfig, help="AWQ: activation-aware scale and clip search, then RTN")
class AWQ(WeightQuantMethod):
    config: AWQConfig

    def on_start(self, pipe: BlockwisePipeline) -> None:
        super().on_start(pipe)
        self.fold_ok = bool(pipe.bmap.smooth) and pipe.bmap.smooth_ok(pipe.model.config)
        if not self.fold_ok:
            from logging import getLogger

            getLogger("slimkit").warning(
                "%s blocks have no foldable norm -> linear pairs; AWQ runs its clip search only",
                pipe.bmap.family,
            )

    def on_window(self, win: Window) -> None:
        for b in win.block_ids:
            H, leader, linears = self.scale_block(win, b)
            if self.config.auto_clip:
                self.clip_block(win, b, H, leader, linears)
            self.round_block(win, b, H, leader)

    # ------------------------------------------------------------------------------ pairs
    def _pairs(self, pipe: BlockwisePipeline, block: nn.Module) -> list[dict]:
        """Scale groups: producer, consumers, compared module (None: consumers' outputs)."""
        out: list[dict] = []
        if not self.fold_ok:
            return out
        inspect = dict(pipe.bmap.inspect)
        for norm, consumers in pipe.bmap.smooth:
            mods = {c: get_module(block, c) for c in consumers}
            mods = {c: m for c, m in mods.items() if m is not None}
            if get_module(block, norm) is None or not mods:
                continue
            parent = get_module(block, inspect[norm]) if norm in inspect else None
            out.append({"producer": norm, "consumers": mods, "parent": parent, "layout": None})
        for producer, consumer, layout in (
            foldable_linear_pairs(pipe, block) if self.config.scale_linear_pairs else []
        ):
            if layout[1] != 1:  # GQA: columns repeat value channels; the reference skips these
                continue
            c = get_module(block, consumer)
            out.append(
                {"producer": producer, "consumers": {consumer: c}, "parent": None, "layout": layout}
            )
        return out

    # ------------------------------------------------------------------------------ block
    @torch.no_grad()
    def scale_block(
        self, win: Window, b: int, mirrors: tuple[nn.Module, ...] = ()
    ) -> tuple[dict, dict, dict]:
        """Collect the block's input statistics, search and fold every pair's scales (also into
        each block of ``mirrors``, copies of the block such as CBQ's full-precision target).

        Returns the input second moments H (per group of linears reading one input, keyed by
        the group's first linear, already rescaled by the folded scales), each linear's group
        leader, and the block's linears {relative name: module}.
        """
        pipe = win.pipe
        T = pipe.bmap.transposed
        block = pipe.blocks[b]
        pairs = self._pairs(pipe, block)
        shared = [
            {rel: get_module(block, rel) for rel in group if get_module(block, rel) is not None}
            for group in pipe.bmap.sequential
        ]
        shared = [g for g in shared if g]
        first = {next(iter(g)): g[next(iter(g))] for g in shared}
        leader = {rel: next(iter(g)) for g in shared for rel in g}
        width = {n: weight_of(m, T).shape[1] for n, m in first.items()}
        acc = {n: HessianAccumulator(width[n], pipe.device) for n in first}
        absum = {n: torch.zeros(width[n], dtype=torch.float64, device=pipe.device) for n in first}

        def observe(name: str, x: torch.Tensor) -> None:
            acc[name].add(x)
            absum[name] += x.reshape(-1, x.shape[-1]).abs().sum(0).double()

        parents = {
            id(p["parent"]): _ParentInputs(p["parent"], self.config.search_tokens)
            for p in pairs
            if p["parent"] is not None
        }
        try:
            pipe.collect([block], win.inputs_of(b), first, observe)
        finally:
            for pi in parents.values():
                pi.handle.remove()
        H = {n: a.finish(pipe) for n, a in acc.items()}
        x_mean = {n: (pipe.all_reduce_sum(absum[n]) / acc[n].n.clamp(min=1)).float() for n in first}

        # every pair is searched on the unscaled block, then all best scales are folded
        found = []
        for p in pairs:
            lead = leader[next(iter(p["consumers"]))]
            s, ratio, err0, err = self._search_scale(pipe, p, x_mean[lead], H[lead], parents)
            found.append((p, lead, s))
            gain = err / err0 if err0 > 0 else 1.0  # error left after the search, vs plain RTN
            pipe.log.append(
                {"window": win.index, "layer": f"{pipe.bmap.blocks}.{b}.{p['producer']}",
                 "awq_alpha": ratio, "awq_gain": gain}
            )  # fmt: skip
        for p, lead, s in found:
            for blk in (block, *mirrors):
                mods = [get_module(blk, c) for c in p["consumers"]]
                if p["layout"] is None:
                    fold_scales(get_module(blk, p["producer"]), mods, s, T)
                else:
                    fold_linear_scales(get_module(blk, p["producer"]), mods[0], s, p["layout"], T)
            H[lead] = H[lead] / s[:, None] / s[None, :]  # the consumers now read x / s
        return H, leader, {rel: m for g in shared for rel, m in g.items()}

    @torch.no_grad()
    def clipped_weights(
        self, win: Window, H: dict, leader: dict, linears: dict
    ) -> dict[str, torch.Tensor]:
        """{relative name: fp32 weight clamped to its searched range} for each linear but those
        feeding attention scores."""
        T = win.pipe.bmap.transposed
        out = {}
        for rel, m in linears.items():
            if rel in win.pipe.bmap.score_linears:
                continue
            w = weight_of(m, T).detach().float()
            mv = search_clip(
                w, H[leader[rel]], self.spec_of(m), self.config.clip_grid, self.config.max_shrink
            )
            wg = w.reshape(w.shape[0], mv.shape[1], -1)
            out[rel] = torch.clamp(wg, -mv[..., None], mv[..., None]).reshape(w.shape)
        return out

    def clip_block(self, win: Window, b: int, H: dict, leader: dict, linears: dict) -> None:
        """Clamp each linear (not those feeding attention scores) to its searched range."""
        for rel, w in self.clipped_weights(win, H, leader, linears).items():
            set_weight(linears[rel], w, win.pipe.bmap.transposed)

    @torch.no_grad()
    def round_block(self, win: Window, b: int, H: dict, leader: dict) -> None:
        pipe = win.pipe
        prefix = f"{pipe.bmap.blocks}.{b}."
        self.attach_activation_quantizers(win, b)
        for name, m in win.named_linears(b).items():
            w = weight_of(m, pipe.bmap.transposed).detach().clone().float()
            qw = quantize_weight(w, self.spec_of(m))
            self.write(pipe, name, m, qw)
            err = output_error(w, qw.dequantize().to(w), H[leader[name[len(prefix) :]]])
            pipe.log.append({"window": win.index, "layer": name, "out_err": err})

    def _search_scale(self, pipe, pair, x_mean, H, parents) -> tuple:
        """Best scales of one pair: (s, alpha, error at alpha = 0, best error)."""
        T = pipe.bmap.transposed
        mods = pair["consumers"]
        orig = {c: weight_of(m, T).detach().clone() for c, m in mods.items()}
        parent = parents.get(id(pair["parent"])) if pair["parent"] is not None else None
        ref = parent.outputs() if parent is not None else None
        best = (None, 0.0, math.inf)
        err0 = math.inf
        w_mean = None
        if self.config.duo_scaling:
            w_mean = weight_means(
                [w.float() for w in orig.values()],
                self.spec_of(next(iter(mods.values()))).group_size,
            )
        try:
            for i, (ratio, duo) in enumerate(
                scale_grid(self.config.n_grid, self.config.duo_scaling)
            ):
                s = awq_scales(x_mean, ratio, w_mean if duo else None)
                if parent is None:
                    err = 0.0
                    n_out = 0
                    for c, w in orig.items():
                        wf = w.float()
                        spec = self.spec_of(mods[c])
                        d = fake_quant_weight(wf * s[None, :], spec) / s[None, :] - wf
                        err += float(torch.einsum("oi,ij,oj->", d.double(), H.double(), d.double()))
                        n_out += w.shape[0]
                    err /= max(n_out, 1)
                else:
                    for c, m in mods.items():
                        wf = orig[c].float()
                        q = fake_quant_weight(wf * s[None, :], self.spec_of(m)) / s[None, :]
                        set_weight(m, q.to(m.weight), T)
                    tot = torch.zeros((), dtype=torch.float64, device=pipe.device)
                    cnt = torch.zeros((), dtype=torch.float64, device=pipe.device)
                    for y, y0 in zip(parent.outputs(), ref):
                        tot += (y.float() - y0.float()).pow(2).sum().double()
                        cnt += y0.numel()
                    err = float(pipe.all_reduce_sum(tot) / pipe.all_reduce_sum(cnt).clamp(min=1))
                if i == 0:
                    err0 = err
                if err < best[2]:
                    best = (s, ratio, err)
        finally:
            for c, m in mods.items():
                set_weight(m, orig[c].to(m.weight), T)
        if not math.isfinite(best[2]):
            raise SlimkitError(
                f"AWQ scale search for {pair['producer']}: every error is non-finite (NaN/Inf inputs?)"
            )
        return best[0], best[1], err0, best[2]
