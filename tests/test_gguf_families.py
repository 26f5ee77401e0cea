"""GGUF export beyond Llama: Qwen2, Qwen3, Gemma-3 and Phi-3 files that llama.cpp runs with the
logits transformers gives for the same weights, SentencePiece-style tokenizers that llama.cpp
splits as transformers does, and refusals that name what llama.cpp lacks.

The llama.cpp checks run where llama-cpp-python is installed (``make llamacpp``) and are skipped
elsewhere; they are the ones that catch a wrong norm offset (Gemma's 1 + w), a wrong rotary
layout or sliding-window period, a wrongly fused tensor and wrong LongRoPE factors. Mutations of
``slimkit/export/gguf_families.py`` checked by hand (each fails the named test):
- Gemma norm offset 0 instead of 1 -> test_llama_cpp_logits_match_transformers[gemma3_text]
  (relative error 1.03 against < 3e-3);
- Gemma sliding period fixed at llama.cpp's default 6 -> same test, gemma3_text (0.36);
- Phi-3 rotary dimension count halved -> same test, phi3 (0.46);
- Qwen2 rows permuted as Llama's -> same test, qwen2 (0.34);
- Phi-3 short / long factor tensors swapped -> test_phi3_longrope_factors_and_attention_factor_in_
  llama_cpp.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_ids

import slimkit
from slimkit.core.errors import SlimkitError
from slimkit.export import ExportConfig, export, load_quantized
from slimkit.export.base import QuantizedModel, reference_model
from slimkit.export.gguf_families import family_for, swa_period
from slimkit.export.gguf_format import GGUFExporter
from slimkit.export.gguf_vocab import vocab_kind

ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
        "phi3": "phi3"}  # fmt: skip
# block-0 tensors llama.cpp's loader of each architecture needs (beyond norms and attn_output)
MUST = {
    "llama": {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_norm.weight"},
    "qwen2": {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "blk.0.ffn_gate.weight"},
    "qwen3": {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight", "blk.0.attn_q.weight"},
    "gemma3": {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight",
               "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.ffn_gate.weight"},
    "phi3": {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"},
}  # fmt: skip
KEYS = {
    "gemma3": ["attention.sliding_window", "attention.sliding_window_pattern",
               "rope.freq_base_swa", "attention.key_length", "rope.scaling.factor"],
    "phi3": ["rope.scaling.original_context_length", "rope.dimension_count",
             "attention.sliding_window"],
    "qwen3": ["attention.key_length"],
    "llama": ["rope.dimension_count"],
    "qwen2": [],
}  # fmt: skip


def family_config(mt: str, vocab: int, hidden: int = 64):
    import transformers as tf

    base = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, initializer_range=0.1)  # fmt: skip
    if mt == "llama":
        return tf.LlamaConfig(**base)
    if mt == "qwen2":
        return tf.Qwen2Config(**base)
    if mt == "qwen3":
        return tf.Qwen3Config(**base, head_dim=hidden // 4)
    if mt == "phi3":
        return tf.Phi3Config(**base, pad_token_id=0)
    if mt == "gemma3_text":
        # sliding, full, sliding (period 2, not llama.cpp's default 6), an 8-token window shorter
        # than the test sequence, linear rotary scaling on full attention only (Gemma-3 4B+)
        hd = hidden // 4
        return tf.Gemma3TextConfig(
            **{**base, "num_hidden_layers": 3}, head_dim=hd, query_pre_attn_scalar=hd,
            sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        )  # fmt: skip
    raise ValueError(mt)


def family_model(mt: str, vocab: int, hidden: int = 64):
    """A tiny random model whose norms and biases are not their initial constants, so a norm
    offset or a bias left out changes the output."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = family_config(mt, vocab, hidden)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's weights are offsets from 1
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0 if "gemma" in mt else 1))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    """Per family: a Q8_0 run (RTN, 8-bit symmetric groups of 32) exported to GGUF and verified
    through transformers' GGUF loader."""
    base = tmp_path_factory.mktemp("gguf-families")
    out = {}
    for mt in ARCH:
        model = family_model(mt, len(tiny_tokenizer))
        cfg = slimkit.RTNConfig(wbits=8, group_size=32, sym=True)
        model, res = slimkit.quantize(model, cfg, random_ids(2, 16, len(tiny_tokenizer)))
        run = base / f"run{len(out)}"  # llama.cpp reads a name with "phi3" as Phi-3's vocabulary
        slimkit.save_quantized(model, tiny_tokenizer, run, res)
        gguf_file = base / f"{mt}.gguf"
        cfg = ExportConfig(format="gguf", gguf_pre="gpt-2", verify=True)
        report = export(run, gguf_file, cfg)  # verify: transformers' GGUF reader, codes, logits
        out[mt] = (run, gguf_file, report)
    return out


