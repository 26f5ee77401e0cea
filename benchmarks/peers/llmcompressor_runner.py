"""Peer baseline: llm-compressor RTN / GPTQ / AWQ weight quantization with GPTQ-style perplexity.

Runs inside its own virtual environment (see ``setup_llmcompressor.sh``) and does not
import slimkit, so the benchmark can place llm-compressor's rows beside slimkit's on the
same model, the same calibration token windows and the same evaluation windows.

Usage::

    benchmarks/peers/.venv-llmcompressor/bin/python benchmarks/peers/llmcompressor_runner.py \\
        --model-dir DIR --calib calib.safetensors --eval eval.safetensors \\
        --scheme {rtn,gptq,awq} --wbits 4 --group-size 64 [--actorder none] \\
        [--duo-scaling false] [--symmetric] [--ignore lm_head] --out result.json

Inputs:

* ``DIR``: a Hugging Face ``save_pretrained`` directory of a causal LM (fp32
  safetensors plus tokenizer files).
* ``calib.safetensors``: int64 ``input_ids`` of shape [n_samples, seq_len], the
  calibration windows. They are fed to ``oneshot`` as an already tokenized
  ``datasets.Dataset`` with shuffling off, ``num_calibration_samples = n_samples`` and
  ``max_seq_length = seq_len``. RTN (``QuantizationModifier``, weight-only) is
  data-free in llm-compressor, so the windows are only used by GPTQ and AWQ.
* ``eval.safetensors``: int64 ``input_ids`` of shape [n_windows, seq_len],
  non-overlapping evaluation windows.

Quantization: integer weights, ``--wbits`` bits, group strategy with ``--group-size``,
asymmetric unless ``--symmetric``; activations stay in floating point (W4A16-style).
Linear layers are targeted and ``--ignore`` (default ``lm_head``) is skipped. GPTQ uses
llm-compressor's default dampening, block size 128 and the ``--actorder`` given
(``default`` leaves llm-compressor's own default in place).

Perplexity: for each evaluation window the model's logits are taken (the quantized model
is evaluated as llm-compressor leaves it in memory, i.e. fake-quantized), the next-token
NLL is computed inside the window (shift by one), averaged over all predicted tokens of
all windows, and ``ppl = exp(mean NLL)``. The unquantized model is evaluated first with
the same function to give ``ppl_fp``.

Semantics worth knowing when comparing (llm-compressor 0.14 / compressed-tensors 0.19):

* Weight qparams come from the ``memoryless_minmax`` observer with 0 forced into the
  range; int4 codes are signed [-8, 7] (asymmetric: scale = (max - min) / 15 and an int8
  zero point; symmetric: scale = absmax / 7.5).
* GPTQ computes each group's scale and zero point once, from the original weights,
  before the column sweep (static groups), instead of from the error-updated weights.
  Its default ``actorder`` is ``static`` (alias of ``weight``): columns are processed in
  descending Hessian-diagonal order with group membership kept by original column index.
  Dampening is 0.01 x mean(diag H); a failed Cholesky falls back to RTN for that module
  (listed in ``quant_args.rtn_fallback_modules``).
* AWQ (``llmcompressor.modifiers.transform.AWQModifier`` followed by the same
  ``QuantizationModifier`` as RTN) searches per-channel scales for its default mappings
  (norm -> q/k/v, v -> o when the shapes match, norm -> gate/up, up -> down), comparing the
  output of the parent module (attention, MLP, or the linear) on ``n_grid = 20`` candidates;
  ``duo_scaling`` (default on) divides by the normalised weight magnitude. It has no clipping
  search (llm-awq's ``auto_clip``). On a machine without an accelerator, 0.14's AWQ fails
  pinning its cached parent inputs (``IntermediatesCache.pin_memory`` -> "Cannot access
  accelerator device when none is available"); pinning only speeds host-to-device copies, so
  the runner turns it into a no-op there (``cpu_without_pinning``), which changes no number.
* GPTQ runs with the sequential pipeline: each decoder layer is calibrated on the outputs
  of the already-quantized layers before it. ``quantize_seconds`` is the wall time of
  ``oneshot`` and includes those calibration forward passes.

The result is written as JSON to ``--out`` and printed to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from importlib import metadata

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

NUM_THREADS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="save_pretrained directory (fp32)")
    p.add_argument("--calib", required=True, help="safetensors with input_ids [n, seq_len]")
    p.add_argument(
        "--eval",
        required=True,
        action="append",
        help="[NAME=]safetensors with input_ids [n, seq_len]; repeat for several corpora",
    )
    p.add_argument("--scheme", required=True, choices=("rtn", "gptq", "awq"))
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument(
        "--actorder",
        default="default",
        choices=("default", "none", "static", "weight"),
        help="GPTQ activation ordering; 'default' keeps llm-compressor's default",
    )
    p.add_argument(
        "--duo-scaling",
        default="true",
        choices=("true", "false"),
        help="AWQ: scale by activations and weights (llm-compressor's default) or activations only",
    )
    p.add_argument(
        "--symmetric", action="store_true", help="symmetric weights (default: asymmetric)"
    )
    p.add_argument(
        "--ignore",
        default="lm_head",
        help="comma-separated modules left unquantized (default: lm_head; '' for none)",
    )
    p.add_argument("--out", required=True, help="where to write the result JSON")
    return p.parse_args(argv)


def load_ids(path: str):
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "input_ids" not in tensors:
        raise SystemExit(f"{path}: no 'input_ids' tensor (found {sorted(tensors)})")
    ids = tensors["input_ids"]
    if ids.ndim != 2:
        raise SystemExit(f"{path}: input_ids must be 2-D [n, seq_len], got {tuple(ids.shape)}")
    return ids.long().contiguous()


def perplexity(model, ids) -> float:
    """exp of the mean next-token NLL over all windows (shift by one inside each)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total_nll = 0.0
    total_tokens = 0
    with torch.inference_mode():
        for window in ids:
            window = window.unsqueeze(0)
            logits = model(input_ids=window, use_cache=False).logits
            nll = F.cross_entropy(
                logits[0, :-1].float(), window[0, 1:], reduction="sum", ignore_index=-100
            )
            total_nll += float(nll)
            total_tokens += window.shape[1] - 1
    return math.exp(total_nll / total_tokens)


