"""Is there a real int8 convolution on the CPU for Q-TinySAM's convolutions? One thread.

For convolutions of TinySAM's `vit_t` at 1024 px (and its decoder's first transposed conv), the
W8A8 conv that slimkit runs (fake quant: the input rounded on its per-tensor offset grid, a
float conv with the int8 weights x per-output-channel scales) against PyTorch's quantized-tensor
convolution (`torch.ao.nn.quantized.functional.conv2d` on the x86 / fbgemm engine: quint8
input, qint8 per-channel weight, int32 accumulation, deprecated). The quint8 input takes the
offset grid exactly when offset / step is an integer; here the zero point is rounded (a shift of
at most half a step). Its output is re-quantized to quint8 (here on the output's min-max range),
a rounding the fake-quant model does not have: "rel. error" is max |int8 - fake| / max |fake|.

    python benchmarks/q_tinysam_conv_kernels.py
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# (label, in, out, kernel, stride, padding, groups, input size): vit_t at 1024 px
CONVS = [
    ("patch_embed.seq.0 (3 -> 32, 3x3 s2, 1024^2)", 3, 32, 3, 2, 1, 1, 1024),
    ("MBConv conv1 (64 -> 256, 1x1, 256^2)", 64, 256, 1, 1, 0, 1, 256),
    ("MBConv conv2 (256 depthwise 3x3, 256^2)", 256, 256, 3, 1, 1, 256, 256),
    ("neck.2 (256 -> 256, 3x3, 64^2)", 256, 256, 3, 1, 1, 1, 64),
]


def _time(fn, reps: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


@torch.no_grad()
def measure(label, cin, cout, k, stride, pad, groups, size) -> dict:
    from slimkit.sam.tinysam import quant as Q

    g = torch.Generator().manual_seed(0)
    x = F.gelu(torch.randn(1, cin, size, size, generator=g))  # a post-GELU input
    w = torch.randn(cout, cin // groups, k, k, generator=g) * 0.1
    scale = w.abs().amax((1, 2, 3), keepdim=True) / 127
    w8 = torch.round(w / scale).clamp(-128, 127)
    off = Q.act_offset(x)
    step = (x.max() - x.min()) / 2 / 127
    hook = Q.ActQuant("offset", step, 8, off)

    def fake():
        return F.conv2d(hook(None, (x,))[0], w8 * scale, None, stride, pad, 1, groups)

    row = {"conv": label, "fake_quant_s": _time(fake)}
    try:
        import torch.ao.nn.quantized.functional as qF

        zp = int(torch.clamp(torch.round(128 - off / step), 0, 255))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qx = torch.quantize_per_tensor(x, float(step), zp, torch.quint8)
            qw = torch.quantize_per_channel(w8 * scale, scale.flatten().double(),
                                            torch.zeros(cout, dtype=torch.long), 0, torch.qint8)  # fmt: skip
            ref = fake()
            o_scale = float(ref.max() - ref.min()) / 255
            o_zp = int(torch.clamp(torch.round(-ref.min() / o_scale), 0, 255))

            def real():
                return qF.conv2d(qx, qw, None, stride, pad, 1, groups, scale=o_scale,
                                 zero_point=o_zp)  # fmt: skip

            row["int8_s"] = _time(real)
            row["rel_error"] = float((real().dequantize() - ref).abs().max() / ref.abs().max())
        row["speedup"] = row["fake_quant_s"] / row["int8_s"]
    except (RuntimeError, ImportError, NotImplementedError) as e:
        row["int8_s"] = None
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return row


def transposed_available() -> str:
    """Whether the quantized engine runs a transposed conv (the decoder's upscaling)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qx = torch.quantize_per_tensor(torch.rand(1, 8, 4, 4), 0.01, 0, torch.quint8)
            qw = torch.quantize_per_tensor(torch.randn(8, 4, 2, 2) * 0.1, 0.01, 0, torch.qint8)
            packed = torch.ops.quantized.conv_transpose2d_prepack(qw, None, [2, 2], [0, 0], [0, 0],
                                                                 [1, 1], 1)  # fmt: skip
            torch.ops.quantized.conv_transpose2d(qx, packed, 0.01, 0)
        return "runs"
    except Exception as e:  # noqa: BLE001 - report whatever the engine says
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.time()
    rows = [measure(*c) for c in CONVS]
    convt = transposed_available()
    cmd = "python benchmarks/q_tinysam_conv_kernels.py " + shlex.join(sys.argv[1:])
    res = {"command": cmd.strip(), "machine": machine_line(), "torch": torch.__version__,
           "engine": torch.backends.quantized.engine, "rows": rows,
           "conv_transpose2d": convt, "seconds": time.time() - t0}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "q_tinysam_conv_kernels.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["# Q-TinySAM convolutions: fake quant vs PyTorch's quantized-tensor conv (CPU)", "",
             f"Command: `{cmd.strip()}` ({res['seconds']:.0f} s, one thread)  ", machine_line(),
             f"  \nQuantized engine: `{res['engine']}`; transposed conv: {convt}.", "",
             "| conv | fake quant s | quantized-tensor int8 s | speed-up | rel. error |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.get("int8_s") is None:
            lines.append(f"| {r['conv']} | {r['fake_quant_s']:.4f} | {r['error']} | | |")
            continue
        lines.append(f"| {r['conv']} | {r['fake_quant_s']:.4f} | {r['int8_s']:.4f} | "
                     f"{r['speedup']:.2f}x | {r['rel_error']:.2e} |")  # fmt: skip
    (RESULTS / "q_tinysam_conv_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
