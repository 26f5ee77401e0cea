"""`make demo`: quantize the embedded SmolLM2-135M with GPTQ W4A16 g64 and compare perplexity.

The demo preset is small so that it finishes in a few minutes on 2 CPU cores: 16 calibration
windows of 512 tokens from wiki-offline (train split) and 20 evaluation windows of 512 tokens
from the wiki-offline test split. Group size 64, not 32: the embedded model already lies on a
4-bit grid with blocks of 32, so 4-bit g32 would be artificially lossless.
"""

from __future__ import annotations

from slimkit.llm.run_config import CalibConfig, EvalConfig
from slimkit.llm.workflow import quantize_run
from slimkit.quant.methods import GPTQConfig

DEMO_MODEL = "smollm2-135m"


def run_demo(out: str) -> dict:
    qcfg = GPTQConfig(wbits=4, group_size=64)
    calib = CalibConfig(calib="wiki-offline", n_calib=16, calib_seq_len=512, seed=0)
    ev = EvalConfig(ppl="wiki-offline", seq_len=512, max_windows=20)
    report = quantize_run(
        DEMO_MODEL,
        qcfg,
        calib,
        ev,
        out=out,
        overwrite=True,
        eval_fp=True,
        command=f"slimkit quantize {DEMO_MODEL} --method gptq --wbits 4 --group-size 64 --n-calib 16 "
        f"--ppl wiki-offline --max-windows 20 --eval-fp --out {out}",
    )
    r = report["eval"]["wiki-offline"]
    print()
    print(f"SmolLM2-135M (embedded), {r['protocol']}")
    print()
    print("| model | wiki-offline ppl |")
    print("|---|---|")
    print(f"| FP32 | {r['fp']['ppl']:.3f} |")
    print(f"| GPTQ W4A16 g64 (fake-quant) | {r['quant']['ppl']:.3f} |")
    print()
    print(
        f"quantization {report['quantize_seconds']:.0f} s, total {report['total_seconds']:.0f} s, "
        f"peak RSS {report['peak_rss_gb']:.2f} GB; run directory {report['out']}"
    )
    return report
