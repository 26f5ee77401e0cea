"""`make demo`: quantize the embedded SmolLM2-135M with CBQ W4A16 g64 and compare perplexity.

CBQ's `demo` preset finishes in a few minutes on 2 CPU cores: 1 epoch over 16 calibration
windows of 256 tokens from wiki-offline (train split; the `fast` preset has 4x the tokens);
perplexity on 20 evaluation windows of 512 tokens from the wiki-offline test split. Group size
64, not 32: the embedded model already lies on a 4-bit grid with blocks of 32, so 4-bit g32
would be artificially lossless.
"""

from __future__ import annotations

from slimkit.llm.run_config import CalibConfig, EvalConfig
from slimkit.llm.workflow import quantize_run
from slimkit.quant.methods import CBQConfig

DEMO_MODEL = "smollm2-135m"


def run_demo(out: str) -> dict:
    preset = CBQConfig.PRESETS["demo"]
    qcfg = CBQConfig(wbits=4, group_size=64, epochs=preset["epochs"])
    calib = CalibConfig(
        calib="wiki-offline",
        n_calib=preset["n_calib"],
        calib_seq_len=preset["calib_seq_len"],
        seed=0,
    )
    ev = EvalConfig(ppl="wiki-offline", seq_len=512, max_windows=20)
    report = quantize_run(
        DEMO_MODEL,
        qcfg,
        calib,
        ev,
        out=out,
        overwrite=True,
        eval_fp=True,
        command=f"slimkit quantize {DEMO_MODEL} --method cbq --preset demo --wbits 4 --group-size 64 "
        f"--ppl wiki-offline --max-windows 20 --eval-fp --out {out}",
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
