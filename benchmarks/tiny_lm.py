"""Tiny-LM recipes at CPU scale: PanGu-π modules, inheritance, multi-round training, tokenizer size.

Every arm trains with `slimkit train-lm` on wiki-offline with the same token budget, seeds 0..n-1
(initialisation and data order), and is evaluated on the first --eval-windows windows of the
validation split. Arms:

(a) architecture, equal parameter count: vanilla Llama vs +SIAF (n=2) vs +AS (d/16) vs PanGu-π
    (both); the FFN width of each PanGu-π arm is lowered so its parameter count matches the
    vanilla model's (within one FFN channel per block); per-layer collapse metrics of seed 0.
(b) random init vs inheritance from SmolLM2-135M (tokenizer compressed to --vocab first, then
    `slimkit inherit` to 8 blocks, hidden 192, FFN 384, 2 KV groups (head_dim 64 kept) with the
    Taylor score, and with learnable masks; the random arm is the child's exact architecture with
    fresh weights).
(c) one round vs two rounds (--keep 0.5) with the same number of optimizer steps in total; the
    second round drawn by softmax(loss) (the paper) or uniformly (ablation: same data reuse);
    the learning rate restarts its warm-up + cosine at round two (slimkit's default) or runs one
    cosine over both rounds (ablation: `two-continue`).
(d) original SmolLM2 tokenizer (49,152) vs the compressed one: parameters and validation bits
    per character (perplexities of different tokenizers are not comparable).
Throughput: slimkit's trainer vs a minimal PyTorch loop on the same model, same batch, in one process.

    python benchmarks/tiny_lm.py                       # all parts, 3 seeds
    python benchmarks/tiny_lm.py --parts a --seeds 0,1,2

Results: benchmarks/results/tiny_lm.json (a rerun skips finished runs), tiny_lm.md, tiny_lm_collapse.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, mean_std, seed_list, slimkit_logged  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "tiny_lm"
# the arms of each part, as named in results and accepted by --arms ("<part>-<arm>")
ARMS = {
    "a": ["vanilla", "siaf", "as", "pangu-pi"],
    "b": ["random", "inherit", "inherit-mask"],
    "c": ["one", "two", "two-uniform", "two-continue"],
    "d": ["original", "compressed"],
}
SHAPE = {"hidden_size": 128, "layers": 8, "heads": 4, "kv_heads": 2, "intermediate_size": 384}


def sk(args: list[str], log: Path) -> None:
    slimkit_logged(args, log)


def n_params(arch: str, ffn: int, vocab: int, siaf: bool, aug: bool) -> int:
    from slimkit.tinylm.pangu_pi import PanguPiConfig, PanguPiForCausalLM

    cfg = PanguPiConfig(vocab_size=vocab, hidden_size=SHAPE["hidden_size"], intermediate_size=ffn,
                        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                        num_key_value_heads=SHAPE["kv_heads"], tie_word_embeddings=True,
                        siaf=arch == "pangu-pi" and siaf, augmented_shortcut=arch == "pangu-pi" and aug, as_ratio=16)  # fmt: skip
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in PanguPiForCausalLM(cfg).parameters())


def matched_ffn(vocab: int, siaf: bool, aug: bool) -> int:
    target = n_params("llama", SHAPE["intermediate_size"], vocab, False, False)
    return min(range(SHAPE["intermediate_size"] - 64, SHAPE["intermediate_size"] + 1),
               key=lambda f: abs(n_params("pangu-pi", f, vocab, siaf, aug) - target))  # fmt: skip


def train(name: str, args: list[str], a, res: dict) -> dict:
    if name in res:
        return res[name]
    if a.arms and name.rsplit("-s", 1)[0] not in a.arms:  # not asked for this time
        return {}
    out = CACHE / "runs" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sk(["train-lm", *args, "--seq-len", str(a.seq_len), "--batch-size", str(a.batch), "--eval-windows",
        str(a.eval_windows), "--eval-every", str(10**9), "--checkpoint-every", "100", "--out", str(out),
        "--overwrite"], out.with_suffix(".log"))  # fmt: skip
    rep = json.loads((out / "report.json").read_text())
    r = {"val_ppl": rep["final_val_ppl"], "parameters": rep["parameters"], "tokens_per_second": rep["tokens_per_second"],
         "seconds": time.time() - t0, "final_loss": rep["history"][-1]["loss"]}  # fmt: skip
    r["bits_per_char"] = math.log2(r["val_ppl"]) * tokens_per_char(out)
    res[name] = r
    return r


_TPC: dict = {}


def tokens_per_char(model_dir: Path) -> float:
    """Validation tokens per character of the run's tokenizer (the eval protocol's text)."""
    from transformers import AutoTokenizer

    from slimkit.tinylm.tokenizer import tokens_per_char as tpc

    tok = AutoTokenizer.from_pretrained(model_dir)
    key = len(tok)
    if key not in _TPC:
        _TPC[key] = tpc(tok, "wiki-offline", "validation")
    return _TPC[key]


def compressed_tokenizer(a) -> Path:
    out = CACHE / f"smollm2-tok{a.vocab}"
    if not (out / "compress_report.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        sk(["compress-tokenizer", "smollm2-135m", "--data", "wiki-offline", "--vocab", str(a.vocab), "--out", str(out)],
           out.with_suffix(".log"))  # fmt: skip
    return out


def shape_args(ffn: int | None = None) -> list[str]:
    s = {**SHAPE, **({"intermediate_size": ffn} if ffn else {})}
    return [f"--{k.replace('_', '-')}={v}" for k, v in s.items()]


def part_a(a, res, seeds):
    tok = str(compressed_tokenizer(a))
    arms = {"vanilla": ("llama", True, True), "siaf": ("pangu-pi", True, False),
            "as": ("pangu-pi", False, True), "pangu-pi": ("pangu-pi", True, True)}  # fmt: skip
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok))
    for s in seeds:
        for arm, (arch, siaf, aug) in arms.items():
            ffn = SHAPE["intermediate_size"] if arm == "vanilla" else matched_ffn(vocab, siaf, aug)
            flags = ["--arch", arch, "--tokenizer", tok, *shape_args(ffn), "--siaf" if siaf else "--no-siaf",
                     "--augmented-shortcut" if aug else "--no-augmented-shortcut", "--as-ratio", "16",
                     "--steps", str(a.steps), "--seed", str(s)]  # fmt: skip
            r = train(f"a-{arm}-s{s}", flags, a, res)
            if r:
                r["ffn"] = ffn
            yield


def collapse(a, res):
    from slimkit.data.text import eval_windows
    from slimkit.llm.models import load_model
    from slimkit.tinylm.collapse import collapse_profile, plot_profiles

    profiles = {}
    for arm in ("vanilla", "siaf", "as", "pangu-pi"):
        d = CACHE / "runs" / f"a-{arm}-s0"
        if not (d / "report.json").is_file():
            return
        model, tok = load_model(str(d))
        w = eval_windows(tok, "wiki-offline", a.seq_len, max_windows=8, split="validation")
        profiles[arm] = collapse_profile(model, w)
    plot_profiles(profiles, str(RESULTS / "tiny_lm_collapse.png"))
    res["collapse"] = profiles


B_SHAPE = {
    "hidden": 192,
    "kv_groups": 2,
}  # SmolLM2 keeps head_dim 64 and 3 query heads per KV group:
# 2 groups = 6 heads, and the hidden size must be a multiple of the head count


def random_like(child: Path, out: Path) -> Path:
    """The child's exact architecture and tokenizer with fresh random weights (the random arm)."""
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(child))
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(child).save_pretrained(out)
    return out


