"""SmolLM2-135M on llama.cpp's Q3_K_M and Q2_K mixes: a reference round-to-nearest
file (llama.cpp's reference quantizer, as the `gguf` package ports it, for the 32-block tensors)
against slimkit RTN and GPTQ on exactly the same per-tensor types (`--grid llama.cpp:FTYPE`).

Every model is evaluated as its GGUF file stores it: the same tensor types, the tied embedding in
Q8_0 (llama.cpp's choice for width 576), so all three files of a type have the same size; the
GPTQ run is exported with `--verify` (transformers' GGUF reader gives back its weights bit for
bit). The gguf package has no K-quant quantizer, so the reference's K-quant tensors (the 1536-wide
down projections, 30 of 210 linears) are slimkit's RTN; llama.cpp's own K-quant quantizer
searches sub-block scales more and is not run here (llama-cpp-python is not installed).

    OMP_NUM_THREADS=1 python benchmarks/gguf_kquants.py     # about 8 min of one core
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "gguf_kquants"
MODEL = "smollm2-135m"
FTYPES = ["q3_k_m", "q2_k"]
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
N_EVAL, N_CALIB, CALIB_LEN, SEED = 4, 8, 512, 0
DATASETS = ("wiki-offline",)  # one: a 4-window evaluation costs ~1 min of one loaded core
GPTQ_FTYPES = ("q3_k_m", "q2_k")  # GPTQ where the low-bit types need it most (CPU budget)
# sizes of llama.cpp's own files of this model (llama_model_quantize of its F16 GGUF), as reported
# in the issue this benchmark answers (not measured here: llama.cpp is not installed)
LLAMA_CPP_MB = {"q4_k_m": 105.0, "q3_k_m": 93.5, "q2_k": 88.0}


def _deq(raw: np.ndarray, kind: str, shape) -> torch.Tensor:
    import gguf

    x = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind.upper()))
    return torch.from_numpy(np.ascontiguousarray(x)).reshape(shape).float()


def _store_embedding(model) -> None:
    """The tied 576-wide embedding as the file holds it: Q8_0 of its F16 values."""
    import gguf

    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        raw = gguf.quants.quantize(
            emb.detach().half().float().numpy(), gguf.GGMLQuantizationType.Q8_0
        )
        emb.copy_(_deq(raw, "q8_0", emb.shape))


def _reference(ftype: str):
    """llama.cpp-style RTN of the F16 weights on the mix's per-tensor types."""
    import gguf

    import slimkit
    from slimkit.llm.block_maps import get_module
    from slimkit.quant.methods.base import layer_specs
    from slimkit.quant.quantizer import quantize_weight

    model, tok = slimkit.load_model(MODEL)
    specs = layer_specs(model, slimkit.RTNConfig(grid=f"llama.cpp:{ftype}"))
    with torch.no_grad():
        for name, spec in specs.items():
            m = get_module(model, name)
            w = m.weight.detach().half().float()
            if spec.grid in LEGACY:
                raw = gguf.quants.quantize(
                    w.numpy(), getattr(gguf.GGMLQuantizationType, spec.grid.upper())
                )
                m.weight.copy_(_deq(raw, spec.grid, w.shape))
            else:
                m.weight.copy_(quantize_weight(w, spec).dequantize())
    return model, tok, {s.grid for s in specs.values()}