def calibration_dataset(ids):
    from datasets import Dataset

    rows = ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


class LibrarySpy:
    """Records what llm-compressor does internally that its public API does not return.

    * which observer is instantiated for each quantized tensor (``Observer`` registry);
    * GPTQ's count of compressed modules and the modules where the Hessian factorization
      failed and it fell back to round-to-nearest (both are reset when the modifier is
      finalized, so they are read just before that).
    """

    def __init__(self) -> None:
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.observers import Observer

        self.observers: dict[str, set[str]] = {}
        self.gptq: dict[str, object] = {}
        self._patches = [
            (Observer, "load_from_registry", Observer.__dict__.get("load_from_registry")),
            (
                GPTQModifier,
                "_log_rtn_fallback_summary",
                GPTQModifier.__dict__.get("_log_rtn_fallback_summary"),
            ),
        ]
        load = Observer.load_from_registry.__func__
        log_fallback = GPTQModifier._log_rtn_fallback_summary
        spy = self

        def load_from_registry(cls, name, *args, **kwargs):
            obs = load(cls, name, *args, **kwargs)
            base = kwargs.get("base_name", "?")
            spy.observers.setdefault(base, set()).add(f"{name} ({type(obs).__name__})")
            return obs

        def log_rtn_fallback_summary(modifier):
            spy.gptq["n_compressed_modules"] = modifier._num_compressed_modules
            spy.gptq["rtn_fallback_modules"] = list(modifier._rtn_fallback_module_names)
            return log_fallback(modifier)

        Observer.load_from_registry = classmethod(load_from_registry)
        GPTQModifier._log_rtn_fallback_summary = log_rtn_fallback_summary

    def restore(self) -> None:
        for cls, attr, original in self._patches:
            if original is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, original)

    def observer_summary(self) -> dict[str, list[str]]:
        return {k: sorted(v) for k, v in self.observers.items()}


