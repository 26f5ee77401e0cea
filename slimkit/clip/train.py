"""``slimkit clip train``: a CLIP dual encoder trained on the shared loop, plain or with
LightCLIP's multi-level interaction (softened negatives, token-level matching, fusion-assisted
MLM), each piece switched on by its weight in :class:`ClipTrainConfig`.

The run directory holds the inference model only (``model.safetensors``, ``model.json``,
``tokenizer.json``): fusion blocks, MLM head and token temperature are training-only. After every
epoch the validation split is scored (zero-shot top-1 when the set has classes, R@1 both ways);
the report gives validation and test numbers at the end.

Determinism and resume: weights from ``seed``; each epoch's order and image shifts from a
generator seeded with (seed, epoch); MLM masks from a generator seeded with (seed, step) over
the global batch. Under ``torchrun`` each rank encodes its slice; features are all-gathered
with gradients, so every negative of the global batch is used and 2 ranks equal 1 process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from slimkit.clip.captions import PairData, PairSplit, load_pairs
from slimkit.clip.evaluate import embed_images, embed_texts, retrieval, zeroshot
from slimkit.clip.fusion_mlm import FusionMLM, mask_tokens
from slimkit.clip.model import (
    ClipArch,
    DualEncoder,
    bert_arch_fields,
    load_bert_layers,
    pretrained_text_source,
    save_clip,
)
from slimkit.clip.softened_contrastive import (
    RAMPS,
    SOFT_MODES,
    gather_with_grad,
    softened_clip_loss,
    softening_alpha,
)
from slimkit.clip.token_matching import MATCHES, token_contrastive_loss, token_similarity
from slimkit.clip.tokenizer import PretrainedTokenizer, WordTokenizer, word_mask
from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.core.optim import warmup_cosine
from slimkit.train import TRAINERS, LoopOptions, Trainer, TrainTask, run_task
from slimkit.vision.data import random_shift, stratified_subset

log = logging.getLogger("slimkit")
CONTRASTIVE = ("slimkit", "open_clip")


@dataclass
class ClipTrainConfig:
    PRESETS: ClassVar[dict[str, dict]] = {
        "clip": {"soft_alpha": 0.0, "token_weight": 0.0, "mlm_weight": 0.0},
        "lightclip": {"soft_alpha": 0.1, "token_weight": 1.0, "mlm_weight": 1.0},
    }

    data: str = field(default="digits-captions", metadata={
        "help": "digits-captions | mnist-5k-captions | shapes-captions | pairs:FILE.jsonl|.csv"})  # fmt: skip
    img_size: int = field(default=32, metadata={"help": "input resolution (images are resized)"})
    train_subset: int = field(default=0, metadata={"help": "train on N pairs (0 = all)"})
    image_arch: str = field(default="tiny-vit-p8", metadata={
        "help": "image tower: any timm model name or a slimkit tiny model (slimkit list vision-models)"})  # fmt: skip
    pretrained_image: bool = field(default=False, metadata={
        "help": "start the image tower from timm's pretrained weights (downloads)"})  # fmt: skip
    init_text: str = field(default="", metadata={
        "help": "'' (text tower from scratch) | minilm (embeddings and the first --text-depth "
                "layers of the offline all-MiniLM-L6-v2, its width, heads and WordPiece tokenizer) "
                "| a local BERT directory"})  # fmt: skip
    init_clip: str = field(default="", metadata={
        "help": "an open_clip or transformers CLIP checkpoint (file or directory): its text "
                "blocks, embeddings, projections, temperature and open_clip timm image trunk are "
                "copied wherever the shapes match"})  # fmt: skip
    text_causal: bool = field(default=False, metadata={
        "help": "causal text attention (as CLIP checkpoints; default: both ways, for MLM)"})  # fmt: skip
    text_act: str = field(default="gelu", metadata={
        "help": "text MLP activation: gelu | quick_gelu (OpenAI CLIP)",
        "choices": ["gelu", "quick_gelu"]})  # fmt: skip
    context_length: int = field(default=16, metadata={"help": "caption tokens incl. [BOS] / [EOS]"})
    text_width: int = field(default=64, metadata={"help": "text tower width"})
    text_depth: int = field(default=2, metadata={"help": "text tower blocks (shortened: few)"})
    text_heads: int = field(default=4, metadata={"help": "text attention heads"})
    embed_dim: int = field(default=64, metadata={"help": "shared embedding width d"})
    init_temperature: float = field(default=0.07, metadata={"help": "initial tau (1/logit scale)"})
    contrastive: str = field(default="slimkit", metadata={
        "help": "instance loss implementation: slimkit (softened) | open_clip (its ClipLoss; "
                "hard labels only)", "choices": list(CONTRASTIVE)})  # fmt: skip
    soft_alpha: float = field(default=0.0, metadata={
        "help": "alpha_max of the softened negative labels (0 = plain CLIP loss)"})  # fmt: skip
    soft_mode: str = field(default="uniform", metadata={
        "help": "off-diagonal label mass: uniform | similarity", "choices": list(SOFT_MODES)})  # fmt: skip
    soft_ramp: str = field(default="linear", metadata={
        "help": "alpha schedule over training progress: linear | cosine (0 at the start)",
        "choices": list(RAMPS)})  # fmt: skip
    soft_kappa: float = field(default=0.07, metadata={
        "help": "temperature of the similarity-mode labels (on cosine similarities)"})  # fmt: skip
    token_weight: float = field(default=0.0, metadata={"help": "lambda_tok (0 = no token level)"})
    token_match: str = field(default="relaxed", metadata={
        "help": "relaxed (best patch per word) | hungarian (one-to-one, SciPy; small scale)",
        "choices": list(MATCHES)})  # fmt: skip
    token_symmetric: bool = field(default=False, metadata={
        "help": "also average the patch -> word direction"})  # fmt: skip
    mlm_weight: float = field(default=0.0, metadata={"help": "lambda_mlm (0 = no MLM / fusion)"})
    mlm_prob: float = field(default=0.15, metadata={"help": "fraction of words masked"})
    mlm_tie: bool = field(default=False, metadata={
        "help": "tie the MLM output layer to the token embedding (saves vocab x width "
                "training-only parameters; advisable with --init-text)"})  # fmt: skip
    fusion_every: int = field(default=0, metadata={
        "help": "fusion after every k-th text block (0 = three injection points)"})  # fmt: skip
    fusion_grad_to_image: bool = field(default=True, metadata={
        "help": "let the MLM loss train the image tower through the fusion inputs"})  # fmt: skip
    epochs: int = field(default=30, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={
        "help": "global batch size (split across torchrun ranks; negatives are gathered)"})  # fmt: skip
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate of the cosine"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    clip_grad: float = field(default=1.0, metadata={"help": "gradient-norm clip (0 = off)"})
    shift: int = field(default=1, metadata={"help": "random translation of images, pixels"})
    seed: int = field(default=0, metadata={"help": "initialisation, order and masking seed"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:N]"})

    def __post_init__(self) -> None:
        for name in ("epochs", "img_size", "text_depth"):
            if getattr(self, name) < 1:
                raise SlimkitError(f"--{name.replace('_', '-')} must be >= 1")
        if self.batch_size < 2:
            raise SlimkitError("--batch-size must be >= 2 (a contrastive batch needs negatives)")
        if self.context_length < 3:
            raise SlimkitError("--context-length must be >= 3 ([BOS], a word, [EOS])")
        for name in ("soft_alpha", "token_weight", "mlm_weight"):
            if getattr(self, name) < 0:
                raise SlimkitError(f"--{name.replace('_', '-')} must be >= 0")
        if self.soft_alpha > 1:
            raise SlimkitError("--soft-alpha must be in [0, 1]")
        if self.contrastive not in CONTRASTIVE:
            raise SlimkitError(f"--contrastive must be one of {CONTRASTIVE}")
        if self.contrastive == "open_clip" and self.soft_alpha:
            raise SlimkitError(
                "--contrastive open_clip is the hard-label baseline: use --soft-alpha 0"
            )
        if not 0 < self.mlm_prob < 1:
            raise SlimkitError("--mlm-prob must be in (0, 1)")
        if self.lr <= 0:
            raise SlimkitError("--lr must be > 0")


class ClipTrainModule(nn.Module):
    """What the trainer optimises: the dual encoder plus the training-only ``aux`` (or None)."""

    def __init__(self, clip: DualEncoder, aux: FusionMLM | None):
        super().__init__()
        self.clip, self.aux = clip, aux


def evaluate_split(model: DualEncoder, tok: WordTokenizer, data: PairData, split: PairSplit,
                   templates: str = "default") -> dict:  # fmt: skip
    """Zero-shot (when the set has classes) and retrieval metrics of one split."""
    out = {}
    if data.class_names and (split.labels >= 0).all():
        out.update({f"zeroshot_{k}": v for k, v in zeroshot(
            model, tok, split.images, split.labels, data.class_names, data.templates[templates]).items()})  # fmt: skip
    img, txt = embed_images(model, split.images), embed_texts(model, tok, split.captions)
    out.update(retrieval(img, txt, split.captions, split.labels))
    return out


class ClipTask(TrainTask):
    """One epoch = len(train) // batch_size steps (the last partial batch is dropped)."""

    kind = "clip-train"

    def __init__(self, cfg: ClipTrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.data = data = load_pairs(cfg.data, cfg.img_size)
        x, caps, y = data.train.images, data.train.captions, data.train.labels
        if cfg.train_subset:
            if cfg.train_subset > len(caps):
                raise SlimkitError(
                    f"--train-subset {cfg.train_subset} exceeds the {len(caps)} pairs"
                )
            idx = (torch.from_numpy(stratified_subset(y.numpy(), cfg.train_subset))
                   if (y >= 0).all() else torch.arange(cfg.train_subset))  # fmt: skip
            x, caps, y = x[idx], [caps[i] for i in idx.tolist()], y[idx]
        self.n = len(caps)
        world = dist.world_size()
        if cfg.batch_size % world:
            raise SlimkitError(
                f"--batch-size {cfg.batch_size} must be divisible by the {world} ranks"
            )
        if cfg.batch_size > self.n:
            raise SlimkitError(f"--batch-size {cfg.batch_size} exceeds the {self.n} training pairs")
        self.x = x
        counts: dict[str, int] = {}
        for c in caps:
            counts[c] = counts.get(c, 0) + 1
        self.dup_rate = sum(1 for c in caps if counts[c] > 1) / len(caps)
        text = {"text_width": cfg.text_width, "text_depth": cfg.text_depth,
                "text_heads": cfg.text_heads, "text_causal": cfg.text_causal,
                "text_act": cfg.text_act}  # fmt: skip
        src = None
        if cfg.init_text:
            src = pretrained_text_source(cfg.init_text)
            text = bert_arch_fields(src, cfg.text_depth)
            self.tok = PretrainedTokenizer(src)
        else:
            self.tok = WordTokenizer.build(caps)
            text["vocab_size"] = len(self.tok)
        self.specials = self.tok.specials()
        self.ids, _ = self.tok(caps, cfg.context_length)
        torch.manual_seed(cfg.seed)
        arch = ClipArch(image_arch=cfg.image_arch, in_chans=data.in_chans, img_size=cfg.img_size,
                        context_length=cfg.context_length, embed_dim=cfg.embed_dim,
                        init_temperature=cfg.init_temperature, pad_id=self.specials["pad_id"],
                        eos_id=self.specials["eos_id"], mean=list(data.mean), std=list(data.std),
                        **text)  # fmt: skip
        clip = DualEncoder(arch, cfg.pretrained_image)
        if src is not None:
            n = load_bert_layers(clip.text, src)
            log.info("text tower: %d tensors from %s (first %d layers)", n, src, arch.text_depth)
        self.init_report = None
        if cfg.init_clip:
            from slimkit.clip.clip_layouts import load_clip_layout

            r = load_clip_layout(clip, cfg.init_clip)
            self.init_report = {"layout": r["layout"], "loaded": len(r["loaded"]),
                                "skipped": r["skipped"]}  # fmt: skip
            log.info("%s layout: %d tensors loaded, %d skipped (%s)", r["layout"], len(r["loaded"]),
                     len(r["skipped"]), "; ".join(r["skipped"][:4]))  # fmt: skip
        aux = None
        if cfg.token_weight or cfg.mlm_weight:
            aux = FusionMLM(clip.image.width, arch.text_width, arch.text_depth, arch.text_heads,
                            len(self.tok), fusion_every=cfg.fusion_every, mlm=cfg.mlm_weight > 0, tie=cfg.mlm_tie,
                            token_temperature=cfg.init_temperature)  # fmt: skip
        self.model = ClipTrainModule(clip, aux).to(device)
        self.open_clip_loss = None
        if cfg.contrastive == "open_clip":
            try:
                from open_clip.loss import ClipLoss
            except ImportError:
                raise SlimkitError("--contrastive open_clip needs open_clip_torch: "
                                   "pip install open_clip_torch") from None  # fmt: skip
            self.open_clip_loss = ClipLoss()  # on the gathered global batch
        self.steps_per_epoch = max(self.n // cfg.batch_size, 1)
        self.total = cfg.epochs * self.steps_per_epoch
        self.history: list[dict] = []
        self.gen: torch.Generator | None = None
        self.order: torch.Tensor | None = None

    def optimizer(self):
        cfg = self.cfg
        decay, plain = [], []
        for n, p in self.model.named_parameters():
            (plain if p.dim() < 2 or "logit_scale" in n else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": plain, "weight_decay": 0.0}], lr=cfg.lr)  # fmt: skip
        f = warmup_cosine(
            self.total, int(cfg.warmup_epochs * self.steps_per_epoch), cfg.min_lr / cfg.lr
        )
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)

    def loop_options(self) -> LoopOptions:
        return LoopOptions(total_steps=self.total, clip_grad=self.cfg.clip_grad)

    def micro_batches(self, step: int) -> list:
        cfg = self.cfg
        epoch, s = divmod(step, self.steps_per_epoch)
        if s == 0 or self.gen is None:
            self.gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            self.order = torch.randperm(self.n, generator=self.gen)
        self.model.train()
        idx = self.order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        x = random_shift(self.x[idx], cfg.shift, self.gen)
        ids = self.ids[idx]
        masked = labels = None
        n_masked = 0
        if cfg.mlm_weight:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            masked, labels = mask_tokens(ids, g, cfg.mlm_prob, len(self.tok), self.specials)
            n_masked = int((labels != -100).sum())
        world, r = dist.world_size(), dist.rank()
        sl = slice(r * len(idx) // world, (r + 1) * len(idx) // world)
        dev = self.device

        def local(t):
            return None if t is None else t[sl].to(dev)

        return [{"x": local(x), "ids": local(ids), "global_ids": ids.to(dev), "masked": local(masked),
                 "labels": local(labels), "n_masked": n_masked, "progress": step / self.total}]  # fmt: skip

    def loss(self, mb: dict) -> tuple[torch.Tensor, dict]:
        cfg, clip, aux = self.cfg, self.model.clip, self.model.aux
        v, u, tokens = clip.image_features(mb["x"])
        t, w = clip.text_features(mb["ids"])
        img, txt = gather_with_grad(v), gather_with_grad(t)
        scale = clip.scale()
        if self.open_clip_loss is not None:
            inst = self.open_clip_loss(img, txt, scale)
        else:
            alpha = softening_alpha(mb["progress"], cfg.soft_alpha, cfg.soft_ramp)
            inst = softened_clip_loss(img, txt, scale, alpha, cfg.soft_mode, cfg.soft_kappa)
        total, parts = inst, {"inst": float(inst.detach())}
        if cfg.token_weight:
            gids = mb["global_ids"]
            sim = token_similarity(gather_with_grad(w), word_mask(gids, **self.specials), gather_with_grad(u),
                                   cfg.token_match, cfg.token_symmetric)  # fmt: skip
            tok = token_contrastive_loss(sim, aux.token_scale())
            total = total + cfg.token_weight * tok
            parts["tok"] = float(tok.detach())
        if cfg.mlm_weight:
            img_tokens = tokens if cfg.fusion_grad_to_image else tokens.detach()
            s = aux.mlm_loss_sum(clip.text, mb["masked"], mb["labels"], img_tokens)
            mlm = s * dist.world_size() / max(mb["n_masked"], 1)  # ranks add up to the global mean
            total = total + cfg.mlm_weight * mlm
            parts["mlm"] = float(mlm.detach())
        return total, parts

    def after_step(self, step: int, rec: dict, trainer: Trainer) -> bool:
        epoch, s = divmod(step, self.steps_per_epoch)
        if s + 1 < self.steps_per_epoch:
            return False
        m = evaluate_split(self.model.clip, self.tok, self.data, self.data.val)
        self.history.append({"epoch": epoch + 1, "loss": rec["loss"], **m})
        log.info("epoch %d/%d loss %.4f val %s", epoch + 1, self.cfg.epochs, rec["loss"],
                 " ".join(f"{k} {v:.1f}" for k, v in m.items() if k.endswith(("top1", "r1"))))  # fmt: skip
        return True

    def state_dict(self) -> dict:
        return {"history": self.history, "gen": self.gen.get_state() if self.gen is not None else None,
                "order": self.order}  # fmt: skip

    def load_state_dict(self, st: dict) -> None:
        self.history, self.order, self.gen = list(st["history"]), st["order"], None
        if st["gen"] is not None:
            self.gen = torch.Generator()
            self.gen.set_state(st["gen"])

    def finish(self, path: Path | None, trainer: Trainer) -> dict:
        if path is None:
            return {}
        clip, data = self.model.clip, self.data
        save_clip(clip, self.tok, path)
        val = evaluate_split(clip, self.tok, data, data.val)
        test = evaluate_split(clip, self.tok, data, data.test)
        if data.class_names:
            held = evaluate_split(clip, self.tok, data, data.test, "heldout")
            test["zeroshot_heldout_prompts_top1"] = held["zeroshot_top1"]
        n_clip = sum(p.numel() for p in clip.parameters())
        n_aux = sum(p.numel() for p in self.model.aux.parameters()) if self.model.aux else 0
        headline = {f"test {k}": round(v, 2) for k, v in test.items()
                    if k in ("zeroshot_top1", "i2t_r1", "t2i_r1")}  # fmt: skip
        return {
            "kind": self.kind,
            "data": {"name": data.name, "train_pairs": self.n, "val_pairs": len(data.val),
                     "test_pairs": len(data.test), "classes": len(data.class_names),
                     "vocabulary": len(self.tok),
                     # captions shared by several training images: in-batch false negatives
                     "duplicate_caption_rate": self.dup_rate},  # fmt: skip
            "val": val,
            "test": test,
            "history": self.history,
            "parameters": {"image": sum(p.numel() for p in clip.image.parameters()),
                           "text": sum(p.numel() for p in clip.text.parameters()),
                           "total_saved": n_clip, "training_only": n_aux},  # fmt: skip
            "global_batch": self.cfg.batch_size,
            "init_clip": self.init_report,
            "headline": headline,
            "protocol": "after the last epoch: zero-shot top-1 / top-5 over the class prompts "
                        "(default templates; heldout_prompts: differently phrased ones) and "
                        "R@1/5/10 image->text and text->image over the held-out captions (a hit "
                        "is an identical caption), on the val and test splits",
        }  # fmt: skip


def train_clip(cfg: ClipTrainConfig, *, out: str | Path, resume: bool = False,
               overwrite: bool = False, command: str = "") -> dict:  # fmt: skip
    """Train a dual encoder into the run directory ``out``; return the report.

    Example:
        >>> train_clip(ClipTrainConfig(data="shapes-captions", soft_alpha=0.1, token_weight=1,
        ...                            mlm_weight=1), out="runs/clip")  # doctest: +SKIP
    """
    return run_task(ClipTask, cfg, out=out, resume=resume, overwrite=overwrite, command=command)


def _tiny(tmp: Path) -> ClipTrainConfig:
    return ClipTrainConfig(data="digits-captions", train_subset=64, batch_size=16, epochs=2,
                           warmup_epochs=0.5, text_depth=2, soft_alpha=0.2, token_weight=1.0,
                           mlm_weight=1.0, soft_mode="similarity")  # fmt: skip


TRAINERS.register("clip-train", train_clip, config=ClipTrainConfig, task=ClipTask, tiny=_tiny)

__all__ = ["ClipTask", "ClipTrainConfig", "evaluate_split", "train_clip"]
