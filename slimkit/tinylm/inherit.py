"""Parameter inheritance (PanGu-π Pro, section 2.3): initialise a smaller Llama-family model
(Llama, Mistral, Qwen2/3, PanGu-π) from a larger pretrained one by copying selected weights.

- Layers: the first ``keep_ends`` and last ``keep_ends`` blocks plus evenly spaced middle blocks
  (``layer_select="spread"``, [our default] from the paper's finding that the ends matter most),
  or the blocks whose removal hurts the calibration loss most (``"importance"``, one skipped-block
  forward pass per block).
- Inside the kept blocks, by an importance score of each structure (``l1``, ``l2`` or ``taylor``
  = sum |w * dL/dw| with the gradient of the LM loss on calibration windows): hidden channels
  (one choice shared by the embeddings, every norm and every projection), FFN neurons per block,
  and attention key/value head groups per block (a KV head with its query heads; head_dim is kept
  and written to the config).

- ``mask``: learnable masks. A sigmoid gate per hidden channel (applied to the output of every
  RMSNorm, so every reader of the residual stream sees the channel scaled), per FFN neuron (on
  the input of ``down_proj``) and per key/value head group (on the input of ``o_proj``) is trained
  with the parent frozen, minimising the LM loss on calibration windows plus
  ``mask_penalty`` x (mean gate - kept fraction)^2 per structure type; the gates are the scores.
  [ours: the paper names learnable masks without a recipe; this is the Sheared-LLaMA-style
  constrained relaxation in its simplest form, with the RMS statistics left ungated.]

Nothing removed reproduces the parent exactly.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.logs import progress

log = logging.getLogger("slimkit")

SCORES = ("l1", "l2", "taylor", "mask")


@dataclass
class InheritConfig:
    layers: int = field(default=0, metadata={"help": "decoder blocks of the child (0 = all)"})
    hidden: int = field(default=0, metadata={"help": "hidden size of the child (0 = parent's)"})
    ffn: int = field(default=0, metadata={"help": "FFN width of the child (0 = parent's)"})
    kv_groups: int = field(
        default=0, metadata={"help": "key/value head groups kept per block (0 = all)"}
    )
    score: str = field(
        default="taylor",
        metadata={
            "help": "importance: l1, l2, taylor or mask (learnable)",
            "choices": list(SCORES),
        },
    )
    layer_select: str = field(
        default="spread",
        metadata={
            "help": "spread (first/last + evenly spaced) or importance",
            "choices": ["spread", "importance"],
        },
    )
    keep_ends: int = field(
        default=2, metadata={"help": "first and last blocks always kept (spread)"}
    )
    data: str = field(
        default="wiki-offline", metadata={"help": "calibration corpus (taylor / importance)"}
    )
    n_calib: int = field(default=8, metadata={"help": "calibration windows"})
    calib_seq_len: int = field(default=256, metadata={"help": "tokens per calibration window"})
    mask_steps: int = field(default=60, metadata={"help": "mask: optimizer steps on the gates"})
    mask_lr: float = field(default=0.05, metadata={"help": "mask: Adam learning rate of the gates"})
    mask_penalty: float = field(
        default=20.0, metadata={"help": "mask: weight of (mean gate - kept fraction)^2"}
    )

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise SlimkitError(f"--score must be one of {', '.join(SCORES)}")
        if self.score == "mask" and (
            self.mask_steps < 1 or self.mask_lr <= 0 or self.mask_penalty < 0
        ):
            raise SlimkitError(
                "--score mask needs --mask-steps >= 1, --mask-lr > 0 and --mask-penalty >= 0"
            )


def _attn_mlp(layer):
    return layer.self_attn, layer.mlp


def spread_layers(n_parent: int, n_child: int, keep_ends: int) -> list[int]:
    if n_child >= n_parent:
        return list(range(n_parent))
    k = min(keep_ends, n_child // 2)
    head, tail = list(range(k)), list(range(n_parent - k, n_parent))
    n_mid = n_child - 2 * k
    lo, hi = k, n_parent - k  # middle blocks [lo, hi)
    mid = (
        [lo + round((i + 0.5) * (hi - lo) / n_mid - 0.5) for i in range(n_mid)] if n_mid > 0 else []
    )
    return sorted(set(head + mid + tail))


def _lm_loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits.float()
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def _weight_scores(model, score: str, ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per parameter name: an elementwise importance tensor (|w|, w^2 or |w * grad|)."""
    params = dict(model.named_parameters())
    if score == "taylor":
        model.zero_grad(set_to_none=True)
        for i in progress(range(ids.shape[0]), desc="taylor scores", unit="window"):
            _lm_loss(model, ids[i : i + 1]).backward()
        out = {
            n: (p.detach() * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            for n, p in params.items()
        }
        model.zero_grad(set_to_none=True)
        return out
    return {n: (p.detach().abs() if score == "l1" else p.detach() ** 2) for n, p in params.items()}


def learn_masks(
    parent: nn.Module, calib: torch.Tensor, keep: dict[str, float], cfg: InheritConfig
) -> dict[str, torch.Tensor]:
    """Train sigmoid gates (parent frozen); returns {"hidden": [H], "ffn": [L, F], "kv": [L, G]}."""
    c = parent.config
    L, H, F = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    hd = getattr(c, "head_dim", None) or H // n_heads
    logits = {
        "hidden": torch.full((H,), 3.0, requires_grad=True),
        "ffn": torch.full((L, F), 3.0, requires_grad=True),
        "kv": torch.full((L, n_kv), 3.0, requires_grad=True),
    }
    gates: dict[str, torch.Tensor] = {}
    hooks = []

    def norm_hook(_m, _i, out):
        return out * gates["hidden"]

    def down_hook(i):
        return lambda _m, args: (args[0] * gates["ffn"][i],)

    def o_hook(i):
        return lambda _m, args: (args[0] * gates["kv"][i].repeat_interleave(n_heads // n_kv * hd),)

    for name, m in parent.named_modules():
        if name.endswith("layernorm") or name == "model.norm":
            hooks.append(m.register_forward_hook(norm_hook))
    for i, layer in enumerate(parent.model.layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i)))
    frozen = [p for p in parent.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(logits.values(), lr=cfg.mask_lr)
    try:
        for step in progress(range(cfg.mask_steps), desc="learning masks", unit="step"):
            gates.update({k: torch.sigmoid(v) for k, v in logits.items()})
            ids = calib[step % calib.shape[0]][None]
            penalty = sum((gates[k].mean() - keep[k]) ** 2 for k in logits)
            loss = _lm_loss(parent, ids) + cfg.mask_penalty * penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    return {k: torch.sigmoid(v.detach()) for k, v in logits.items()}


def inherit(
    parent: nn.Module, cfg: InheritConfig, calib: torch.Tensor | None = None
) -> tuple[nn.Module, dict]:
    """A smaller model initialised from ``parent`` and the record of what was kept."""
    c = parent.config
    if not hasattr(parent, "model") or not hasattr(parent.model, "layers"):
        raise SlimkitError("parameter inheritance supports Llama-family models (model.layers)")
    L, H, F = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    n_heads = c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    hd = getattr(c, "head_dim", None) or H // n_heads
    group = n_heads // n_kv
    Lc, Hc, Fc, Gc = cfg.layers or L, cfg.hidden or H, cfg.ffn or F, cfg.kv_groups or n_kv
    if not (1 <= Lc <= L and 1 <= Hc <= H and 1 <= Fc <= F and 1 <= Gc <= n_kv):
        raise SlimkitError(
            f"child sizes must not exceed the parent's (layers {L}, hidden {H}, ffn {F}, kv groups {n_kv})"
        )
    if Hc % (Gc * group):
        raise SlimkitError(
            f"hidden size {Hc} must be a multiple of the child's {Gc * group} attention heads "
            f"({Gc} KV groups x {group} query heads; transformers checks this even with head_dim set): "
            f"choose --hidden as a multiple of {Gc * group} or other --kv-groups"
        )
    if (cfg.score in ("taylor", "mask") or cfg.layer_select == "importance") and calib is None:
        raise SlimkitError(
            "the taylor and mask scores and importance layer selection need calibration windows"
        )
    parent.eval()
    log.info("inheriting %d of %d blocks, hidden %d of %d, FFN %d of %d, %d of %d KV groups "
             "(score %s)", Lc, L, Hc, H, Fc, F, Gc, n_kv, cfg.score)  # fmt: skip
    # layers
    if cfg.layer_select == "importance" and Lc < L:
        base = float(_lm_loss(parent, calib).detach())
        drops = []
        layers = parent.model.layers
        for i in progress(range(L), desc="block importance", unit="block"):
            keep = nn.ModuleList([m for j, m in enumerate(layers) if j != i])
            parent.model.layers = keep
            with torch.no_grad():
                drops.append(float(_lm_loss(parent, calib)) - base)
            parent.model.layers = layers
        kept_layers = sorted(sorted(range(L), key=lambda i: -drops[i])[:Lc])
    else:
        kept_layers = spread_layers(L, Lc, cfg.keep_ends)
    masks = (
        learn_masks(parent, calib, {"hidden": Hc / H, "ffn": Fc / F, "kv": Gc / n_kv}, cfg)
        if cfg.score == "mask"
        else None
    )
    ws = _weight_scores(parent, "l1" if masks else cfg.score, calib)
    pre = "model.layers"
    # hidden channels: every weight touching channel j
    hid = ws["model.embed_tokens.weight"].sum(0).clone()
    for i in kept_layers if masks is None else []:
        for n, w in ws.items():
            if not n.startswith(f"{pre}.{i}."):
                continue
            if n.endswith(
                (
                    "q_proj.weight",
                    "k_proj.weight",
                    "v_proj.weight",
                    "gate_proj.weight",
                    "up_proj.weight",
                    "as_down.weight",
                )
            ):
                hid += w.sum(0)
            elif n.endswith(("o_proj.weight", "down_proj.weight", "as_up.weight")):
                hid += w.sum(1)
            elif n.endswith("layernorm.weight"):
                hid += w
    if "lm_head.weight" in ws and not getattr(c, "tie_word_embeddings", False):
        hid += ws["lm_head.weight"].sum(0)
    if masks is not None:
        hid = masks["hidden"]
    keep_h = torch.sort(torch.topk(hid, Hc).indices).values
    record = {"layers": kept_layers, "hidden": keep_h.tolist(), "ffn": {}, "kv_groups": {}}
    child_cfg = copy.deepcopy(c)
    child_cfg.num_hidden_layers, child_cfg.hidden_size, child_cfg.intermediate_size = Lc, Hc, Fc
    child_cfg.num_attention_heads, child_cfg.num_key_value_heads, child_cfg.head_dim = (
        Gc * group,
        Gc,
        hd,
    )
    if hasattr(child_cfg, "layer_types") and child_cfg.layer_types is not None:
        child_cfg.layer_types = [child_cfg.layer_types[i] for i in kept_layers]
    child = type(parent)(child_cfg).eval()
    sd = parent.state_dict()
    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:, keep_h]
    out["model.norm.weight"] = sd["model.norm.weight"][keep_h]
    if "lm_head.weight" in child.state_dict() and not getattr(c, "tie_word_embeddings", False):
        out["lm_head.weight"] = sd["lm_head.weight"][:, keep_h]
    for new_i, i in enumerate(progress(kept_layers, desc="copying blocks", unit="block")):
        p, q = f"{pre}.{i}.", f"{pre}.{new_i}."
        ffn_score = (
            ws[p + "mlp.gate_proj.weight"].sum(1)
            + ws[p + "mlp.up_proj.weight"].sum(1)
            + ws[p + "mlp.down_proj.weight"].sum(0)
        )
        if masks is not None:
            ffn_score = masks["ffn"][i]
        keep_f = torch.sort(torch.topk(ffn_score, Fc).indices).values
        o_cols = ws[p + "self_attn.o_proj.weight"].sum(0) + ws[p + "self_attn.q_proj.weight"].sum(1)
        g_score = o_cols.reshape(n_kv, group * hd).sum(1)
        g_score = g_score + (
            ws[p + "self_attn.k_proj.weight"].sum(1) + ws[p + "self_attn.v_proj.weight"].sum(1)
        ).reshape(n_kv, hd).sum(1)
        if masks is not None:
            g_score = masks["kv"][i]
        keep_g = torch.sort(torch.topk(g_score, Gc).indices).values
        q_rows = (keep_g[:, None] * group * hd + torch.arange(group * hd)).reshape(-1)
        kv_rows = (keep_g[:, None] * hd + torch.arange(hd)).reshape(-1)
        record["ffn"][new_i], record["kv_groups"][new_i] = keep_f.tolist(), keep_g.tolist()
        for k, v in sd.items():
            if not k.startswith(p):
                continue
            name = q + k[len(p) :]
            if k.endswith("layernorm.weight"):
                v = v[keep_h]
            elif k.endswith(("q_proj.weight",)):
                v = v[q_rows][:, keep_h]
            elif k.endswith(("k_proj.weight", "v_proj.weight")):
                v = v[kv_rows][:, keep_h]
            elif k.endswith(("q_proj.bias",)):
                v = v[q_rows]
            elif k.endswith(("k_proj.bias", "v_proj.bias")):
                v = v[kv_rows]
            elif k.endswith("o_proj.weight"):
                v = v[keep_h][:, q_rows]
            elif k.endswith(("q_norm.weight", "k_norm.weight")):
                pass  # per head_dim, unchanged
            elif k.endswith(("gate_proj.weight", "up_proj.weight")):
                v = v[keep_f][:, keep_h]
            elif k.endswith("down_proj.weight"):
                v = v[keep_h][:, keep_f]
            elif k.endswith(("siaf_a", "siaf_b")):
                v = v[:, keep_f]
            elif k.endswith("as_down.weight"):
                v = v[:, keep_h]
            elif k.endswith(("as_up.weight", "as_up.bias")):
                v = v[keep_h]
            elif k.endswith("o_proj.bias") or k.endswith("down_proj.bias"):
                v = v[keep_h]
            out[name] = v.clone()
    missing, unexpected = child.load_state_dict(out, strict=False)
    missing = [
        m
        for m in missing
        if not (m == "lm_head.weight" and getattr(c, "tie_word_embeddings", False))
    ]
    if missing or unexpected:
        raise SlimkitError(
            f"inheritance produced a state dict that does not fit the child: {missing[:3]} {unexpected[:3]}"
        )
    if getattr(c, "tie_word_embeddings", False):
        child.tie_weights()
    return child, record


def inherit_run(
    parent_name: str, cfg: InheritConfig, out: str | Path, *, overwrite: bool = False
) -> dict:
    """``slimkit inherit``: the child model, its tokenizer and ``inherit.json`` in ``out``
    (written under ``OUT.partial`` and renamed when complete; an existing ``out`` is refused
    unless ``overwrite``)."""
    from slimkit.core.rundir import atomic_output, check_output
    from slimkit.data.text import calibration_windows
    from slimkit.llm.models import load_model

    out = check_output(out, overwrite=overwrite)  # before the parent is loaded
    log.info("loading the parent %s", parent_name)
    model, tok = load_model(parent_name)
    calib = None
    if cfg.score in ("taylor", "mask") or cfg.layer_select == "importance":
        log.info("calibration: %d windows of %d tokens from %s", cfg.n_calib, cfg.calib_seq_len,
                 cfg.data)  # fmt: skip
        calib = calibration_windows(tok, cfg.data, cfg.n_calib, cfg.calib_seq_len, seed=0)
    child, record = inherit(model, cfg, calib)
    rep = {
        "parent": parent_name,
        "parent_parameters": sum(p.numel() for p in model.parameters()),
        "child_parameters": sum(p.numel() for p in child.parameters()),
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "kept": record,
    }
    log.info("writing %s", out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        child.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "inherit.json").write_text(json.dumps(rep) + "\n")
    return rep