def _arch_names(arch: str, n_layers: int) -> set[str]:
    import gguf

    a = getattr(gguf.MODEL_ARCH, arch.upper())
    names = set()
    for t in gguf.MODEL_TENSORS[a]:
        fmt = gguf.TENSOR_NAMES[t]
        for i in range(n_layers):
            names |= {fmt.format(bid=i) + ".weight", fmt.format(bid=i) + ".bias"}
    return names


@pytest.mark.parametrize("mt", list(ARCH))
def test_file_has_llama_cpp_names_metadata_and_the_stored_numbers(mt, runs):
    """Catches a tensor named for another architecture (llama.cpp refuses the file), a fused
    Phi-3 tensor split or reshaped, a missing architecture key, and stored numbers that differ
    from slimkit's: quantized blocks through gguf's own dequantizer equal the run's weights bit
    for bit; norms equal the model's (Gemma's plus 1, as llama.cpp's converter stores them)."""
    import gguf

    run, out, report = runs[mt]
    arch = ARCH[mt]
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == arch
    t = {x.name: x for x in reader.tensors}
    qm = load_quantized(run)
    c = qm.model.config
    assert set(t) <= _arch_names(arch, c.num_hidden_layers), set(t) - _arch_names(arch, 9)
    assert MUST[arch] <= set(t)
    assert ("output.weight" in t) == (not c.tie_word_embeddings)
    keys = ["context_length", "embedding_length", "block_count", "feed_forward_length",
            "attention.head_count", "attention.head_count_kv", "rope.freq_base",
            "attention.layer_norm_rms_epsilon", *KEYS[arch]]  # fmt: skip
    assert not [k for k in keys if f"{arch}.{k}" not in reader.fields]
    if arch == "phi3":  # kept fused: [q; k; v] rows and [gate; up] rows, as in the model
        ffn = c.intermediate_size
        assert tuple(t["blk.0.ffn_up.weight"].shape) == (c.hidden_size, 2 * ffn)
        assert "blk.0.ffn_gate.weight" not in t and "blk.0.attn_q.weight" not in t
    if arch == "gemma3":
        assert reader.fields["gemma3.attention.sliding_window_pattern"].contents() == 2
    exporter, cfg = GGUFExporter(), ExportConfig(format="gguf")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
    for name, qw in qm.layers.items():
        x = t[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        deq = gguf.quants.dequantize(np.asarray(x.data), x.tensor_type)
        if arch == "llama" and name.endswith(("q_proj", "k_proj")):
            continue  # rows permuted; checked through transformers' loader in test_export
        assert np.array_equal(deq, exporter.reference_weight(qw, cfg).numpy()), name
    state = qm.model.state_dict()
    offset = 1.0 if arch == "gemma3" else 0.0
    for name, p in state.items():
        if p.dim() == 1:
            x = t[names.get_name(name, try_suffixes=(".weight", ".bias"))]
            assert x.tensor_type.name == "F32", name
            assert np.array_equal(np.asarray(x.data), (p.float() + offset).numpy()), name
    assert report["gguf_types"] == ["Q8_0"]
    v = report["verify"]
    assert v["passed"] and v["codes_identical"] and v["max_abs_logit_diff_vs_reference"] == 0.0
    assert v["tokenizer_identical"] is not False


def _llama_cpp_logits(llama_cpp, path, ids) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True,
                          verbose=False)  # fmt: skip
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@pytest.mark.parametrize("mt", list(ARCH))
def test_llama_cpp_logits_match_transformers(mt, runs, tmp_path, tiny_tokenizer):
    """llama.cpp runs each family's file with transformers' logits of the same weights: an F32
    file within llama.cpp's F16 KV cache round-off (measured 3e-4 - 6e-4 relative), the Q8_0 file
    within its 8-bit activation rounding (llama.cpp quantizes activations for Q8_0 products). Catches a wrong norm offset, rotary layout or type,
    sliding-window period or rotary base, a wrongly fused tensor or a missing bias."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = random_ids(1, 24, len(tiny_tokenizer), seed=3)[0].tolist()  # 24 > Gemma's window 8
    model = family_model(mt, len(tiny_tokenizer))
    qm = QuantizedModel(tmp_path, model, tiny_tokenizer, {"config": {}}, {}, {}, {"model": "t"})
    f32 = tmp_path / "f32.gguf"
    GGUFExporter().write(qm, ExportConfig(format="gguf", dtype="float32", gguf_pre="gpt-2"), f32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    got = _llama_cpp_logits(llama_cpp, f32, ids)
    err = (got - ref).norm() / ref.norm()
    assert err < 3e-3, err
    run, q8, _ = runs[mt]
    qm = load_quantized(run)
    ref_model = reference_model(qm, GGUFExporter(), ExportConfig(format="gguf"))
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    got = _llama_cpp_logits(llama_cpp, q8, ids)
    err = (got - ref).norm() / ref.norm()
    assert err < 3e-2, err  # measured 0.008 - 0.021
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_phi3_longrope_factors_and_attention_factor_in_llama_cpp(tmp_path, tiny_tokenizer):
    """Phi-3-128k / Phi-3.5 LongRoPE: distinct short and long frequency factors written as
    llama.cpp's rope_factors_short / _long tensors and transformers' cos / sin scale (here
    sqrt(1 + ln 4 / ln 512) = 1.11) as rope.scaling.attn_factor. llama.cpp uses the short factors
    while its context (64, padded to 256) is within the original 512 positions, as transformers
    does for a 24-token sequence. Catches swapped factor tensors and a missing attention factor
    (measured 0.35 and 0.16 relative against 4e-4)."""
    import gguf
    import transformers as tf
    from transformers import AutoModelForCausalLM

    short = [1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 4.0]  # head_dim 16: 8 frequencies
    cfg = tf.Phi3Config(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
        max_position_embeddings=2048, original_max_position_embeddings=512, initializer_range=0.1,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": short,
                         "long_factor": [8.0] * 8},
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    qm = QuantizedModel(tmp_path, model, tiny_tokenizer, {"config": {}}, {}, {}, {"model": "t"})
    out = tmp_path / "f32.gguf"
    GGUFExporter().write(qm, ExportConfig(format="gguf", dtype="float32", gguf_pre="gpt-2"), out)
    reader = gguf.GGUFReader(str(out))
    t = {x.name: np.asarray(x.data) for x in reader.tensors}
    assert np.array_equal(t["rope_factors_short.weight"], np.float32(short))
    assert reader.fields["phi3.rope.scaling.attn_factor"].contents() == pytest.approx(
        (1 + np.log(4) / np.log(512)) ** 0.5, rel=1e-6
    )
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = random_ids(1, 24, len(tiny_tokenizer), seed=4)[0].tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    got = _llama_cpp_logits(llama_cpp, out, ids)
    assert (got - ref).norm() / ref.norm() < 3e-3


def test_k_quant_gemma3_is_bit_exact_and_runs_in_llama_cpp(tmp_path, tiny_tokenizer):
    """Gemma-3 at widths divisible by 256 on the Q4_K grid: genuine K-quant super-blocks,
    verified through transformers' GGUF loader (codes identical) and run by llama.cpp."""
    model = family_model("gemma3_text", len(tiny_tokenizer), hidden=256)
    cfg = slimkit.RTNConfig(wbits=4, grid="gguf:q4_k")
    model, res = slimkit.quantize(model, cfg, random_ids(2, 16, len(tiny_tokenizer)))
    run = tmp_path / "run"
    slimkit.save_quantized(model, tiny_tokenizer, run, res)
    out = tmp_path / "m.gguf"
    r = export(run, out, ExportConfig(format="gguf", gguf_pre="gpt-2", gguf_embeddings="f16"))
    assert r["gguf_types"] == ["Q4_K"]
    import gguf

    t = {x.name: x for x in gguf.GGUFReader(str(out)).tensors}
    qm = load_quantized(run)
    x = t["blk.1.ffn_down.weight"]
    deq = gguf.quants.dequantize(np.asarray(x.data), x.tensor_type)
    assert np.array_equal(deq, qm.layers["model.layers.1.mlp.down_proj"].dequantize().numpy())
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = random_ids(1, 24, len(tiny_tokenizer), seed=4)[0].tolist()
    with torch.no_grad():
        ref = reference_model(qm, GGUFExporter(), ExportConfig(format="gguf"))(
            torch.tensor([ids])
        ).logits[0]
    got = _llama_cpp_logits(llama_cpp, out, ids)
    # K-quant dot products round the activations to 8 bits (Q8_K): measured 0.04 over three
    # Gemma blocks; a wrong layout or scale gives 0.3 and more
    assert (got - ref).norm() / ref.norm() < 6e-2


