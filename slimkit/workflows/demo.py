"""`make demo`: quantize the embedded SmolLM2-135M with CBQ W4A16 g64 and compare perplexity.

CBQ's `demo` preset finishes in a few minutes on 2 CPU cores: 1 epoch over 16 calibration
windows of 256 tokens from wiki-offline (train split; the `fast` preset has 4x the tokens);
perplexity on 20 evaluation windows of 512 tokens from the wiki-offline test split. Group size
64, not 32: the embedded model already lies on a 4-bit grid with blocks of 32, so 4-bit g32
would be artificially lossless.
"""

from __future__ import annotations

from slimkit.core.config import from_preset
from slimkit.quant.methods import CBQConfig
from slimkit.workflows.llm import quantize_run
from slimkit.workflows.run_config import CalibConfig, EvalConfig

DEMO_MODEL = "smollm2-135m"


# what `make demo` runs, as the command line its run directory records
DEMO_ARGS = f"{DEMO_MODEL} --method cbq --preset demo --wbits 4 --group-size 64 --ppl wiki-offline --max-windows 20 --eval-fp"


def demo_configs() -> tuple[CBQConfig, CalibConfig, EvalConfig]:
    """The demo's method, calibration and evaluation configs (the same as ``slimkit quantize``
    with ``DEMO_ARGS`` gives)."""
    qcfg, calib = from_preset("demo", CBQConfig, CalibConfig, wbits=4, group_size=64)
    return qcfg, calib, EvalConfig(ppl="wiki-offline", seq_len=512, max_windows=20)


def run_demo(out: str) -> dict:
    report = quantize_run(
        DEMO_MODEL,
        *demo_configs(),
        out=out,
        overwrite=True,
        eval_fp=True,
        command=f"slimkit quantize {DEMO_ARGS} --out {out}",
    )
    r = report["eval"]["wiki-offline"]
    print()
    print(f"SmolLM2-135M (embedded), {r['protocol']}")
    print()
    print("| model | wiki-offline ppl |")
    print("|---|---|")
    print(f"| FP32 | {r['fp']['ppl']:.3f} |")
    print(f"| CBQ W4A16 g64, demo preset (fake-quant) | {r['quant']['ppl']:.3f} |")
    print()
    print(
        f"quantization {report['quantize_seconds']:.0f} s, total {report['total_seconds']:.0f} s, "
        f"peak RSS {report['peak_rss_gb']:.2f} GB; run directory {report['out']}"
    )
    return report
