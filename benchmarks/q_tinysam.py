"""Q-TinySAM on CPU at toy scale: W8A8 of a SAM (image encoder + mask decoder + attention
matmuls + convolutions) with three quantizer variants, and integer vs fake-quant linears.

Model: `vit_mini` (0.97 M-parameter ViT encoder, 256 px) trained on generated scenes with
`slimkit sam train` (recipes/sam/shapes-small.yaml, fewer steps). Variants, all W8A8 with
per-channel weights and static per-tensor activations, 8 calibration scenes from the training
seeds (three disjoint calibration sets = three seeds):

  uniform         plain symmetric min-max grids everywhere (search: minmax)
  twin            twin-uniform post-softmax / post-GELU quantizers (search: minmax; the twin
                  steps minimise their own squared error)
  twin + mse      twin, alternating weight / activation scale search on the layer output MSE
  twin + task     twin, the same search on the Hessian-guided (Fisher-sampled mask + IoU) task
                  objective: Q-TinySAM's recipe

Numbers: mIoU (one centre point, 5 interactive points, tight box) on held-out generated scenes
(seeds 3,000,000+), the calibration task KL to the FP model, seconds per image (fake-quant, one
thread). The convolutions (patch embedding, neck, the decoder's transposed convs) are quantized
too unless --no-quantize-convs (the published results/q_tinysam.md predates their quantization:
its numbers are those of --no-quantize-convs). Nothing is tuned: the search uses the paper's [0.01, 1.2] range with fewer candidates
(--search-points) and rounds than the paper's 100 x 3 to fit the CPU budget.

Integer kernels: one linear at the ViT-B shape (4096 tokens, 768 -> 3072 and 3072 -> 768 with the
twin-GELU input) and at the toy shape, `torch._int_mm` vs the fake-quant float path.

    python benchmarks/q_tinysam.py --teacher-steps 400 --test-scenes 6
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, mean_std  # noqa: E402
from tinysam import ensure_teacher  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "tinysam"

VARIANTS = {
    "uniform": {"act_quantizer": "uniform", "search": "minmax"},
    "twin": {"act_quantizer": "twin", "search": "minmax"},
    "twin + mse search": {"act_quantizer": "twin", "search": "mse"},
    "twin + task search": {"act_quantizer": "twin", "search": "task"},
}


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def kernel_timing(reps: int = 3) -> list[dict]:
    """Seconds of one W8A8 linear: fake quant (round the input in float, float matmul with the
    dequantized weight) vs Int8Linear (torch._int_mm)."""
    from slimkit.sam.tinysam import quant as Q

    rows = []
    for label, (m, k, n), kind in (
        ("ViT-B lin1 (4096 x 768 -> 3072)", (4096, 768, 3072), "uniform"),
        ("ViT-B lin2, twin-GELU input (4096 x 3072 -> 768)", (4096, 3072, 768), "twin_gelu"),
        ("vit_mini lin1 (256 x 128 -> 512)", (256, 128, 512), "uniform"),
    ):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g)
        if kind == "twin_gelu":
            x = torch.nn.functional.gelu(x)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scale = torch.rand(n, 1, generator=g) * 1e-2
        step = torch.tensor(float(x.abs().max()) / 127)
        fake_hook = Q.ActQuant(kind, step, 8)
        w = scale * w8.float()
        lin = Q.Int8Linear(w8, scale, torch.zeros(n), kind, step, 8)

        def fake_fn(x=x, hook=fake_hook, w=w):
            return torch.nn.functional.linear(hook(None, (x,))[0], w)

        def real_fn(x=x, lin=lin):
            return lin(x)

        with torch.no_grad():
            fake, real = _time(fake_fn, reps), _time(real_fn, reps)
            err = float((real_fn() - fake_fn()).abs().max())
        rows.append({"layer": label, "fake_quant_s": fake, "int8_s": real, "kernel": lin.kernel,
                     "speedup": fake / real, "max_abs_diff": err})  # fmt: skip
    return rows


@torch.no_grad()
def agreement(model, ref, images, prompt_sets) -> float:
    """Mean IoU between the quantized and the FP model's highest-scored masks (binarised
    low-resolution logits) over held-out prompts: fidelity to the FP model."""
    from slimkit.sam.tinysam.quant import _forward

    ious = []
    for (rm, ri), (qm, qi) in zip(_forward(ref, images, prompt_sets, 4),
                                  _forward(model, images, prompt_sets, 4)):  # fmt: skip
        idx = torch.arange(len(rm))
        a, b = rm[idx, ri.argmax(1)] > 0, qm[idx, qi.argmax(1)] > 0
        inter, union = (a & b).flatten(1).sum(1), (a | b).flatten(1).sum(1)
        ious += torch.where(union > 0, inter / union.clamp(min=1), 1.0).tolist()
    return sum(ious) / len(ious)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", help="an existing `slimkit sam train` run (default: train one)")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2", help="calibration sets (scenes 8s..8s+7)")
    ap.add_argument("--calib-images", type=int, default=8)
    ap.add_argument("--search-points", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-rows", type=int, default=512)
    ap.add_argument("--test-scenes", type=int, default=6)
    ap.add_argument("--quantize-convs", action=argparse.BooleanOptionalAction, default=True,
                    help="W8A8 of the convolutions too (the paper quantizes every layer)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    from slimkit.sam.tinysam import quant as Q
    from slimkit.sam.tinysam.evaluate import (
        TEST_SEED,
        complexity,
        evaluate_prompts,
        validation_scenes,
    )
    from slimkit.sam.train import load_trained

    t_start = time.time()
    CACHE.mkdir(parents=True, exist_ok=True)
    teacher = ensure_teacher(args.teacher, args.teacher_steps)
    test = validation_scenes(256, args.test_scenes, TEST_SEED)
    fp_model = load_trained(teacher).eval()
    fp = evaluate_prompts(fp_model, test)
    cx = complexity(fp_model)
    print("FP32", fp, flush=True)
    # held-out prompts for the fidelity columns: the test scenes' instances (points / boxes)
    held_out = Q.calibration_set(fp_model, args.test_scenes, 8, TEST_SEED)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[dict]] = {}
    for name, opts in VARIANTS.items():
        rows[name] = []
        for seed in seeds:
            cfg = Q.SamQuantConfig(wbits=8, abits=8, calib_images=args.calib_images,
                                   calib_seed=seed * args.calib_images,
                                   search_points=args.search_points, rounds=args.rounds,
                                   max_rows=args.max_rows, quantize_convs=args.quantize_convs,
                                   **opts)  # fmt: skip
            model = load_trained(teacher)
            calib = Q.calibration_set(model, cfg.calib_images, cfg.calib_prompts, cfg.calib_seed)
            t0 = time.perf_counter()
            Q.quantize_model(model, cfg, calib)
            qsec = time.perf_counter() - t0
            kl = Q.task_distance(model, fp_model, *calib)
            r = {"seed": seed, "quantize_seconds": qsec, "calib_task_kl": kl,
                 "test_task_kl": Q.task_distance(model, fp_model, *held_out),
                 "iou_to_fp": agreement(model, fp_model, *held_out),
                 **evaluate_prompts(model.eval(), test)}  # fmt: skip
            rows[name].append(r)
            print(name, r, flush=True)
    kernels = kernel_timing()
    for k in kernels:
        print(k, flush=True)
    total = time.time() - t_start
    rep = teacher / "report.json"
    teacher_cmd = (json.loads(rep.read_text()).get("command") if rep.is_file() else None) or str(
        teacher
    )
    cmd = "python benchmarks/q_tinysam.py " + shlex.join(sys.argv[1:])
    res = {"command": cmd.strip(), "machine": machine_line(), "seconds": total, "args": vars(args),
           "fp32": fp, "complexity": cx, "variants": rows, "kernels": kernels}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "q_tinysam.json").write_text(json.dumps(res, indent=1, default=float) + "\n")

    def ms(runs, key, fmt="{:.3f}"):
        return mean_std([r[key] for r in runs], fmt)

    lines = [
        "# Q-TinySAM at toy scale: W8A8 quantizer variants and integer kernels",
        "",
        f"Command: `{cmd.strip()}` ({total / 60:.1f} min, one thread)  ",
        machine_line(),
        "",
        f"Model: `vit_mini` trained with `{teacher_cmd}` (encoder {cx['params_encoder'] / 1e6:.3f} M "
        f"params, {cx['macs_encoder'] / 1e9:.3f} G MACs = {cx['flops_encoder'] / 1e9:.3f} G FLOPs "
        f"per image; prompt encoder + decoder {cx['params_decoder'] / 1e6:.3f} M params, "
        f"{cx['macs_decoder_per_prompt'] / 1e6:.2f} M MACs per prompt). W8A8 of every linear of "
        "the encoder and the mask decoder and of both attention matmuls"
        f"{' and of every convolution' if args.quantize_convs else ' (convolutions in float)'}; "
        f"{args.calib_images} calibration scenes per seed (disjoint training scenes), "
        f"{args.search_points} candidates x {args.rounds} rounds for the searches. Test: "
        f"{args.test_scenes} held-out generated scenes ({fp['instances']} instances). "
        "Mean ± std over the calibration seeds; seconds per image are fake-quant on a shared CPU.",
        "",
        "Fidelity columns (on the test scenes' prompts: one centre point for every other "
        "instance, the boxes of the others): task KL to the FP model (mask logits + IoU, the "
        "objective the task-aware search approximates) and the IoU of the quantized model's "
        "best mask with the FP model's.",
        "",
        "| variant | mIoU 1 point | mIoU 5 points | mIoU box | task KL to FP, test | IoU to FP masks, test | task KL, calibration | s / image | quantize s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| FP32 | {fp['miou_1pt']:.3f} | {fp['miou_5pt']:.3f} | {fp['miou_box']:.3f} | 0 | 1 | 0 | "
        f"{fp['seconds_per_image']:.3f} | | |",
    ]
    for name, runs in rows.items():
        lines.append(f"| W8A8 {name} | {ms(runs, 'miou_1pt')} | {ms(runs, 'miou_5pt')} | "
                     f"{ms(runs, 'miou_box')} | {ms(runs, 'test_task_kl', '{:.2e}')} | "
                     f"{ms(runs, 'iou_to_fp')} | {ms(runs, 'calib_task_kl', '{:.2e}')} | "
                     f"{ms(runs, 'seconds_per_image')} | {ms(runs, 'quantize_seconds', '{:.0f}')} | "
                     f"{len(runs)} |")  # fmt: skip
    lines += ["", "## One W8A8 linear: integer matmul vs fake quant (one thread)", "",
              "| layer | fake quant s | int8 s | speed-up | kernel | max abs diff |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for k in kernels:
        lines.append(f"| {k['layer']} | {k['fake_quant_s']:.4f} | {k['int8_s']:.4f} | "
                     f"{k['speedup']:.2f}x | {k['kernel']} | {k['max_abs_diff']:.2e} |")  # fmt: skip
    (RESULTS / "q_tinysam.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