SP = "\u2581"


def spm_tokenizer(style: str, tmp_path):
    """A tiny SentencePiece-style BPE (what a Llama-2 / Gemma tokenizer.json holds): specials,
    the 256 ``<0xXX>`` byte-fallback pieces, pieces learned on offline text with "▁" for spaces,
    and merges listed as Hugging Face's SentencePiece converter lists them (every split of a
    piece into two pieces, ordered by the piece's rank)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from slimkit.data import load_documents

    texts = [d.text for d in load_documents("wiki-offline", "train")[:200]]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="always")
    tk.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, limit_alphabet=60, show_progress=False)
    )
    specials = (
        ["<unk>", "<s>", "</s>"] if style == "llama" else ["<pad>", "<eos>", "<bos>", "<unk>"]
    )
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(tk.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    pieces = [p for p in vocab if p not in specials and not p.startswith("<0x")]
    merges = sorted(
        ((vocab[p], vocab[p[:i]], vocab[p[i:]]), (p[:i], p[i:]))
        for p in pieces
        for i in range(1, len(p))
        if p[:i] in vocab and p[i:] in vocab
    )
    cls = tf.LlamaTokenizer if style == "llama" else tf.GemmaTokenizer
    tok = cls(vocab=vocab, merges=[m for _, m in merges])
    d = tmp_path / f"tok-{style}"
    tok.save_pretrained(d)
    return tf.AutoTokenizer.from_pretrained(d)


SENTENCES = [
    "The history of the city begins in the early middle ages, when a small market grew.",
    "Two  spaces, émigré café ☃ (bytes) and 12345\nnew line",
]


@pytest.mark.parametrize("style,mt", [("llama", "llama"), ("gemma", "gemma3_text")])
def test_sentencepiece_tokenizer_is_written_as_llama_vocab(style, mt, tmp_path):
    """A SentencePiece-style tokenizer (byte fallback, "▁") becomes llama.cpp's 'llama'
    vocabulary: scores from the merge ranks, BYTE / UNKNOWN / CONTROL types, the prefix space of
    Llama-2's Metaspace and none for Gemma; llama.cpp then splits text into the ids transformers
    gives (bytes for characters outside the vocabulary included). Catches merges written for a
    'gpt2' vocabulary (llama.cpp would byte-encode "▁"), scores in the wrong order (other
    splits) and a wrong prefix space (an extra or missing "▁" token at the start)."""
    import gguf

    tok = spm_tokenizer(style, tmp_path)
    model = family_model(mt, len(tok))
    qm = QuantizedModel(tmp_path, model, tok, {"config": {}}, {}, {}, {"model": "t"})
    out = tmp_path / "m.gguf"
    GGUFExporter().write(qm, ExportConfig(format="gguf"), out)
    f = gguf.GGUFReader(str(out)).fields
    assert f["tokenizer.ggml.model"].contents() == "llama"
    assert "tokenizer.ggml.merges" not in f
    assert f["tokenizer.ggml.add_space_prefix"].contents() == (style == "llama")
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    scores = f["tokenizer.ggml.scores"].contents()
    assert len(tokens) == len(types) == len(scores) == model.config.vocab_size
    kinds = dict(zip(tokens, types))
    assert kinds["<0x41>"] == gguf.TokenType.BYTE and kinds["<unk>"] == gguf.TokenType.UNKNOWN
    assert kinds[tok.eos_token] == gguf.TokenType.CONTROL
    s = dict(zip(tokens, scores))  # the first merge learned outranks a later one
    first, later = tok.convert_ids_to_tokens([tok.vocab_size - 100, tok.vocab_size - 1])
    if len(first) > 1 and len(later) > 1:
        assert s[first] > s[later]
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in SENTENCES:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text).input_ids


def test_refusals_name_what_llama_cpp_lacks(tmp_path, tiny_tokenizer):
    """Each model llama.cpp would run differently from transformers is refused with what is
    missing, and no file is left; a Unigram vocabulary is refused by name."""
    import transformers as tf

    V = len(tiny_tokenizer)
    bad = {
        "query_pre_attn_scalar 256": tf.Gemma3TextConfig(
            vocab_size=V, hidden_size=64, num_attention_heads=4, head_dim=16, sliding_window=8
        ),
        "layer types": tf.Gemma3TextConfig(
            vocab_size=V, hidden_size=64, num_attention_heads=4, head_dim=16, sliding_window=8,
            query_pre_attn_scalar=16, num_hidden_layers=3,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        ),
        "final_logit_softcapping": tf.Gemma3TextConfig(
            vocab_size=V, hidden_size=64, num_attention_heads=4, head_dim=16, sliding_window=8,
            query_pre_attn_scalar=16, final_logit_softcapping=30.0,
        ),
        "sliding-window": tf.Qwen2Config(vocab_size=V, use_sliding_window=True, sliding_window=8),
        "'yarn'": tf.Qwen2Config(
            vocab_size=V, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                           "original_max_position_embeddings": 32},
        ),
        "'llama3'": tf.LlamaConfig(
            vocab_size=V, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}),
        "'olmo2'": tf.Olmo2Config(vocab_size=V),
    }  # fmt: skip
    for words, config in bad.items():
        with pytest.raises(SlimkitError, match=words):
            family_for(config)
    assert swa_period(["sliding_attention"] * 5 + ["full_attention"]) == 6
    assert swa_period(["full_attention"] * 3) == 1 and swa_period(["sliding_attention"] * 2) == 0
    # end to end: the quantized run is refused before anything is written
    model = family_model("gemma3_text", V)
    model.config.query_pre_attn_scalar = 256
    model, res = slimkit.quantize(
        model, slimkit.RTNConfig(wbits=8, group_size=32, sym=True), random_ids(2, 16, V)
    )
    slimkit.save_quantized(model, tiny_tokenizer, tmp_path / "run", res)
    with pytest.raises(SlimkitError, match="query_pre_attn_scalar"):
        export(tmp_path / "run", tmp_path / "m.gguf", ExportConfig(format="gguf"))
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()
    from tokenizers import Tokenizer, models

    uni = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0))
    import json

    with pytest.raises(SlimkitError, match="Unigram"):
        vocab_kind(json.loads(uni.to_str()))
