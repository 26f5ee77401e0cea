"""Shared fixtures: tiny random models of every supported family, a tiny tokenizer, offline guard."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any hidden download fails loudly instead of hanging."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def tiny_config(family: str, *, layers: int = 2, hidden: int = 64, vocab: int = 256):
    import transformers as tf

    common = dict(vocab_size=vocab, max_position_embeddings=128)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {
            "llama": tf.LlamaConfig,
            "mistral": tf.MistralConfig,
            "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config,
        }[family]
        extra = {"head_dim": hidden // 4} if family == "qwen3" else {}
        # RoPE holds no position weights: a context as long as the default --calib-seq-len (512),
        # which slimkit refuses to exceed, costs nothing
        return cls(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            **extra,
            **{**common, "max_position_embeddings": 2048},
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            word_embed_proj_dim=hidden,
            **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, vocab_size=vocab
        )
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "opt", "gpt2"]


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).eval()


def random_ids(n: int = 8, seq: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE with 512 pieces trained on a little offline text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimkit.data import load_documents

    texts = [d.text for d in load_documents("wiki-offline", "train")[:400]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A save_pretrained directory of a tiny Llama with the tiny tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    m = tiny_model("llama", vocab=len(tiny_tokenizer), layers=3)
    m.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


class Crash(Exception):
    """Raised by :func:`crash_on_call` to simulate a killed run."""


def crash_on_call(monkeypatch, cls, method: str, n: int) -> None:
    """Make ``cls.method`` raise :class:`Crash` on its ``n``-th call (earlier calls run)."""
    original = getattr(cls, method)
    calls = {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, crashing)


def crash_in_checkpoint(monkeypatch, n: int, windows: set[int] | None = None) -> dict:
    """Kill the run right after the ``n``-th file-system step of the block-wise pipeline's
    checkpoint writes (counting only the checkpoints of ``windows``; None: all).

    The steps are every tensor file written, directory made, file or directory renamed, JSON
    written and file or directory deleted: a kill between any two of them is simulated. Returns a
    dict whose ``"steps"`` is the number of steps seen (compare it with ``n`` to know whether the
    run was killed at all).
    """
    import os
    from pathlib import Path

    from slimkit.llm import pipeline

    seen = {"steps": 0, "active": False}

    def counted(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if seen["active"]:
                seen["steps"] += 1
                if seen["steps"] == n:
                    raise Crash
            return out

        return wrapper

    for name in ("replace", "rename", "mkdir", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, counted(getattr(os, name)))
    monkeypatch.setattr(Path, "write_text", counted(Path.write_text))
    monkeypatch.setattr(pipeline, "save_file", counted(pipeline.save_file))
    original = pipeline.BlockwisePipeline._save_checkpoint

    def save_checkpoint(self, wi, *args, **kwargs):
        seen["active"] = windows is None or wi in windows
        try:
            return original(self, wi, *args, **kwargs)
        finally:
            seen["active"] = False

    monkeypatch.setattr(pipeline.BlockwisePipeline, "_save_checkpoint", save_checkpoint)
    return seen


def checkpoint_files_are_only_the_latest(d) -> bool:
    """True when a checkpoint directory holds progress.json and only the files it names."""
    import json
    from pathlib import Path

    d = Path(d)
    files = json.loads((d / "progress.json").read_text())["files"]
    streams = files["streams"].format(rank=0)
    named = {d / p for p in files["blocks"].values()} | {d / files["method"], d / streams}
    present = {p for p in d.rglob("*") if p.is_file()} - {d / "progress.json"}
    return present == named


@pytest.fixture
def one_thread():
    """Tests that run dozens of tiny models: one intra-op thread is many times faster on a shared
    two-core machine (thread hand-offs dominate matmuls of 64 x 64)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous: fixed ports collide when two
    test runs share a machine (EADDRINUSE)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def search_distances():
    """``fn(run)``: the task distance (KL of the mask logits / IoU to the float model) after
    Q-TinySAM at W4A4 with the MSE and with the task-aware scale search, on a fixed model and
    calibration set: ``{"mse": d, "task": d}``."""

    def fn(run):
        import copy

        from slimkit.sam.tinysam import quant as Q
        from slimkit.sam.train import load_trained

        dist = {}
        for search in ("mse", "task"):
            model = load_trained(run)
            fp = copy.deepcopy(model)
            cfg = Q.SamQuantConfig(calib_images=2, search_points=10, rounds=2, max_rows=256,
                                   search=search, wbits=4, abits=4)  # fmt: skip
            calib = Q.calibration_set(model, cfg.calib_images, cfg.calib_prompts)
            Q.quantize_model(model, cfg, calib)
            dist[search] = Q.task_distance(model, fp, *calib)
        return dist

    return fn
