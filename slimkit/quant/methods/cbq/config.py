"""The CBQ config: every option of the method, its presets and the checks on them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from slimkit.core.errors import SlimkitError
from slimkit.llm.pipeline import PipelineOptions
from slimkit.quant.cfp import CFPParams
from slimkit.quant.methods.base import QuantConfig

log = logging.getLogger("slimkit")

ROUNDINGS = ("lora", "full", "nearest")
LORA_INITS = ("residual", "svd", "zero")
ROUNDING_INITS = ("nearest", "gptq")


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