def part_b(a, res, seeds):
    tok = compressed_tokenizer(a)
    child, masked = CACHE / "inherit-init", CACHE / "inherit-mask-init"
    for d, score in ((child, "taylor"), (masked, "mask")):
        if not (d / "inherit.json").is_file():
            sk(["inherit", str(tok), "--layers", str(SHAPE["layers"]), "--hidden", str(B_SHAPE["hidden"]),
                "--ffn", str(SHAPE["intermediate_size"]), "--kv-groups", str(B_SHAPE["kv_groups"]), "--score", score,
                "--out", str(d)], d.with_suffix(".log"))  # fmt: skip
    rand = random_like(child, CACHE / "random-init")
    lr = [
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-4",
    ]  # the same for every arm: gentler for inherited weights
    for s in seeds:
        for arm, init in (("random", rand), ("inherit", child), ("inherit-mask", masked)):
            train(
                f"b-{arm}-s{s}",
                ["--init", str(init), "--steps", str(a.steps), "--seed", str(s), *lr],
                a,
                res,
            )
            yield


def part_c(a, res, seeds):
    tok = str(compressed_tokenizer(a))
    first = int(round(a.steps / 1.5))
    for s in seeds:
        base = ["--arch", "pangu-pi", "--tokenizer", tok, *shape_args(), "--seed", str(s)]
        train(f"c-one-s{s}", [*base, "--steps", str(a.steps)], a, res)
        yield
        train(
            f"c-two-s{s}", [*base, "--steps", str(first), "--rounds", "2", "--keep", "0.5"], a, res
        )
        yield
        two = [*base, "--steps", str(first), "--rounds", "2", "--keep", "0.5"]
        train(f"c-two-uniform-s{s}", [*two, "--round-sampling", "uniform"], a, res)
        yield
        train(f"c-two-continue-s{s}", [*two, "--round-schedule", "continue"], a, res)
        yield


