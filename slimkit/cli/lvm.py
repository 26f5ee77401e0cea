"""The ``slimkit lvm`` command group (DeLVM): train-tokenizer, make-sentences, train, distill,
prompt."""

from __future__ import annotations

import json
from pathlib import Path

from slimkit.core.commands import Invocation, arg, command, group
from slimkit.core.errors import SlimkitError

group("lvm", help="autoregressive vision models over VQ tokens (DeLVM): slimkit lvm --help")
RUN = ("out", "resume", "overwrite")


@command("train-tokenizer", group="lvm", configs=["slimkit.lvm.train:TokenizerConfig"], run=RUN,
         out_help="tokenizer directory to create",
         help="train a VQ-VAE image tokenizer", description="Train a VQ-VAE image tokenizer.")  # fmt: skip
def train_tokenizer(inv: Invocation) -> int:
    from slimkit.lvm.train import train_tokenizer as train

    r = train(*inv.configs, **inv.run_kwargs)
    if r:
        rt = r["round_trip"]
        print(f"{r['out']}: round trip PSNR {rt['psnr']:.2f} dB on {rt['images']} held-out images, "
              f"{100 * rt['codebook_usage']:.1f} % of {inv.configs[0].codebook} codes used")  # fmt: skip
    return 0


@command("import-vqgan", group="lvm", run=("out", "overwrite"), out_help="tokenizer directory to create",
         args=[arg("weights", help="taming-layout VQGAN weights (.safetensors, or .ckpt / .pth of plain tensors)"),
               arg("--config", required=True, help="its shape: taming's YAML (model.params.ddconfig, embed_dim, n_embed) or JSON"),
               arg("--input-range", default="", choices=["", "-1,1", "0,1"],
                   help="pixel range the model expects (default: the config's, else taming's -1,1; open-muse: 0,1)")],
         help="turn a VQGAN checkpoint into a tokenizer directory",
         description="Load a VQGAN checkpoint in the taming key layout (weights_only / safetensors) "
                     "and write it as a tokenizer directory for make-sentences and prompt.")  # fmt: skip
def import_vqgan(inv: Invocation) -> int:
    from slimkit.core.rundir import atomic_output
    from slimkit.lvm.vqgan import load_vqgan, save_vqgan

    ns = inv.ns
    model = load_vqgan(
        ns.weights, ns.config, **({"input_range": ns.input_range} if ns.input_range else {})
    )
    with atomic_output(ns.out, overwrite=ns.overwrite) as tmp:
        save_vqgan(model, tmp)
    c = model.cfg
    print(f"{ns.out}: VQGAN f{c.factor}, {c.n_embed} codes of {c.embed_dim}, {c.resolution} px -> "
          f"{c.grid} x {c.grid} tokens, inputs in [{c.input_range}]")  # fmt: skip
    return 0


@command("make-sentences", group="lvm", configs=["slimkit.lvm.sentences:SentencesConfig"],
         run=("out", "overwrite"), out_help="sentence directory to create",
         help="visual sentences of task pairs as token shards",
         description="Make (input, annotation) pairs of several tasks, tokenize them and pack "
                     "them into train / val / test token shards.")  # fmt: skip
def make_sentences(inv: Invocation) -> int:
    from slimkit.lvm.sentences import make_sentences as make

    meta = make(*inv.configs, out=inv.ns.out, overwrite=inv.ns.overwrite)
    counts = ", ".join(f"{t} {n}" for t, n in meta["counts"]["train"].items())
    print(f"{inv.ns.out}: training sentences {counts}; {meta['sentence_tokens']} tokens each "
          f"(vocabulary {meta['vocab_size']})")  # fmt: skip
    return 0


def _print_lvm(r: dict) -> None:
    if r:
        ppl = ", ".join(f"{t} {v['ppl']:.2f}" for t, v in r["test"].items())
        print(
            f"{r['out']}: {r['parameters']:,} parameters; test perplexity of target tokens: {ppl}"
        )


@command("train", group="lvm", configs=["slimkit.lvm.train:LVMTrainConfig"], run=RUN,
         help="train the autoregressive vision model on visual sentences",
         description="Train the autoregressive vision model (a Llama / PanGu-π causal LM over "
                     "VQ codes) on visual sentences.")  # fmt: skip
