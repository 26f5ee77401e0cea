"""LLM commands: quantize, prune, eval, export, generate, bench, list, demo."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from slimkit.core.commands import Invocation, arg, command
from slimkit.core.errors import SlimkitError

RUN = ("out", "resume", "overwrite")
CALIB_EVAL = ["slimkit.workflows.run_config:CalibConfig", "slimkit.workflows.run_config:EvalConfig"]


def _quant_methods() -> list[str]:
    from slimkit.quant.methods import METHODS

    return METHODS.names()


def _prune_methods() -> list[str]:
    from slimkit.prune import PRUNE_METHODS

    return PRUNE_METHODS.names()


def _quantize_configs(method: str) -> list:
    from slimkit.quant.methods import METHODS, config_class

    METHODS.get(method)  # an unknown method: one line naming the registered ones
    return [config_class(method), *CALIB_EVAL]


@command("quantize", configs=_quantize_configs, run=RUN,
         args=[arg("model", nargs="?", help="registered name, HF id or local dir"),
               arg("--method", default="gptq", selects=True, values=_quant_methods),
               arg("--eval-fp", action="store_true", help="also evaluate the unquantized model")],
         help="quantize a causal LM into a run directory",
         description="Quantize a causal LM into a run directory.")  # fmt: skip
def quantize(inv: Invocation) -> int:
    from slimkit.workflows.llm import quantize_run

    if not inv.ns.model:
        raise SlimkitError(
            "name a model: slimkit quantize MODEL --out DIR (see `slimkit list models`)"
        )
    quantize_run(inv.ns.model, *inv.configs, eval_fp=inv.ns.eval_fp, **inv.run_kwargs)
    return 0


def _prune_configs(method: str, then: str | None) -> list:
    from slimkit.prune import PRUNE_METHODS
    from slimkit.quant.methods import config_class

    classes = [PRUNE_METHODS.meta(method)["config"]]
    if then:
        classes.append(config_class(then))
    return classes + CALIB_EVAL


@command("prune", configs=_prune_configs, run=RUN,
         args=[arg("model", help="registered name, HF id or local dir"),
               arg("--method", default="wanda", selects=True, values=_prune_methods),
               arg("--then", selects=True, values=_quant_methods,
                   help="quantize after pruning (sparsegpt + gptq run as one joint pass; zeros "
                        "are kept)"),
               arg("--eval-fp", action="store_true", help="also evaluate the unpruned model")],
         help="prune a causal LM (and optionally quantize it)",
         description="Prune a causal LM (and optionally quantize it).")  # fmt: skip
def prune(inv: Invocation) -> int:
    from slimkit.workflows.llm import compress_run

    ns = inv.ns
    compress_run(ns.model, prune_steps(inv), inv.config(inv.classes[-2]),
                 inv.config(inv.classes[-1]), eval_fp=ns.eval_fp, **inv.run_kwargs)  # fmt: skip
    return 0


def prune_steps(inv: Invocation) -> list:
    """The pruner's config, then the ``--then`` quantizer's (none when SparseGPT and GPTQ run as
    one joint pass). ``--wbits`` belongs to the quantizer: SparseGPT before another method only
    prunes."""
    ns = inv.ns
    pcfg = inv.config(inv.classes[0])
    if not ns.then or (ns.method == "sparsegpt" and ns.then == "gptq"):
        return [pcfg]
    if ns.method == "sparsegpt":
        pcfg = dataclasses.replace(pcfg, wbits=16)
    qcls = inv.classes[1]
    keeps = "keep_zeros" in {f.name for f in dataclasses.fields(qcls)}
    return [pcfg, inv.config(qcls, {"keep_zeros": True} if keeps else {})]


@command("eval", configs=["slimkit.workflows.run_config:EvalConfig"],
         args=[arg("model", help="run directory, registered name, HF id or local dir"),
               arg("--device", default="auto"),
               arg("--json", output=True, help="also write the results here")],
         help="perplexity (GPTQ protocol) and lm-eval tasks",
         description="Perplexity (GPTQ protocol) and lm-eval tasks.")  # fmt: skip
def eval_(inv: Invocation) -> int:
    from slimkit.workflows.llm import eval_run

    (ev,) = inv.configs
    res = eval_run(inv.ns.model, ev, device=inv.ns.device, json_out=inv.ns.json)
    for corpus, r in res["results"].items():
        if "ppl" in r:
            print(f"{corpus}\tppl {r['ppl']:.4f}\t({r['n_windows']} windows x {r['seq_len']} tokens)")  # fmt: skip
    return 0


LISTS = {  # `slimkit list WHAT`: the registry (module, name) behind each
    "methods": ("slimkit.quant.methods", "METHODS"),
    "pruners": ("slimkit.prune", "PRUNE_METHODS"),
    "models": ("slimkit.llm.models", "MODELS"),
    "datasets": ("slimkit.data", "CORPORA"),
    "families": ("slimkit.llm.block_maps", "BLOCK_MAPS"),
    "formats": ("slimkit.export", "FORMATS"),
    "vision-models": ("slimkit.vision.models", "TINY"),
    "images": ("slimkit.vision.data", "IMAGE_SETS"),
    "losses": ("slimkit.distill.losses", "LOSSES"),
    "captioners": ("slimkit.distill.describers", "CAPTIONERS"),
    "text-encoders": ("slimkit.distill.text_encoders", "TEXT_ENCODERS"),
}


@command("list", args=[arg("what", choices=sorted(LISTS))],
         help="list the registered methods, models, datasets, formats, ...")  # fmt: skip
def list_(inv: Invocation) -> int:
    import importlib

    module, name = LISTS[inv.ns.what]
    reg = getattr(importlib.import_module(module), name)
    for n in reg.names():
        print(f"{n:16s} {reg.meta(n).get('help', '')}")
    return 0


@command("demo", run=("out",), out_default="runs/demo-cbq-w4g64", out_help="run directory",
         help="quantize the embedded model with CBQ and compare perplexity",
         description="Quantize the embedded model and compare perplexity.")  # fmt: skip
def demo(inv: Invocation) -> int:
    from slimkit.workflows.demo import run_demo

    run_demo(inv.ns.out)
    return 0


@command("export", configs=["slimkit.export:ExportConfig"], run=("out", "overwrite"),
         out_help="output directory (a .gguf file for --format gguf)",
         args=[arg("run", help="run directory of `slimkit quantize` / `slimkit prune --then`")],
         help="write a quantized run as a real packed model",
         description="Write a quantized run as a real packed model (no re-quantization).")  # fmt: skip
def export(inv: Invocation) -> int:
    from slimkit.export import FORMATS
    from slimkit.export import export as export_run

    (cfg,), ns = inv.configs, inv.ns
    r = export_run(ns.run, ns.out, cfg, overwrite=ns.overwrite)
    print(f"{ns.out}: {FORMATS.meta(cfg.format)['help']}, {r['size_bytes'] / 1e6:.1f} MB "
          f"(source run {r['source_size_bytes'] / 1e6:.1f} MB)")  # fmt: skip
    v = r.get("verify")
    if v:
        print(f"verify ({v['reader']}): codes identical {v['codes_identical']}, max |logit diff| "
              f"{v['max_abs_logit_diff_vs_reference']:.3g} (relative {v['relative_logit_diff']:.1e}), "
              f"top-1 agreement {v['top1_agreement']:.4f}: {'PASSED' if v['passed'] else 'FAILED'}")  # fmt: skip
    return 0


@command("generate", configs=["slimkit.export.runtime:GenerateConfig"],
         args=[arg("model", help="export (dir or .gguf), run directory, registered name or HF id"),
               arg("--prompt", required=True)],
         help="greedy text continuation with any slimkit model",
         description="Greedy text continuation with any slimkit model.")  # fmt: skip
def generate(inv: Invocation) -> int:
    from slimkit.export.runtime import generate as generate_text

    ns, (cfg,) = inv.ns, inv.configs
    r = generate_text(ns.model, ns.prompt, cfg.max_new_tokens)
    print(f"[{r['how']}]", file=sys.stderr)
    print(ns.prompt + r["text"])
    print(f"[{r['new_tokens']} tokens in {r['seconds']:.2f} s, "
          f"{r['new_tokens'] / r['seconds']:.1f} tok/s]", file=sys.stderr)  # fmt: skip
    return 0


@command("bench", configs=["slimkit.export.runtime:BenchConfig"],
         args=[arg("model", help="a .gguf file written by slimkit export"),
               arg("--baseline", help="F16 GGUF to compare with, or to quantize with llama.cpp "
                                      "for --against (default: written from the base model)"),
               arg("--json", output=True, help="also write the results here")],
         help="size and llama.cpp speed (and perplexity) of a GGUF beside F16 or llama.cpp's own quantization",
         description="Size and llama.cpp prefill/decode tokens/s of a GGUF beside its F16 baseline; "
                     "with --against llama.cpp:FTYPE, size, speed and perplexity beside llama.cpp's "
                     "own quantization of the same model.")  # fmt: skip
def bench(inv: Invocation) -> int:
    from slimkit.export.runtime import against_table, bench_against, bench_gguf

    ns, (cfg,) = inv.ns, inv.configs
    if not ns.model.endswith(".gguf"):
        raise SlimkitError(
            "slimkit bench measures GGUF files through llama.cpp (CPU speed is real there); export "
            "with --format gguf first. compressed-tensors / GPTQ exports are served by vLLM on GPUs."
        )
    if cfg.against:
        r = bench_against(ns.model, cfg, ns.baseline)
        print(f"engine: {r['engine']}; prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new "
              f"tokens; {r.get('ppl_protocol', 'no perplexity')}")  # fmt: skip
        print(against_table(r))
    else:
        r = bench_gguf(ns.model, ns.baseline, prompt_tokens=cfg.prompt_tokens,
                       new_tokens=cfg.new_tokens, threads=cfg.threads, base=cfg.base)  # fmt: skip
        print(f"engine: {r['engine']}; prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens")  # fmt: skip
        print("| file | size MB | prefill tok/s | decode tok/s |\n|---|---|---|---|")
        for k in ("model", "f16"):
            print(f"| {r['files'][k]} | {r['size_mb'][k]:.1f} | {r[k]['prefill_tok_s']:.1f} | "
                  f"{r[k]['decode_tok_s']:.1f} |")  # fmt: skip
        x = r["ratios_vs_f16"]
        print(f"ratios vs F16: size {x['size']:.2f}, prefill {x['prefill']:.2f}, decode {x['decode']:.2f}")  # fmt: skip
    if ns.json:
        Path(ns.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0
