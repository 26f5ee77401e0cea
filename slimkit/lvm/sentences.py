"""Visual sentences: (input, annotation) pairs of one task, tokenized and packed into shards.

A pair task maps a *source* (a clean image, and for ``segment`` its instance map) to an
(input, target) pair of images [our default tasks, after LVM's DATASET.md formats]:

| task | input | target |
|---|---|---|
| colorize | the grey image (3 channels) | the colour image |
| denoise | the image + Gaussian noise (sigma 0.15) | the clean image |
| inpaint | the image with a grey square hole | the full image |
| edges | the image | Sobel edges, white on black |
| segment | a generated scene | its instances painted in fixed colours on black |

A sentence is ``pairs`` pairs of the same task, as DeLVM's ``token_concat.py`` joins records of
one task: [BOS] [in_1 | out_1 | in_2 | out_2 | ...], ``tokens_per_image`` codes per image in
raster order. The BOS id is ``codebook`` (the vocabulary is the codes + 1 special) [our default;
DeLVM uses no specials, which leaves the first code of a sentence unsupervised].

A sentence directory holds one safetensors shard per split (``train``, ``val``, ``test``):

    tokens   int32 [total]            every sentence's ids, concatenated
    offsets  int64 [n + 1]            sentence i is tokens[offsets[i]:offsets[i + 1]] (the
                                      document boundaries: attention never crosses them)
    task     int64 [n]                index into the directory's task list
    pairs    uint8 [n, P, 2, 3, S, S] the images that were tokenized (decode / metric reference)
    sources  uint8 [n, P, 3, S, S], masks uint8 [n, P, S, S]: what the pairs were made from
                                      (the long-tail augmentation re-makes pairs from them)

and ``sentences.json`` (tasks, counts, tokenizer, vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Registry
from slimkit.lvm.images import load_images, scenes

TASKS = Registry("lvm task")
SPLITS = ("train", "val", "test")
META_FILE = "sentences.json"
PALETTE = torch.tensor([[0, 0, 0], [1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.4, 1.0],
                        [1.0, 1.0, 0.2], [1.0, 0.3, 1.0]])  # fmt: skip


def _gray(x: torch.Tensor) -> torch.Tensor:
    g = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return g[:, None].expand(-1, 3, -1, -1).contiguous()


@TASKS.register("colorize", kind="image", help="grey -> colour")
def _colorize(src, masks, g):
    return _gray(src), src


@TASKS.register("denoise", kind="image", help="noisy (sigma 0.15) -> clean")
def _denoise(src, masks, g):
    return (src + 0.15 * torch.randn(src.shape, generator=g)).clamp(0, 1), src


@TASKS.register("inpaint", kind="image", help="grey square hole -> full image")
def _inpaint(src, masks, g):
    x = src.clone()
    s = src.shape[-1]
    for i in range(len(x)):
        side = int(torch.randint(s // 4, s // 2 + 1, (1,), generator=g))
        y0, x0 = (int(v) for v in torch.randint(0, s - side + 1, (2,), generator=g))
        x[i, :, y0 : y0 + side, x0 : x0 + side] = 0.5
    return x, src


@TASKS.register("edges", kind="mask", help="image -> Sobel edges, white on black")
def _edges(src, masks, g):
    k = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gray = _gray(src)[:, :1]
    gx = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k[None, None])
    gy = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k.t()[None, None])
    e = (gx.pow(2) + gy.pow(2)).sqrt()
    return src, (e > 0.35).float().expand(-1, 3, -1, -1).contiguous()


@TASKS.register("segment", kind="mask", scenes=True, help="scene -> instances on black")
def _segment(src, masks, g):
    idx = masks.long().clamp(max=len(PALETTE) - 1)
    return src, PALETTE[idx].permute(0, 3, 1, 2).contiguous()


def make_pairs(task: str, sources: torch.Tensor, masks: torch.Tensor, seed: int):
    """(inputs, targets) of ``task`` for ``sources`` [N, 3, S, S], rounded to 8-bit levels
    (what is stored is exactly what was tokenized)."""
    g = torch.Generator().manual_seed(seed)
    a, b = TASKS.get(task)(sources, masks, g)
    return _to_u8(a), _to_u8(b)


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


@dataclass
class SentencesConfig:
    tokenizer: str = field(
        default="", metadata={"help": "tokenizer directory (lvm train-tokenizer)"}
    )
    tasks: str = field(
        default="colorize,denoise,inpaint,edges,segment",
        metadata={"help": "comma-separated tasks: " + ", ".join(TASKS.names())},
    )
    images: str = field(
        default="scenes",
        metadata={"help": "source images: scenes, photos or a folder (segment always uses scenes)"},
    )
    sentences: int = field(default=200, metadata={"help": "training sentences per common task"})
    pairs: int = field(default=2, metadata={"help": "pairs per sentence"})
    rare_task: str = field(default="", metadata={"help": "make this task rare (long tail)"})
    rare_fraction: float = field(
        default=0.05, metadata={"help": "share of the training sentences the rare task gets"}
    )
    eval_sentences: int = field(
        default=20, metadata={"help": "validation and test sentences per task"}
    )
    seed: int = field(default=0, metadata={"help": "image and noise seed"})

    def task_list(self) -> list[str]:
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        for t in names:
            TASKS.get(t)  # an unknown task: one line naming the registered ones
        if len(set(names)) != len(names) or not names:
            raise SlimkitError(f"--tasks must name distinct tasks (got {self.tasks!r})")
        return names

    def __post_init__(self) -> None:
        tasks = self.task_list()
        if self.sentences < 1 or self.pairs < 1 or self.eval_sentences < 1:
            raise SlimkitError("--sentences, --pairs and --eval-sentences must be >= 1")
        if self.rare_task and self.rare_task not in tasks:
            raise SlimkitError(
                f"--rare-task {self.rare_task!r} is not one of --tasks ({self.tasks})"
            )
        if not 0 < self.rare_fraction < 1:
            raise SlimkitError(f"--rare-fraction must be in (0, 1) (got {self.rare_fraction})")

    def counts(self) -> dict[str, int]:
        """Training sentences per task; the rare task gets ``rare_fraction`` of the total."""
        tasks = self.task_list()
        n = {t: self.sentences for t in tasks}
        if self.rare_task:
            common = self.sentences * (len(tasks) - 1)
            n[self.rare_task] = max(
                1, round(self.rare_fraction * common / (1 - self.rare_fraction))
            )
        return n


def _sources(task: str, cfg: SentencesConfig, n: int, size: int, seed: int):
    if TASKS.meta(task).get("scenes") or cfg.images == "scenes":
        img, m = scenes(n, size, seed)
        return img, m.clamp(max=255).to(torch.uint8)
    return load_images(cfg.images, n, size, seed), torch.zeros(n, size, size, dtype=torch.uint8)


def tokenize_pairs(vq, inputs: torch.Tensor, targets: torch.Tensor, bos: int, batch: int = 256):
    """[N, P] pairs of 8-bit images -> int64 sentences [N, 1 + 2 P T] ([BOS] in out in out ...)."""
    n, p = inputs.shape[:2]
    both = torch.stack([inputs, targets], 2).reshape(-1, *inputs.shape[2:])  # in, out, in, out
    codes = torch.cat([vq.encode(to_float(both[i : i + batch])).reshape(min(batch, len(both) - i), -1)
                       for i in range(0, len(both), batch)]).cpu()  # fmt: skip
    codes = codes.reshape(n, -1)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), codes], 1)


def build_split(vq, cfg: SentencesConfig, counts: dict[str, int], seed: int) -> dict:
    """The tensors of one shard (see the module docstring)."""
    tasks, size = cfg.task_list(), vq.cfg.image_size
    rows: dict[str, list] = {"tokens": [], "task": [], "pairs": [], "sources": [], "masks": []}
    for ti, task in enumerate(tasks):
        n = counts.get(task, 0)
        if n == 0:
            continue
        s = seed * 1009 + ti * 7919
        src, masks = _sources(task, cfg, n * cfg.pairs, size, s)
        src = to_float(_to_u8(src))
        a, b = make_pairs(task, src, masks, s + 1)
        shape = (n, cfg.pairs)
        a, b = a.reshape(*shape, *a.shape[1:]), b.reshape(*shape, *b.shape[1:])
        rows["tokens"].append(tokenize_pairs(vq, a, b, vq.cfg.codebook))
        rows["task"].append(torch.full((n,), ti, dtype=torch.long))
        rows["pairs"].append(torch.stack([a, b], 2))
        rows["sources"].append(_to_u8(src).reshape(*shape, *src.shape[1:]))
        rows["masks"].append(masks.reshape(*shape, size, size))
    out = {k: torch.cat(v) for k, v in rows.items()}
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(out["task"]), generator=g)  # tasks shuffled: no forgetting
    out = {k: v[order] for k, v in out.items()}
    toks = out.pop("tokens")
    out["offsets"] = torch.arange(len(toks) + 1, dtype=torch.long) * toks.shape[1]
    out["tokens"] = toks.reshape(-1).to(torch.int32)
    return out


def make_sentences(cfg: SentencesConfig, *, out: str | Path, overwrite: bool = False) -> dict:
    """Write the train / val / test shards of visual sentences into ``out``."""
    from safetensors.torch import save_file

    from slimkit.core.rundir import atomic_output
    from slimkit.lvm.vq import load_vq

    if not cfg.tokenizer:
        raise SlimkitError(
            "--tokenizer is required (a directory from `slimkit lvm train-tokenizer`)"
        )
    vq = load_vq(cfg.tokenizer)
    tasks = cfg.task_list()
    ev = {t: cfg.eval_sentences for t in tasks}
    plan = {"train": cfg.counts(), "val": ev, "test": ev}
    with atomic_output(out, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        for i, (split, counts) in enumerate(plan.items()):
            shard = build_split(vq, cfg, counts, cfg.seed * 3 + i + 1)
            save_file(
                {k: v.contiguous() for k, v in shard.items()}, str(tmp / f"{split}.safetensors")
            )
        meta = {"tasks": tasks, "kinds": {t: TASKS.meta(t)["kind"] for t in tasks},
                "counts": plan, "pairs": cfg.pairs, "codebook": vq.cfg.codebook,
                "bos": vq.cfg.codebook, "vocab_size": vq.cfg.codebook + 1,
                "tokens_per_image": vq.cfg.tokens_per_image, "image_size": vq.cfg.image_size,
                "tokenizer": str(Path(cfg.tokenizer).resolve()),
                "sentence_tokens": 1 + 2 * cfg.pairs * vq.cfg.tokens_per_image,
                "config": asdict(cfg)}  # fmt: skip
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class Sentences:
    """A sentence directory: ``Sentences(path).split("train")`` -> dict of tensors, plus
    ``meta`` and ``sentence(split, i)`` (the int64 ids of sentence i)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        f = self.path / META_FILE
        if not f.is_file():
            raise SlimkitError(
                f"{path} is not a sentence directory (no {META_FILE}); make one with "
                "`slimkit lvm make-sentences`"
            )
        self.meta = json.loads(f.read_text())
        self._cache: dict[str, dict] = {}

    def split(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._cache:
            from safetensors.torch import load_file

            from slimkit.core.weights import check_safetensors

            p = self.path / f"{name}.safetensors"
            check_safetensors(p)
            self._cache[name] = load_file(str(p))
        return self._cache[name]

    def sentence(self, split: str, i: int) -> torch.Tensor:
        s = self.split(split)
        a, b = int(s["offsets"][i]), int(s["offsets"][i + 1])
        return s["tokens"][a:b].long()

    def rows(self, split: str) -> torch.Tensor:
        """All sentences of a split as int64 [n, L] (every sentence has the same length)."""
        s = self.split(split)
        return s["tokens"].long().view(len(s["task"]), -1)


def image_codes(sentence: torch.Tensor, tokens_per_image: int, bos: int) -> torch.Tensor:
    """The code grid of every image of a sentence: [n_images, T] (BOS and specials dropped)."""
    codes = sentence[sentence < bos]
    if len(codes) % tokens_per_image:
        raise SlimkitError(
            f"a sentence of {len(codes)} codes is not a whole number of {tokens_per_image}-token images"
        )
    return codes.view(-1, tokens_per_image)


def decode_sentence(vq, sentence: torch.Tensor) -> torch.Tensor:
    """A sentence's images, decoded: [n_images, 3, S, S] in sentence order (in, out, in, out...)."""
    return vq.decode(image_codes(sentence, vq.cfg.tokens_per_image, vq.cfg.codebook))
