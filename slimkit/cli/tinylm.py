"""Small-LM commands: train-lm, analyze-collapse, compress-tokenizer, inherit."""

from __future__ import annotations

import json
from pathlib import Path

from slimkit.core.commands import Invocation, arg, command


@command("train-lm", configs=["slimkit.tinylm.train:LMTrainConfig"], run=("out", "resume", "overwrite"),
         help="pre-train a small causal LM (PanGu-pi or Llama)",
         description="Pre-train a small causal LM (PanGu-π or Llama).")  # fmt: skip
def train_lm(inv: Invocation) -> int:
    from slimkit.tinylm.train import train_lm as train

    r = train(*inv.configs, **inv.run_kwargs)
    if r:
        print(f"{r['out']}: {r['parameters']:,} parameters, validation ppl {r['final_val_ppl']:.2f}, "
              f"{r['tokens_per_second']:.0f} tokens/s")  # fmt: skip
    return 0


@command("analyze-collapse", configs=["slimkit.tinylm.collapse:CollapseConfig"],
         args=[arg("models", nargs="+", help="model directories / names (compared in one plot)"),
               arg("--plot", output=True, help="write the per-layer plot here (PNG)"),
               arg("--json", output=True, help="write the profiles here")],
         help="per-layer feature collapse of one or more models",
         description="Per-layer feature collapse (d_rel, effective dimension d(0.8)).")  # fmt: skip
def analyze_collapse(inv: Invocation) -> int:
    from slimkit.tinylm.collapse import analyze_collapse as run
    from slimkit.tinylm.collapse import plot_profiles

    ns, (cfg,) = inv.ns, inv.configs
    profiles = run(ns.models, cfg)
    for name, rows in profiles.items():
        print(f"{name}\nlayer  d_rel   d(0.8)  cos")
        for r in rows:
            print(f"{r['layer']:5d}  {r['d_rel']:.3f}  {r['d80']:6.1f}  {r['cos']:.3f}")
    if ns.plot:
        plot_profiles(profiles, ns.plot)
    if ns.json:
        Path(ns.json).write_text(json.dumps(profiles, indent=1) + "\n")
    return 0


@command("compress-tokenizer", configs=["slimkit.tinylm.tokenizer:CompressTokenizerConfig"],
         run=("out", "overwrite"), out_help="directory to write",
         args=[arg("model", help="registered name, HF id or local dir (tokenizer + model)"),
               arg("--vocab", type=int, required=True, help="target vocabulary size")],
         help="keep the most frequent pieces of a BPE tokenizer; remap the model",
         description="Keep the most frequent pieces of a byte-level BPE tokenizer; remap the "
                     "model.")  # fmt: skip
def compress_tokenizer(inv: Invocation) -> int:
    from slimkit.tinylm.tokenizer import compress_run

    ns, (cfg,) = inv.ns, inv.configs
    r = compress_run(ns.model, cfg.data, ns.vocab, ns.out, with_model=not cfg.tokenizer_only,
                     overwrite=ns.overwrite)  # fmt: skip
    print(f"{ns.out}: vocabulary {r['vocab_before']} -> {r['vocab_after']} (covers "
          f"{100 * r['train_token_coverage']:.1f} % of the training tokens); tokens per character on "
          f"{cfg.data} validation {r['tokens_per_char_before']:.4f} -> {r['tokens_per_char_after']:.4f}")  # fmt: skip
    if "parameters_after" in r:
        print(f"parameters {r['parameters_before']:,} -> {r['parameters_after']:,}")
    return 0


@command("inherit", configs=["slimkit.tinylm.inherit:InheritConfig"], run=("out", "overwrite"),
         out_help="directory of the child model",
         args=[arg("model", help="parent: registered name, HF id or local dir")],
         help="initialise a smaller model from a larger one",
         description="Initialise a smaller model from a larger one (layers, hidden, FFN, heads).")  # fmt: skip
def inherit(inv: Invocation) -> int:
    from slimkit.tinylm.inherit import inherit_run

    r = inherit_run(inv.ns.model, *inv.configs, inv.ns.out, overwrite=inv.ns.overwrite)
    print(f"{inv.ns.out}: {r['child_parameters']:,} parameters inherited from "
          f"{r['parent_parameters']:,} (blocks {r['kept']['layers']})")  # fmt: skip
    return 0