def main() -> None:
    import slimkit
    from slimkit.data import calibration_windows, eval_windows
    from slimkit.export import ExportConfig, export

    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    base, tok = slimkit.load_model(MODEL)
    evals = {d: eval_windows(tok, d, 512, max_windows=N_EVAL) for d in DATASETS}

    def ppl(model) -> dict:
        return {d: round(slimkit.perplexity(model, w)["ppl"], 3) for d, w in evals.items()}

    rows = [{"ftype": "-", "method": "FP32", **ppl(base), "size_mb": None, "seconds": 0}]
    print(rows[-1], flush=True)
    calib = calibration_windows(tok, "wiki-offline", N_CALIB, CALIB_LEN, seed=SEED)
    for ftype in FTYPES:
        t0 = time.time()
        ref, _, types = _reference(ftype)
        secs = time.time() - t0
        _store_embedding(ref)
        rows.append({"ftype": ftype, "method": "reference RTN", **ppl(ref), "seconds": round(secs)})
        print(rows[-1], flush=True)
        methods = [("slimkit RTN", slimkit.RTNConfig(grid=f"llama.cpp:{ftype}"))]
        if ftype in GPTQ_FTYPES:
            methods.append(("slimkit GPTQ", slimkit.GPTQConfig(grid=f"llama.cpp:{ftype}")))
        for method, cfg in methods:
            model, _ = slimkit.load_model(MODEL)
            t0 = time.time()
            model, res = slimkit.quantize(model, cfg, calib)
            secs = time.time() - t0
            row = {"ftype": ftype, "method": method, "seconds": round(secs)}
            if method == "slimkit GPTQ" or ftype not in GPTQ_FTYPES:  # one file per type
                run = CACHE / f"{method.split()[-1].lower()}-{ftype}"
                slimkit.save_quantized(model, tok, run, res)
                out = CACHE / f"{run.name}.gguf"
                r = export(run, out, ExportConfig(format="gguf"), overwrite=True)
                row["size_mb"] = round(out.stat().st_size / 1e6, 1)
                row["types"] = sorted(r["gguf_types"])
            _store_embedding(model)
            row.update(ppl(model))
            rows.append(row)
            print(rows[-1], flush=True)
        for r in rows:
            if r["ftype"] == ftype and "size_mb" not in r:
                r["size_mb"] = next(
                    x["size_mb"] for x in rows if x.get("types") and x["ftype"] == ftype
                )
    cmd = "OMP_NUM_THREADS=1 python benchmarks/gguf_kquants.py"
    (RESULTS / "gguf_kquants.json").write_text(
        json.dumps({"machine": machine_line(), "command": cmd, "n_eval_windows": N_EVAL,
                    "calib": [N_CALIB, CALIB_LEN, SEED], "rows": rows}, indent=1) + "\n"
    )  # fmt: skip
    lines = [
        "# SmolLM2-135M on llama.cpp's K-quant mixes: reference RTN vs slimkit RTN / GPTQ on the same grid",
        "",
        f"{machine_line()} Model: {MODEL} (30 layers, widths 576 / 1536, tied embedding).",
        f"Command: `{cmd}` (one thread). Perplexity: GPTQ protocol, first {N_EVAL} windows of 512 "
        "tokens of the wiki-offline test split (one dataset, 4 windows: CPU budget on a loaded 2-core machine); GPTQ calibration: "
        f"{N_CALIB} windows x {CALIB_LEN} tokens of the wiki-offline train split, seed {SEED} "
        "(one seed: CPU budget). Every model is evaluated with the numbers its GGUF file stores "
        "(tied embedding in Q8_0 as llama.cpp stores it).",
        "",
        "| file type | method | size MB | llama.cpp's file MB | wiki-offline ppl | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = "-" if r.get("size_mb") is None else f"{r['size_mb']:.1f}"
        ref_mb = LLAMA_CPP_MB.get(r["ftype"])
        lines.append(
            f"| {r['ftype'].upper()} | {r['method']} | {size} | {ref_mb or '-'} | "
            f"{r['wiki-offline']:.3f} | {r['seconds']} |"
        )
    lines += [
        "",
        "Types written: "
        + "; ".join(
            f"{r['ftype'].upper()}: {', '.join(r['types'])}" for r in rows if r.get("types")
        ),
        "",
        '"reference RTN": llama.cpp\'s reference quantizer (`quantize_row_*_ref`, as the gguf '
        "package ports it) for the 32-block tensors, which are 180 of the 210 linears here "
        "(width 576 is not a multiple of 256), and slimkit's round to nearest for the K-quant "
        "down projections (the gguf package has no K-quant quantizer). All three rows of a type "
        "hold the same tensor types, hence the same size (one file exported per type). The column "
        "\"llama.cpp's file MB\" is llama.cpp's own file of this model as reported in the issue "
        "(not measured here). That slimkit's files read back bit for bit through gguf's "
        "dequantizer is checked by tests/test_gguf_grids.py (here: `export` without `--verify`, "
        "CPU budget). GPTQ ran on Q3_K_M and Q2_K only (CPU budget).",
    ]
    (RESULTS / "gguf_kquants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
