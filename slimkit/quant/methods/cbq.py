"""CBQ: cross-block reconstruction PTQ (Ding et al., arXiv 2312.07950v5, ICLR 2025).

Per window of K consecutive blocks (overlap O, run by the shared pipeline):

1. New blocks are prepared once: CFP detects activation-outlier channels of every foldable
   norm -> linear group on the full-precision stream and folds ``1/s`` into the norm and ``s`` into
   the consumers' columns (exactly function-preserving, applied to the FP copy too); with
   ``--cfp-linear`` also of the value -> output and up -> down pairs (``1/s`` into the producer's
   rows, GQA-aware); it also truncates weight-outlier columns in a copy that only initialises
   each linear's range. ``--awq-init`` replaces this step by AWQ's searches (ours): the scales
   of the foldable pairs found by AWQ's output-error search (folded into the block and its FP
   copy, function-preserving), and each linear's AWQ clipping range, which sets the initial
   step size and zero point (the weights themselves are not clamped; GPTQ's starting codes are
   computed on the clamped copy). With it the clipping factors train at 1e-2 unless
   ``--lr-clip`` says otherwise: at 1e-1 a short schedule re-learns AWQ's ranges away and ends
   worse than AWQ (benchmarks/cbq_ladder.py, rows ``cbq-awq`` and ``cbq-awq-lrclip``).
2. Every linear gets learnable quantizer parameters (fp32): OmniQuant-style clipping factors
   ``sigmoid(gamma) * max``, ``sigmoid(beta) * min`` per output channel / group (they set the
   step size and zero point), a rounding parameterisation, and, with ``--abits``, a learnable
   clipping ratio of its input's range.
3. The window is trained on the homologous reconstruction loss
   ``E(T_fp(X_fp), T_q(X_q)) + E(T_fp(X_q), T_q(X_q))`` with
   ``E(a, b) = ||a - b||^2 / ||a||^2`` per token (``--kl`` adds the paper's KL(softmax(a) || softmax(b))
   over the hidden dimension),
   plus the AdaRound rounding regulariser with beta annealed from 20 to 2 after a warm-up.
4. A block is finalized when it leaves its last window: rounding is hardened to integer codes
   (``1[h >= 0.5]``), the step sizes are frozen, and the dequantized weight replaces the FP one.

Rounding (``--rounding``):
- ``lora`` (CBQ's LoRA-Rounding): rounding logits ``V = V0 + A1 A2`` with ``A1`` (out x r) and
  ``A2`` (r x in) learned; ``V0`` (not learned) is the AdaRound initialisation
  ``logit((frac(W/S) - gamma) / (zeta - gamma))`` so that training starts from the FP weight.
  ``--lora-init svd`` instead starts from the best rank-r approximation of V0 (``V = A1 A2``),
  the other reading of the paper; ``zero`` starts from h = 0.5.
- ``full``: AdaRound, one learned logit per weight (the cost baseline).
- ``nearest``: round-to-nearest with a straight-through gradient (learned step sizes only; with
  K = 1 this is the OmniQuant-LWC analogue of the ablation ladder).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.core.logs import progress
from slimkit.llm.block_maps import get_module, set_weight, weight_of
from slimkit.llm.pipeline import BlockwiseMethod, BlockwisePipeline, PipelineOptions, Window
from slimkit.quant import activations as acts
from slimkit.quant.activations import ActQuantHook, ActSpec, quantize_activation
from slimkit.quant.cfp import CFPParams, activation_scales, truncated_weight
from slimkit.quant.methods.awq import AWQ, AWQConfig
from slimkit.quant.methods.base import QuantConfig, check_widths, register_method
from slimkit.quant.methods.gptq import gptq_quantize
from slimkit.quant.methods.smoothquant import (
    fold_linear_scales,
    fold_scales,
    foldable_linear_pairs,
    reduce_repeated,
)
from slimkit.quant.obs import collect_hessians
from slimkit.quant.quantizer import QuantizedWeight, QuantSpec, _grouped, trivial_g_idx

log = logging.getLogger("slimkit")

ROUNDINGS = ("lora", "full", "nearest")
LORA_INITS = ("residual", "svd", "zero")
ROUNDING_INITS = ("nearest", "gptq")
ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


@dataclass
class CBQConfig(QuantConfig):
    """CBQ options. Defaults marked (paper) follow the paper / msModelSlim; the rest are ours
    (``../specs/cbq.md`` lists the provenance of each).

    Example:
        >>> cfg = CBQConfig(wbits=2, group_size=64, epochs=2)
        >>> cfg.pipeline_options().window
        2
    """

    # `--preset`: calibration size, epochs (and, for long schedules, OmniQuant's learning rates)
    PRESETS: ClassVar[dict[str, dict]] = {
        "demo": {"epochs": 1, "n_calib": 16, "calib_seq_len": 256},
        "fast": {"epochs": 1, "n_calib": 32, "calib_seq_len": 512},
        "default": {"epochs": 2, "n_calib": 32, "calib_seq_len": 512},
        "paper": {
            "epochs": 20,
            "n_calib": 128,
            "calib_seq_len": 2048,
            "lr_round": 1e-3,
            "lr_clip": 1e-2,
        },
    }

    window: int = field(default=2, metadata={"help": "K, blocks reconstructed jointly (paper)"})
    overlap: int = field(default=1, metadata={"help": "O, blocks shared by consecutive windows"})
    epochs: int = field(default=2, metadata={"help": "passes over the calibration set per window"})
    train_batch_size: int = field(default=1, metadata={"help": "samples per optimizer step"})
    rounding: str = field(
        default="lora", metadata={"help": "learned rounding", "choices": list(ROUNDINGS)}
    )
    rank: int = field(default=8, metadata={"help": "LoRA-Rounding rank r"})
    lora_init: str = field(
        default="residual",
        metadata={"help": "LoRA-Rounding initialisation", "choices": list(LORA_INITS)},
    )
    rounding_init: str = field(
        default="gptq",
        metadata={
            "help": "start the learned rounding from round-to-nearest or from GPTQ's "
            "error-compensated codes (ours)",
            "choices": list(ROUNDING_INITS),
        },
    )
    cfp: bool = field(default=True, metadata={"help": "coarse-to-fine outlier pre-processing"})
    cfp_q_lo: float = field(default=0.2, metadata={"help": "CFP coarse lower quantile"})
    cfp_q_hi: float = field(default=0.8, metadata={"help": "CFP coarse upper quantile"})
    cfp_lam1: float = field(default=1.5, metadata={"help": "CFP coarse IQR multiplier"})
    cfp_smooth_rate: float = field(default=0.7, metadata={"help": "CFP activation scale exponent"})
    cfp_linear: bool = field(
        default=False,
        metadata={
            "help": "CFP also folds activation scales of the linear -> linear pairs the family "
            "declares (value -> output projection, up -> down projection) into the producer's "
            "rows (ours: the paper folds into the preceding norm or linear without naming pairs)"
        },
    )
    awq_init: bool = field(
        default=False,
        metadata={
            "help": "start from AWQ instead of CFP: AWQ's searched scales of the foldable pairs "
            "(folded, function-preserving) and its searched clipping ranges as the initial step "
            "sizes (ours)"
        },
    )
    awq_search_tokens: int = field(
        default=0,
        metadata={
            "help": "with --awq-init: AWQ's --search-tokens, the calibration tokens its scale "
            "search re-runs attention / MLP on (0: all; a cap makes the AWQ start cheaper on "
            "long calibration sets)"
        },
    )
    learn_smooth: bool = field(
        default=False,
        metadata={
            "help": "with --abits and CFP: learn per-channel migration scales of the foldable "
            "norm -> linear pairs, initialised by CFP, folded into the norm at finalization "
            "(ours, OmniQuant-LET-like; off by default: mixed results at short schedules)"
        },
    )
    lr_smooth: float = field(default=1e-2, metadata={"help": "learning rate of migration scales"})
    homologous: bool = field(
        default=True, metadata={"help": "add the same-input term E(T_fp(X_q), T_q(X_q))"}
    )
    kl: bool = field(
        default=False,
        metadata={"help": "add KL(softmax over hidden) to the L2 distance (see `distance`)"},
    )
    soft_rounding: bool = field(
        default=False,
        metadata={
            "help": "train with AdaRound's soft rounding h (paper); default: forward with the "
            "hardened rounding 1[h >= 0.5] and a straight-through gradient into h"
        },
    )
    lr_round: float = field(default=1e-2, metadata={"help": "learning rate of rounding logits"})
    lr_clip: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of clipping factors (default 1e-1; 1e-2 with --awq-init, "
            "whose searched ranges the larger rate re-learns away on short schedules)"
        },
    )
    lam_round: float = field(default=0.01, metadata={"help": "rounding regulariser weight"})
    beta_start: float = field(default=20.0, metadata={"help": "regulariser beta at warm-up end"})
    beta_end: float = field(default=2.0, metadata={"help": "regulariser beta at the window end"})
    warmup: float = field(default=0.2, metadata={"help": "fraction of steps without regulariser"})
    learn_act_clip: bool = field(
        default=True, metadata={"help": "learn a clipping ratio for each activation quantizer"}
    )
    train_seed: int = field(
        default=0, metadata={"help": "seed of the training sample order and the LoRA start"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, choices in (
            ("rounding", ROUNDINGS),
            ("lora_init", LORA_INITS),
            ("rounding_init", ROUNDING_INITS),
        ):
            if getattr(self, name) not in choices:
                raise SlimkitError(
                    f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; "
                    f"choose one of: {', '.join(choices)}"
                )
        if self.window < 1 or not 0 <= self.overlap < self.window:
            raise SlimkitError(
                f"need window >= 1 and 0 <= overlap < window (got {self.window}, {self.overlap})"
            )
        if self.epochs < 0 or self.train_batch_size < 1 or self.rank < 1:
            raise SlimkitError("epochs must be >= 0, train batch size and rank >= 1")
        if not 0 <= self.warmup < 1:
            raise SlimkitError(f"--warmup must be in [0, 1) (got {self.warmup})")
        if not 0 < self.cfp_q_lo < self.cfp_q_hi < 1:
            raise SlimkitError("CFP quantiles need 0 < q_lo < q_hi < 1")
        if self.awq_init and self.group_size == 0:
            raise SlimkitError(
                "--awq-init needs per-channel (-1) or grouped weights, not per-tensor"
            )
        if self.awq_search_tokens < 0:
            raise SlimkitError(f"--awq-search-tokens must be >= 0 (got {self.awq_search_tokens})")
        if self.awq_search_tokens and not self.awq_init:
            log.warning("--awq-search-tokens only applies with --awq-init; ignored")
        if self.lr_clip is None:
            self.lr_clip = 1e-2 if self.awq_init else 1e-1
        if self.lr_clip < 0 or self.lr_round < 0:
            raise SlimkitError(
                f"learning rates must be >= 0 (got --lr-clip {self.lr_clip}, "
                f"--lr-round {self.lr_round})"
            )

    def pipeline_options(self) -> PipelineOptions:
        o = super().pipeline_options()
        o.window, o.overlap = self.window, self.overlap
        return o

    def cfp_params(self) -> CFPParams:
        return CFPParams(
            q_lo=self.cfp_q_lo,
            q_hi=self.cfp_q_hi,
            lam1=self.cfp_lam1,
            smooth_rate=self.cfp_smooth_rate,
        )

    def scheme(self) -> str:
        parts = [f"K={self.window},O={self.overlap}", self.rounding]
        if self.rounding == "lora":
            parts[-1] += f" r={self.rank}"
        if self.awq_init:
            parts.append("AWQ-init")
        elif self.cfp:
            parts.append("CFP+linear" if self.cfp_linear else "CFP")
        return f"CBQ({', '.join(parts)}) " + super().scheme()


def _group_range(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per row group, widened to include 0; all-zero groups get [-1, 1]."""
    x = _grouped(w.float(), spec)
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    dead = (lo == 0) & (hi == 0)
    return torch.where(dead, -torch.ones_like(lo), lo), torch.where(dead, torch.ones_like(hi), hi)


