"""DeLVM at toy scale: a long-tailed task with and without augmentation (and with real data
instead), a small student with and without KD from a larger teacher, and W4 GPTQ of the trained
model against its FP weights.

Set-up (one process, one thread; spec delvm.md section 4 scaled to the CPU budget):
- tokenizer: the VQ-VAE of `slimkit lvm train-tokenizer` on 2,000 generated scenes, 32 x 32 ->
  8 x 8 = 64 codes of K = 128, trained once (seed 0);
- sentences: colorize, denoise (photos-free scenes) and segment, 2 pairs per sentence (257
  tokens with BOS); 200 training sentences per common task, segment given 5 % of the training
  sentences (21); 20 validation and 20 test sentences per task;
- arms (3 seeds each; the seed sets initialisation, batch order and augmentation):
  `plain` (the long-tailed data), `augment` (`--augment long-tail`: segment augmented to parity
  with six-crop / flips / resized crops), `real` (segment given 200 real sentences instead), and
  `kd` (the `plain` student distilled from a larger teacher trained once on the same data);
- metrics on the test split: per-task perplexity of the target-image tokens, and the prompt
  metric of the answer to (one example pair + query): PSNR (dB) for colorize / denoise, fg/bg
  mIoU for segment. Validation numbers are in the JSON; no hyper-parameter was tuned (the
  values below were fixed beforehand), so neither split chose anything.

    python benchmarks/delvm.py                 # everything, seeds 0,1,2 (~10 min on one core)
    python benchmarks/delvm.py --seeds 0 --prompts 15
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, machine_line, mean_std, seed_list  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache" / "delvm"
TASKS = "colorize,denoise,segment"
STUDENT = dict(hidden_size=64, intermediate_size=192, layers=2, heads=4, kv_heads=4)
TEACHER = dict(hidden_size=128, intermediate_size=384, layers=3, heads=4, kv_heads=4)
TRAIN = dict(batch_size=8, steps=250, warmup_steps=20, lr=3e-3, min_lr=3e-4, eval_every=250,
             checkpoint_every=0)  # fmt: skip


def _quiet():
    import logging

    logging.getLogger("slimkit").setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def tokenizer() -> Path:
    from slimkit.lvm.train import TokenizerConfig, train_tokenizer

    out = CACHE / "vq"
    if not (out / "report.json").is_file():
        train_tokenizer(TokenizerConfig(n_images=2000, image_size=32, codebook=128, embed_dim=16, channels=32,
                                        steps=250, batch_size=32, eval_images=128, checkpoint_every=0),
                        out=out, overwrite=True)  # fmt: skip
    return out


def sentences(vq: Path, rare: bool) -> Path:
    from slimkit.lvm.sentences import SentencesConfig, make_sentences

    out = CACHE / ("sent-longtail" if rare else "sent-balanced")
    if not (out / "sentences.json").is_file():
        make_sentences(SentencesConfig(tokenizer=str(vq), tasks=TASKS, sentences=200, pairs=2, eval_sentences=20,
                                       rare_task="segment" if rare else "", rare_fraction=0.05),
                       out=out, overwrite=True)  # fmt: skip
    return out


TRAINED: list[str] = []


def train(name: str, sent: Path, seed: int, arch: dict, **kw) -> dict:
    from slimkit.lvm.train import LVMTrainConfig, distill_lvm, train_lvm

    out = CACHE / "runs" / f"{name}-s{seed}"
    if not (out / "report.json").is_file():
        TRAINED.append(out.name)
        cfg = LVMTrainConfig(sentences=str(sent), seed=seed, **arch, **{**TRAIN, **kw})
        (distill_lvm if cfg.teacher else train_lvm)(cfg, out=out, overwrite=True)
    return json.loads((out / "report.json").read_text()) | {"dir": str(out)}


def prompt_metrics(model_dir: str, vq: Path, sent: Path, n: int, model=None) -> dict:
    from slimkit.lvm.prompt import evaluate_prompts
    from slimkit.lvm.sentences import Sentences
    from slimkit.lvm.train import load_lvm
    from slimkit.lvm.vq import load_vq

    if model is None:
        model, _ = load_lvm(model_dir)
    return evaluate_prompts(model, load_vq(vq), Sentences(sent), "test", n)


def trivial_answers(sent: Path, n: int) -> dict:
    """The prompt metric of answers that ignore the examples: an all-black image, and the query
    itself (what a model that learnt nothing about the task could output)."""
    from slimkit.lvm.prompt import task_metric
    from slimkit.lvm.sentences import Sentences, to_float

    data = Sentences(sent)
    sp, meta = data.split("test"), data.meta
    out: dict[str, dict] = {}
    for i in range(min(n, len(sp["task"]))):
        task = meta["tasks"][int(sp["task"][i])]
        pairs = to_float(sp["pairs"][i])
        query, ref = pairs[-1, 0], pairs[-1, 1]
        r = out.setdefault(task, {"black": [], "query": []})
        r["black"].append(task_metric(meta["kinds"][task], torch.zeros_like(ref), ref)[1])
        r["query"].append(task_metric(meta["kinds"][task], query, ref)[1])
    return {t: {k: sum(v) / len(v) for k, v in r.items()} for t, r in out.items()}


def gptq(lvm: dict, sent: Path, vq: Path, n: int) -> dict:
    """W4 g32 GPTQ through `slimkit quantize` (calibrated on training sentences), then the same
    per-task metrics with the fake-quantized weights."""
    from slimkit.lvm.sentences import Sentences
    from slimkit.lvm.train import evaluate_tokens, load_lvm
    from slimkit.quant.methods.gptq import GPTQConfig
    from slimkit.workflows.llm import load_for_eval, quantize_run
    from slimkit.workflows.run_config import CalibConfig

    out = CACHE / "w4"
    if not (out / "report.json").is_file():
        quantize_run(lvm["dir"], GPTQConfig(wbits=4, group_size=32), CalibConfig(calib=f"sentences:{sent}", n_calib=32,
                     calib_seq_len=257), out=out, overwrite=True)  # fmt: skip
    loaded = load_for_eval(str(out))
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    _, info = load_lvm(lvm["dir"])
    data = Sentences(sent)
    test = evaluate_tokens(model, data.rows("test"), data.split("test")["task"], data.meta, "cpu")
    return {"test": test, "prompts": prompt_metrics(str(out), vq, sent, n, model=model)}


def summarize(runs: dict, tasks: list[str]) -> list[str]:
    lines = ["| arm | " + " | ".join(f"{t} ppl" for t in tasks) + " | " + " | ".join(f"{t} prompt" for t in tasks) + " |",
             "|---|" + "---|" * (2 * len(tasks))]  # fmt: skip
    for arm, rs in runs.items():
        ppl = [mean_std([r["test"][t]["ppl"] for r in rs]) for t in tasks]
        pm = []
        for t in tasks:
            vals = [r["prompts"][t]["value"] for r in rs if t in r["prompts"]]
            fmt = "{:.3f}" if rs[0]["prompts"][t]["metric"] == "miou" else "{:.2f}"
            pm.append(mean_std(vals, fmt))
        lines.append(f"| {arm} (n={len(rs)}) | " + " | ".join(ppl) + " | " + " | ".join(pm) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=seed_list, default=[0, 1, 2])
    ap.add_argument(
        "--prompts", type=int, default=30, help="test prompts scored per model (first N)"
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    _quiet()
    t0, c0 = time.time(), time.process_time()
    vq = tokenizer()
    longtail, balanced = sentences(vq, True), sentences(vq, False)
    tasks = json.loads((longtail / "sentences.json").read_text())["tasks"]
    runs: dict[str, list] = {"plain": [], "augment": [], "real": [], "kd": []}
    teacher = train("teacher", longtail, 0, TEACHER, steps=400)
    teacher["prompts"] = prompt_metrics(teacher["dir"], vq, longtail, a.prompts)
    for seed in a.seeds:
        for arm, sent, kw in (("plain", longtail, {}), ("augment", longtail, {"augment": "long-tail"}),
                              ("real", balanced, {}), ("kd", longtail, {"teacher": teacher["dir"]})):  # fmt: skip
            r = train(arm, sent, seed, STUDENT, **kw)
            r["prompts"] = prompt_metrics(r["dir"], vq, sent, a.prompts)
            runs[arm].append(r)
            print(
                f"{arm} seed {seed}: " + ", ".join(f"{t} {r['test'][t]['ppl']:.2f}" for t in tasks),
                flush=True,
            )
    w4 = gptq(runs["plain"][0], longtail, vq, a.prompts)
    trivial = trivial_answers(longtail, a.prompts)
    secs, cpu = time.time() - t0, time.process_time() - c0
    vq_rep = json.loads((vq / "report.json").read_text())["round_trip"]
    keep = (
        "test",
        "val",
        "prompts",
        "parameters",
        "augmented_sentences",
        "train_sentences",
        "seconds",
    )
    data = {"command": "python benchmarks/delvm.py " + " ".join(sys.argv[1:]), "machine": machine_line(),
            "seconds": secs, "cpu_seconds": cpu, "tokenizer_round_trip": vq_rep, "teacher": {k: teacher.get(k) for k in keep},
            "runs": {arm: [{k: r.get(k) for k in keep} for r in rs] for arm, rs in runs.items()},
            "w4_gptq": w4, "trivial_answers": trivial, "trained_in_this_invocation": TRAINED, "fp_of_w4": {k: runs["plain"][0].get(k) for k in ("test", "prompts")},
            "student": STUDENT, "teacher_arch": TEACHER, "train": TRAIN}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "delvm.json").write_text(json.dumps(data, indent=1) + "\n")
    ceil = runs["plain"][0]["prompts"]
    md = ["# DeLVM at toy scale", "",
          f"Command: `{data['command'].strip()}` ({cpu / 60:.1f} min of one CPU thread, {secs / 60:.1f} min "
          f"wall on a shared machine; {len(TRAINED)} of {1 + 4 * len(a.seeds)} models trained in this "
          f"invocation, the rest read from benchmarks/.cache). {data['machine']}", "",
          "Tokenizer: VQ-VAE, 32 x 32 generated scenes -> 8 x 8 codes of 128; round trip on 128 "
          f"held-out images: PSNR {vq_rep['psnr']:.2f} dB, {100 * vq_rep['codebook_usage']:.0f} % of the codes used.",
          "Sentences: 2 (input, target) pairs of one task, 257 tokens with BOS; colorize and denoise "
          "200 training sentences each, **segment 21 (5 %)**; 20 test sentences per task.",
          f"Student: Llama d {STUDENT['hidden_size']}, {STUDENT['layers']} layers "
          f"({runs['plain'][0]['parameters']:,} parameters); teacher d {TEACHER['hidden_size']}, "
          f"{TEACHER['layers']} layers ({teacher['parameters']:,}), 400 steps; students {TRAIN['steps']} "
          f"steps of {TRAIN['batch_size']} sentences, lr {TRAIN['lr']}. Nothing was tuned (validation "
          "numbers in delvm.json).", "",
          "Test split, mean ± std over seeds " + ",".join(map(str, a.seeds)) + ". ppl: perplexity of the "
          "target-image tokens (lower is better). prompt: the answer to one example pair + the query, "
          "greedy, against the reference target: PSNR in dB (colorize, denoise), fg/bg mIoU (segment); "
          f"higher is better, on the first {a.prompts} test prompts.", "",
          *summarize(runs, tasks), "",
          "Teacher: " + ", ".join(f"{t} ppl {teacher['test'][t]['ppl']:.2f}" for t in tasks) + "; prompts "
          + ", ".join(f"{t} {teacher['prompts'][t]['value']:.3f}" for t in tasks if t in teacher["prompts"]) + ".",
          "Tokenizer ceiling of the prompt metric (the reference target encoded and decoded): "
          + ", ".join(f"{t} {ceil[t]['tokenizer_ceiling']:.3f}" for t in tasks if t in ceil) + ". "
          "Answers that ignore the examples: an all-black image "
          + ", ".join(f"{t} {trivial[t]['black']:.3f}" for t in tasks if t in trivial) + "; the query itself "
          + ", ".join(f"{t} {trivial[t]['query']:.3f}" for t in tasks if t in trivial) + ".", "",
          "## W4 GPTQ of the trained LVM (plain arm, seed 0)", "",
          "`slimkit quantize` with `--method gptq --wbits 4 --group-size 32 --calib sentences:DIR` (32 "
          "training windows of 257 tokens); the same test metrics on the fake-quantized weights.", "",
          "| model | " + " | ".join(f"{t} ppl" for t in tasks) + " | " + " | ".join(f"{t} prompt" for t in tasks) + " |",
          "|---|" + "---|" * (2 * len(tasks)),
          "| FP | " + " | ".join(f"{runs['plain'][0]['test'][t]['ppl']:.2f}" for t in tasks) + " | "
          + " | ".join(f"{runs['plain'][0]['prompts'][t]['value']:.3f}" for t in tasks) + " |",
          "| W4 g32 | " + " | ".join(f"{w4['test'][t]['ppl']:.2f}" for t in tasks) + " | "
          + " | ".join(f"{w4['prompts'][t]['value']:.3f}" for t in tasks) + " |", ""]  # fmt: skip
    (RESULTS / "delvm.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
