"""Command-line interface. Thin: each subcommand parses flags into config dataclasses and calls
one public Python function. Bad input prints one message and exits with status 2."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from slimkit.core import dist
from slimkit.core.config import add_arguments, from_args, load_yaml, parse_run_command, split_recipe
from slimkit.core.errors import SlimkitError
from slimkit.core.logs import setup_logging

log = logging.getLogger("slimkit")

PRESETS = {  # calibration / pipeline presets for `quantize --preset`
    "demo": {"n_calib": 16, "calib_seq_len": 512},
    "fast": {"n_calib": 32, "calib_seq_len": 512},
    "default": {"n_calib": 128, "calib_seq_len": 512},
    "paper": {"n_calib": 128, "calib_seq_len": 2048},
}


def cmd_quantize(argv: list[str]) -> int:
    from slimkit.llm.run_config import CalibConfig, EvalConfig
    from slimkit.llm.workflow import quantize_run
    from slimkit.quant.methods import METHODS, config_class

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(argv)
    recipe = load_yaml(known.recipe) if known.recipe else {}
    method = known.method or recipe.pop("method", None) or "gptq"
    recipe.pop("method", None)
    cfg_cls = config_class(method) if method in METHODS else None
    if cfg_cls is None:
        METHODS.get(method)  # raises the unknown-method message

    p = argparse.ArgumentParser(
        prog="slimkit quantize", description="Quantize a causal LM into a run directory."
    )
    p.add_argument(
        "model",
        nargs="?",
        default=recipe.pop("model", None),
        help="registered name, HF id or local dir",
    )
    p.add_argument("--method", default=method, help=f"one of: {', '.join(METHODS.names())}")
    p.add_argument("--recipe", help="YAML file of option: value pairs (flags override it)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="calibration size (and, for trained methods, epochs) preset; flags override it",
    )
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUT.partial"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--eval-fp", action="store_true", help="also evaluate the unquantized model")
    p.add_argument("-v", "--verbose", action="store_true")
    add_arguments(p, cfg_cls)
    add_arguments(p, CalibConfig)
    add_arguments(p, EvalConfig)
    ns = p.parse_args(argv)
    setup_logging(ns.verbose)
    if not ns.model:
        raise SlimkitError(
            "name a model: slimkit quantize MODEL --out DIR (see `slimkit list models`)"
        )
    q_part, c_part, e_part = split_recipe(recipe, [cfg_cls, CalibConfig, EvalConfig])
    if ns.preset:  # generic calibration preset, then the method's own (recipe and flags win)
        pq, pc, _ = split_recipe(
            {**PRESETS[ns.preset], **getattr(cfg_cls, "PRESETS", {}).get(ns.preset, {})},
            [cfg_cls, CalibConfig, EvalConfig],
        )
        q_part, c_part = {**pq, **q_part}, {**pc, **c_part}
    qcfg = from_args(cfg_cls, ns, q_part)
    ccfg = from_args(CalibConfig, ns, c_part)
    ecfg = from_args(EvalConfig, ns, e_part)
    quantize_run(
        ns.model,
        qcfg,
        ccfg,
        ecfg,
        out=ns.out,
        resume=ns.resume,
        overwrite=ns.overwrite,
        eval_fp=ns.eval_fp,
        command="slimkit quantize " + shlex.join(argv),
    )
    return 0


def cmd_prune(argv: list[str]) -> int:
    import dataclasses

    from slimkit.llm.run_config import CalibConfig, EvalConfig
    from slimkit.llm.workflow import compress_run
    from slimkit.prune import PRUNE_METHODS
    from slimkit.quant.methods import METHODS, config_class

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="wanda")
    pre.add_argument("--then")
    known, _ = pre.parse_known_args(argv)
    pcls = (
        PRUNE_METHODS.meta(known.method)["config"]
        if known.method in PRUNE_METHODS
        else PRUNE_METHODS.get(known.method)
    )
    qcls = config_class(known.then) if known.then else None

    p = argparse.ArgumentParser(
        prog="slimkit prune", description="Prune a causal LM (and optionally quantize it)."
    )
    p.add_argument("model", help="registered name, HF id or local dir")
    p.add_argument("--method", default="wanda", help=f"one of: {', '.join(PRUNE_METHODS.names())}")
    p.add_argument(
        "--then",
        choices=METHODS.names(),
        help="quantize after pruning (sparsegpt + gptq run as one joint pass; zeros are kept)",
    )
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUT.partial"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--eval-fp", action="store_true", help="also evaluate the unpruned model")
    p.add_argument("-v", "--verbose", action="store_true")
    add_arguments(p, pcls)
    pfields = {f.name for f in dataclasses.fields(pcls)}
    if qcls is not None:
        add_arguments(p, qcls, skip=tuple(pfields))
    add_arguments(p, CalibConfig)
    add_arguments(p, EvalConfig)
    ns = p.parse_args(argv)
    setup_logging(ns.verbose)
    joint = ns.method == "sparsegpt" and ns.then == "gptq"
    if ns.method == "sparsegpt" and ns.then and not joint:
        ns.wbits = 16  # SparseGPT only prunes; the --then method quantizes
    pcfg = from_args(pcls, ns)
    steps = [pcfg]
    if qcls is not None and not joint:
        base = (
            {"keep_zeros": True}
            if "keep_zeros" in {f.name for f in dataclasses.fields(qcls)}
            else {}
        )
        steps.append(from_args(qcls, ns, base))
    compress_run(
        ns.model,
        steps,
        from_args(CalibConfig, ns),
        from_args(EvalConfig, ns),
        out=ns.out,
        resume=ns.resume,
        overwrite=ns.overwrite,
        eval_fp=ns.eval_fp,
        command="slimkit prune " + shlex.join(argv),
    )
    return 0


def cmd_eval(argv: list[str]) -> int:
    from slimkit.llm.run_config import EvalConfig
    from slimkit.llm.workflow import eval_run

    p = argparse.ArgumentParser(
        prog="slimkit eval", description="Perplexity (GPTQ protocol) and lm-eval tasks."
    )
    p.add_argument("model", help="run directory, registered name, HF id or local dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results here")
    add_arguments(p, EvalConfig)
    ns = p.parse_args(argv)
    setup_logging()
    ev = from_args(EvalConfig, ns)
    res = eval_run(ns.model, ev, device=ns.device, json_out=ns.json)
    for corpus, r in res["results"].items():
        if "ppl" in r:
            print(
                f"{corpus}\tppl {r['ppl']:.4f}\t({r['n_windows']} windows x {r['seq_len']} tokens)"
            )
    return 0


def cmd_list(argv: list[str]) -> int:
    from slimkit.data import CORPORA
    from slimkit.export import FORMATS
    from slimkit.kd.losses import LOSSES
    from slimkit.llm.block_maps import BLOCK_MAPS
    from slimkit.llm.models import MODELS
    from slimkit.prune import PRUNE_METHODS
    from slimkit.quant.methods import METHODS
    from slimkit.vision.data import IMAGE_SETS
    from slimkit.vision.models import TINY

    regs = {
        "methods": METHODS,
        "pruners": PRUNE_METHODS,
        "models": MODELS,
        "datasets": CORPORA,
        "families": BLOCK_MAPS,
        "formats": FORMATS,
        "vision-models": TINY,
        "images": IMAGE_SETS,
        "losses": LOSSES,
    }
    p = argparse.ArgumentParser(prog="slimkit list")
    p.add_argument("what", choices=sorted(regs))
    ns = p.parse_args(argv)
    reg = regs[ns.what]
    for name in reg.names():
        print(f"{name:16s} {reg.meta(name).get('help', '')}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from slimkit.demo import run_demo

    p = argparse.ArgumentParser(
        prog="slimkit demo", description="Quantize the embedded model and compare perplexity."
    )
    p.add_argument("--out", default="runs/demo-cbq-w4g64")
    ns = p.parse_args(argv)
    setup_logging()
    run_demo(ns.out)
    return 0


def cmd_export(argv: list[str]) -> int:
    from slimkit.export import FORMATS, ExportConfig, export

    p = argparse.ArgumentParser(
        prog="slimkit export",
        description="Write a quantized run as a real packed model (no re-quantization).",
    )
    p.add_argument("run", help="run directory of `slimkit quantize` / `slimkit prune --then`")
    p.add_argument("--out", required=True, help="output directory (a .gguf file for --format gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("-v", "--verbose", action="store_true")
    add_arguments(p, ExportConfig)
    ns = p.parse_args(argv)
    setup_logging(ns.verbose)
    cfg = from_args(ExportConfig, ns)
    r = export(ns.run, ns.out, cfg, overwrite=ns.overwrite)
    print(
        f"{ns.out}: {FORMATS.meta(cfg.format)['help']}, {r['size_bytes'] / 1e6:.1f} MB "
        f"(source run {r['source_size_bytes'] / 1e6:.1f} MB)"
    )
    v = r.get("verify")
    if v:
        print(
            f"verify ({v['reader']}): codes identical {v['codes_identical']}, max |logit diff| "
            f"{v['max_abs_logit_diff_vs_reference']:.3g} (relative {v['relative_logit_diff']:.1e}), "
            f"top-1 agreement {v['top1_agreement']:.4f}: {'PASSED' if v['passed'] else 'FAILED'}"
        )
    return 0


def cmd_generate(argv: list[str]) -> int:
    from slimkit.export.runtime import generate

    p = argparse.ArgumentParser(
        prog="slimkit generate", description="Greedy text continuation with any slimkit model."
    )
    p.add_argument("model", help="export (dir or .gguf), run directory, registered name or HF id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    ns = p.parse_args(argv)
    setup_logging()
    if ns.max_new_tokens < 1:
        raise SlimkitError("--max-new-tokens must be >= 1")
    r = generate(ns.model, ns.prompt, ns.max_new_tokens)
    print(f"[{r['how']}]", file=sys.stderr)
    print(ns.prompt + r["text"])
    print(
        f"[{r['new_tokens']} tokens in {r['seconds']:.2f} s, {r['new_tokens'] / r['seconds']:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def cmd_bench(argv: list[str]) -> int:
    import json

    from slimkit.export.runtime import bench_gguf

    p = argparse.ArgumentParser(
        prog="slimkit bench",
        description="Size and llama.cpp prefill/decode tokens/s of a GGUF beside its F16 baseline.",
    )
    p.add_argument("model", help="a .gguf file written by slimkit export")
    p.add_argument(
        "--baseline", help="F16 GGUF to compare with (default: written from the base model)"
    )
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    ns = p.parse_args(argv)
    setup_logging()
    if not ns.model.endswith(".gguf"):
        raise SlimkitError(
            "slimkit bench measures GGUF files through llama.cpp (CPU speed is real there); export "
            "with --format gguf first. compressed-tensors / GPTQ exports are served by vLLM on GPUs."
        )
    r = bench_gguf(
        ns.model,
        ns.baseline,
        prompt_tokens=ns.prompt_tokens,
        new_tokens=ns.new_tokens,
        threads=ns.threads,
    )
    print(
        f"engine: {r['engine']}; prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens"
    )
    print("| file | size MB | prefill tok/s | decode tok/s |\n|---|---|---|---|")
    for k in ("model", "f16"):
        print(
            f"| {r['files'][k]} | {r['size_mb'][k]:.1f} | {r[k]['prefill_tok_s']:.1f} | {r[k]['decode_tok_s']:.1f} |"
        )
    x = r["ratios_vs_f16"]
    print(
        f"ratios vs F16: size {x['size']:.2f}, prefill {x['prefill']:.2f}, decode {x['decode']:.2f}"
    )
    if ns.json:
        Path(ns.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


def _train_cmd(argv: list[str], prog: str, cfg_cls: type, description: str) -> int:
    from slimkit.kd.train import run_training

    ns, cfg = parse_run_command(argv, prog, cfg_cls, description)
    r = run_training(cfg, out=ns.out, resume=ns.resume, overwrite=ns.overwrite,
                     command=f"slimkit {prog.split()[-1]} " + shlex.join(argv))  # fmt: skip
    if r:
        print(f"{r['out']}: last top-1 {r['last']['top1']:.2f} %, best {r['best']['top1']:.2f} % "
              f"(epoch {r['best']['epoch']}), {r['seconds']:.0f} s")  # fmt: skip
    return 0


def cmd_train_classifier(argv: list[str]) -> int:
    from slimkit.kd.train import TrainConfig

    return _train_cmd(argv, "slimkit train-classifier", TrainConfig,
                      "Train a timm image classifier (e.g. a teacher) with cross-entropy.")  # fmt: skip


def cmd_distill(argv: list[str]) -> int:
    from slimkit.kd.train import DistillConfig

    return _train_cmd(argv, "slimkit distill", DistillConfig,
                      "Distil a frozen teacher into a student (KD, DKD, DIST, FitNet, OFA).")  # fmt: skip


def cmd_cka(argv: list[str]) -> int:
    import json

    from slimkit.kd.cka import cka_matrix, plot_cka
    from slimkit.kd.train import load_model_from_run
    from slimkit.vision.data import load_images

    p = argparse.ArgumentParser(
        prog="slimkit cka", description="Linear CKA between every teacher and student stage."
    )
    p.add_argument(
        "--teacher", required=True, help="run directory (or weights file with --teacher-arch)"
    )
    p.add_argument("--teacher-arch", default="")
    p.add_argument(
        "--student", required=True, help="run directory (or weights file with --student-arch)"
    )
    p.add_argument("--student-arch", default="")
    p.add_argument("--data", default="digits")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--max-images", type=int, default=512, help="test images used")
    p.add_argument("--plot", help="write the heat-map here (PNG)")
    p.add_argument("--json", help="write the matrix here")
    ns = p.parse_args(argv)
    setup_logging()
    data = load_images(ns.data, ns.img_size)
    t = load_model_from_run(ns.teacher, ns.teacher_arch, data)
    s = load_model_from_run(ns.student, ns.student_arch, data)
    x = data.test.tensors[0][: ns.max_images]
    m = cka_matrix(t, s, x)
    print("CKA (rows: teacher stages 1-4, columns: student stages 1-4)")
    for i, row in enumerate(m.tolist()):
        print(f"T{i + 1} " + " ".join(f"{v:.3f}" for v in row))
    print(f"mean diagonal {m.diagonal().mean():.3f}")
    if ns.plot:
        plot_cka(m, ns.plot, f"linear CKA on {ns.data} ({len(x)} test images)", Path(ns.teacher).name,
                 Path(ns.student).name)  # fmt: skip
    if ns.json:
        Path(ns.json).write_text(json.dumps({"cka": m.tolist(), "images": len(x)}, indent=1) + "\n")
    return 0


def cmd_train_lm(argv: list[str]) -> int:
    from slimkit.lm.train import LMTrainConfig, train_lm

    ns, cfg = parse_run_command(argv, "slimkit train-lm", LMTrainConfig,
                                "Pre-train a small causal LM (PanGu-π or Llama).")  # fmt: skip
    r = train_lm(cfg, out=ns.out, resume=ns.resume, overwrite=ns.overwrite,
                 command="slimkit train-lm " + shlex.join(argv))  # fmt: skip
    if r:
        print(f"{r['out']}: {r['parameters']:,} parameters, validation ppl {r['final_val_ppl']:.2f}, "
              f"{r['tokens_per_second']:.0f} tokens/s")  # fmt: skip
    return 0


def cmd_analyze_collapse(argv: list[str]) -> int:
    import json

    from slimkit.data.text import eval_windows
    from slimkit.llm.models import load_model
    from slimkit.lm.collapse import collapse_profile, plot_profiles

    p = argparse.ArgumentParser(prog="slimkit analyze-collapse",
                                description="Per-layer feature collapse (d_rel, effective dimension d(0.8)).")  # fmt: skip
    p.add_argument("models", nargs="+", help="model directories / names (compared in one plot)")
    p.add_argument("--data", default="wiki-offline")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=8, help="validation windows averaged")
    p.add_argument("--plot", help="write the per-layer plot here (PNG)")
    p.add_argument("--json", help="write the profiles here")
    ns = p.parse_args(argv)
    setup_logging()
    profiles = {}
    for name in ns.models:
        model, tok = load_model(name)
        w = eval_windows(tok, ns.data, ns.seq_len, max_windows=ns.windows, split="validation")
        profiles[name] = collapse_profile(model, w)
        print(f"{name}\nlayer  d_rel   d(0.8)  cos")
        for r in profiles[name]:
            print(f"{r['layer']:5d}  {r['d_rel']:.3f}  {r['d80']:6.1f}  {r['cos']:.3f}")
    if ns.plot:
        plot_profiles(profiles, ns.plot)
    if ns.json:
        Path(ns.json).write_text(json.dumps(profiles, indent=1) + "\n")
    return 0


def cmd_compress_tokenizer(argv: list[str]) -> int:
    from slimkit.lm.tokenizer import compress_run

    p = argparse.ArgumentParser(
        prog="slimkit compress-tokenizer",
        description="Keep the most frequent pieces of a byte-level BPE tokenizer; remap the model.",
    )
    p.add_argument("model", help="registered name, HF id or local dir (tokenizer + model)")
    p.add_argument("--data", default="wiki-offline", help="corpus whose train split is counted")
    p.add_argument("--vocab", type=int, required=True, help="target vocabulary size")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer-only", action="store_true", help="do not write a remapped model")
    ns = p.parse_args(argv)
    setup_logging()
    r = compress_run(ns.model, ns.data, ns.vocab, ns.out, with_model=not ns.tokenizer_only)
    print(f"{ns.out}: vocabulary {r['vocab_before']} -> {r['vocab_after']} (covers "
          f"{100 * r['train_token_coverage']:.1f} % of the training tokens); tokens per character on "
          f"{ns.data} validation {r['tokens_per_char_before']:.4f} -> {r['tokens_per_char_after']:.4f}")  # fmt: skip
    if "parameters_after" in r:
        print(f"parameters {r['parameters_before']:,} -> {r['parameters_after']:,}")
    return 0


def cmd_inherit(argv: list[str]) -> int:
    from slimkit.lm.inherit import InheritConfig, inherit_run

    p = argparse.ArgumentParser(
        prog="slimkit inherit",
        description="Initialise a smaller model from a larger one (layers, hidden, FFN, heads).",
    )
    p.add_argument("model", help="parent: registered name, HF id or local dir")
    p.add_argument("--out", required=True)
    add_arguments(p, InheritConfig)
    ns = p.parse_args(argv)
    setup_logging()
    r = inherit_run(ns.model, from_args(InheritConfig, ns), ns.out)
    print(f"{ns.out}: {r['child_parameters']:,} parameters inherited from {r['parent_parameters']:,} "
          f"(blocks {r['kept']['layers']})")  # fmt: skip
    return 0


def cmd_sam(argv: list[str]) -> int:
    from slimkit.sam.cli import main as sam_main

    return sam_main(argv)


COMMANDS = {
    "quantize": cmd_quantize,
    "prune": cmd_prune,
    "eval": cmd_eval,
    "list": cmd_list,
    "demo": cmd_demo,
    "export": cmd_export,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "train-classifier": cmd_train_classifier,
    "distill": cmd_distill,
    "cka": cmd_cka,
    "train-lm": cmd_train_lm,
    "analyze-collapse": cmd_analyze_collapse,
    "compress-tokenizer": cmd_compress_tokenizer,
    "inherit": cmd_inherit,
    "sam": cmd_sam,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(
                f"slimkit: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}",
                file=sys.stderr,
            )
            return 2
        print(
            "usage: slimkit {"
            + ",".join(COMMANDS)
            + "} ...   (slimkit COMMAND --help for its options)"
        )
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist.init_from_env()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except SlimkitError as e:
        print(f"slimkit: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_dist():
            import torch.distributed as td

            td.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