def _floor_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.floor(x) - x).detach() + x


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rounding_logits(frac: torch.Tensor) -> torch.Tensor:
    """V* with h(V*) = frac (clipped to +-6), AdaRound's initialisation."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p)).clamp(-6, 6)


class LinearQuantizer(nn.Module):
    """Learnable weight quantizer of one linear (fp32): clipping factors per output channel or
    group, and rounding logits (LoRA pair, full matrix, or none).

    ``weight(w, hard)`` returns the fake-quantized weight (out, in); ``hard=True`` uses hardened
    rounding and equals ``harden(w).dequantize()`` exactly.
    """

    def __init__(
        self,
        w: torch.Tensor,
        spec: QuantSpec,
        rounding: str,
        rank: int,
        lora_init: str = "residual",
        range_w: torch.Tensor | None = None,
        init: bool = True,
        soft: bool = False,
        start: QuantizedWeight | None = None,
        generator: torch.Generator | None = None,
        exact_range: bool = False,
    ):
        super().__init__()
        self.spec, self.rounding = spec, rounding
        self.soft = soft
        out, inp = w.shape
        # clipping factors: hi = sigmoid(up) * max, lo = sigmoid(low) * min of the current weight
        # (ranges follow the weight, so migration scales can change it). Start: the range of
        # ``range_w`` (CFP's truncated or AWQ's clipped copy) capped at OmniQuant's sigmoid(4) =
        # 0.982, or at sigmoid(8) = 0.9997 (trainable, nearly exact) with GPTQ's codes (computed
        # on the min-max grid of ``range_w``, else of ``w``) or an ``exact_range``.
        lo, hi = _group_range(w, spec)
        logit0 = 8.0 if start is not None or exact_range else 4.0
        up0 = torch.full_like(hi, logit0)
        low0 = torch.full_like(lo, logit0)
        if range_w is not None:
            rlo, rhi = _group_range(range_w, spec)
            cap = torch.sigmoid(torch.tensor(logit0))
            ratio_hi = torch.where(hi > 0, rhi / hi.clamp(min=1e-30), torch.ones_like(hi))
            ratio_lo = torch.where(lo < 0, rlo / lo.clamp(max=-1e-30), torch.ones_like(lo))
            up0 = torch.logit(ratio_hi.clamp(1e-3, cap))
            low0 = torch.logit(ratio_lo.clamp(1e-3, cap))
        self.up = nn.Parameter(up0)
        self.low = nn.Parameter(low0)
        r = min(rank, out, inp)
        if rounding == "lora":
            self.a1 = nn.Parameter(torch.zeros(out, r, device=w.device))
            self.a2 = nn.Parameter(torch.zeros(r, inp, device=w.device))
            self.register_buffer("v0", torch.zeros(out, inp, device=w.device))
        elif rounding == "full":
            self.v = nn.Parameter(torch.zeros(out, inp, device=w.device))
        if not init or rounding == "nearest":
            return
        with torch.no_grad():
            s, _ = self.scale_zero(w)
            frac = (_grouped(w.float(), spec) / s).reshape(out, inp)
            v_star = rounding_logits(frac - torch.floor(frac))
            self.start_mismatch = 0.0
            if start is not None:  # h = 1 where GPTQ rounded up; margin = distance from 1/2
                _, z = self.scale_zero(w)
                codes = _grouped(start.codes.to(w.device).float(), spec)
                d = (codes - z - torch.floor(_grouped(w.float(), spec) / s)).reshape(out, inp)
                self.start_mismatch = float(((d < 0) | (d > 1)).float().mean())
                v_star = torch.where(d >= 1, 1.0, -1.0) * v_star.abs().clamp(min=0.5)
            if rounding == "full":
                self.v.copy_(v_star)
            elif lora_init == "residual":
                self.v0.copy_(v_star)
            elif lora_init == "svd":
                u, sv, vh = torch.linalg.svd(v_star, full_matrices=False)
                root = sv[:r].sqrt()
                self.a1.copy_(u[:, :r] * root)
                self.a2.copy_(root[:, None] * vh[:r])
            if lora_init != "svd" and rounding == "lora":  # A1 small random, A2 = 0: V = V0
                a1 = torch.randn(out, r, generator=generator) / math.sqrt(r)
                self.a1.copy_(a1.to(self.a1.device))

    def n_round_params(self) -> int:
        if self.rounding == "lora":
            return self.a1.numel() + self.a2.numel()
        return self.v.numel() if self.rounding == "full" else 0

    def scale_zero(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = self.spec.qmax
        lo, hi = _group_range(w, self.spec)
        hi = torch.sigmoid(self.up) * hi
        lo = torch.sigmoid(self.low) * lo
        if self.spec.sym:
            amax = torch.maximum(hi, -lo)
            s = (2 * amax / qmax).clamp(min=1e-8)
            return s, torch.full_like(s, (qmax + 1) / 2)
        s = ((hi - lo) / qmax).clamp(min=1e-8)
        z = torch.clamp(_round_ste(-lo / s), 0, qmax)
        return s, z

    def h(self) -> torch.Tensor | None:
        if self.rounding == "lora":
            return rectified_sigmoid(self.v0 + self.a1 @ self.a2)
        if self.rounding == "full":
            return rectified_sigmoid(self.v)
        return None

    def codes(self, w: torch.Tensor, hard: bool) -> tuple[torch.Tensor, ...]:
        """(codes (grouped, float, soft unless hard), scale, zero)."""
        s, z = self.scale_zero(w)
        x = _grouped(w.float(), self.spec) / s
        h = self.h()
        if h is None:
            q = torch.round(x) if hard else _round_ste(x)
        else:
            h = h.reshape(x.shape)
            hard_h = (h >= 0.5).to(x.dtype)
            if hard:
                q = torch.floor(x) + hard_h
            elif self.soft:
                q = _floor_ste(x) + h
            else:  # hardened forward, gradient into h (straight-through)
                q = _floor_ste(x) + (hard_h - h).detach() + h
        return torch.clamp(q + z, 0, self.spec.qmax), s, z

    def weight(self, w: torch.Tensor, hard: bool = False) -> torch.Tensor:
        q, s, z = self.codes(w, hard)
        return (s * (q - z)).reshape(w.shape)

    def reg(self, beta: float) -> torch.Tensor:
        """Mean of AdaRound's 1 - |2h - 1|^beta over the weights (0 once h is binary)."""
        h = self.h()
        if h is None:
            return torch.zeros((), device=self.up.device)
        return (1 - (2 * h - 1).abs().pow(beta)).mean()

    @torch.no_grad()
    def harden(self, w: torch.Tensor) -> QuantizedWeight:
        q, s, z = self.codes(w, hard=True)
        out, inp = w.shape
        g = self.spec.group_size
        return QuantizedWeight(
            codes=q.reshape(out, inp).to(torch.uint8).cpu(),
            scale=s.reshape(s.shape[0], -1).cpu(),
            zero=z.reshape(z.shape[0], -1).cpu(),
            g_idx=trivial_g_idx(inp, g),
            spec=self.spec,
        )

    @torch.no_grad()
    def soft_fraction(self) -> float:
        """Share of rounding values not yet binary (|h - 0.5| < 0.49)."""
        h = self.h()
        return 0.0 if h is None else float(((h - 0.5).abs() < 0.49).float().mean())


