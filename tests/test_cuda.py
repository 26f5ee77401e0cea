"""Device selection, and the trainers / predictor on a GPU (skipped where CUDA is absent): a CUDA
run must match the same run on the CPU within float round-off, and write CPU tensors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.core.dist import resolve_device
from slimkit.core.errors import SlimkitError

sys.path.insert(0, str(Path(__file__).resolve().parent))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SlimkitError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SlimkitError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(SlimkitError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def _history(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "report.json").read_text())["history"]]


@cuda
@pytest.mark.parametrize("loss", ["ofa", "fitnet"])
def test_distillation_on_cuda_matches_cpu(tmp_path, loss):
    from safetensors.torch import load_file

    from slimkit.distill.train import DistillConfig, TrainConfig, run_training

    base = dict(data="digits", epochs=2, batch_size=32, train_subset=96, warmup_epochs=0.5)
    run_training(TrainConfig(arch="tiny-vit", epochs=1, device="cpu", **{k: v for k, v in base.items() if k != "epochs"}),
                 out=tmp_path / "teacher")  # fmt: skip
    reps = {}
    for dev in ("cpu", "cuda"):
        cfg = DistillConfig(
            arch="tiny-resnet", teacher=str(tmp_path / "teacher"), loss=loss, device=dev, **base
        )
        reps[dev] = run_training(cfg, out=tmp_path / dev)
    assert reps["cuda"]["device"].startswith("cuda")
    a, b = _history(tmp_path / "cpu"), _history(tmp_path / "cuda")
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-2, (a, b)
    w = load_file(str(tmp_path / "cuda" / "model.safetensors"))
    assert all(t.device.type == "cpu" for t in w.values())
    assert not any(k.startswith(("branches", "connectors")) for k in w)


def _text_corpus(d: Path) -> tuple[str, str]:
    """A self-contained corpus and byte-level BPE tokenizer (no downloaded data needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), rng.integers(2, 7))) for _ in range(300)]
    docs = [" ".join(rng.choice(words, 120)) + "." for _ in range(400)]
    (d / "corpus.txt").write_text("\n\n".join(docs))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(d / "tok")
    return f"file:{d / 'corpus.txt'}", str(d / "tok")


@cuda
def test_lm_training_on_cuda_fp32_matches_cpu_and_bf16_trains(tmp_path):
    from test_lm import lm_args

    from slimkit.cli import main

    data, tok = _text_corpus(tmp_path)
    for name, extra in (("cpu", ["--device", "cpu"]), ("gpu32", ["--bf16", "off"]), ("gpu16", [])):
        assert main(lm_args(tmp_path / name, "--data", data, "--tokenizer", tok, *extra)) == 0
    cpu, g32, g16 = (_history(tmp_path / n) for n in ("cpu", "gpu32", "gpu16"))
    assert max(abs(x - y) / x for x, y in zip(cpu, g32)) < 1e-3, (cpu, g32)
    assert max(abs(x - y) / x for x, y in zip(cpu, g16)) < 5e-2, (cpu, g16)
    rep = json.loads((tmp_path / "gpu16" / "report.json").read_text())
    assert np.isfinite(rep["final_val_ppl"])


@cuda
def test_sam_predictor_and_everything_on_cuda_match_cpu():
    from slimkit.sam.everything import EverythingConfig, sam_predict_fn, segment_everything
    from slimkit.sam.model import build_sam
    from slimkit.sam.predictor import SamPredictor
    from slimkit.sam.train import draw_scene

    torch.manual_seed(0)
    model = build_sam("vit_mini").eval()
    img, _ = draw_scene(96, 7)
    outs = {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        p = SamPredictor(model)
        p.set_image(img)
        outs[dev] = p.predict(np.array([[40, 50]]), np.array([1]), box=np.array([10, 10, 80, 70]))
    (ma, ia, la), (mb, ib, lb) = outs["cpu"], outs["cuda"]
    assert np.abs(ia - ib).max() < 1e-3 and np.abs(la - lb).max() < 1e-2 * (np.abs(la).max() + 1)
    assert (ma == mb).mean() > 0.995
    cfg = EverythingConfig(mode="hierarchical", points_per_side=8, pred_iou_thresh=0.0,
                           stability_score_thresh=0.0)  # fmt: skip
    res = segment_everything(sam_predict_fn(model, img)[0], img.shape[:2], cfg)
    assert res["prompts"] > 0 and all(
        isinstance(m["segmentation"], np.ndarray) for m in res["masks"]
    )


@cuda
def test_sam_training_on_cuda_matches_cpu(tmp_path):
    from slimkit.cli import main

    args = ["sam", "train", "--steps", "3", "--batch-size", "2", "--prompts-per-image", "2", "--scenes", "8",
            "--val-scenes", "2", "--warmup-steps", "1"]  # fmt: skip
    for dev in ("cpu", "cuda"):
        assert main([*args, "--device", dev, "--out", str(tmp_path / dev)]) == 0
    a, b = _history(tmp_path / "cpu"), _history(tmp_path / "cuda")
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 1e-2, (a, b)
