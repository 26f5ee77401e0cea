"""Q-TinySAM: W8A8 post-training quantization of a SAM's ViT image encoder
(``slimkit sam quantize``), spec section 2.4.

- Weights: every linear of the encoder's blocks (qkv, proj, lin1, lin2) is rounded to a
  symmetric per-output-channel grid by the shared block-wise pipeline (``BlockwisePipeline``
  with ``encoder_block_map`` and ``RTN``); no fork of the pipeline.
- Activations: static per-tensor quantizers (forward pre-hooks) on the input of every one of
  those linears and on the post-softmax attention probabilities (the input of attn @ v),
  calibrated on ``calib_images`` training scenes after the weights are quantized.
  ``act_quantizer: uniform`` is a symmetric signed min-max grid everywhere; ``twin`` replaces it
  with TinySAM's twin-uniform quantizers at the two skewed places:
    post-softmax: [0, split) on a fine step s (codes 0..127), [split, 1] on step 1/127;
    post-GELU (input of lin2): positives on a calibrated step (codes 0..127), negatives on the
    fixed step 0.16997/128 (codes -128..0; GELU's minimum is about -0.17).
  The twin steps are chosen by a grid of ``search_points`` candidates in
  [0.01, 1.2] x max / 127 minimising the squared error on the calibration activations.
- Saved as ``quant.safetensors``: int8 codes + float32 per-channel scales for every quantized
  weight, the activation scales, the other tensors as they are; ``quant.json`` names the
  quantized layers; nothing is pickled. ``load_quantized`` rebuilds the model with identical
  outputs. Inference is fake-quant (int8 weights dequantized at load; activations rounded in
  float): no int8 kernels are used.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import SlimkitError

ACT_QUANTIZERS = ("uniform", "twin")
GELU_NEG_STEP = 0.16997 / 128


@dataclass
class SamQuantConfig:
    wbits: int = field(default=8, metadata={"help": "weight bits, 2..8"})
    abits: int = field(
        default=8, metadata={"help": "activation bits, 2..8, or 16 for weights only"}
    )
    act_quantizer: str = field(
        default="twin",
        metadata={
            "help": "uniform (min-max) or twin (twin-uniform post-softmax / post-GELU)",
            "choices": list(ACT_QUANTIZERS),
        },
    )
    calib_images: int = field(
        default=8, metadata={"help": "calibration scenes (training seeds 0..N-1)"}
    )
    search_points: int = field(
        default=100, metadata={"help": "candidate steps of the twin-uniform search"}
    )
    batch_size: int = field(default=4, metadata={"help": "calibration images per forward"})

    def __post_init__(self) -> None:
        if not 2 <= self.wbits <= 8 or not (2 <= self.abits <= 8 or self.abits == 16):
            raise SlimkitError("--wbits must be 2..8 and --abits 2..8 or 16")
        if self.act_quantizer not in ACT_QUANTIZERS:
            raise SlimkitError(f"--act-quantizer must be one of {', '.join(ACT_QUANTIZERS)}")
        if min(self.calib_images, self.search_points, self.batch_size) < 1:
            raise SlimkitError("--calib-images, --search-points and --batch-size must be >= 1")


# ---------------------------------------------------------------- fake quantizers


def fq_uniform(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric signed grid: clip(round(x / s), -2^(b-1), 2^(b-1) - 1) * s."""
    q = 2 ** (bits - 1)
    return torch.clamp(torch.round(x / step), -q, q - 1) * step


