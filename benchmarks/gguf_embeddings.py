"""GGUF file size with the token embedding quantized as llama.cpp quantizes it (the default,
`--gguf-embeddings llama.cpp`) against the embedding kept in F16 (`--gguf-embeddings f16`, what
slimkit wrote before), on the embedded SmolLM2-135M (tied 49,152 x 576 embedding).

Each run is one `slimkit quantize` (RTN, no calibration data needed), each file one
`slimkit export --format gguf --verify` (transformers' GGUF reader: codes identical and logits
equal to slimkit's reference with the stored numbers). llama.cpp picks Q8_0 for this tied
embedding (its width 576 is not a multiple of 256), so the default file holds exactly the tensor
types of llama.cpp's own file for the same type.

    python benchmarks/gguf_embeddings.py      # about 5 min on 2 cores
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, sh, slimkit_cmd  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "gguf_embeddings"
MODEL = "smollm2-135m"
RUNS = {  # file type: quantize flags
    "Q4_1": ["--wbits", "4", "--group-size", "32"],
    "Q8_0": ["--wbits", "8", "--group-size", "32", "--sym"],
}


def main() -> None:
    import gguf

    CACHE.mkdir(parents=True, exist_ok=True)
    rows, commands = [], []
    for kind, flags in RUNS.items():
        run = CACHE / f"rtn-{kind.lower()}"
        if not (run / "quantization.json").is_file():
            cmd = slimkit_cmd("quantize", MODEL, "--method", "rtn", *flags, "--out", str(run),
                              "--overwrite")  # fmt: skip
            sh(cmd)
            commands.append("slimkit " + " ".join(cmd[3:]).replace(str(ROOT) + "/", ""))
        for emb in ("llama.cpp", "f16"):
            out = CACHE / f"{kind.lower()}-{emb.replace('.', '')}.gguf"
            cmd = slimkit_cmd("export", str(run), "--format", "gguf", "--gguf-embeddings", emb,
                              "--verify", "--overwrite", "--out", str(out))  # fmt: skip
            sh(cmd)
            commands.append("slimkit " + " ".join(cmd[3:]).replace(str(ROOT) + "/", ""))
            t = {x.name: x for x in gguf.GGUFReader(str(out)).tensors}
            rep = json.loads(Path(str(out) + ".export.json").read_text()) if Path(
                str(out) + ".export.json").is_file() else {}  # fmt: skip
            rows.append({
                "file_type": kind, "embeddings": emb,
                "token_embd_type": t["token_embd.weight"].tensor_type.name,
                "size_bytes": out.stat().st_size,
                "verify_passed": rep.get("verify", {}).get("passed"),
            })  # fmt: skip
    (RESULTS / "gguf_embeddings.json").write_text(
        json.dumps({"machine": machine_line(), "commands": commands, "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "# GGUF: token embedding quantized as llama.cpp does vs kept in F16",
        "",
        f"{machine_line()} Model: {MODEL} (tied embedding 49,152 x 576).",
        "Command: `python benchmarks/gguf_embeddings.py`; it ran:",
        "",
        *[f"    {c}" for c in commands],
        "",
        "| file type | --gguf-embeddings | token_embd type | size MB | verify |",
        "|---|---|---|---|---|",
        *[
            f"| {r['file_type']} | {r['embeddings']} | {r['token_embd_type']} | "
            f"{r['size_bytes'] / 1e6:.1f} | {r['verify_passed']} |"
            for r in rows
        ],  # fmt: skip
    ]
    (RESULTS / "gguf_embeddings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
