"""Pre-training small causal LMs (PanGu-π or vanilla Llama) on slimkit's text corpora.

Data: the corpus' train split, documents in key order joined with a blank line, tokenized once
into a packed token stream (cached under ``$SLIMKIT_CACHE/tokens``). Step s draws its windows at
offsets from a generator seeded with (seed, s), so a run resumed from a checkpoint sees exactly
the batches an uninterrupted run sees. Evaluation: GPTQ-protocol perplexity on the first
``eval_windows`` windows of the validation split.

Under ``torchrun`` each rank takes an equal slice of every global batch (gloo on CPU, nccl on
GPU); the shared trainer averages gradients, so the loss curve matches one process with the same global batch.
Only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.core.optim import warmup_cosine
from slimkit.data.text import _tokenize, eval_windows, load_documents
from slimkit.llm.evaluate import perplexity
from slimkit.llm.models import cache_dir
from slimkit.tinylm.pangu_pi import PanguPiConfig, PanguPiForCausalLM
from slimkit.train import TRAINERS, LoopOptions, Trainer, TrainTask, run_task

log = logging.getLogger("slimkit")
ARCHS = ("pangu-pi", "llama")


@dataclass
class LMTrainConfig:
    arch: str = field(
        default="pangu-pi",
        metadata={
            "help": "pangu-pi (SIAF/AS switchable) or llama (vanilla)",
            "choices": list(ARCHS),
        },
    )
    tokenizer: str = field(
        default="smollm2-135m",
        metadata={"help": "tokenizer: a registered model, HF id or directory"},
    )
    init: str = field(
        default="", metadata={"help": "start from this model directory instead of a random init"}
    )
    hidden_size: int = field(default=128, metadata={"help": "model width d"})
    intermediate_size: int = field(default=384, metadata={"help": "FFN width"})
    layers: int = field(default=8, metadata={"help": "decoder blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads (GQA)"})
    siaf: bool = field(default=True, metadata={"help": "series informed activation (pangu-pi)"})
    siaf_terms: int = field(default=2, metadata={"help": "SIAF terms n"})
    augmented_shortcut: bool = field(
        default=True, metadata={"help": "augmented shortcut (pangu-pi)"}
    )
    as_ratio: int = field(default=32, metadata={"help": "AS bottleneck: width d / as_ratio"})
    data: str = field(
        default="wiki-offline", metadata={"help": "training corpus (slimkit list datasets)"}
    )
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=16, metadata={"help": "global sequences per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    steps: int = field(default=500, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=3e-4, metadata={"help": "final learning rate (cosine)"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (betas 0.9, 0.95)"}
    )
    clip_grad: float = field(default=1.0, metadata={"help": "gradient-norm clip (0 = off)"})
    rounds: int = field(
        default=1, metadata={"help": "training rounds; later rounds re-draw batches by loss"}
    )
    keep: float = field(
        default=0.5,
        metadata={"help": "fraction of the first round's batches drawn for each later round"},
    )
    round_sampling: str = field(
        default="loss",
        metadata={
            "help": "later rounds draw batches by softmax(loss) (the paper) or uniformly (ablation)",
            "choices": ["loss", "uniform"],
        },
    )
    round_schedule: str = field(
        default="restart",
        metadata={
            "help": "learning rate over rounds: warm-up + cosine restarted at every round (ours) "
            "or one warm-up + cosine over all rounds' steps",
            "choices": ["restart", "continue"],
        },
    )
    eval_every: int = field(
        default=100, metadata={"help": "evaluate every N steps (and at the end)"}
    )
    eval_windows: int = field(default=20, metadata={"help": "validation windows of seq_len tokens"})
    checkpoint_every: int = field(default=50, metadata={"help": "checkpoint every N steps"})
    device: str = field(
        default="auto", metadata={"help": "auto (this rank's GPU if any, else CPU), cpu, cuda[:N]"}
    )
    bf16: str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast: auto (on CUDA), on, off",
            "choices": ["auto", "on", "off"],
        },
    )
    seed: int = field(default=0, metadata={"help": "initialisation and data-order seed"})

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise SlimkitError(f"--arch must be one of {', '.join(ARCHS)}")
        for name in (
            "hidden_size",
            "layers",
            "heads",
            "seq_len",
            "batch_size",
            "steps",
            "grad_accum",
        ):
            if getattr(self, name) < 1:
                raise SlimkitError(f"--{name.replace('_', '-')} must be >= 1")
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise SlimkitError(
                "--hidden-size must be divisible by --heads, and --heads by --kv-heads"
            )
        if self.batch_size % self.grad_accum:
            raise SlimkitError("--batch-size must be divisible by --grad-accum")
        if self.rounds < 1 or not 0 < self.keep <= 1:
            raise SlimkitError("--rounds must be >= 1 and --keep in (0, 1]")
        if self.round_sampling not in ("loss", "uniform"):
            raise SlimkitError("--round-sampling must be loss or uniform")
        if self.round_schedule not in ("restart", "continue"):
            raise SlimkitError("--round-schedule must be restart or continue")

    def round_steps(self) -> int:
        """Optimizer steps of each round after the first."""
        return max(int(round(self.keep * self.steps)), 1)

    def total_steps(self) -> int:
        return self.steps + (self.rounds - 1) * self.round_steps()

    def model_config(self, vocab_size: int, tok) -> PanguPiConfig:
        pangu = self.arch == "pangu-pi"
        return PanguPiConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.seq_len, 2048), tie_word_embeddings=True,
            siaf=pangu and self.siaf, siaf_terms=self.siaf_terms,
            augmented_shortcut=pangu and self.augmented_shortcut, as_ratio=self.as_ratio,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )  # fmt: skip


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from slimkit.llm.models import resolve_model_path

    d = Path(name)
    if d.is_dir() and any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(d)  # a tokenizer directory (no model config needed)
    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def token_stream(tok, corpus: str, split: str = "train") -> torch.Tensor:
    """The split tokenized once (documents in key order, blank-line separated), int32, cached."""
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    key = hashlib.sha256(f"{corpus}|{split}|{vocab}".encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", corpus)[-60:]  # file:PATH corpora hold slashes
    path = cache_dir() / "tokens" / f"{safe}-{split}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    docs = load_documents(corpus, split)
    ids: list[int] = []
    for i in range(0, len(docs), 256):
        ids += _tokenize(tok, "\n\n".join(d.text for d in docs[i : i + 256]) + "\n\n")
    t = torch.tensor(ids, dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(t, tmp)
    tmp.replace(path)
    return t


def batch_at(stream: torch.Tensor, step: int, cfg: LMTrainConfig) -> torch.Tensor:
    """The global batch of step ``step``: int64 [batch_size, seq_len + 1] (inputs and targets)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    return torch.stack([stream[s : s + cfg.seq_len + 1] for s in starts.tolist()]).long()


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _round_schedule(cfg: LMTrainConfig):
    """Warm-up + cosine restarted at every round [our default: each round is a full schedule];
    ``round_schedule="continue"``: one warm-up + cosine over every round's steps."""
    if cfg.round_schedule == "continue":
        return warmup_cosine(cfg.total_steps(), cfg.warmup_steps, cfg.min_lr / cfg.lr)
    first = warmup_cosine(cfg.steps, cfg.warmup_steps, cfg.min_lr / cfg.lr)
    later = warmup_cosine(
        cfg.round_steps(), min(cfg.warmup_steps, cfg.round_steps() // 10), cfg.min_lr / cfg.lr
    )

    def f(step: int) -> float:
        if step < cfg.steps:
            return first(step)
        return later((step - cfg.steps) % cfg.round_steps())

    return f


@torch.no_grad()
def draw_next_round(
    model: nn.Module, stream: torch.Tensor, cfg: LMTrainConfig, round_no: int, device
) -> list[int]:
    """Multi-round sampling: the loss of every first-round batch under the current (frozen)
    model, p_i = softmax(l)_i, ``keep`` x N batches drawn without replacement."""
    was = model.training
    model.eval()
    losses = torch.tensor(
        [float(lm_loss(model, batch_at(stream, b, cfg).to(device))) for b in range(cfg.steps)]
    )
    model.train(was)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + round_no)
    probs = (
        torch.softmax(losses.double(), 0)
        if cfg.round_sampling == "loss"
        else torch.full_like(losses.double(), 1.0 / len(losses))
    )
    drawn = torch.multinomial(probs, cfg.round_steps(), replacement=False, generator=g)
    if dist.is_dist():
        drawn = dist.broadcast(drawn)
    log.info("round %d: %d of %d batches drawn (%s; mean loss %.3f, drawn %.3f)", round_no,
             len(drawn), cfg.steps, cfg.round_sampling, losses.mean(), losses[drawn].mean())  # fmt: skip
    return drawn.tolist()


