"""Start a :class:`~slimkit.clip.model.DualEncoder` from an open_clip or a transformers CLIP
checkpoint, tensor by tensor, wherever the shapes match.

Key maps (ours <- theirs):

| slimkit | open_clip (``CLIP``) | transformers (``CLIPModel``) |
|---|---|---|
| ``text.tok_emb.weight`` | ``token_embedding.weight`` | ``text_model.embeddings.token_embedding.weight`` |
| ``text.pos_emb`` (first rows) | ``positional_embedding`` | ``text_model.embeddings.position_embedding.weight`` |
| ``text.blocks.i.ln1`` / ``ln2`` | ``transformer.resblocks.i.ln_1`` / ``ln_2`` | ``...layers.i.layer_norm1`` / ``layer_norm2`` |
| ``text.blocks.i.qkv`` | ``...attn.in_proj_weight`` / ``_bias`` | ``...self_attn.q_proj``, ``k_proj``, ``v_proj`` stacked |
| ``text.blocks.i.out`` | ``...attn.out_proj`` | ``...self_attn.out_proj`` |
| ``text.blocks.i.mlp.0`` / ``mlp.2`` | ``...mlp.c_fc`` / ``mlp.c_proj`` | ``...mlp.fc1`` / ``mlp.fc2`` |
| ``text.ln_final`` | ``ln_final`` | ``text_model.final_layer_norm`` |
| ``text_proj.weight`` | ``text_projection`` transposed | ``text_projection.weight`` |
| ``image.trunk.*`` | ``visual.trunk.*`` (timm towers) | — |
| ``image_proj.weight`` | ``visual.head.proj.weight`` (timm towers) | — |
| ``logit_scale`` | ``logit_scale`` | ``logit_scale`` |

A shorter text tower keeps the checkpoint's first blocks. A tensor whose shape differs (e.g. the
token embedding of another vocabulary) is skipped and listed. CLIP's text towers are causal and
OpenAI's use QuickGELU: build the model with ``text_causal`` / ``text_act`` to match (the
``--init-clip`` option of ``clip train`` does not change them for you). Files are read without
unpickling (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimkit.core.errors import SlimkitError


def _open_clip_map(state: dict, depth: int) -> dict[str, torch.Tensor]:
    out = {}
    simple = {"token_embedding.weight": "text.tok_emb.weight", "ln_final.weight": "text.ln_final.weight",
              "ln_final.bias": "text.ln_final.bias", "logit_scale": "logit_scale",
              "visual.head.proj.weight": "image_proj.weight"}  # fmt: skip
    sub = {"ln_1": "ln1", "ln_2": "ln2", "attn.in_proj_weight": "qkv.weight",
           "attn.in_proj_bias": "qkv.bias", "attn.out_proj": "out", "mlp.c_fc": "mlp.0",
           "mlp.c_proj": "mlp.2"}  # fmt: skip
    for k, v in state.items():
        if k in simple:
            out[simple[k]] = v
        elif k == "positional_embedding":
            out["text.pos_emb"] = v
        elif k == "text_projection":
            out["text_proj.weight"] = v.T
        elif k.startswith("visual.trunk."):
            out["image." + k.removeprefix("visual.")] = v
        elif k.startswith("transformer.resblocks."):
            i, rest = k.removeprefix("transformer.resblocks.").split(".", 1)
            if int(i) >= depth:
                continue
            for a, b in sub.items():
                if rest.startswith(a):
                    out[f"text.blocks.{i}.{b}{rest[len(a) :]}"] = v
                    break
    return out


def _hf_map(state: dict, depth: int) -> dict[str, torch.Tensor]:
    out = {}
    p = "text_model."
    simple = {p + "embeddings.token_embedding.weight": "text.tok_emb.weight",
              p + "embeddings.position_embedding.weight": "text.pos_emb",
              p + "final_layer_norm.weight": "text.ln_final.weight",
              p + "final_layer_norm.bias": "text.ln_final.bias",
              "text_projection.weight": "text_proj.weight", "logit_scale": "logit_scale"}  # fmt: skip
    sub = {"layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.out_proj": "out",
           "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}  # fmt: skip
    for k, v in state.items():
        if k in simple:
            out[simple[k]] = v
        elif k.startswith(p + "encoder.layers."):
            i, rest = k.removeprefix(p + "encoder.layers.").split(".", 1)
            if int(i) >= depth:
                continue
            for a, b in sub.items():
                if rest.startswith(a):
                    out[f"text.blocks.{i}.{b}{rest[len(a) :]}"] = v
            for kind in ("weight", "bias"):
                if rest == f"self_attn.q_proj.{kind}":
                    parts = [
                        state.get(f"{p}encoder.layers.{i}.self_attn.{x}_proj.{kind}") for x in "qkv"
                    ]
                    if all(t is not None for t in parts):
                        out[f"text.blocks.{i}.qkv.{kind}"] = torch.cat(parts)
    return out


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's flat state dict (``state_dict`` / ``model`` wrappers and ``module.``
    prefixes removed), read without unpickling."""
    from slimkit.core.weights import load_state_dict

    p = Path(path)
    if p.is_dir():
        p = next((p / n for n in ("open_clip_model.safetensors", "model.safetensors",
                                  "open_clip_pytorch_model.bin", "pytorch_model.bin")
                  if (p / n).is_file()), p / "model.safetensors")  # fmt: skip
    if not p.is_file():
        raise SlimkitError(f"--init-clip {path}: no checkpoint file there")
    state = load_state_dict(p)
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SlimkitError(f"--init-clip {p} does not hold a flat state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_clip_layout(model, path: str | Path) -> dict:
    """Copy every tensor of an open_clip / transformers CLIP checkpoint whose slimkit name and
    shape match into ``model``; returns ``{"layout", "loaded", "skipped"}`` (names)."""
    state = read_state(path)
    depth = len(getattr(model.text, "blocks", []))
    if any(k.startswith("text_model.") for k in state):
        layout, mapped = "transformers", _hf_map(state, depth)
    elif "token_embedding.weight" in state or any(
        k.startswith("transformer.resblocks.") for k in state
    ):
        layout, mapped = "open_clip", _open_clip_map(state, depth)
    else:
        raise SlimkitError(
            f"--init-clip {path}: neither an open_clip nor a transformers CLIP layout"
        )
    own = model.state_dict()
    loaded, skipped = [], []
    with torch.no_grad():
        for k, v in mapped.items():
            if (
                k == "text.pos_emb"
                and k in own
                and v.shape[1:] == own[k].shape[1:]
                and len(v) >= len(own[k])
            ):
                v = v[: len(own[k])]  # a shorter context keeps the first positions
            if k in own and own[k].shape == v.shape:
                own[k].copy_(v.to(own[k].dtype))
                loaded.append(k)
            else:
                skipped.append(
                    f"{k} {tuple(v.shape)} vs {tuple(own[k].shape) if k in own else 'absent'}"
                )
    if not loaded:
        raise SlimkitError(f"--init-clip {path}: no tensor fits this model ({skipped[:3]})")
    return {"layout": layout, "loaded": loaded, "skipped": skipped}
