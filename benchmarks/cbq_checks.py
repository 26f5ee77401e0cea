"""Small, quick checks behind CBQ's design choices (minutes on 2 cores).

1. Tiny random models of three families at W3 g32: RTN vs CBQ started from round-to-nearest vs
   CBQ started from GPTQ's codes (relative logit MSE on held-out random tokens, 3 seeds).
2. A tiny Llama with injected activation-outlier channels (2-3 % of the channels of every
   norm -> linear input scaled by 50, function-preserving) at W4A4: RTN, SmoothQuant + RTN, CBQ
   without CFP, CBQ, CBQ with learned migration scales (3 seeds).
3. SmolLM2-135M, one `down_proj` at W3 g64: relative error of AdaRound's soft weight at
   initialisation vs its hardened weight (why slimkit trains with the hardened forward).
4. SmolLM2-135M, RTN W3 g64 vs FP32 hidden states per block: per-token relative L2 and
   KL(softmax over hidden) (why the KL term is off by default).

    python benchmarks/cbq_checks.py        # writes benchmarks/results/cbq_checks.md
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import ROOT, machine_line  # noqa: E402

from slimkit import CBQConfig, RTNConfig, SmoothQuantConfig, quantize  # noqa: E402
from slimkit.quant.outliers import inject_outliers  # noqa: E402

logging.getLogger("slimkit").setLevel(logging.ERROR)
OUT = ROOT / "benchmarks" / "results" / "cbq_checks.md"
SEEDS = (0, 1, 2)


def tiny(family: str, seed: int, layers: int = 2, hidden: int = 64):
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256)  # fmt: skip
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, word_embed_proj_dim=hidden, vocab_size=256)  # fmt: skip
    else:
        cfg = tf.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, vocab_size=256
        )
    cfg._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def ids(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def logit_err(model, ref, x) -> float:
    with torch.no_grad():
        out = model(x).logits
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


def compare(make_base, configs: dict) -> dict[str, list[float]]:
    errs: dict[str, list[float]] = {k: [] for k in configs}
    for seed in SEEDS:
        base = make_base(seed)
        calib, held = ids(8, 32, 100 + seed), ids(8, 32, 200 + seed)
        with torch.no_grad():
            ref = base(held).logits
        for name, cfg in configs.items():
            torch.manual_seed(seed)
            model, _ = quantize(copy.deepcopy(base), cfg, calib)
            errs[name].append(logit_err(model, ref, held))
    return errs


def fmt(v: list[float]) -> str:
    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"


def main() -> None:
    lines = [
        "# CBQ design checks",
        "",
        "Command: `python benchmarks/cbq_checks.py`",
        machine_line(),
        "",
    ]
    common = dict(epochs=4, train_batch_size=2)
    lines += ["## 1. Rounding start, W3 g32, tiny random models (relative logit MSE, 3 seeds)", "",
              "| family | RTN | CBQ, nearest start | CBQ, GPTQ start |", "|---|---|---|---|"]  # fmt: skip
    for fam in ("llama", "opt", "gpt2"):
        e = compare(
            lambda s, f=fam: tiny(f, s, layers=3),
            {
                "rtn": RTNConfig(wbits=3, group_size=32),
                "near": CBQConfig(wbits=3, group_size=32, rounding_init="nearest", **common),
                "gptq": CBQConfig(wbits=3, group_size=32, **common),
            },
        )
        lines.append(f"| {fam} | {fmt(e['rtn'])} | {fmt(e['near'])} | {fmt(e['gptq'])} |")
        print(lines[-1], flush=True)

    def outlier_llama(seed):
        m = tiny("llama", seed)
        inject_outliers(m, fraction=0.03, k=50, seed=seed)
        return m

    wa = dict(wbits=4, abits=4, group_size=-1)
    e = compare(
        outlier_llama,
        {
            "RTN": RTNConfig(**wa),
            "SmoothQuant + RTN": SmoothQuantConfig(**wa, sym=False, alpha=0.5),
            "CBQ without CFP": CBQConfig(**wa, cfp=False, **common),
            "CBQ": CBQConfig(**wa, **common),
            "CBQ + learned migration": CBQConfig(**wa, learn_smooth=True, **common),
        },
    )
    lines += ["", "## 2. W4A4 with injected outlier channels (tiny Llama, relative logit MSE, 3 seeds)",
              "", "| method | error |", "|---|---|", *(f"| {k} | {fmt(v)} |" for k, v in e.items())]  # fmt: skip
    print("\n".join(lines[-len(e) :]), flush=True)

    from slimkit.llm.models import load_model, resolve_model_path
    from slimkit.quant.methods.cbq import LinearQuantizer
    from slimkit.quant.quantizer import QuantSpec

    model, tok = load_model(resolve_model_path("smollm2-135m"))
    w = model.model.layers[3].mlp.down_proj.weight.data.float()
    q = LinearQuantizer(w, QuantSpec(3, 64), "full", rank=8, soft=True)
    with torch.no_grad():
        soft, hard = q.weight(w), q.weight(w, hard=True)
    rel = [float((x - w).norm() / w.norm()) for x in (soft, hard)]
    lines += ["", "## 3. Soft vs hardened AdaRound weight at initialisation (SmolLM2 layer 3 down_proj, W3 g64)",
              "", f"relative error: soft {rel[0]:.3f}, hardened {rel[1]:.3f}"]  # fmt: skip

    from slimkit.data.text import calibration_windows

    x = calibration_windows(tok, "wiki-offline", 4, 256, seed=0)
    qm = copy.deepcopy(model)
    quantize(qm, RTNConfig(wbits=3, group_size=64))
    with torch.no_grad():
        a = model(x, output_hidden_states=True).hidden_states
        b = qm(x, output_hidden_states=True).hidden_states
    lines += ["", "## 4. RTN W3 g64 vs FP32 hidden states (SmolLM2, 4 x 256 wiki-offline tokens)", "",
              "| after block | rel. L2 (mean over tokens) | KL mean | KL median | KL max |", "|---|---|---|---|---|"]  # fmt: skip
    for k in (2, 10, 20, 25, 29, 30):
        ref, out = a[k].float(), b[k].float()
        l2 = ((ref - out).pow(2).sum(-1) / ref.pow(2).sum(-1)).mean()
        lr, lo = F.log_softmax(ref, -1), F.log_softmax(out, -1)
        kl = (lr.exp() * (lr - lo)).sum(-1)
        lines.append(f"| {k} | {float(l2):.3f} | {float(kl.mean()):.3f} | {float(kl.median()):.3f} | {float(kl.max()):.1f} |")  # fmt: skip
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
