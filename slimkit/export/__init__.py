"""Real quantized models out of slimkit runs: compressed-tensors, GPTQ (v1 / v2) and GGUF.

>>> from slimkit.export import ExportConfig, export
>>> export("runs/smol-w4", "models/smol-w4-ct", ExportConfig(verify=True))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from slimkit.core.errors import SlimkitError
from slimkit.core.rundir import atomic_output, check_output, versions
from slimkit.export import compressed_tensors, gguf_format, gptq, sparse24  # noqa: F401  (register formats)
from slimkit.export.base import FORMATS, ExportConfig, QuantizedModel, load_quantized, verify

log = logging.getLogger("slimkit")
__all__ = ["FORMATS", "ExportConfig", "export", "load_quantized", "disk_size"]


def disk_size(path: str | Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*.safetensors"))


def export(
    run_dir: str | Path, out: str | Path, cfg: ExportConfig, *, overwrite: bool = False
) -> dict:
    """Write the quantized run ``run_dir`` in ``cfg.format`` at ``out``; with ``cfg.verify``
    reload it independently and compare. Returns the report (also written next to the export).

    The export is written and verified under ``OUT.partial`` and renamed when complete, so a
    killed export (even during ``--verify``) never leaves a half-written or unverified model
    under the final name. A failed verification keeps the files (their ``export.json`` says
    FAILED) and raises :class:`SlimkitError` with the figures."""
    out = check_output(out, overwrite=overwrite)  # before the source is even read
    exporter = FORMATS.get(cfg.format)()
    t0 = time.perf_counter()
    qm: QuantizedModel = exporter.load_source(run_dir)
    grids = sorted({s.grid for s in qm.specs() if s.grid})
    if grids and not getattr(exporter, "stores_gguf_grids", False):
        raise SlimkitError(
            f"{run_dir} was quantized on GGUF grids ({', '.join(grids)}), which only --format gguf "
            "stores exactly; quantize with --grid uniform for compressed-tensors / gptq"
        )
    exporter.check(qm, cfg)
    # written and verified under OUT.partial: a kill, even during --verify, leaves no OUT
    with atomic_output(out, overwrite=overwrite, directory=not exporter.single_file) as tmp:
        log.info("writing %s (%s)", out, cfg.format)
        info = exporter.write(qm, cfg, tmp)
        report = {
            "source_run": str(run_dir),
            "format": cfg.format,
            **info,
            "dtype": cfg.dtype,
            "method": qm.meta["method"],
            "quantization": {
                k: qm.config[k]
                for k in ("wbits", "group_size", "sym", "abits", "grid")
                if k in qm.config
            },
            "weights_only": cfg.weights_only,
            "layers": len(qm.layers),
            "size_bytes": disk_size(tmp),
            "source_size_bytes": disk_size(Path(run_dir) / "model.safetensors"),
            "export_seconds": round(time.perf_counter() - t0, 2),
            "versions": versions() | _extra_versions(),
        }
        if cfg.verify:
            log.info("verifying %s through %s", out, exporter.reader_name)
            report["verify"] = verify(qm, exporter, cfg, tmp)
        if not exporter.single_file:
            (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
            (tmp / "README.md").write_text(export_card(qm, report))
    if exporter.single_file:
        side = out.with_name(out.name + ".export.json")
        side.write_text(json.dumps(report, indent=2) + "\n")
    v = report.get("verify")
    if v and not v["passed"]:
        raise SlimkitError(
            f"verification of {out} FAILED: codes identical {v['codes_identical']} "
            f"(different in {v['layers_with_different_codes']}), relative logit difference "
            f"{v['relative_logit_diff']:.2e} (tolerance {v['tolerance_relative']:.0e}); files kept"
        )
    return report


def _extra_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("compressed-tensors", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def export_card(qm: QuantizedModel, r: dict) -> str:
    q = r["quantization"]
    fmt = r["format"] + (
        f" (checkpoint_format {r['checkpoint_format']})" if "checkpoint_format" in r else ""
    )
    if q:
        title = (f"W{q['wbits']}A{16 if r['weights_only'] else q['abits']} g{q['group_size']} "
                 f"({r['method']}), {fmt}")  # fmt: skip
        how = (
            f"Exported by slimkit from the run `{r['source_run']}` without re-quantization: the integer "
            "codes, scales and zero points are the ones the method produced "
            f"(scales stored as {'float16' if r['format'] != 'compressed-tensors' else r['dtype']})."
        )
    else:
        title = f"2:4 sparse ({r['method']}), {r['format']}"
        how = (f"Exported by slimkit from the pruned run `{r['source_run']}`: the kept weights (in "
               f"{r['dtype']}) and their 2:4 positions as a bitmask.")  # fmt: skip
    lines = [
        f"# {qm.run.get('model', qm.path.name)}: {title}",
        "",
        how,
        "",
        f"- size on disk: {r['size_bytes'] / 1e6:.1f} MB (fake-quant fp32 source: "
        f"{r['source_size_bytes'] / 1e6:.1f} MB)",
        f"- library versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}",
        "- how it was quantized: `recipe.yaml` (resolved slimkit config) and the source run's README",
    ]
    v = r.get("verify")
    if v:
        lines += [
            "",
            "## Verification",
            "",
            f"Reloaded through {v['reader']} and compared with slimkit's model using the stored "
            "scales (fp32 arithmetic):",
            "",
            f"- integer codes identical in all {v['layers']} quantized layers: {v['codes_identical']}",
            f"- max |weight difference|: {v['max_abs_weight_diff_vs_reference']:.3g}",
            f"- max |logit difference|: {v['max_abs_logit_diff_vs_reference']:.3g} "
            f"(logit std {v['logit_std']:.3g}; relative {v['relative_logit_diff']:.2e}, "
            f"tolerance {v['tolerance_relative']:.0e}); top-1 agreement {v['top1_agreement']:.4f}",
            f"- max |logit difference| against the fp32-scale fake-quant model: "
            f"{v['max_abs_logit_diff_vs_fp32_scales']:.3g}",
            f"- passed: {v['passed']}",
        ]
    if r["weights_only"]:
        lines += [
            "",
            "**Weights only**: the run quantized activations too; they are not quantized in this "
            "export, so its accuracy differs from the run's evaluation. Re-measure it.",
        ]
    return "\n".join(lines) + "\n"
