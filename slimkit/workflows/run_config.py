"""Config dataclasses for the parts of an LLM run that are not the method: calibration data and
evaluation. Like method configs they map one-to-one onto CLI flags and YAML keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from slimkit.core.errors import SlimkitError


@dataclass
class CalibConfig:
    # `--preset` / `preset:` / `from_preset`: calibration size; a method's own presets (CBQ's
    # epochs and calibration) are merged over these (slimkit.core.config.resolve_preset)
    PRESETS: ClassVar[dict[str, dict]] = {
        "demo": {"n_calib": 16, "calib_seq_len": 512},
        "fast": {"n_calib": 32, "calib_seq_len": 512},
        "default": {"n_calib": 128, "calib_seq_len": 512},
        "paper": {"n_calib": 128, "calib_seq_len": 2048},
    }

    calib: str = field(
        default="wiki-offline",
        metadata={"help": "calibration corpus (slimkit list datasets) or file:PATH"},
    )
    n_calib: int = field(default=128, metadata={"help": "number of calibration windows"})
    calib_seq_len: int = field(default=512, metadata={"help": "tokens per calibration window"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration document shuffle"})

    def __post_init__(self) -> None:
        if self.n_calib < 1:
            raise SlimkitError(f"--n-calib must be >= 1 (got {self.n_calib})")
        if self.calib_seq_len < 2:
            raise SlimkitError(f"--calib-seq-len must be >= 2 (got {self.calib_seq_len})")


@dataclass
class EvalConfig:
    ppl: str = field(
        default="",
        metadata={"help": "comma-separated corpora for perplexity, e.g. wiki-offline,bbc-news"},
    )
    seq_len: int = field(default=512, metadata={"help": "perplexity window length L"})
    max_windows: int = field(
        default=0, metadata={"help": "evaluate the first N windows only (0 = all)"}
    )
    split: str = field(
        default="test", metadata={"help": "evaluation split", "choices": ["test", "validation"]}
    )
    tasks: str = field(
        default="", metadata={"help": "comma-separated lm-eval tasks (needs lm-eval and its data)"}
    )
    eval_batch_size: int = field(
        default=1,
        metadata={
            "help": "windows per forward pass (logits of one 512-token window of a 49k vocabulary take 100 MB)"
        },
    )

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise SlimkitError(f"--seq-len must be >= 2 (got {self.seq_len})")
        if self.max_windows < 0:
            raise SlimkitError(f"--max-windows must be >= 0 (got {self.max_windows})")
        from slimkit.data.text import check_corpus

        for corpus in self.corpora():  # a typo is refused now, not after a whole quantization
            check_corpus(corpus)

    def corpora(self) -> list[str]:
        return [c.strip() for c in self.ppl.split(",") if c.strip()]