def train(inv: Invocation) -> int:
    from slimkit.lvm.train import train_lvm

    _print_lvm(train_lvm(*inv.configs, **inv.run_kwargs))
    return 0


@command("distill", group="lvm", configs=["slimkit.lvm.train:LVMTrainConfig"], run=RUN,
         help="distil a larger LVM into a smaller one (CE + masked KL)",
         description="Distil a larger LVM (--teacher) into a smaller one: CE + tau^2 KL, masked "
                     "at the ignored positions.")  # fmt: skip
def distill(inv: Invocation) -> int:
    from slimkit.lvm.train import distill_lvm

    _print_lvm(distill_lvm(*inv.configs, **inv.run_kwargs))
    return 0


@command("prompt", group="lvm",
         args=[arg("model", help="LVM directory (lvm train / distill)"),
               arg("--examples", help="in1.png,out1.png,in2.png,out2.png,... example pairs"),
               arg("--query", help="query image"),
               arg("--out", output=True, help="answer image (PNG) to write"),
               arg("--budget", type=int, default=0, help="most tokens in context + answer (0 = the model's context)"),
               arg("--sentences", help="instead: prompt with the sentences of this directory and report per-task metrics"),
               arg("--split", default="test", choices=["val", "test"]),
               arg("--n", type=int, default=0, help="prompts scored (0 = the whole split)"),
               arg("--grid", output=True, help="also write a picture grid (examples, query, answer, reference) here"),
               arg("--json", output=True, help="write the metrics here"),
               arg("--device", default="auto", help="auto, cpu, cuda[:N]")],
         help="answer a visual prompt (example pairs + query) or score prompts per task",
         description="Greedy visual prompting with a token budget: example pairs and a query "
                     "image -> the answer image; or per-task PSNR / mIoU over a sentence split.")  # fmt: skip
def prompt(inv: Invocation) -> int:
    from slimkit.core.dist import resolve_device
    from slimkit.lvm.prompt import answer, evaluate_prompts, read_image, save_grid, write_image
    from slimkit.lvm.train import load_lvm
    from slimkit.lvm.vq import load_vq

    ns = inv.ns
    device = resolve_device(ns.device)
    model, info = load_lvm(ns.model, device)
    vq = load_vq(info["tokenizer"], device)
    if ns.sentences:
        from slimkit.lvm.sentences import Sentences, to_float

        data = Sentences(ns.sentences)
        if data.meta["vocab_size"] != info["vocab_size"]:
            raise SlimkitError(
                f"{ns.sentences} has vocabulary {data.meta['vocab_size']}, the model {info['vocab_size']}"
            )
        res = evaluate_prompts(model, vq, data, ns.split, ns.n, ns.budget)
        for t, r in res.items():
            print(
                f"{t}\t{r['metric']} {r['value']:.3f}\t(tokenizer ceiling {r['tokenizer_ceiling']:.3f}, {r['prompts']} prompts)"
            )
        if ns.json:
            Path(ns.json).write_text(json.dumps(res, indent=1) + "\n")
        if ns.grid:
            sp, rows, seen = data.split(ns.split), [], set()
            for i in range(len(sp["task"])):
                t = int(sp["task"][i])
                if t in seen:
                    continue
                seen.add(t)
                pairs = to_float(sp["pairs"][i])
                ex = [im for p in pairs[:-1] for im in p]
                pred, _ = answer(model, vq, ex, pairs[-1, 0], info["bos"], ns.budget)
                rows.append([*ex, pairs[-1, 0], pred, pairs[-1, 1]])
            save_grid(rows, ns.grid)
        return 0
    if not (ns.examples and ns.query and ns.out):
        raise SlimkitError(
            "give --examples, --query and --out (or --sentences DIR to score prompts)"
        )
    files = [f.strip() for f in ns.examples.split(",") if f.strip()]
    if not files or len(files) % 2:
        raise SlimkitError(f"--examples needs input,output pairs (got {len(files)} images)")
    S = info["image_size"]
    ex = [read_image(f, S) for f in files]
    q = read_image(ns.query, S)
    img, truncated = answer(model, vq, ex, q, info["bos"], ns.budget)
    write_image(img, ns.out)
    if ns.grid:
        save_grid([[*ex, q, img]], ns.grid)
    print(
        f"{ns.out}: answer to {len(files) // 2} example pairs + query"
        + (" (truncated by the token budget; the rest filled with code 0)" if truncated else "")
    )
    return 0