class LearnableActQuant(ActQuantHook, nn.Module):
    """Activation fake-quantizer with a learnable clipping ratio sigmoid(logit) (fp32)."""

    def __init__(self, spec: ActSpec, absmax: torch.Tensor | None, learn: bool, device):
        nn.Module.__init__(self)
        ActQuantHook.__init__(self, spec, absmax)
        self.learn = learn
        self.logit = nn.Parameter(torch.tensor(4.0, device=device), requires_grad=learn)

    @property
    def clip(self) -> torch.Tensor | None:  # type: ignore[override]
        return torch.sigmoid(self.logit) if self.learn else None

    @clip.setter
    def clip(self, value) -> None:  # ActQuantHook.__init__ assigns None
        pass

    def __call__(self, module: nn.Module, args: tuple) -> tuple:  # type: ignore[override]
        return (quantize_activation(args[0], self.spec, self.absmax, self.clip), *args[1:])


def distance(ref: torch.Tensor, out: torch.Tensor, kl: bool) -> torch.Tensor:
    """Per-token relative squared L2 ||ref - out||^2 / ||ref||^2 plus
    KL(softmax(ref) || softmax(out)) over the hidden dimension, both averaged over tokens.

    The KL term is off by default (ours): on SmolLM2-135M with RTN W3 g64 it is dominated by a
    handful of tokens with massive activations (block 25: mean 2.6 nats, max 192, median 0) and
    destabilises the late windows.

    Normalising each token by its own energy (ours; the paper's L2 is unnormalised) keeps the
    few tokens with massive activations (|h| ~ 1e4 in SmolLM2's middle blocks, against ~1e2
    elsewhere) from owning the loss, and makes the scale comparable across depth."""
    ref, out = ref.float(), out.float()
    loss = ((ref - out).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp(min=1e-12)).mean()
    if kl:
        lr, lo = F.log_softmax(ref, -1), F.log_softmax(out, -1)
        loss = loss + (lr.exp() * (lr - lo)).sum(-1).mean()
    return loss


