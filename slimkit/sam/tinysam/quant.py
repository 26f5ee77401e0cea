"""Q-TinySAM: W8A8 post-training quantization of a SAM (``slimkit sam quantize``), spec 2.4.

Quantized places (``Place``), in the image encoder (ViT: ``vit_b/l/h``, ``vit_mini``,
``vit_micro``; TinyViT: ``vit_t``) and (``decoder: true``) the mask decoder:

- every ``nn.Linear``: weight on a symmetric per-output-channel grid (slimkit's
  ``QuantizedWeight``), input on a static per-tensor grid;
- (``quantize_convs: true``, the paper's choice) every ``nn.Conv2d`` / ``nn.ConvTranspose2d``
  (patch embeddings, necks, TinyViT's MBConv / patch-merging / local convs, the decoder's
  upscaling): weight per output channel as a linear's, input on a static per-tensor grid that
  carries an offset (spec 2.4's a_bias: x_hat = round((x - o) / s) * s + o, o the middle of
  the calibration range; ``act_quantizer: uniform``: no offset). A Conv-BN keeps its BN in
  float: per-output-channel steps are scale-equivariant, so quantizing before or after folding
  the BN's per-channel factor gives the same grid (up to float rounding, and the unused -128
  code of a channel whose factor is negative);
- (``matmuls: true``) both attention matmuls: q and k of q @ k^T, the post-softmax
  probabilities and v of attn @ v, each on a static per-tensor grid (identity modules
  ``q_in`` / ``k_in`` / ``softmax_out`` / ``v_in`` of the attention are the hook points).

Activation grids: ``act_quantizer: uniform`` is the symmetric signed grid everywhere; ``twin``
puts TinySAM's twin-uniform quantizers at the two skewed places of the encoder:
    post-softmax: [0, split) on a fine step s (codes 0..127), [split, 1] on step 1/127;
    post-GELU (input of lin2 / a TinyViT's fc2): positives on a calibrated step (codes 0..127), negatives on the
    fixed step 0.16997/128 (codes -128..0; GELU's minimum is about -0.17).
(The decoder's MLPs use ReLU, so its post-softmax probabilities are its only twin place.)

Scale search (``search``):
- ``minmax``: weight scales max|w| / 127 per channel, activation steps max|x| / 127; a twin
  step minimises its own squared error over ``search_points`` candidates.
- ``mse`` / ``task``: for each place, alternately (``rounds`` times) the step of operand A
  (input / q / probabilities) and of operand B (weight, per output channel independently / k /
  v) among ``search_points`` candidates in [0.01, 1.2] x max / 127, minimising the distortion
  of the place's output O (the linear's, the conv's or the matmul's; a conv's operands are
  whole calibration samples, its weight's error summed per output channel):
    mse:  mean((O - O_hat)^2)
    task: mean((g * (O - O_hat))^2), g = d L / d O (Hessian-guided, as the paper).
  L is the task loss of the mask logits and the IoU predictions on calibration prompts. The
  paper's L = KL(quantized || FP) has a zero gradient at the FP model, and its Hessian there is
  the Fisher information; g is therefore the gradient of the log-likelihood of labels drawn
  from the FP model's own Bernoulli outputs (sigmoid of the mask logits and of the IoU
  predictions; one draw per output, a fixed seed), whose square estimates the Fisher diagonal.
- The image encoder runs on the shared block-wise pipeline (``BlockwisePipeline`` over the
  encoder's chain of blocks, ``encoder_blocks.encoder_chain``: patch embedding, transformer /
  MBConv / patch-merging blocks, neck; the method is :class:`SamPTQ`): each block's places are
  searched on the inputs that the already quantized blocks produce. The mask decoder's blocks take four
  tensors (queries, keys and their positional encodings) and return two, which the pipeline's
  one-stream block calls cannot carry; its places are searched on inputs captured in one pass
  of the decoder behind the quantized encoder.

Saved as ``quant.safetensors``: int8 codes + float32 per-channel scales of every quantized
weight (a conv's codes in its weight's layout, scales broadcast per output channel), the
activation steps and offsets, the other tensors as they are; ``quant.json`` names the quantized
weights (``convs``: those of convolutions) and the kind of each activation quantizer; nothing
is pickled.
``load_quantized`` rebuilds the model with identical outputs (fake-quant: int8 weights
dequantized, activations rounded in float) or, with ``int8_kernels=True``, runs the linears
whose input grid is uniform or twin-GELU as integer matmuls (``torch._int_mm``: int8 x int8 ->
int32, then one float scale per output channel; a twin-GELU input is two integer matmuls, one
per half). The attention matmuls stay fake-quant (PyTorch has no batched int8 matmul on CPU),
and so do the convolutions (``CONV_KERNEL_NOTE``; ``int8_kernel_report`` counts them).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.llm.pipeline import BlockwiseMethod, Window

ACT_QUANTIZERS = ("uniform", "twin")
SEARCHES = ("minmax", "mse", "task")
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
    search: str = field(
        default="task",
        metadata={
            "help": "scale search: minmax, mse (layer output error) or task (Hessian-guided "
            "mask / IoU objective), alternating weight and activation scales",
            "choices": list(SEARCHES),
        },
    )
    rounds: int = field(default=3, metadata={"help": "alternating rounds of the scale search"})
    calib_images: int = field(
        default=8, metadata={"help": "calibration scenes (training seeds 0..N-1)"}
    )
    calib_seed: int = field(
        default=0, metadata={"help": "first training scene of the calibration set"}
    )
    calib_prompts: int = field(
        default=8, metadata={"help": "prompts per calibration image (instance points / boxes)"}
    )
    search_points: int = field(
        default=100, metadata={"help": "candidate steps per search (the paper: 100)"}
    )
    decoder: bool = field(default=True, metadata={"help": "quantize the mask decoder too"})
    matmuls: bool = field(
        default=True, metadata={"help": "quantize the attention matmuls (q k^T, attn v)"}
    )
    quantize_convs: bool = field(
        default=True,
        metadata={"help": "quantize the convolutions too (patch embedding, neck, TinyViT's MBConv / "
                          "merging / local convs, the decoder's transposed convs); the paper "
                          "quantizes every Conv2d / ConvTranspose2d"},
    )  # fmt: skip
    max_rows: int = field(
        default=1024, metadata={"help": "rows (tokens) per place kept for the scale search"}
    )
    batch_size: int = field(default=4, metadata={"help": "calibration images per forward"})

    def __post_init__(self) -> None:
        if not 2 <= self.wbits <= 8 or not (2 <= self.abits <= 8 or self.abits == 16):
            raise SlimkitError("--wbits must be 2..8 and --abits 2..8 or 16")
        if self.act_quantizer not in ACT_QUANTIZERS:
            raise SlimkitError(f"--act-quantizer must be one of {', '.join(ACT_QUANTIZERS)}")
        if self.search not in SEARCHES:
            raise SlimkitError(f"--search must be one of {', '.join(SEARCHES)}")
        if min(self.calib_images, self.search_points, self.batch_size, self.rounds,
               self.calib_prompts, self.max_rows) < 1:  # fmt: skip
            raise SlimkitError(
                "--calib-images, --calib-prompts, --search-points, --rounds, --max-rows and "
                "--batch-size must be >= 1"
            )

    def scheme(self) -> str:
        return f"W{self.wbits}A{self.abits}-{self.act_quantizer}-{self.search}"


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


def fq_offset(x: torch.Tensor, step: torch.Tensor, bits: int, offset: torch.Tensor) -> torch.Tensor:
    """The signed grid shifted by ``offset`` (a convolution's input, spec 2.4's a_bias):
    clip(round((x - offset) / s), -2^(b-1), 2^(b-1) - 1) * s + offset."""
    return fq_uniform(x - offset, step, bits) + offset


FQ = {"uniform": fq_uniform, "twin_softmax": fq_twin_softmax, "twin_gelu": fq_twin_gelu}


def act_offset(x: torch.Tensor) -> torch.Tensor:
    """The offset of an ``offset`` grid: the middle of the calibration range."""
    return ((x.max() + x.min()) / 2).reshape(())


class ActQuant:
    """A forward pre-hook that fake-quantizes a module's first input (``offset``: the shift of
    an ``offset`` grid)."""

    def __init__(
        self, kind: str, step: torch.Tensor, bits: int, offset: torch.Tensor | None = None
    ):
        self.kind, self.step, self.bits = kind, step.float().reshape(()), bits
        self.offset = None if offset is None else offset.float().reshape(())
        if (kind == "offset") != (offset is not None):
            raise SlimkitError(
                f"an {kind} activation grid {'needs' if kind == 'offset' else 'takes no'} offset"
            )

    def __call__(self, module, args):
        x = args[0]
        s = self.step.to(x.device)
        if self.kind == "offset":
            y = fq_offset(x, s, self.bits, self.offset.to(x.device))
        else:
            y = FQ[self.kind](x, s, self.bits)
        return (y.to(x.dtype), *args[1:])


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


# ---------------------------------------------------------------- places


@dataclass
class Place:
    """One quantized operation: output = op(A, B). ``linear`` / ``conv``: A = the input, B = the
    weight; ``qk``: A = q, B = k (q @ k^T); ``av``: A = post-softmax probabilities, B = v.
    ``geom`` of a conv: (transposed, stride, padding, output_padding, dilation, groups)."""

    op: str
    a: str  # module whose first input is operand A
    b: str  # the linear / conv itself (weight) or the module whose input is operand B
    out: str  # module whose output is the place's output
    a_kind: str  # uniform / twin_gelu / twin_softmax / offset
    geom: tuple = ()

    @property
    def weight(self) -> bool:
        return self.op in ("linear", "conv")

    @property
    def rows(self) -> str:
        """How operands are sampled for the search: token rows of a linear, (batch x head)
        slices of a matmul, whole samples (maps) of a conv."""
        return {"linear": "rows", "conv": "samples"}.get(self.op, "slices")


CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _conv_geom(m: nn.Module) -> tuple:
    t = isinstance(m, nn.ConvTranspose2d)
    if t and m.groups != 1:
        raise SlimkitError(f"{m}: grouped transposed convolutions are not supported")
    return (t, m.stride, m.padding, m.output_padding if t else 0, m.dilation, m.groups)


def find_places(root: nn.Module, prefix: str, cfg: SamQuantConfig) -> list[Place]:
    """The quantized places under ``root`` (names prefixed with ``prefix``)."""
    from slimkit.sam.model import Attention, ViTAttention
    from slimkit.sam.tinyvit import WindowAttention

    twin = cfg.act_quantizer == "twin"
    out = []
    for name, m in root.named_modules():
        n = prefix + name
        if isinstance(m, nn.Linear):
            gelu = twin and name.endswith(("mlp.lin2", "mlp.fc2")) and "image_encoder" in prefix
            out.append(Place("linear", n, n, n, "twin_gelu" if gelu else "uniform"))
        elif cfg.quantize_convs and isinstance(m, CONVS):
            # the paper's convolution inputs carry an offset (a_bias); plain uniform: none
            out.append(Place("conv", n, n, n, "offset" if twin else "uniform", _conv_geom(m)))
        elif cfg.matmuls and isinstance(m, (ViTAttention, Attention, WindowAttention)):
            out.append(Place("qk", f"{n}.q_in", f"{n}.k_in", f"{n}.qk_out", "uniform"))
            sm = "twin_softmax" if twin else "uniform"
            out.append(Place("av", f"{n}.softmax_out", f"{n}.v_in", f"{n}.av_out", sm))
    return out


def _index(n: int, keep: int) -> torch.Tensor:
    """A fixed subset of ``keep`` of ``n`` rows (the same for an input and its gradient)."""
    if n <= keep:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(n))[:keep].sort().values


def _select(x: torch.Tensor, rows: str, max_rows: int) -> torch.Tensor:
    """Rows of a linear's input / output, (batch x head) slices of a matmul operand, or whole
    samples of a conv's input / output (``rows``: a :attr:`Place.rows`)."""
    x = x.detach().float().cpu()
    if rows == "rows":
        x = x.reshape(-1, x.shape[-1])
        return x[_index(len(x), max_rows)]
    if rows == "samples":  # the same samples of an input map and of its output's gradient
        return x[_index(len(x), max(1, max_rows // 32))]
    x = x.reshape(-1, *x.shape[-2:])  # (batch x heads, n, m): whole slices, the same for
    return x[_index(len(x), max(1, max_rows // 32))]  # both operands and the output


# ---------------------------------------------------------------- scale search

_OPS = {
    "linear": lambda a, b: a @ b.T,
    "qk": lambda a, b: a @ b.transpose(-2, -1),
    "av": lambda a, b: a @ b,
}


def _top(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "offset":
        return ((x.max() - x.min()) / 2).clamp(min=1e-8)
    return (x.abs().max() if kind == "uniform" else x.max()).clamp(min=1e-8)


def _conv_op(geom: tuple):
    """The conv of a place, output channels last (so that the error sums per channel)."""
    t, stride, pad, opad, dil, groups = geom

    def op(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if t:
            y = nn.functional.conv_transpose2d(a, w, None, stride, pad, opad, groups, dil)
        else:
            y = nn.functional.conv2d(a, w, None, stride, pad, dil, groups)
        return y.movedim(1, -1)

    return op


def _channel_max(p: Place, w: torch.Tensor) -> torch.Tensor:
    """max |w| per output channel, shaped to broadcast against the weight: (out, 1) for a
    linear, (out, 1, 1, 1) for a conv, (1, out, 1, 1) for a transposed conv ((in, out, kh, kw))."""
    dims = tuple(d for d in range(w.ndim) if d != (1 if p.op == "conv" and p.geom[0] else 0))
    return w.abs().amax(dims, keepdim=True).clamp(min=1e-8)


def search_place(p: Place, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor | None,
                 cfg: SamQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(step of A, step of B) for one place: B's step is (out, 1) per channel for a weight.

    ``minmax`` returns the initial steps; ``mse`` / ``task`` alternate ``rounds`` times between
    A's step and B's, each the best of ``search_points`` candidates for the output distortion
    (weighted by g^2 for ``task``; g: the task-loss gradient at the place's output). The search
    starts from, and never returns worse than, the min-max steps. An ``offset`` A (a conv's
    input) is centred on :func:`act_offset` first."""
    ma, mb = 2 ** (cfg.abits - 1) - 1, 2 ** ((cfg.wbits if p.weight else cfg.abits) - 1) - 1
    bits_b = cfg.wbits if p.weight else cfg.abits
    if p.a_kind == "offset":
        off = act_offset(a)
        fa = lambda x, s, bits: fq_offset(x, s, bits, off)  # noqa: E731
    else:
        fa = FQ[p.a_kind]
    if p.a_kind in ("uniform", "offset"):
        step_a = _top(a, p.a_kind) / ma
    else:
        step_a = search_step(a, p.a_kind, cfg.abits, cfg.search_points)
    top_b = _channel_max(p, b) if p.weight else _top(b, "uniform")
    step_b = top_b / mb
    if cfg.search == "minmax":
        return step_a, step_b
    if cfg.search == "task" and g is None:
        raise SlimkitError(f"{p.out}: no task gradient was captured")
    op = _conv_op(p.geom) if p.op == "conv" else _OPS[p.op]
    o = op(a, b)
    if g is not None and p.op == "conv":
        g = g.movedim(1, -1)  # channels last, as the op's output
    w2 = g.pow(2) if cfg.search == "task" else None

    def err(o_hat: torch.Tensor, per_channel: bool) -> torch.Tensor:
        d = (o - o_hat).pow(2)
        if w2 is not None:
            d = d * w2
        return d.reshape(-1, d.shape[-1]).sum(0) if per_channel else d.sum()

    thetas = torch.linspace(0.01, 1.2, cfg.search_points).tolist()
    top_a = _top(a, p.a_kind)
    b_hat = fq_uniform(b, step_b, bits_b)
    for _ in range(cfg.rounds):
        best = err(op(fa(a, step_a, cfg.abits), b_hat), False)
        for t in thetas:
            s = torch.as_tensor(t * top_a / ma)
            e = err(op(fa(a, s, cfg.abits), b_hat), False)
            if e < best:
                best, step_a = e, s
        a_hat = fa(a, step_a, cfg.abits)
        best = err(op(a_hat, b_hat), p.weight)
        for t in thetas:
            s = t * top_b / mb
            e = err(op(a_hat, fq_uniform(b, s, bits_b)), p.weight)
            if p.weight:  # per output channel: the channels' errors are independent
                better = e < best
                best = torch.where(better, e, best)
                step_b = torch.where(better.reshape(step_b.shape), s, step_b)
            elif e < best:
                best, step_b = e, s
        b_hat = fq_uniform(b, step_b, bits_b)
    return step_a, step_b


def _as_rows(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A weight as (out, fan_in) rows: a conv's (out, in, kh, kw) flattened, a transposed
    conv's (in, out, kh, kw) with its output channels first."""
    return (w.transpose(0, 1) if transposed else w).reshape(w.shape[1 if transposed else 0], -1)


def _from_rows(rows: torch.Tensor, like: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The inverse of :func:`_as_rows`: rows back in the layout of ``like``."""
    if transposed:
        return rows.reshape(like.shape[1], like.shape[0], *like.shape[2:]).transpose(0, 1)
    return rows.reshape(like.shape)


def _weight_record(w: torch.Tensor, step: torch.Tensor, bits: int, transposed: bool = False):
    """slimkit's QuantizedWeight for a symmetric per-channel grid with the given steps (a
    conv's weight as (out, fan_in) rows)."""
    from slimkit.quant.quantizer import QuantizedWeight, QuantSpec, quantize, trivial_g_idx

    if w.ndim > 2:
        w, step = _as_rows(w, transposed), step.reshape(-1, 1)
    zero = torch.full_like(step, float(2 ** (bits - 1)))
    codes = quantize(w.float(), step, zero, bits).to(torch.uint8)
    spec = QuantSpec(bits=bits, group_size=-1, sym=True)
    return QuantizedWeight(codes=codes, scale=step.float(), zero=zero,
                           g_idx=trivial_g_idx(w.shape[1], -1), spec=spec)  # fmt: skip


def _apply(model_mods: dict, places: list[Place], caught: dict, grads: dict, cfg,
           records: dict, acts: dict, log: list) -> None:  # fmt: skip
    """Search every place from its captured operands, write weights, attach quantizers."""
    for p in places:
        a = torch.cat(caught[p.a])
        if p.weight:
            b = model_mods[p.b].weight.detach().float()
        else:
            b = torch.cat(caught[p.b])
        g = torch.cat(grads[p.out]) if p.out in grads else None
        if g is not None and len(g) != len(a):
            raise SlimkitError(f"{p.out}: captured gradient and input rows disagree")
        step_a, step_b = search_place(p, a, b, g, cfg)
        if cfg.abits != 16:
            off = act_offset(a) if p.a_kind == "offset" else None
            acts[p.a] = (p.a_kind, step_a.reshape(()), off)
        transposed = p.op == "conv" and p.geom[0]
        if p.weight:
            qw = _weight_record(b, step_b, cfg.wbits, transposed)
            records[p.b] = qw
            mod = model_mods[p.b]
            mod.weight.data.copy_(_from_rows(qw.dequantize(), b, transposed).to(mod.weight.dtype))
        elif cfg.abits != 16:
            acts[p.b] = ("uniform", step_b.reshape(()), None)
        rows = _as_rows(b, transposed) if p.weight else None
        log.append({"place": p.out, "step_a": float(step_a.reshape(())),
                    "weight_rel_err": float((records[p.b].dequantize() - rows).norm() / rows.norm())
                    if p.weight else None})  # fmt: skip
        for n in (p.a,) if p.weight else (p.a, p.b):
            if n in acts:
                kind, step, off = acts[n]
                model_mods[n].register_forward_pre_hook(ActQuant(kind, step, cfg.abits, off))


class SamPTQ(BlockwiseMethod):
    """Q-TinySAM's scale search over the image encoder's blocks on the shared pipeline: per
    block, the operands of every place are collected from the quantized stream, the scales
    searched, the weights written and the activation quantizers attached before the stream
    advances through the block."""

    def __init__(self, cfg: SamQuantConfig, grads: dict | None = None,
                 roots: list[tuple[nn.Module, str]] | None = None):  # fmt: skip
        """``roots``: per pipeline block, the module whose places it quantizes and that
        module's full name prefix in the SAM (:func:`encoder_chain`)."""
        if roots is None:
            raise SlimkitError(
                "SamPTQ needs the encoder's block roots (encoder_blocks.encoder_chain)"
            )
        self.cfg, self.grads, self.roots = cfg, grads or {}, roots
        # activation name -> (kind, step, offset of an ``offset`` grid or None)
        self.acts: dict[str, tuple[str, torch.Tensor, torch.Tensor | None]] = {}
        self.log: list[dict] = []

    def on_window(self, win: Window) -> None:
        pipe = win.pipe
        for b in win.block_ids:
            root, prefix = self.roots[b]
            places = find_places(root, prefix, self.cfg)
            if not places:  # e.g. a TinyViT's MBConv block with --no-quantize-convs
                continue
            rel = {n: n.removeprefix(prefix) for p in places for n in (p.a, p.b)}
            mods = {n: root.get_submodule(r) for n, r in rel.items()}
            caught: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
            rows = {n: p.rows for p in places for n in (p.a, p.b)}
            pipe.collect([pipe.blocks[b]], win.inputs_of(b), mods,
                         lambda n, x, c=caught, r=rows: c[n].append(
                             _select(x, r[n], self.cfg.max_rows)))  # fmt: skip
            _apply(mods, places, caught, self.grads, self.cfg, pipe.records, self.acts, self.log)


# ---------------------------------------------------------------- calibration data and task loss


def calibration_set(model, n: int, prompts: int, first: int = 0):
    """(preprocessed images, per image (point coords (P,1,2), labels (P,1), boxes (Q,4))): one
    positive point at the centre-most pixel of every other instance, the others' boxes."""
    from slimkit.sam.tinysam.evaluate import _centre
    from slimkit.sam.train import draw_scene

    size = model.cfg.img_size
    imgs, prompt_sets = [], []
    for i in range(first, first + n):
        img, masks = draw_scene(size, i)
        imgs.append(torch.as_tensor(img).permute(2, 0, 1).float())
        pts, boxes = [], []
        for j, m in enumerate(masks[:prompts]):
            if j % 2 == 0:
                pts.append(_centre(m))
            else:
                ys, xs = m.nonzero()
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        pts = torch.tensor(pts, dtype=torch.float32).reshape(-1, 1, 2)
        prompt_sets.append((pts, torch.ones(len(pts), 1, dtype=torch.long),
                            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)))  # fmt: skip
    return model.preprocess(torch.stack(imgs)), prompt_sets


def _decode_all(model, emb: torch.Tensor, prompt_sets) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mask logits, IoU predictions) of every prompt of every image, points then boxes."""
    out = []
    for e, (pts, labels, boxes) in zip(emb, prompt_sets):
        if len(pts):
            out.append(model.decode(e[None], points=(pts, labels)))
        if len(boxes):
            out.append(model.decode(e[None], boxes=boxes))
    return out


def _forward(model, images, prompt_sets, batch_size):
    outs = []
    for i in range(0, len(images), batch_size):
        emb = model.image_encoder(images[i : i + batch_size])
        outs += _decode_all(model, emb, prompt_sets[i : i + batch_size])
    return outs


@torch.no_grad()
def task_distance(model, reference, images, prompt_sets, batch_size: int = 4) -> float:
    """Mean Bernoulli KL(reference || model) of the mask logits plus that of the IoU
    predictions (after a sigmoid) on the calibration prompts: the objective the task-aware
    search approximates."""

    def kl(p_logit, q_logit):
        p, lp = torch.sigmoid(p_logit), nn.functional.logsigmoid
        return (p * (lp(p_logit) - lp(q_logit))
                + (1 - p) * (lp(-p_logit) - lp(-q_logit))).mean()  # fmt: skip

    ref = _forward(reference, images, prompt_sets, batch_size)
    got = _forward(model, images, prompt_sets, batch_size)
    vals = [kl(rm, qm) + kl(ri, qi) for (rm, ri), (qm, qi) in zip(ref, got)]
    return float(torch.stack(vals).mean())


def fisher_grads(model, images, prompt_sets, places: list[Place], cfg: SamQuantConfig) -> dict:
    """Place output -> the task-loss gradient at the FP model's output of that place (rows
    selected as the operands will be): the gradient of the log-likelihood of labels drawn from
    the model's own Bernoulli mask and IoU outputs."""
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(0)
    calls: dict[str, list] = {p.out: [] for p in places}
    rows = {p.out: p.rows for p in places}

    def fwd_hook(name):
        def hook(module, args, out):
            slot = calls[name]
            slot.append(None)
            i = len(slot) - 1

            def grad_hook(g):
                slot[i] = _select(g, rows[name], cfg.max_rows)

            out.register_hook(grad_hook)

        return hook

    handles = [mods[n].register_forward_hook(fwd_hook(n)) for n in calls]
    was = model.training
    model.eval()
    # every place's output must carry a gradient, those of the prompt-only paths too
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            for i in range(0, len(images), cfg.batch_size):
                x = images[i : i + cfg.batch_size].clone().requires_grad_(True)
                emb = model.image_encoder(x)
                loss = 0.0
                for masks, iou in _decode_all(model, emb, prompt_sets[i : i + cfg.batch_size]):
                    for logit in (masks, iou):
                        t = torch.bernoulli(torch.sigmoid(logit.detach()), generator=gen)
                        loss = loss + nn.functional.binary_cross_entropy_with_logits(
                            logit, t, reduction="sum")  # fmt: skip
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(False)
        model.train(was)
    return calls


def _check_encoder(model) -> None:
    from slimkit.sam.tinysam.encoder_blocks import encoder_chain

    encoder_chain(model.image_encoder)  # refuses an encoder without a block map


@torch.no_grad()
def quantize_model(model, cfg: SamQuantConfig, calib=None) -> tuple[dict, dict]:
    """Quantize ``model`` in place; returns (weight records, activation steps), keyed by the
    full module names. ``calib``: (preprocessed images, prompt sets) of :func:`calibration_set`
    (default: ``cfg.calib_images`` training scenes)."""
    from slimkit.llm.pipeline import BlockwisePipeline, PipelineOptions
    from slimkit.sam.tinysam.encoder_blocks import chain_block_map, encoder_chain

    chain, roots = encoder_chain(model.image_encoder)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    images, prompt_sets = calib or calibration_set(
        model, cfg.calib_images, cfg.calib_prompts, cfg.calib_seed
    )
    enc_places = [p for root, prefix in roots for p in find_places(root, prefix, cfg)]
    dec_places = find_places(model.mask_decoder, "mask_decoder.", cfg) if cfg.decoder else []
    grads = {}
    if cfg.search == "task":
        grads = fisher_grads(model, images, prompt_sets, enc_places + dec_places, cfg)
    pipe = BlockwisePipeline(chain, images, PipelineOptions(batch_size=cfg.batch_size, device="cpu"),
                             block_map=chain_block_map())  # fmt: skip
    method = SamPTQ(cfg, grads, roots)
    pipe.run(method)
    records, acts = dict(pipe.records), dict(method.acts)
    if dec_places:
        mods = dict(model.named_modules())
        names = {n: p.rows for p in dec_places for n in (p.a, p.b)}
        caught: dict[str, list] = {n: [] for n in names}
        handles = [mods[n].register_forward_pre_hook(
            lambda m, args, _n=n: caught[_n].append(_select(args[0], names[_n], cfg.max_rows)))
            for n in names]  # fmt: skip
        try:
            _forward(model, images, prompt_sets, cfg.batch_size)
        finally:
            for h in handles:
                h.remove()
        _apply(mods, dec_places, caught, grads, cfg, records, acts, method.log)
    model.quant_log = method.log
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
    _check_encoder(model)
    fp = copy.deepcopy(model).eval()
    calib = calibration_set(model, cfg.calib_images, cfg.calib_prompts, cfg.calib_seed)
    records, acts = quantize_model(model, cfg, calib)
    kl = task_distance(model, fp, *calib, batch_size=cfg.batch_size)
    with atomic_output(out, overwrite=overwrite) as tmp:
        save_quantized(model, records, acts, cfg, tmp)
        shutil.copy(run / "sam_config.json", tmp / "sam_config.json")
    return {"out": str(out), "layers": len(records), "act_points": len(acts),
            "calib_task_kl": kl, **asdict(cfg)}  # fmt: skip


def save_quantized(model, records: dict, acts: dict, cfg: SamQuantConfig, path: Path) -> None:
    from safetensors.torch import save_file

    tensors, layers, convs = {}, [], []
    qkeys = {f"{n}.weight": n for n in records}
    for k, v in model.state_dict().items():
        if k in qkeys:
            qw = records[qkeys[k]]
            if qw.scale.shape[1] != 1 or not torch.all(qw.zero == 2 ** (cfg.wbits - 1)):
                raise SlimkitError(f"{k}: expected a symmetric per-channel grid")
            codes = (qw.codes.to(torch.int16) - 2 ** (cfg.wbits - 1)).to(torch.int8)
            scale = qw.scale.float()
            if v.ndim == 4:  # a conv: codes in the weight's layout, scale broadcast per channel
                t = isinstance(model.get_submodule(qkeys[k]), nn.ConvTranspose2d)
                codes = _from_rows(codes, v, t)
                scale = scale.reshape((1, -1, 1, 1) if t else (-1, 1, 1, 1))
                convs.append(k)
            tensors[k + ".int8"] = codes.contiguous()
            tensors[k + ".scale"] = scale.contiguous()
            layers.append(k)
        else:
            tensors[k] = v.detach().cpu().contiguous()
    for n, (_, step, off) in acts.items():
        tensors[f"act.{n}.step"] = step.float().reshape(1).contiguous()
        if off is not None:
            tensors[f"act.{n}.offset"] = off.float().reshape(1).contiguous()
    save_file(tensors, str(path / "quant.safetensors"))
    meta = {"format": "slimkit-sam-w8a8", **asdict(cfg), "weights": layers, "convs": convs,
            "acts": {n: kind for n, (kind, *_) in acts.items()},
            "note": "int8 weight codes (w = int8 * scale per output channel) and activation "
                    "steps (x = code * step + offset on an offset grid)",
            "conv_kernel": CONV_KERNEL_NOTE if convs else None}  # fmt: skip
    (path / "quant.json").write_text(json.dumps(meta, indent=1) + "\n")


# ---------------------------------------------------------------- int8 kernels

CONV_KERNEL_NOTE = (
    "convolutions run fake-quant (int8 codes x scales dequantized to float, inputs rounded on "
    "their grid): PyTorch has no int8 x int8 convolution for plain tensors; its quantized-tensor "
    "convolution (torch.ao, x86 / fbgemm engine) runs on the CPU and was 2-23x faster than fake "
    "quant on one thread (benchmarks/results/q_tinysam_conv_kernels.md), but it re-quantizes "
    "every output to 8 bits, a rounding this W8A8 model does not have, and is deprecated"
)


class Int8Linear(nn.Module):
    """A W8A8 linear run as integer matmuls: the input rounded to int8 codes on its static grid
    (uniform, or the two halves of the twin-GELU grid), ``torch._int_mm`` (int8 x int8 ->
    int32), then the float scales. Where ``torch._int_mm`` refuses the shapes or the device,
    the same integer product is taken in float (``kernel`` says which ran last)."""

    def __init__(self, w_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 kind: str, step: torch.Tensor, bits: int):  # fmt: skip
        super().__init__()
        if kind not in ("uniform", "twin_gelu"):
            raise SlimkitError(f"no integer kernel for a {kind} input")
        self.register_buffer("w_t", w_int8.t().contiguous())  # (in, out) int8
        self.register_buffer("scale", scale.float().reshape(1, -1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.kind, self.step, self.bits = kind, float(step), bits
        self.kernel = "none"

    def _mm(self, q: torch.Tensor) -> torch.Tensor:
        try:
            out = torch._int_mm(q, self.w_t).float()
            self.kernel = "int_mm"
            return out
        except (RuntimeError, NotImplementedError):
            self.kernel = "float"
            return q.float() @ self.w_t.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        q = 2 ** (self.bits - 1)
        if self.kind == "uniform":
            codes = torch.clamp(torch.round(x2 / self.step), -q, q - 1).to(torch.int8)
            y = self._mm(codes) * (self.step * self.scale)
        else:
            neg = 0.16997 / q
            pos = torch.clamp(torch.round(x2.clamp(min=0) / self.step), 0, q - 1).to(torch.int8)
            ngc = torch.clamp(torch.round(x2.clamp(max=0) / neg), -q, 0).to(torch.int8)
            y = self._mm(pos) * (self.step * self.scale) + self._mm(ngc) * (neg * self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1).to(x.dtype)


def load_quantized(path: str | Path, int8_kernels: bool = False):
    """Rebuild a quantized SAM from ``quant.safetensors`` (no unpickling); ``int8_kernels``:
    run the linears with a uniform or twin-GELU input grid as :class:`Int8Linear`."""
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
        sd[k] = t[k + ".scale"] * (t[k + ".int8"].float())  # broadcast per output channel
    load_into(model, sd, str(d))
    mods = dict(model.named_modules())
    replaced = set()
    if int8_kernels:
        for k in meta["weights"]:
            name = k.removesuffix(".weight")
            kind = meta["acts"].get(name)
            if kind not in ("uniform", "twin_gelu") or not isinstance(mods[name], nn.Linear):
                continue
            lin = mods[name]
            new = Int8Linear(t[k + ".int8"], t[k + ".scale"], lin.bias, kind,
                             t[f"act.{name}.step"], meta["abits"])  # fmt: skip
            parent, _, child = name.rpartition(".")
            setattr(mods[parent], child, new)
            replaced.add(name)
    for n, kind in meta["acts"].items():
        if n not in replaced:
            mods[n].register_forward_pre_hook(ActQuant(kind, t[f"act.{n}.step"], meta["abits"],
                                                       t.get(f"act.{n}.offset")))  # fmt: skip
    return model.eval()


def int8_kernel_report(model) -> dict:
    """How many linears ran which kernel in the last forward pass, and how many quantized
    convolutions run fake-quant (``fake_quant_conv``: see ``CONV_KERNEL_NOTE``)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Int8Linear):
            out[m.kernel] = out.get(m.kernel, 0) + 1
        elif isinstance(m, CONVS) and any(
            isinstance(h, ActQuant) for h in m._forward_pre_hooks.values()
        ):
            out["fake_quant_conv"] = out.get("fake_quant_conv", 0) + 1
    return out


# ---------------------------------------------------------------- the compression registry


def _register() -> None:
    from slimkit.llm.compress import (
        COMPRESSION_METHODS,
        CompressionResult,
        register_compression_method,
        register_entry_point,
    )

    if "q-tinysam" in COMPRESSION_METHODS:
        return
    register_compression_method(
        "q-tinysam", SamQuantConfig, kind="sam-quantization",
        help="Q-TinySAM W8A8 of a SAM's ViT / TinyViT encoder and mask decoder",
    )(SamPTQ)  # fmt: skip

    def compress_sam(model, config: SamQuantConfig, calib=None, **kw):
        """``slimkit.compress(sam, SamQuantConfig(...), calib)``: ``calib`` is
        (preprocessed images, prompt sets) as :func:`calibration_set` returns (None: the
        config's training scenes)."""
        if kw:
            raise SlimkitError(f"q-tinysam takes no options {sorted(kw)}")
        records, acts = quantize_model(model, config, calib)
        report = {"method": "q-tinysam", "scheme": config.scheme(), "layers": len(records),
                  "act_points": len(acts), "places": model.quant_log}  # fmt: skip
        quant = {"method": "q-tinysam", "config": config, "records": records, "act_params": acts}
        return model, CompressionResult(report, quantization=quant)

    register_entry_point("sam-quantization", compress_sam)


_register()


def _view():
    from slimkit.llm.compress import COMPRESSION_METHODS

    return COMPRESSION_METHODS.where("SAM quantization method", kind="sam-quantization")


SAM_QUANT_METHODS = _view()  # the registry's view of this kind