def part_d(a, res, seeds):
    tok = str(compressed_tokenizer(a))
    for s in seeds:
        for name, t in (("original", "smollm2-135m"), ("compressed", tok)):
            train(f"d-{name}-s{s}", ["--arch", "pangu-pi", "--tokenizer", t, *shape_args(), "--steps", str(a.steps),
                                      "--seed", str(s)], a, res)  # fmt: skip
            yield


def throughput(a, res):
    """slimkit's trainer (`train_lm`, its step loop timed by the trainer itself: batches, autocast,
    backward, clipping, optimizer, schedule, loss logging) vs a minimal PyTorch loop on the same
    model shape and batches, alternated three times, best of each."""
    import tempfile

    import torch

    from slimkit.tinylm.pangu_pi import PanguPiForCausalLM
    from slimkit.tinylm.train import LMTrainConfig, batch_at, load_tokenizer, token_stream, train_lm

    tok = load_tokenizer(str(compressed_tokenizer(a)))
    stream = token_stream(tok, "wiki-offline")
    n = 20
    cfg = LMTrainConfig(tokenizer=str(compressed_tokenizer(a)), seq_len=a.seq_len, batch_size=a.batch,
                        steps=n, warmup_steps=2, eval_every=10**9, eval_windows=1, checkpoint_every=10**9,
                        hidden_size=SHAPE["hidden_size"], layers=SHAPE["layers"], heads=SHAPE["heads"],
                        kv_heads=SHAPE["kv_heads"], intermediate_size=SHAPE["intermediate_size"])  # fmt: skip

    def plain():
        torch.manual_seed(0)
        model = PanguPiForCausalLM(cfg.model_config(len(tok), tok)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        t0 = time.perf_counter()
        for s in range(n):
            x = batch_at(stream, s, cfg)
            logits = model(x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        return n * a.batch * a.seq_len / (time.perf_counter() - t0)

    def slim():
        with tempfile.TemporaryDirectory() as d:
            return train_lm(cfg, out=Path(d) / "run")["step_tokens_per_second"]

    best = {"plain": 0.0, "slimkit": 0.0}
    for _ in range(3):
        best["plain"] = max(best["plain"], plain())
        best["slimkit"] = max(best["slimkit"], slim())
    res["throughput"] = {**best, "ratio": best["slimkit"] / best["plain"], "steps": n}


def summarize(res: dict, a) -> str:
    def rows(prefix, arms, key="val_ppl", fmt="{:.2f}"):
        out = []
        for arm in arms:
            rs = [v for k, v in res.items() if k.startswith(f"{prefix}-{arm}-s")]
            if rs:
                out.append(f"| {arm} | {len(rs)} | {rs[0]['parameters']:,} | {mean_std([r[key] for r in rs], fmt)} | "
                           f"{mean_std([r['bits_per_char'] for r in rs], '{:.3f}')} | {mean_std([r['tokens_per_second'] for r in rs], '{:.0f}')} |")  # fmt: skip
        return out

    head = [
        "| arm | n | parameters | validation ppl | bits / char | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    lines = [
        "# Tiny-LM recipes on wiki-offline (CPU scale)",
        "",
        f"Shape: hidden {SHAPE['hidden_size']}, {SHAPE['layers']} blocks, {SHAPE['heads']} heads / {SHAPE['kv_heads']} KV, FFN "
        f"{SHAPE['intermediate_size']}; {a.steps} steps of {a.batch} x {a.seq_len} tokens (same budget in every arm), AdamW "
        f"(0.9, 0.95) lr 3e-3 -> 3e-4 cosine, tokenizer: SmolLM2's compressed to {a.vocab} pieces unless stated. "
        f"Validation: first {a.eval_windows} windows of {a.seq_len} tokens of the wiki-offline validation split. "
        "Mean ± sample std over seeds (n).",
        "",
        f"Command: `python benchmarks/tiny_lm.py {' '.join(sys.argv[1:])}`".rstrip(),
        machine_line(),
        "",
        "## (a) PanGu-π modules at equal parameter count", "", *head,
        *rows("a", ARMS["a"]),
    ]  # fmt: skip
    if "collapse" in res:
        lines += ["", "Per-layer collapse (seed 0; d_rel / d(0.8), layer 0 = embeddings):", "",
                  "| layer | " + " | ".join(res["collapse"]) + " |", "|---" * (len(res["collapse"]) + 1) + "|"]  # fmt: skip
        n = len(next(iter(res["collapse"].values())))
        for i in range(n):
            lines.append(
                f"| {i} | "
                + " | ".join(
                    f"{p[i]['d_rel']:.3f} / {p[i]['d80']:.1f}" for p in res["collapse"].values()
                )
                + " |"
            )
        lines += ["", "Plot: tiny_lm_collapse.png"]
    lines += [
        "",
        "## (b) random initialisation vs inheritance from SmolLM2-135M",
        "",
        f"Shape of this part: 8 blocks, hidden {B_SHAPE['hidden']}, FFN 384, {B_SHAPE['kv_groups']} KV groups of 3 query "
        "heads, head_dim 64 (SmolLM2's); lr 1e-3 -> 1e-4 in every arm. inherit: Taylor scores; inherit-mask: "
        "learnable masks; random: the same architecture, fresh weights.",
        "",
        *head,
        *rows("b", ARMS["b"]),
    ]
    lines += [
        "",
        "## (c) one round vs two rounds (same optimizer steps)",
        "",
        "two: 200 steps, then 100 batches re-drawn from them by softmax(loss), learning rate "
        "restarted; two-uniform: re-drawn uniformly; two-continue: one cosine over both rounds.",
        "",
        *head,
        *rows("c", ARMS["c"]),
    ]
    lines += ["", "## (d) tokenizer size", "", *head, *rows("d", ARMS["d"])]
    if "throughput" in res:
        t = res["throughput"]
        lines += ["", f"Throughput, same model shape and batches, best of 3 x {t.get('steps', 10)} steps: minimal PyTorch loop "
                  f"{t['plain']:.0f} tok/s, slimkit's trainer (`train_lm`, its step loop) {t['slimkit']:.0f} tok/s "
                  f"(ratio {t['ratio']:.2f}; target >= 0.90)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", default="a,b,c,d,t")
    p.add_argument("--seeds", type=seed_list, default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--results", default=str(RESULTS / "tiny_lm.json"))
    p.add_argument(
        "--arms", default="", help="only these arms, e.g. c-two-continue,d-original (default: all)"
    )
    a = p.parse_args()
    a.arms = [x for x in a.arms.split(",") if x]
    known = [f"{part}-{arm}" for part, arms in ARMS.items() for arm in arms]
    for x in a.arms:
        if x not in known:
            raise SystemExit(f"unknown arm {x!r}; choose from {', '.join(known)}")
    seeds = a.seeds
    path = Path(a.results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res = json.loads(path.read_text()) if path.exists() else {}

    def save():
        path.write_text(json.dumps(res, indent=1) + "\n")
        path.with_suffix(".md").write_text(summarize(res, a))

    parts = a.parts.split(",")
    gens = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}
    for part in parts:
        if part in gens:
            for _ in gens[part](a, res, seeds):
                save()
            if part == "a" and "collapse" not in res:
                collapse(a, res)
                save()
    if "t" in parts and "throughput" not in res:
        throughput(a, res)
        save()
    print(summarize(res, a))


if __name__ == "__main__":
    main()