class LMTask(TrainTask):
    """Next-token training of a causal LM on a packed token stream, with PanGu-π's multi-round
    sampling: after the first round's ``steps`` batches, every later round re-draws ``keep`` x
    steps of them by softmax(loss) under the current model."""

    kind = "train-lm"

    def __init__(self, cfg: LMTrainConfig, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.cfg, self.device = cfg, device
        world = dist.world_size()
        if cfg.batch_size % (world * cfg.grad_accum):
            raise SlimkitError(
                f"--batch-size must be divisible by ranks x --grad-accum ({world} x {cfg.grad_accum})"
            )
        self.tok = tok = load_tokenizer(cfg.init or cfg.tokenizer)
        self.stream = token_stream(tok, cfg.data, "train")
        if len(self.stream) < cfg.seq_len + 2:
            raise SlimkitError(f"{cfg.data} has only {len(self.stream)} training tokens")
        self.val = eval_windows(tok, cfg.data, cfg.seq_len, max_windows=cfg.eval_windows,
                                split="validation")  # fmt: skip
        torch.manual_seed(cfg.seed)
        if cfg.init:
            from slimkit.llm.models import resolve_model_path

            model = AutoModelForCausalLM.from_pretrained(
                resolve_model_path(cfg.init), dtype=torch.float32
            )
        else:
            model = PanguPiForCausalLM(cfg.model_config(len(tok), tok))
        self.model = model.to(device).train()
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.plan = list(range(cfg.steps))  # batch ids, step by step; later rounds are appended

    def optimizer(self):
        cfg, model = self.cfg, self.model
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))  # fmt: skip
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, _round_schedule(cfg))

    def loop_options(self) -> LoopOptions:
        cfg = self.cfg
        bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and self.device.type == "cuda")
        return LoopOptions(total_steps=cfg.total_steps(), clip_grad=cfg.clip_grad,
                           precision="bf16" if bf16 else "fp32", checkpoint_every=cfg.checkpoint_every)  # fmt: skip

    def _round(self, step: int) -> int:
        cfg = self.cfg
        return 1 if step < cfg.steps else 2 + (step - cfg.steps) // cfg.round_steps()

    def micro_batches(self, step: int) -> list:
        cfg = self.cfg
        if step == len(self.plan):  # a round ended: draw the next one
            self.plan += draw_next_round(
                self.model, self.stream, cfg, self._round(step), self.device
            )
        batch = batch_at(self.stream, self.plan[step], cfg)
        world, r = dist.world_size(), dist.rank()
        mine = batch[r * cfg.batch_size // world : (r + 1) * cfg.batch_size // world]
        return list(mine.to(self.device).chunk(cfg.grad_accum))

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        return lm_loss(self.model, micro), {}

    def after_step(self, step: int, rec: dict, trainer: Trainer) -> bool:
        cfg, done = self.cfg, step + 1
        round_no = self._round(step)
        self.history.append({"step": done, "round": round_no, "loss": rec["loss"], "lr": rec["lr"]})
        round_end = done == cfg.steps or (
            done > cfg.steps and (done - cfg.steps) % cfg.round_steps() == 0
        )
        if dist.rank() == 0 and (done % cfg.eval_every == 0 or round_end):
            ppl = perplexity(self.model, self.val, batch_size=4, device=self.device)
            self.model.train()
            self.evals.append({"step": done, "round": round_no, "val_ppl": ppl["ppl"]})
            log.info("step %d/%d (round %d) loss %.4f val ppl %.2f", done, cfg.total_steps(),
                     round_no, rec["loss"], ppl["ppl"])  # fmt: skip
        return False

    def state_dict(self) -> dict:
        return {"history": self.history, "evals": self.evals, "plan": self.plan}

    def load_state_dict(self, st: dict) -> None:
        self.history, self.evals, self.plan = (
            list(st["history"]),
            list(st["evals"]),
            list(st["plan"]),
        )

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        if path is None:
            return {}
        cfg = self.cfg
        self.model.save_pretrained(path)
        self.tok.save_pretrained(path)
        steps_run = cfg.total_steps() - (trainer.resumed_at or 0)
        tokens = steps_run * cfg.batch_size * cfg.seq_len
        secs = max(time.time() - trainer.t0, 1e-9)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("%d parameters, val ppl %.2f", n_params, self.evals[-1]["val_ppl"])
        return {
            "kind": self.kind, "parameters": n_params, "tokens": tokens, "rounds": cfg.rounds,
            "tokens_per_second": tokens / secs, "step_tokens_per_second": tokens / secs,
            "final_val_ppl": self.evals[-1]["val_ppl"], "evals": self.evals, "plan": self.plan,
            "history": self.history,
            "headline": {"validation perplexity": self.evals[-1]["val_ppl"], "parameters": n_params},
            "protocol": f"perplexity on the first {int(self.val.shape[0])} windows of {cfg.seq_len} "
                        f"tokens of {cfg.data}'s validation split",
            "validation": {"corpus": cfg.data, "split": "validation", "windows": int(self.val.shape[0]), "seq_len": cfg.seq_len},
            "global_batch_tokens": cfg.batch_size * cfg.seq_len, "seconds": secs,
        }  # fmt: skip


def train_lm(cfg: LMTrainConfig, *, out: str | Path, resume: bool = False, overwrite: bool = False,
             command: str = "") -> dict:  # fmt: skip
    """Pre-train (or continue training with ``init``) a causal LM into the run directory ``out``."""
    return run_task(LMTask, cfg, out=out, resume=resume, overwrite=overwrite, command=command)


def _tiny_lm(tmp: Path) -> LMTrainConfig:
    return LMTrainConfig(layers=1, hidden_size=32, intermediate_size=64, heads=2, kv_heads=1,
                         seq_len=32, batch_size=4, steps=6, eval_every=3, eval_windows=2,
                         checkpoint_every=2, as_ratio=8)  # fmt: skip


TRAINERS.register("train-lm", train_lm, config=LMTrainConfig, task=LMTask, tiny=_tiny_lm)
