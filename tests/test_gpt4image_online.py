"""GPT4Image's online captioner and text encoders, run offline on tiny random models saved in
the layouts the hub serves (a transformers BLIP directory, a CLIP directory, a
sentence-transformers BERT directory, an open_clip config + safetensors checkpoint). The loading,
prompting, truncation and pooling code is the code a user with network access runs; only the
weights are random."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.distill.describers import DescribeConfig, describe
from slimkit.distill.text_encoders import encode

pytestmark = pytest.mark.filterwarnings("ignore")
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _bert_vocab(path, extra=()):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", ",",
             "digit", "bold", "thin", *DIGITS, *extra]  # fmt: skip
    path.write_text("\n".join(words) + "\n")
    return words


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,  # fmt: skip
        BlipProcessor,
    )

    d = tmp_path_factory.mktemp("blip")
    words = _bert_vocab(d / "vocab.txt")
    torch.manual_seed(0)
    cfg = BlipConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16),
        text_config=dict(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=16,
                         max_position_embeddings=64, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3),
        projection_dim=16,
    )  # fmt: skip
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"), bos_token="[DEC]")
    proc = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    BlipForConditionalGeneration(cfg).save_pretrained(d / "model")
    proc.save_pretrained(d / "model")
    return d / "model"


def test_hf_captioner_conditions_on_each_images_class(blip_dir, tmp_path):
    """Catches the captioner run through a pipeline call that transformers 5 refuses (the old
    ``image-to-text`` call without text), class prompts paired with the wrong image, and a
    batch that returns fewer captions than images."""
    out = tmp_path / "cap.jsonl"
    cfg = DescribeConfig(data="digits", train_subset=20, captioner=f"hf:{blip_dir}",
                         max_new_tokens=3, batch_size=6)  # fmt: skip
    r = describe(cfg, out=out)
    recs = [json.loads(line) for line in out.read_text().splitlines() if '"caption"' in line]
    assert r["count"] == 20 and len(recs) == 20
    for rec in recs:  # the prefix that names the class reached the model for this very image
        assert re.match(rf"a photo of an? {DIGITS[rec['label']]},", rec["caption"]), rec
    agnostic = describe(DescribeConfig(data="digits", train_subset=20, prompt="agnostic",
                                       captioner=f"hf:{blip_dir}", max_new_tokens=3),
                        out=tmp_path / "agn.jsonl")  # fmt: skip
    assert agnostic["count"] == 20
    assert not any("photo of" in e for e in agnostic["examples"])


def test_hf_captioner_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(SlimkitError, match="cannot load image-to-text model"):
        describe(DescribeConfig(data="digits", train_subset=20, captioner=f"hf:{tmp_path}/none"),
                 out=tmp_path / "c.jsonl")  # fmt: skip


def _clip_tokenizer_files(d):
    """A byte-level CLIP BPE vocabulary with no merges: one token per character, so the
    77-token context is 75 characters of text."""
    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256+
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def test_hf_clip_tower_truncates_to_77_tokens_and_normalises(tmp_path):
    """Catches captions not cut to CLIP's context (a position-embedding overflow), a truncation
    rate counted in characters or words, and text features taken from the wrong output."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    n = _clip_tokenizer_files(tmp_path)
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16),
        projection_dim=8,
    )  # fmt: skip
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    texts = ["a bold seven", "x" * 75, "y" * 76, "z" * 200]  # 77, 77, 78, 202 tokens
    enc = encode(texts, f"hf-clip:{tmp_path / 'clip'}")
    assert enc.truncated == pytest.approx(0.5)
    with torch.no_grad():
        b = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        f = model.get_text_features(**b)
        ref = F.normalize(getattr(f, "pooler_output", f), dim=1)
    torch.testing.assert_close(enc.embeddings, ref)
    assert enc.embeddings.shape == (4, 8)


def test_sentence_transformers_model_from_a_directory(tmp_path):
    """Catches unnormalised rows and a truncation rate that ignores the model's max length."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = _bert_vocab(tmp_path / "vocab.txt")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=64)).save_pretrained(tmp_path / "st")  # fmt: skip
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "st")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    st.max_seq_length = 8
    st.save(str(tmp_path / "st8"))
    texts = ["a bold seven", " ".join(["seven"] * 12)]  # 5 and 14 tokens with [CLS] / [SEP]
    enc = encode(texts, f"st:{tmp_path / 'st8'}")
    assert enc.truncated == pytest.approx(0.5)
    assert torch.allclose(enc.embeddings.norm(dim=1), torch.ones(2))
    ref = F.normalize(st.encode(texts, convert_to_tensor=True).float(), dim=1)
    torch.testing.assert_close(enc.embeddings, ref)


def test_open_clip_tower_from_a_local_checkpoint(tmp_path):
    """Catches the open_clip path loading another tower than the named checkpoint, and its
    truncation rate (open_clip's tokenizer cuts silently at 77)."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    cfg = {"embed_dim": 8,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16,
                          "head_width": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2,
                        "layers": 1}}  # fmt: skip
    (tmp_path / "slimkit-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "slimkit-tiny-test.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("slimkit-tiny-test").eval()
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    texts = ["a bold seven", " ".join(["seven"] * 100)]
    enc = encode(texts, f"open-clip:slimkit-tiny-test/{ckpt}")
    with torch.no_grad():
        ref = F.normalize(model.encode_text(open_clip.get_tokenizer("slimkit-tiny-test")(texts)))
    torch.testing.assert_close(enc.embeddings, ref)
    assert enc.truncated == pytest.approx(0.5)
