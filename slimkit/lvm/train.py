"""DeLVM trainers on the shared loop: the VQ tokenizer, and the autoregressive vision model
(with the long-tail augmentation and knowledge distillation from a larger model).

The AR model is slimkit's tiny-LM decoder (``slimkit.tinylm``): a Llama (DeLVM's choice; q/k/v/o
with bias, as in DeLVM) or a PanGu-π model as a transformers causal LM over the codebook's ids
plus one BOS. :class:`LVMTask` is the tiny-LM trainer's :class:`~slimkit.tinylm.train.LMTask`
with visual sentences as its data: it keeps that trainer's optimizer (AdamW, betas 0.9 / 0.95,
no decay on norms and biases), warm-up + cosine schedule, bf16 switch, multi-round sampling and
``init`` (start from an inherited / pre-trained model), and replaces batches, loss and evaluation.

One training row is one sentence (its document boundary: attention never crosses sentences).
Every code is supervised (``supervise="all"``, DeLVM's pre-training) or only the target images'
codes (``targets``); code 0 included (see ``slimkit.lvm.losses``). Evaluation: per-task
cross-entropy, next-token accuracy and perplexity on the *target-image tokens* of the held-out
sentences [spec, our default].
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.lvm.losses import IGNORE, SUPERVISE, masked_kd_loss, sentence_labels
from slimkit.lvm.sentences import Sentences
from slimkit.lvm.vq import VQVAE, VQConfig, round_trip, save_vq
from slimkit.tinylm.train import ARCHS, LMTask
from slimkit.train import TRAINERS, LoopOptions, Trainer, TrainTask, run_task

log = logging.getLogger("slimkit")
LVM_FILE = "lvm.json"


# ---------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------
@dataclass
class TokenizerConfig:
    images: str = field(default="scenes", metadata={"help": "scenes, photos or a folder of images"})
    n_images: int = field(default=2000, metadata={"help": "training images drawn from --images"})
    image_size: int = field(
        default=32, metadata={"help": "image side (multiple of 4); tokens = (side/4)^2"}
    )
    codebook: int = field(default=256, metadata={"help": "number of codes K"})
    embed_dim: int = field(default=32, metadata={"help": "code width D"})
    channels: int = field(default=32, metadata={"help": "encoder / decoder width"})
    quantizer: str = field(
        default="ema", metadata={"help": "codebook update", "choices": ["ema", "st"]}
    )
    beta: float = field(default=0.25, metadata={"help": "commitment weight"})
    restart_every: int = field(
        default=10, metadata={"help": "restart dead codes every N steps (0 = never)"}
    )
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate"})
    eval_images: int = field(
        default=256, metadata={"help": "held-out images for the round-trip metrics"}
    )
    checkpoint_every: int = field(default=100, metadata={"help": "checkpoint every N steps"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda[:N]"})
    seed: int = field(default=0, metadata={"help": "initialisation, image and batch seed"})

    def __post_init__(self) -> None:
        for k in (
            "n_images",
            "codebook",
            "steps",
            "batch_size",
            "eval_images",
            "embed_dim",
            "channels",
        ):
            if getattr(self, k) < 1:
                raise SlimkitError(f"--{k.replace('_', '-')} must be >= 1")
        if self.image_size % 4 or self.image_size < 8:
            raise SlimkitError(
                f"--image-size must be a multiple of 4, >= 8 (got {self.image_size})"
            )
        if self.quantizer not in ("ema", "st"):
            raise SlimkitError(f"--quantizer must be ema or st (got {self.quantizer!r})")

    def vq_config(self) -> VQConfig:
        return VQConfig(codebook=self.codebook, embed_dim=self.embed_dim, channels=self.channels,
                        image_size=self.image_size, quantizer=self.quantizer, beta=self.beta)  # fmt: skip


class TokenizerTask(TrainTask):
    """VQ-VAE training: reconstruction + commitment loss, EMA (or gradient) codebook, dead-code
    restarts every ``restart_every`` steps; round-trip PSNR and codebook usage at the end."""

    kind = "lvm-tokenizer"

    def __init__(self, cfg: TokenizerConfig, device: torch.device):
        from slimkit.lvm.images import load_images

        self.cfg, self.device = cfg, device
        if cfg.batch_size % dist.world_size():
            raise SlimkitError(f"--batch-size must be divisible by the {dist.world_size()} ranks")
        self.images = load_images(cfg.images, cfg.n_images, cfg.image_size, cfg.seed)
        self.val = load_images(cfg.images, cfg.eval_images, cfg.image_size, cfg.seed + 10_007)
        torch.manual_seed(cfg.seed)
        self.model = VQVAE(cfg.vq_config()).to(device).train()
        self.restarts: list[int] = []

    def optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr), None

    def loop_options(self) -> LoopOptions:
        return LoopOptions(total_steps=self.cfg.steps, checkpoint_every=self.cfg.checkpoint_every)

    def micro_batches(self, step: int) -> list:
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.images), (cfg.batch_size,), generator=g)
        w, r = dist.world_size(), dist.rank()
        mine = idx[r * cfg.batch_size // w : (r + 1) * cfg.batch_size // w]
        return [self.images[mine].to(self.device)]

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        _, loss, parts = self.model(micro)
        return loss, parts

    def after_step(self, step: int, rec: dict, trainer: Trainer) -> bool:
        every = self.cfg.restart_every
        if every and (step + 1) % every == 0:
            self.restarts.append(self.model.restart_dead_codes(step))
        return False

    def state_dict(self) -> dict:
        return {"restarts": list(self.restarts)}

    def load_state_dict(self, st: dict) -> None:
        self.restarts = list(st["restarts"])

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        if path is None:
            return {}
        save_vq(self.model, path)
        rt = round_trip(self.model, self.val)
        log.info("round trip on %d held-out images: PSNR %.2f dB, %.1f %% of the codes used",
                 rt["images"], rt["psnr"], 100 * rt["codebook_usage"])  # fmt: skip
        return {"kind": self.kind, "round_trip": rt, "codes_restarted": sum(self.restarts),
                "tokens_per_image": self.model.cfg.tokens_per_image,
                "headline": {"round-trip PSNR (dB)": rt["psnr"], "codebook usage": rt["codebook_usage"]},
                "protocol": f"encode -> decode of {rt['images']} held-out {self.cfg.images} images"}  # fmt: skip


def train_tokenizer(cfg: TokenizerConfig, *, out: str | Path, resume: bool = False,
                    overwrite: bool = False, command: str = "") -> dict:  # fmt: skip
    """Train a VQ-VAE tokenizer into the run directory ``out`` (``vq.safetensors`` + config)."""
    return run_task(
        TokenizerTask, cfg, out=out, resume=resume, overwrite=overwrite, command=command
    )


# ---------------------------------------------------------------------------------------
# the autoregressive model
# ---------------------------------------------------------------------------------------
@dataclass
class LVMTrainConfig:
    sentences: str = field(default="", metadata={"help": "sentence directory (lvm make-sentences)"})
    arch: str = field(
        default="llama", metadata={"help": "llama (DeLVM) or pangu-pi", "choices": list(ARCHS)}
    )
    init: str = field(
        default="", metadata={"help": "start from this model directory (e.g. slimkit inherit)"}
    )
    hidden_size: int = field(default=64, metadata={"help": "model width d"})
    intermediate_size: int = field(default=176, metadata={"help": "SwiGLU width"})
    layers: int = field(default=2, metadata={"help": "decoder blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    kv_heads: int = field(default=4, metadata={"help": "key/value heads"})
    supervise: str = field(
        default="all",
        metadata={"help": "codes trained: all (DeLVM) or targets", "choices": list(SUPERVISE)},
    )
    augment: str = field(
        default="none",
        metadata={
            "help": "long-tail: augment the rarest task to parity",
            "choices": ["none", "long-tail"],
        },
    )
    augment_to: float = field(
        default=1.0, metadata={"help": "augmented rare task size / largest task size"}
    )
    teacher: str = field(default="", metadata={"help": "distil from this LVM directory (CE + KL)"})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of the KL term"})
    ce_weight: float = field(default=1.0, metadata={"help": "weight of the cross-entropy term"})
    temperature: float = field(default=1.0, metadata={"help": "KD temperature tau"})
    kd_direction: str = field(
        default="forward",
        metadata={"help": "KL(p_T||p_S) or KL(p_S||p_T)", "choices": ["forward", "reverse"]},
    )
    batch_size: int = field(default=16, metadata={"help": "sentences per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    steps: int = field(default=300, metadata={"help": "optimizer steps (first round)"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=3e-4, metadata={"help": "final learning rate (cosine)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    clip_grad: float = field(default=1.0, metadata={"help": "gradient-norm clip (0 = off)"})
    rounds: int = field(default=1, metadata={"help": "training rounds (tiny-LM multi-round)"})
    keep: float = field(
        default=0.5, metadata={"help": "fraction of first-round batches per later round"}
    )
    round_sampling: str = field(
        default="loss", metadata={"help": "loss or uniform", "choices": ["loss", "uniform"]}
    )
    round_schedule: str = field(
        default="restart",
        metadata={"help": "restart or continue", "choices": ["restart", "continue"]},
    )
    eval_every: int = field(
        default=100, metadata={"help": "evaluate every N steps (and at the end)"}
    )
    checkpoint_every: int = field(default=50, metadata={"help": "checkpoint every N steps"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda[:N]"})
    bf16: str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast: auto (on CUDA), on, off",
            "choices": ["auto", "on", "off"],
        },
    )
    seed: int = field(default=0, metadata={"help": "initialisation, augmentation and batch seed"})

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise SlimkitError(f"--arch must be one of {', '.join(ARCHS)}")
        for k in (
            "hidden_size",
            "layers",
            "heads",
            "batch_size",
            "steps",
            "grad_accum",
            "kv_heads",
        ):
            if getattr(self, k) < 1:
                raise SlimkitError(f"--{k.replace('_', '-')} must be >= 1")
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise SlimkitError(
                "--hidden-size must be divisible by --heads, and --heads by --kv-heads"
            )
        if self.batch_size % self.grad_accum:
            raise SlimkitError("--batch-size must be divisible by --grad-accum")
        if self.supervise not in SUPERVISE:
            raise SlimkitError(f"--supervise must be one of {', '.join(SUPERVISE)}")
        if self.augment not in ("none", "long-tail") or self.augment_to <= 0:
            raise SlimkitError("--augment must be none or long-tail, --augment-to > 0")
        if self.kd_direction not in ("forward", "reverse") or self.temperature <= 0:
            raise SlimkitError("--kd-direction must be forward or reverse, --temperature > 0")
        if self.rounds < 1 or not 0 < self.keep <= 1:
            raise SlimkitError("--rounds must be >= 1 and --keep in (0, 1]")

    def round_steps(self) -> int:
        return max(int(round(self.keep * self.steps)), 1)

    def total_steps(self) -> int:
        return self.steps + (self.rounds - 1) * self.round_steps()


def build_lvm(cfg: LVMTrainConfig, vocab_size: int, bos: int, max_len: int):
    """The decoder over ``vocab_size`` ids: transformers' LlamaForCausalLM (q/k/v/o with bias,
    untied head, as DeLVM) or slimkit's PanGu-π model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimkit.tinylm.pangu_pi import PanguPiConfig, PanguPiForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
              num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
              max_position_embeddings=max(max_len, 64), rms_norm_eps=1e-5, attention_bias=True,
              tie_word_embeddings=False, bos_token_id=bos, eos_token_id=bos, pad_token_id=bos)  # fmt: skip
    if cfg.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw))
    return PanguPiForCausalLM(PanguPiConfig(as_ratio=max(1, min(32, cfg.hidden_size // 4)), **kw))


def save_vocabulary(path: Path, codebook: int, bos: int) -> None:
    """A transformers tokenizer (word level: ``<c17>`` is code 17, ``<s>`` the BOS) so that the
    model directory loads with AutoTokenizer like any causal LM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<c{i}>": i for i in range(codebook)} | {"<s>": bos}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<s>", pad_token="<s>",
                            unk_token="<s>").save_pretrained(path)  # fmt: skip


def load_lvm(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, info)`` of an LVM directory (``lvm.json`` + a transformers causal LM)."""
    from transformers import AutoModelForCausalLM

    import slimkit.tinylm.pangu_pi  # noqa: F401  (registers pangu_pi with AutoModelForCausalLM)

    p = Path(path)
    if not (p / LVM_FILE).is_file():
        raise SlimkitError(
            f"{path} is not an LVM directory (no {LVM_FILE}); train one with `slimkit lvm train`"
        )
    info = json.loads((p / LVM_FILE).read_text())
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SlimkitError(f"could not load {path}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), info


class LVMTask(LMTask):
    """Next-token training over visual sentences (optionally distilled from a teacher LVM)."""

    kind = "lvm-train"

    def __init__(self, cfg: LVMTrainConfig, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.cfg, self.device = cfg, device
        world = dist.world_size()
        if cfg.batch_size % (world * cfg.grad_accum):
            raise SlimkitError(
                f"--batch-size must be divisible by ranks x --grad-accum ({world} x {cfg.grad_accum})"
            )
        if not cfg.sentences:
            raise SlimkitError(
                "--sentences is required (a directory from `slimkit lvm make-sentences`)"
            )
        self.data = Sentences(cfg.sentences)
        meta = self.data.meta
        self.T, self.bos, self.vocab = meta["tokens_per_image"], meta["bos"], meta["vocab_size"]
        self.rows = self.data.rows("train")
        self.row_task = self.data.split("train")["task"].clone()
        self.augmented = 0
        if cfg.augment == "long-tail":
            self._augment_rare()
        self.val = self._eval_set("val")
        torch.manual_seed(cfg.seed)
        if cfg.init:
            model = AutoModelForCausalLM.from_pretrained(cfg.init, dtype=torch.float32)
            if model.config.vocab_size != self.vocab:
                raise SlimkitError(
                    f"--init {cfg.init} has vocabulary {model.config.vocab_size}, the sentences {self.vocab}"
                )
        else:
            model = build_lvm(cfg, self.vocab, self.bos, self.rows.shape[1])
        self.model = model.to(device).train()
        self.teacher = None
        if cfg.teacher:
            self.teacher, _ = load_lvm(cfg.teacher, device)
            if self.teacher.config.vocab_size != self.vocab:
                raise SlimkitError(f"--teacher {cfg.teacher} has vocabulary {self.teacher.config.vocab_size}, "
                                   f"the sentences {self.vocab}")  # fmt: skip
            self.teacher.requires_grad_(False)
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.plan = list(range(cfg.steps))

    # ---- data ---------------------------------------------------------------------------
    def _augment_rare(self) -> None:
        """Add augmented sentences of the rarest task until it has ``augment_to`` x the largest
        task's count (sources re-made into pairs and tokenized with the sentences' tokenizer)."""
        from slimkit.lvm.augment import augment_source
        from slimkit.lvm.sentences import make_pairs, to_float, tokenize_pairs
        from slimkit.lvm.vq import load_vq

        cfg, meta, tr = self.cfg, self.data.meta, self.data.split("train")
        counts = torch.bincount(self.row_task, minlength=len(meta["tasks"]))
        rare = int(counts.argmin())
        need = int(round(cfg.augment_to * int(counts.max()))) - int(counts[rare])
        if need <= 0:
            return
        vq = load_vq(meta["tokenizer"])
        task = meta["tasks"][rare]
        idx = (self.row_task == rare).nonzero().flatten()
        src = to_float(tr["sources"][idx]).flatten(0, 1)  # [n * P, 3, S, S]
        masks = tr["masks"][idx].flatten(0, 1)
        g = torch.Generator().manual_seed(cfg.seed * 31 + 17)
        P = meta["pairs"]
        pick = torch.randint(len(src), (need * P,), generator=g)
        aug = [augment_source(src[i], masks[i], g) for i in pick.tolist()]
        a_src = torch.stack([a for a, _ in aug])
        a_mask = torch.stack([m for _, m in aug])
        a, b = make_pairs(task, a_src, a_mask, cfg.seed * 31 + 19)
        new = tokenize_pairs(
            vq, a.view(need, P, *a.shape[1:]), b.view(need, P, *b.shape[1:]), self.bos
        )
        self.rows = torch.cat([self.rows, new])
        self.row_task = torch.cat([self.row_task, torch.full((need,), rare)])
        self.augmented = need
        log.info(
            "long-tail augmentation: %s %d -> %d sentences",
            task,
            int(counts[rare]),
            int(counts[rare]) + need,
        )

    def _eval_set(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.rows(split), self.data.split(split)["task"]

    def batch_rows(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        return torch.randint(0, len(self.rows), (self.cfg.batch_size,), generator=g)

    def micro_batches(self, step: int) -> list:
        cfg = self.cfg
        if step == len(self.plan):  # a round ended: draw the next one by loss
            self.plan += self._draw_round(step)
        ids = self.rows[self.batch_rows(self.plan[step])]
        w, r = dist.world_size(), dist.rank()
        mine = ids[r * cfg.batch_size // w : (r + 1) * cfg.batch_size // w]
        return list(mine.to(self.device).chunk(cfg.grad_accum))

    @torch.no_grad()
    def _draw_round(self, step: int) -> list[int]:
        """Multi-round sampling (tiny-LM): first-round batches drawn by softmax of their loss."""
        cfg = self.cfg
        was = self.model.training
        self.model.eval()
        losses = torch.tensor([float(self._ce(self.rows[self.batch_rows(b)].to(self.device))[0])
                               for b in range(cfg.steps)])  # fmt: skip
        self.model.train(was)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + self._round(step))
        probs = (
            torch.softmax(losses.double(), 0)
            if cfg.round_sampling == "loss"
            else torch.ones(len(losses)).double()
        )
        drawn = torch.multinomial(probs, cfg.round_steps(), replacement=False, generator=g)
        if dist.is_dist():
            drawn = dist.broadcast(drawn)
        return drawn.tolist()

    # ---- loss ---------------------------------------------------------------------------
    def labels(self, ids: torch.Tensor) -> torch.Tensor:
        return sentence_labels(
            ids, torch.ones_like(ids, dtype=torch.bool), self.T, self.cfg.supervise
        )

    def _ce(self, ids: torch.Tensor):
        logits = self.model(input_ids=ids[:, :-1], use_cache=False).logits.float()
        labels = self.labels(ids)
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                         ignore_index=IGNORE)  # fmt: skip
        return ce, logits, labels

    def loss(self, micro) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        ce, logits, labels = self._ce(micro)
        if self.teacher is None:
            return ce, {}
        with torch.no_grad():
            t_logits = self.teacher(input_ids=micro[:, :-1], use_cache=False).logits.float()
        kd = masked_kd_loss(logits, t_logits, labels, cfg.temperature, cfg.kd_direction)
        return cfg.ce_weight * ce + cfg.kd_weight * kd, {
            "ce": float(ce.detach()),
            "kd": float(kd.detach()),
        }

    # ---- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict:
        """Per-task CE / accuracy / perplexity on the target-image tokens of ``split``."""
        rows, tasks = self._eval_set(split)
        return evaluate_tokens(self.model, rows, tasks, self.data.meta, self.device)

    def after_step(self, step: int, rec: dict, trainer: Trainer) -> bool:
        cfg, done = self.cfg, step + 1
        self.history.append({"step": done, "round": self._round(step), "loss": rec["loss"]})
        if dist.rank() == 0 and (done % cfg.eval_every == 0 or done == cfg.total_steps()):
            ev = self.evaluate("val")
            self.model.train()
            self.evals.append({"step": done, **{t: r["ppl"] for t, r in ev.items()}})
            log.info(
                "step %d val ppl (targets) %s", done, {t: round(r["ppl"], 2) for t, r in ev.items()}
            )
        return False

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        if path is None:
            return {}
        meta = self.data.meta
        self.model.save_pretrained(path)
        save_vocabulary(path, meta["codebook"], self.bos)
        info = {k: meta[k] for k in ("tasks", "kinds", "codebook", "bos", "vocab_size",
                                     "tokens_per_image", "image_size", "tokenizer", "pairs")}  # fmt: skip
        info["sentences"] = str(Path(self.cfg.sentences).resolve())
        (path / LVM_FILE).write_text(json.dumps(info, indent=1) + "\n")
        val, test = self.evaluate("val"), self.evaluate("test")
        n_params = sum(p.numel() for p in self.model.parameters())
        secs = max(time.time() - trainer.t0, 1e-9)
        return {
            "kind": self.kind, "parameters": n_params, "val": val, "test": test,
            "augmented_sentences": self.augmented, "train_sentences": len(self.rows),
            "evals": self.evals, "history": self.history, "seconds": secs,
            "final_val_ppl": math.exp(sum(r["ce"] for r in val.values()) / len(val)),
            "headline": {f"{t} test ppl": r["ppl"] for t, r in test.items()} | {"parameters": n_params},
            "protocol": "cross-entropy / accuracy / perplexity of the target-image tokens of the "
                        "held-out sentences, per task (test split; val chose nothing here)",
        }  # fmt: skip


@torch.no_grad()
def evaluate_tokens(
    model, rows: torch.Tensor, tasks: torch.Tensor, meta: dict, device, batch: int = 32
) -> dict:
    """Per task: mean CE (nats), next-token accuracy and perplexity exp(CE) over the codes of
    the target images (every pair's second image) of sentences ``rows`` [n, L]."""
    was = model.training
    model.eval()
    T = meta["tokens_per_image"]
    sums = {}
    for i in range(0, len(rows), batch):
        ids = rows[i : i + batch].to(device)
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
        labels = sentence_labels(ids, torch.ones_like(ids, dtype=torch.bool), T, "targets")
        ce = nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
        )
        hit = (logits.argmax(-1) == labels) & (labels != IGNORE)
        n = (labels != IGNORE).sum(1)
        for j, t in enumerate(tasks[i : i + batch].tolist()):
            s = sums.setdefault(t, [0.0, 0.0, 0])
            s[0] += float(ce[j].sum())
            s[1] += float(hit[j].sum())
            s[2] += int(n[j])
    model.train(was)
    out = {}
    for t, (ce, hit, n) in sorted(sums.items()):
        out[meta["tasks"][t]] = {"ce": ce / n, "acc": hit / n, "ppl": math.exp(ce / n), "tokens": n}
    return out


def train_lvm(cfg: LVMTrainConfig, *, out: str | Path, resume: bool = False, overwrite: bool = False,
              command: str = "") -> dict:  # fmt: skip
    """Train the autoregressive vision model on visual sentences into the run directory ``out``."""
    return run_task(LVMTask, cfg, out=out, resume=resume, overwrite=overwrite, command=command)


def distill_lvm(cfg: LVMTrainConfig, *, out: str | Path, resume: bool = False, overwrite: bool = False,
                command: str = "") -> dict:  # fmt: skip
    """``train_lvm`` with a teacher: CE + tau^2 KL masked at the ignored positions."""
    if not cfg.teacher:
        raise SlimkitError("--teacher is required (an LVM directory from `slimkit lvm train`)")
    return run_task(LVMTask, cfg, out=out, resume=resume, overwrite=overwrite, command=command)


# ---------------------------------------------------------------------------------------
# seconds-long runs for the shared trainer tests
# ---------------------------------------------------------------------------------------
def _tiny_tokenizer(tmp: Path) -> TokenizerConfig:
    return TokenizerConfig(n_images=32, image_size=16, codebook=16, embed_dim=8, channels=8, steps=6,
                           batch_size=8, eval_images=8, checkpoint_every=2, restart_every=2)  # fmt: skip


def tiny_sentences(tmp: Path) -> Path:
    """A tokenizer and a sentence directory of seconds (for tests)."""
    from slimkit.lvm.sentences import SentencesConfig, make_sentences

    sent = tmp / "tiny-sentences"
    if not sent.exists():
        vq = tmp / "tiny-vq"
        if not vq.exists():
            train_tokenizer(_tiny_tokenizer(tmp), out=vq)
        make_sentences(SentencesConfig(tokenizer=str(vq), tasks="colorize,segment", sentences=8,
                                       eval_sentences=2, rare_task="segment", rare_fraction=0.2), out=sent)  # fmt: skip
    return sent


def _tiny_lvm(tmp: Path) -> LVMTrainConfig:
    return LVMTrainConfig(sentences=str(tiny_sentences(tmp)), hidden_size=16, intermediate_size=32, layers=1,
                          heads=2, kv_heads=1, batch_size=4, steps=6, warmup_steps=2, eval_every=3,
                          checkpoint_every=2, augment="long-tail")  # fmt: skip


def _tiny_distill(tmp: Path) -> LVMTrainConfig:
    teacher = tmp / "tiny-teacher"
    if not teacher.exists():
        c = _tiny_lvm(tmp)
        c.hidden_size, c.steps, c.augment = 32, 2, "none"
        train_lvm(c, out=teacher)
    c = _tiny_lvm(tmp)
    c.teacher, c.augment = str(teacher), "none"
    return c


TRAINERS.register(
    "lvm-tokenizer",
    train_tokenizer,
    config=TokenizerConfig,
    task=TokenizerTask,
    tiny=_tiny_tokenizer,
)
TRAINERS.register("lvm-train", train_lvm, config=LVMTrainConfig, task=LVMTask, tiny=_tiny_lvm)
TRAINERS.register(
    "lvm-distill", distill_lvm, config=LVMTrainConfig, task=LVMTask, tiny=_tiny_distill
)