@register_method(
    "cbq", CBQConfig, help="CBQ: cross-block reconstruction, LoRA-Rounding, CFP (W and W+A)"
)
class CBQ(BlockwiseMethod):
    needs_fp = True

    def __init__(self, config: CBQConfig):
        self.config = config
        self.wspec = config.weight_spec()
        self.aspec = config.act_spec()
        self.wq: dict[int, dict[str, LinearQuantizer]] = {}
        self.aq: dict[int, dict[str, LearnableActQuant]] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self.mig: dict[int, dict[str, nn.Parameter]] = {}  # block -> norm -> log scale
        self._norm_hooks: dict[int, list] = {}

    # ------------------------------------------------------------------------------ events
    def on_start(self, pipe: BlockwisePipeline) -> None:
        if dist.world_size() > 1:
            raise SlimkitError(
                "cbq trains quantizer parameters and does not run under torchrun yet; "
                "run it as a single process (use --device to pick the accelerator)"
            )
        check_widths(pipe, self.wspec)
        bm = pipe.bmap
        self.cfp_on = self.config.cfp and bool(bm.smooth) and bm.smooth_ok(pipe.model.config)
        if self.config.cfp and not self.cfp_on:
            log.warning("%s blocks have no foldable norm -> linear pairs; CFP skipped", bm.family)
        self.awq = None
        if self.config.awq_init:
            shared = {f.name: getattr(self.config, f.name) for f in fields(QuantConfig)}
            self.awq = AWQ(AWQConfig(**shared, search_tokens=self.config.awq_search_tokens))
            self.awq.on_start(pipe)
            self.cfp_on = False  # AWQ's scales take CFP's place
            if self.config.learn_smooth:
                log.warning("--learn-smooth starts from CFP's scales; with --awq-init it is off")
            if self.config.cfp_linear:
                log.warning("--cfp-linear is a CFP option; with --awq-init AWQ's pairs are used")
        self.mig_on = self.cfp_on and self.config.learn_smooth and self.aspec is not None

    def on_window(self, win: Window) -> None:
        for pos, b in enumerate(win.block_ids):
            if b not in self.wq:
                self._prepare_block(win, pos, b)
            self._install(win.pipe, b)
        self._train(win)

    def on_finalize(self, win: Window, index: int, block: nn.Module) -> None:
        pipe = win.pipe
        soft, mismatch = [], []
        self._fold_migration(pipe, index, block)
        for name, m in pipe.named_linears(index).items():
            quant = self.wq[index][name]
            w = weight_of(m, pipe.bmap.transposed).float()
            soft.append(quant.soft_fraction())
            mismatch.append(getattr(quant, "start_mismatch", 0.0))
            qw = quant.harden(w)
            if not torch.isfinite(qw.scale).all():
                raise SlimkitError(f"{name}: CBQ produced non-finite scales")
            _uninstall(m)
            w_hat = qw.dequantize()
            err = float(((w_hat - w.cpu()).norm() / w.norm().clamp(min=1e-30)) ** 2)
            pipe.log.append({"window": win.index, "layer": name, "weight_rel_err": err})
            set_weight(
                m, qw.dequantize().to(m.weight.dtype).to(m.weight.device), pipe.bmap.transposed
            )
            pipe.records[name] = qw
            if index in self.aq:
                a = self.aq[index][name]
                acts.attach(
                    m,
                    a.spec,
                    None if a.absmax is None else a.absmax.detach().cpu(),
                    None if a.clip is None else a.clip.detach().cpu(),
                )
        pipe.log.append(
            {
                "window": win.index,
                "block": index,
                "undecided_rounding": sum(soft) / max(1, len(soft)),
                "gptq_codes_outside_floor_ceil": sum(mismatch) / max(1, len(mismatch)),
            }
        )
        del self.wq[index]
        self.aq.pop(index, None)
        self.mig.pop(index, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for b, qs in self.wq.items():
            for name, q in qs.items():
                out.update(
                    {f"w|{b}|{name}|{k}": v.detach().cpu() for k, v in q.state_dict().items()}
                )
        for b, scales in self.mig.items():
            out.update({f"s|{b}|{n}": p.detach().cpu() for n, p in scales.items()})
        for b, qs in self.aq.items():
            for name, a in qs.items():
                out[f"a|{b}|{name}|logit"] = a.logit.detach().cpu().reshape(1)
                if a.absmax is not None:
                    out[f"a|{b}|{name}|absmax"] = a.absmax.detach().cpu().reshape(1)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._pending = dict(state)

    # ------------------------------------------------------------------------------ steps
    def _prepare_block(self, win: Window, pos: int, b: int) -> None:
        """CFP folding, then fresh quantizers (or the ones of a resumed checkpoint)."""
        pipe = win.pipe
        block, fp_block = win.blocks[pos], win.fp_blocks[pos]
        resumed = any(k.startswith(f"w|{b}|") for k in self._pending)
        clipped: dict[str, torch.Tensor] = {}
        if self.cfp_on and not resumed:
            fp_in = (
                win.inputs_fp if pos == 0 else pipe.run_blocks(win.fp_blocks[:pos], win.inputs_fp)
            )
            self._cfp_fold(pipe, block, fp_block, fp_in, b)
        if self.awq is not None and not resumed:  # a resumed block carries its scales
            H, leader, rel = self.awq.scale_block(win, b, mirrors=(fp_block,))
            if self.awq.config.auto_clip:
                prefix = f"{pipe.bmap.blocks}.{b}."
                clipped = {
                    prefix + r: w for r, w in self.awq.clipped_weights(win, H, leader, rel).items()
                }
        dev = pipe.device
        self.wq[b] = {}
        starts = {} if resumed else self._gptq_start(win, b, clipped)
        for i, (name, m) in enumerate(pipe.named_linears(b).items()):
            w = weight_of(m, pipe.bmap.transposed).float().to(dev)
            # the LoRA factors' random start depends on train_seed, block and linear only, so
            # two runs of one command give the same model whatever the global RNG holds
            gen = torch.Generator().manual_seed(self.config.train_seed * 100003 + b * 1000 + i)
            if self.awq is not None:  # AWQ's clipped copy (q / k are not clipped, as in AWQ)
                rng = clipped[name].to(dev) if name in clipped else w
            elif self.config.cfp and name not in starts:
                rng = truncated_weight(w, self.config.cfp_params())
            else:
                rng = None
            q = LinearQuantizer(
                w,
                self.wspec,
                self.config.rounding,
                self.config.rank,
                self.config.lora_init,
                range_w=rng,
                init=not resumed,
                soft=self.config.soft_rounding,
                start=starts.get(name),
                generator=gen,
                exact_range=self.awq is not None,
            ).to(dev)
            if resumed:
                q.load_state_dict(
                    {
                        k.split("|", 3)[3]: v
                        for k, v in self._pending.items()
                        if k.startswith(f"w|{b}|{name}|")
                    }
                )
            self.wq[b][name] = q
        if self.aspec is not None:
            self._prepare_acts(win, pos, b, resumed)
        if self.mig_on:
            self.mig[b] = {}
            for norm_name, consumers in pipe.bmap.smooth:
                norm = get_module(block, norm_name)
                if norm is None or get_module(block, consumers[0]) is None:
                    continue
                key = f"s|{b}|{norm_name}"
                init = (
                    self._pending[key] if key in self._pending else torch.zeros(norm.weight.numel())
                )
                self.mig[b][norm_name] = nn.Parameter(init.float().clone().to(dev))
        if resumed:
            self._pending = {k: v for k, v in self._pending.items() if f"|{b}|" not in k}

    def _gptq_start(
        self, win: Window, b: int, clipped: dict[str, torch.Tensor]
    ) -> dict[str, QuantizedWeight]:
        """GPTQ codes of the block's linears (Hessians of the quantized-stream inputs, all
        linears at once, act-order with static groups so groups stay contiguous), used as the
        starting point of the learned rounding; a linear in ``clipped`` is quantized from that
        clamped copy of its weight."""
        cfg = self.config
        if cfg.rounding_init != "gptq" or cfg.rounding == "nearest":
            return {}
        if self.wspec.group_size == 0:
            log.warning("rounding_init=gptq needs per-channel or grouped weights; using nearest")
            return {}
        pipe = win.pipe
        block = pipe.blocks[b]
        prefix = f"{pipe.bmap.blocks}.{b}."
        linears = pipe.named_linears(b)
        shared = [
            {prefix + rel: get_module(block, rel) for rel in group if prefix + rel in linears}
            for group in pipe.bmap.sequential
        ]
        hessians = collect_hessians(pipe, block, win.inputs_of(b), shared)
        return {
            n: gptq_quantize(
                clipped[n] if n in clipped else weight_of(m, pipe.bmap.transposed).detach().float(),
                hessians[n],
                self.wspec,
                act_order=True,
                static_groups=True,
            )
            for n, m in linears.items()
        }

    def _cfp_fold(
        self, pipe: BlockwisePipeline, block, fp_block, fp_in, index: int | None = None
    ) -> None:
        firsts = {}
        for norm_name, consumers in pipe.bmap.smooth:
            m = get_module(fp_block, consumers[0])
            if m is not None and get_module(fp_block, norm_name) is not None:
                firsts[norm_name] = m
        stats: dict[str, list[torch.Tensor]] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            x = x.detach().reshape(-1, x.shape[-1]).float()
            mx, mn = x.amax(0), x.amin(0)
            if name in stats:
                mx, mn = torch.maximum(stats[name][0], mx), torch.minimum(stats[name][1], mn)
            stats[name] = [mx, mn]

        pairs = foldable_linear_pairs(pipe, fp_block) if self.config.cfp_linear else []
        for _, consumer, _ in pairs:
            firsts[consumer] = get_module(fp_block, consumer)
        pipe.collect([fp_block], fp_in, firsts, observe)
        for producer, consumer, layout in pairs:
            mx = reduce_repeated(stats[consumer][0], layout, "max")
            mn = reduce_repeated(stats[consumer][1], layout, "min")
            s = activation_scales(mx, mn, self.config.cfp_params())
            if bool((s == 1).all()):
                continue
            for blk in (block, fp_block):
                fold_linear_scales(
                    get_module(blk, producer),
                    get_module(blk, consumer),
                    s,
                    layout,
                    pipe.bmap.transposed,
                )
            pipe.log.append(
                {
                    "block": index,
                    "block_pair": f"{producer}->{consumer}",
                    "cfp_channels": int((s > 1).sum()),
                    "cfp_max_scale": float(s.max()),
                }
            )
        for norm_name, consumers in pipe.bmap.smooth:
            if norm_name not in stats:
                continue
            s = activation_scales(*stats[norm_name], self.config.cfp_params())
            if bool((s == 1).all()):
                continue
            for blk in (block, fp_block):
                mods = [get_module(blk, c) for c in consumers]
                fold_scales(
                    get_module(blk, norm_name),
                    [m for m in mods if m is not None],
                    s,
                    pipe.bmap.transposed,
                )
            pipe.log.append(
                {
                    "block": index,
                    "block_norm": norm_name,
                    "cfp_channels": int((s > 1).sum()),
                    "cfp_max_scale": float(s.max()),
                }
            )

    def _prepare_acts(self, win: Window, pos: int, b: int, resumed: bool) -> None:
        pipe = win.pipe
        linears = pipe.named_linears(b)
        self.aq[b] = {}
        absmax: dict[str, torch.Tensor] = {}
        if self.aspec.granularity == "per-tensor" and not resumed:

            def observe(name: str, x: torch.Tensor) -> None:
                m = x.detach().abs().amax().float()
                absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

            for m in linears.values():
                acts.detach(m)
            src = win.inputs_of(b)
            pipe.collect([pipe.blocks[b]], src, linears, observe)
        for name in linears:
            a = LearnableActQuant(
                self.aspec, absmax.get(name), self.config.learn_act_clip, pipe.device
            )
            if resumed:
                a.logit.data.copy_(self._pending[f"a|{b}|{name}|logit"].reshape(()))
                if f"a|{b}|{name}|absmax" in self._pending:
                    a.absmax = self._pending[f"a|{b}|{name}|absmax"].reshape(()).to(pipe.device)
            self.aq[b][name] = a

    def _install(self, pipe: BlockwisePipeline, b: int) -> None:
        """Route the block's linears through their fake quantizers (soft or hard), and, with
        migration scales, divide each norm's output by s and scale its consumers' columns by s."""
        block = pipe.blocks[b]
        cols: dict[str, nn.Parameter] = {}
        for norm_name, log_s in self.mig.get(b, {}).items():
            for c in dict(pipe.bmap.smooth)[norm_name]:
                cols[f"{pipe.bmap.blocks}.{b}.{c}"] = log_s
            if b not in self._norm_hooks:
                self._norm_hooks[b] = []
            if len(self._norm_hooks[b]) < len(self.mig[b]):
                norm = get_module(block, norm_name)
                self._norm_hooks[b].append(
                    norm.register_forward_hook(
                        lambda mod, args, out, _p=log_s: out / torch.exp(_p).to(out.dtype)
                    )
                )
        for name, m in pipe.named_linears(b).items():
            m.requires_grad_(False)
            _override(m, self.wq[b][name], pipe.bmap.transposed, cols.get(name))
            if b in self.aq:
                acts.attach(m, self.aq[b][name].spec, hook=self.aq[b][name])

    def _fold_migration(self, pipe: BlockwisePipeline, b: int, block: nn.Module) -> None:
        """Make the learned migration scales permanent: norm /= s, consumer columns *= s."""
        for h in self._norm_hooks.pop(b, []):
            h.remove()
        for norm_name, log_s in self.mig.get(b, {}).items():
            s = torch.exp(log_s.detach())
            mods = [get_module(block, c) for c in dict(pipe.bmap.smooth)[norm_name]]
            fold_scales(
                get_module(block, norm_name),
                [m for m in mods if m is not None],
                s,
                pipe.bmap.transposed,
            )

    def _params(self, win: Window) -> list[dict]:
        rnd, clip, mig = [], [], []
        for b in win.block_ids:
            mig += list(self.mig.get(b, {}).values())
            for q in self.wq[b].values():
                clip += [q.up, q.low]
                rnd += [p for n, p in q.named_parameters() if n in ("a1", "a2", "v")]
            for a in self.aq.get(b, {}).values():
                if a.logit.requires_grad:
                    clip.append(a.logit)
        groups = [{"params": clip, "lr": self.config.lr_clip}]
        if mig:
            groups.append({"params": mig, "lr": self.config.lr_smooth})
        if rnd:
            groups.append({"params": rnd, "lr": self.config.lr_round})
        return groups

    def _train(self, win: Window) -> None:
        cfg, pipe = self.config, win.pipe
        for blk in win.blocks:
            blk.requires_grad_(False)
        n = pipe.calib.shape[0]
        targets = [pipe.run_blocks(win.fp_blocks, win.inputs_fp)]
        if cfg.homologous:
            targets.append(pipe.run_blocks(win.fp_blocks, win.inputs_q))
        groups = self._params(win)
        per_epoch = math.ceil(n / cfg.train_batch_size)
        total = cfg.epochs * per_epoch
        quants = [q for b in win.block_ids for q in self.wq[b].values()]
        if total == 0 or not any(p.requires_grad for g in groups for p in g["params"]):
            return
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.train_seed * 100003 + win.index)
        snapshot = _snapshot(groups)
        rollbacks, step, first, last = 0, 0, None, None
        trace: list[float] = []
        bar = progress(total=total, desc=f"window {win.index + 1}", unit="step", leave=False)
        for _epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            ep_losses = []
            for i0 in range(0, n, cfg.train_batch_size):
                idx = order[i0 : i0 + cfg.train_batch_size]
                x = _gather(win.inputs_q, idx).to(pipe.device)
                with torch.enable_grad():
                    out = x
                    for blk in win.blocks:
                        out = pipe.call_block(blk, out)
                    rec = sum(
                        distance(_gather(t, idx).to(pipe.device), out, cfg.kl) for t in targets
                    )
                    beta, lam = self._beta(step, total)
                    loss = rec
                    if lam > 0 and cfg.rounding != "nearest":
                        loss = loss + lam * sum(q.reg(beta) for q in quants) / len(quants)
                if not torch.isfinite(loss):
                    rollbacks += 1
                    _restore(groups, snapshot)
                    if rollbacks > 3:
                        log.warning(
                            "window %d: loss is not finite; keeping the last good state", win.index
                        )
                        break
                    for g in opt.param_groups:
                        g["lr"] *= 0.5
                    opt = torch.optim.AdamW(
                        [{"params": g["params"], "lr": g["lr"]} for g in opt.param_groups],
                        weight_decay=0.0,
                    )
                    log.warning("window %d: non-finite loss, rolled back (lr halved)", win.index)
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if not all(torch.isfinite(p).all() for g in groups for p in g["params"]):
                    rollbacks += 1
                    _restore(groups, snapshot)
                    log.warning("window %d: non-finite parameters, rolled back", win.index)
                    if rollbacks > 3:
                        break
                    continue
                ep_losses.append(float(rec.detach()))
                trace.append(ep_losses[-1])
                step += 1
                bar.update(1)
            else:
                if ep_losses:
                    ep = sum(ep_losses) / len(ep_losses)
                    first = ep if first is None else first
                    last = ep
                snapshot = _snapshot(groups)
                continue
            break
        bar.close()
        pipe.log.append(
            {
                "window": win.index,
                "blocks": f"{win.block_ids[0]}-{win.block_ids[-1]}",
                "loss_first_epoch": first,
                "loss_last_epoch": last,
                "rec_err": last if last is not None else float("nan"),
                "loss_first_steps": _avg(trace[: max(1, len(trace) // 8)]),
                "loss_last_steps": _avg(trace[-max(1, len(trace) // 8) :]),
                "rollbacks": rollbacks,
                "round_params": sum(q.n_round_params() for q in quants),
            }
        )
        log.debug("window %d: loss %s -> %s", win.index, first, last)

    def _beta(self, step: int, total: int) -> tuple[float, float]:
        """(beta, regulariser weight) at ``step``: no regulariser during the warm-up, then beta
        decays linearly from beta_start to beta_end (AdaRound's schedule)."""
        cfg = self.config
        start = cfg.warmup * total
        if step < start:
            return cfg.beta_start, 0.0
        t = (step - start) / max(1.0, total - start)
        return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - t), cfg.lam_round


def _override(
    m: nn.Module, quant: LinearQuantizer, transposed: bool, log_s: nn.Parameter | None = None
) -> None:
    """Make ``m`` compute with its fake-quantized weight (an instance-level forward, so the
    module keeps its class and state_dict keys); ``log_s``: input-column migration scales."""

    def forward(x, *args, **kwargs):
        w = weight_of(m, transposed)
        if log_s is not None:  # the same product fold_scales writes at finalization
            w = w * torch.exp(log_s.detach() if not torch.is_grad_enabled() else log_s).to(
                w
            ).unsqueeze(0)
        w_hat = quant.weight(w, hard=not torch.is_grad_enabled())
        return F.linear(x, w_hat.to(x.dtype), m.bias)

    m.forward = forward


def _uninstall(m: nn.Module) -> None:
    if "forward" in m.__dict__:
        del m.forward
    acts.detach(m)


def _avg(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def _gather(store, idx: list[int]) -> torch.Tensor:
    return torch.cat([store.get(i, i + 1) for i in idx])


def _snapshot(groups: list[dict]) -> list[torch.Tensor]:
    return [p.detach().clone() for g in groups for p in g["params"]]


def _restore(groups: list[dict], snap: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip((p for g in groups for p in g["params"]), snap):
            p.copy_(s)