def build_modifier(args: argparse.Namespace, ignore: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    weights = QuantizationArgs(
        num_bits=args.wbits,
        type="int",
        symmetric=args.symmetric,
        strategy="group",
        group_size=args.group_size,
        dynamic=False,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    common = {"config_groups": {"group_0": scheme}, "ignore": ignore}
    if args.scheme == "rtn":
        return QuantizationModifier(**common)
    if args.scheme == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(duo_scaling=args.duo_scaling == "true"), QuantizationModifier(**common)]
    kwargs = dict(common, block_size=128)
    if args.actorder != "default":
        kwargs["actorder"] = None if args.actorder == "none" else args.actorder
    return GPTQModifier(**kwargs)


def cpu_without_pinning() -> None:
    """llm-compressor 0.14 AWQ pins cached CPU tensors, which needs an accelerator."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def quantized_weight_args(model) -> tuple[dict, int, list[str]]:
    """Weight quantization args actually attached to the model, and the modules covered."""
    from compressed_tensors.utils import getattr_chain

    found = None
    names = []
    for name, module in model.named_modules():
        wargs = getattr_chain(module, "quantization_scheme.weights", None)
        if wargs is None:
            continue
        names.append(name)
        dumped = wargs.model_dump(mode="json")
        if found is None:
            found = dumped
        elif dumped != found:
            raise RuntimeError(f"{name}: weight args differ between modules: {dumped}")
    if found is None:
        raise RuntimeError("llm-compressor attached no weight quantization to the model")
    return found, len(names), names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch

    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(0)

    import transformers
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = load_ids(args.calib)
    evals = {}
    for spec in args.eval:
        name, _, path = spec.rpartition("=")
        evals[name or "eval"] = load_ids(path)
    n_calib, seq_len = calib.shape
    ignore = [s for s in args.ignore.split(",") if s]

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()

    t0 = time.perf_counter()
    ppl_fp = {name: perplexity(model, ids) for name, ids in evals.items()}
    fp_eval_seconds = time.perf_counter() - t0
    print(f"[llmcompressor_runner] fp ppl {ppl_fp} ({fp_eval_seconds:.1f} s)", flush=True)

    modifier = build_modifier(args, ignore)
    oneshot_kwargs = {}
    if args.scheme in ("gptq", "awq"):
        oneshot_kwargs = dict(
            dataset=calibration_dataset(calib),
            num_calibration_samples=n_calib,
            max_seq_length=seq_len,
            shuffle_calibration_samples=False,
            batch_size=1,
        )

    if args.scheme == "awq" and not torch.cuda.is_available():
        cpu_without_pinning()
    spy = LibrarySpy()
    t0 = time.perf_counter()
    try:
        model = oneshot(model=model, tokenizer=tokenizer, recipe=modifier, **oneshot_kwargs)
    finally:
        spy.restore()
    quantize_seconds = time.perf_counter() - t0
    print(f"[llmcompressor_runner] oneshot {quantize_seconds:.1f} s", flush=True)

    weight_args, n_modules, module_names = quantized_weight_args(model)
    quant_args = {
        "modifier": "+".join(
            type(m).__name__ for m in (modifier if isinstance(modifier, list) else [modifier])
        ),
        "weights": weight_args,
        "input_activations": None,
        "targets": ["Linear"],
        "ignore": ignore,
        "n_quantized_modules": n_modules,
        "observers": spy.observer_summary(),
    }
    if args.scheme == "gptq":
        quant_args.update(
            block_size=modifier.block_size,
            dampening_frac=modifier.dampening_frac,
            actorder_requested=args.actorder,
            actorder=weight_args.get("actorder"),
            n_gptq_compressed_modules=spy.gptq.get("n_compressed_modules"),
            rtn_fallback_modules=spy.gptq.get("rtn_fallback_modules"),
            calibration={
                "n_samples": n_calib,
                "seq_len": seq_len,
                "shuffle": False,
                "batch_size": 1,
                "pipeline": "sequential (inferred)",
            },
        )
    if args.scheme == "awq":
        awq = modifier[0]
        quant_args.update(
            duo_scaling=awq.duo_scaling,
            n_grid=awq.n_grid,
            calibration={
                "n_samples": n_calib,
                "seq_len": seq_len,
                "shuffle": False,
                "batch_size": 1,
            },
        )
    quant_args["lm_head_quantized"] = any(n.split(".")[-1] == "lm_head" for n in module_names)

    t0 = time.perf_counter()
    ppl = {name: perplexity(model, ids) for name, ids in evals.items()}
    eval_seconds = time.perf_counter() - t0
    print(f"[llmcompressor_runner] quantized ppl {ppl} ({eval_seconds:.1f} s)", flush=True)

    result = {
        "tool": "llm-compressor",
        "version": metadata.version("llmcompressor"),
        "compressed_tensors": metadata.version("compressed-tensors"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "scheme": args.scheme,
        "wbits": args.wbits,
        "group_size": args.group_size,
        "quant_args": quant_args,
        "ppl_fp": ppl_fp,
        "ppl": ppl,
        "quantize_seconds": quantize_seconds,
        "fp_eval_seconds": fp_eval_seconds,
        "eval_seconds": eval_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "n_calib": n_calib,
        "seq_len": seq_len,
        "n_eval_windows": {name: ids.shape[0] for name, ids in evals.items()},
        "eval_seq_len": {name: ids.shape[1] for name, ids in evals.items()},
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