def fq_twin_softmax(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """x in [0, 1]: below split = step * (2^(b-1) - 1) on the fine step, above on 1/(2^(b-1) - 1)."""
    m = 2 ** (bits - 1) - 1
    fine = torch.clamp(torch.round(x / step), 0, m) * step
    coarse = torch.clamp(torch.round(x * m), 0, m) / m
    return torch.where(x < step * m, fine, coarse)


def fq_twin_gelu(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Positives on ``step`` (codes 0..2^(b-1)-1), negatives on the fixed 0.16997 / 2^(b-1)."""
    q = 2 ** (bits - 1)
    neg_step = 0.16997 / q
    pos = torch.clamp(torch.round(x.clamp(min=0) / step), 0, q - 1) * step
    neg = torch.clamp(torch.round(x.clamp(max=0) / neg_step), -q, 0) * neg_step
    return pos + neg


FQ = {"uniform": fq_uniform, "twin_softmax": fq_twin_softmax, "twin_gelu": fq_twin_gelu}


class ActQuant:
    """A forward pre-hook that fake-quantizes a module's first input."""

    def __init__(self, kind: str, step: torch.Tensor, bits: int):
        self.kind, self.step, self.bits = kind, step.float().reshape(()), bits

    def __call__(self, module, args):
        x = args[0]
        return (FQ[self.kind](x, self.step.to(x.device), self.bits).to(x.dtype), *args[1:])


def search_step(sample: torch.Tensor, kind: str, bits: int, n: int) -> torch.Tensor:
    """The step of ``kind`` among n candidates in [0.01, 1.2] x max / (2^(b-1) - 1) with the
    smallest squared quantization error on ``sample``."""
    m = 2 ** (bits - 1) - 1
    top = (
        float(sample.abs().max().clamp(min=1e-8))
        if kind == "uniform"
        else float(sample.max().clamp(min=1e-8))
    )
    best, best_err = None, float("inf")
    for f in torch.linspace(0.01, 1.2, n).tolist():
        s = torch.tensor(f * top / m)
        err = float((FQ[kind](sample, s, bits) - sample).pow(2).sum())
        if err < best_err:
            best, best_err = s, err
    return best


# ---------------------------------------------------------------- calibration


def act_points(encoder: nn.Module) -> dict[str, str]:
    """Module name (in the encoder) -> the place's role: linear inputs and post-softmax."""
    out = {}
    for name, m in encoder.named_modules():
        if not name.startswith("blocks."):
            continue
        if isinstance(m, nn.Linear):
            out[name] = "post_gelu" if name.endswith("mlp.lin2") else "linear"
        elif name.endswith("attn.softmax_out"):
            out[name] = "post_softmax"
    return out


def kind_of(role: str, act_quantizer: str) -> str:
    if act_quantizer == "twin" and role == "post_softmax":
        return "twin_softmax"
    if act_quantizer == "twin" and role == "post_gelu":
        return "twin_gelu"
    return "uniform"


@torch.no_grad()
def calibrate_activations(encoder: nn.Module, images: torch.Tensor, cfg: SamQuantConfig,
                          max_sample: int = 200_000) -> dict[str, tuple[str, torch.Tensor]]:  # fmt: skip
    """Per quantized place: (kind, step) from the calibration images."""
    points = act_points(encoder)
    mods = dict(encoder.named_modules())
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in points}
    gen = torch.Generator().manual_seed(0)

    def observer(name):
        def hook(module, args):
            x = args[0].detach().float().flatten().cpu()
            if len(x) > max_sample:
                x = x[torch.randint(len(x), (max_sample,), generator=gen)]
            samples[name].append(x)

        return hook

    handles = [mods[n].register_forward_pre_hook(observer(n)) for n in points]
    try:
        for b in range(0, len(images), cfg.batch_size):
            encoder(images[b : b + cfg.batch_size])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, role in points.items():
        x = torch.cat(samples[n])
        kind = kind_of(role, cfg.act_quantizer)
        if kind == "uniform":  # plain min-max
            step = x.abs().max().clamp(min=1e-8) / (2 ** (cfg.abits - 1) - 1)
        else:
            step = search_step(x, kind, cfg.abits, cfg.search_points)
        out[n] = (kind, step)
    return out


def attach(encoder: nn.Module, acts: dict[str, tuple[str, torch.Tensor]], bits: int) -> None:
    mods = dict(encoder.named_modules())
    for n, (kind, step) in acts.items():
        mods[n].register_forward_pre_hook(ActQuant(kind, step, bits))


# ---------------------------------------------------------------- quantize, save, load


def _calibration_images(model, n: int) -> torch.Tensor:
    from slimkit.sam.train import draw_scene

    size = model.cfg.img_size
    x = torch.stack(
        [torch.as_tensor(draw_scene(size, i)[0]).permute(2, 0, 1).float() for i in range(n)]
    )
    return model.preprocess(x)


@torch.no_grad()
def quantize_model(model, cfg: SamQuantConfig) -> tuple[dict, dict]:
    """Quantize ``model.image_encoder`` in place; returns (weight records, activation steps)."""
    from slimkit.llm.block_maps import encoder_block_map
    from slimkit.llm.pipeline import BlockwisePipeline, PipelineOptions
    from slimkit.quant.methods.rtn import RTN, RTNConfig
    from slimkit.sam.model import ImageEncoderViT

    enc = model.image_encoder
    if not isinstance(enc, ImageEncoderViT):
        raise SlimkitError("sam quantize handles ViT image encoders (vit_b/l/h, vit_mini, vit_micro); "
                           f"this model's encoder is {type(enc).__name__}")  # fmt: skip
    model.eval()
    images = _calibration_images(model, cfg.calib_images)
    bmap = encoder_block_map(enc, "blocks", pre_blocks=("patch_embed", "pos_embed"))
    pipe = BlockwisePipeline(enc, images, PipelineOptions(batch_size=cfg.batch_size, device="cpu"),
                             block_map=bmap)  # fmt: skip
    pipe.run(RTN(RTNConfig(wbits=cfg.wbits, group_size=-1, sym=True, device="cpu")))
    records = dict(pipe.records)
    acts = {} if cfg.abits == 16 else calibrate_activations(enc, images, cfg)
    attach(enc, acts, cfg.abits)
    return records, acts


def quantize_sam(
    run: str | Path, cfg: SamQuantConfig, *, out: str | Path, overwrite: bool = False
) -> dict:
    """Quantize a slimkit SAM run into ``out`` (quant.safetensors, quant.json, sam_config.json)."""
    from slimkit.core.rundir import atomic_output
    from slimkit.sam.train import load_trained

    run = Path(run)
    if not (run / "sam_config.json").is_file():
        raise SlimkitError(f"{run} is not a slimkit SAM run (no sam_config.json)")
    model = load_trained(run)
    records, acts = quantize_model(model, cfg)
    with atomic_output(out, overwrite=overwrite) as tmp:
        save_quantized(model, records, acts, cfg, tmp)
        shutil.copy(run / "sam_config.json", tmp / "sam_config.json")
    return {"out": str(out), "layers": len(records), "act_points": len(acts), **asdict(cfg)}


def save_quantized(model, records: dict, acts: dict, cfg: SamQuantConfig, path: Path) -> None:
    from safetensors.torch import save_file

    tensors, layers = {}, []
    qkeys = {f"image_encoder.{n}.weight": n for n in records}
    for k, v in model.state_dict().items():
        if k in qkeys:
            qw = records[qkeys[k]]
            if qw.scale.shape[1] != 1 or not torch.all(qw.zero == 2 ** (cfg.wbits - 1)):
                raise SlimkitError(f"{k}: expected a symmetric per-channel grid")
            tensors[k + ".int8"] = (
                (qw.codes.to(torch.int16) - 2 ** (cfg.wbits - 1)).to(torch.int8).contiguous()
            )
            tensors[k + ".scale"] = qw.scale.float().contiguous()
            layers.append(k)
        else:
            tensors[k] = v.detach().cpu().contiguous()
    for n, (_, step) in acts.items():
        tensors[f"act.image_encoder.{n}.step"] = step.float().reshape(1).contiguous()
    save_file(tensors, str(path / "quant.safetensors"))
    meta = {"format": "slimkit-sam-w8a8", **asdict(cfg), "weights": layers,
            "acts": {f"image_encoder.{n}": kind for n, (kind, _) in acts.items()},
            "note": "int8 weight codes (w = int8 * scale per output channel) and activation "
                    "steps; fake-quant inference"}  # fmt: skip
    (path / "quant.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_quantized(path: str | Path):
    """Rebuild a quantized SAM from ``quant.safetensors`` (no unpickling)."""
    from safetensors.torch import load_file

    from slimkit.core.weights import check_safetensors
    from slimkit.sam.checkpoint import load_into
    from slimkit.sam.model import build_sam

    d = Path(path)
    meta = json.loads((d / "quant.json").read_text())
    c = json.loads((d / "sam_config.json").read_text())
    arch = c.pop("arch")
    model = build_sam(arch, **{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
    check_safetensors(d / "quant.safetensors")
    t = load_file(str(d / "quant.safetensors"))
    sd = {
        k: v
        for k, v in t.items()
        if not k.startswith("act.") and not k.endswith((".int8", ".scale"))
    }
    for k in meta["weights"]:
        if t[k + ".int8"].dtype != torch.int8:
            raise SlimkitError(f"{d}: {k} is not stored as int8")
        sd[k] = t[k + ".scale"] * (t[k + ".int8"].float())
    load_into(model, sd, str(d))
    mods = dict(model.named_modules())
    for n, kind in meta["acts"].items():
        mods[n].register_forward_pre_hook(ActQuant(kind, t[f"act.{n}.step"], meta["abits"]))
    return model.eval()
