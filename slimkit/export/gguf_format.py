"""GGUF files for llama.cpp / ollama / llama-cpp-python (CPU serving), written from slimkit's
codes through the ``gguf`` package's writer.

Two kinds of runs fit (exactly; slimkit never re-quantizes on export):
- a uniform grid of groups of 32: Q4_0 = 4-bit symmetric (d = scale, q = code, value d (q - 8));
  Q4_1 = 4-bit asymmetric (d = scale, m = -d zero, value d q + m); Q8_0 = 8-bit symmetric
  (signed code q - 128). Scales and m are stored in fp16, so the reference the file is compared
  with uses the same fp16 numbers;
- a run quantized on a GGUF grid (``--grid gguf:TYPE`` or ``--grid llama.cpp:FTYPE``, see
  :mod:`slimkit.quant.gguf_grids`): every linear already holds the exact numbers of its block
  type (K-quants included), so the file reproduces the run's fake-quant weights bit for bit.

Llama family only (``general.architecture = llama``; Mistral uses the same layout). The rows of
the q and k projections are permuted from the Hugging Face rotary layout to GGML's as llama.cpp's
converter does (whole rows move, so each row's groups move with it); transformers' GGUF loader
undoes it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.export.base import (
    FORMATS,
    ExportConfig,
    Exporter,
    QuantizedModel,
    check_activations,
    unsupported,
)
from slimkit.quant import gguf_grids
from slimkit.quant.quantizer import QuantizedWeight

log = logging.getLogger("slimkit")
ARCHS = {"llama": "llama", "mistral": "llama"}
# tokenizer.ggml.pre values llama.cpp knows, guessed from the model's name when not given
PRE_HINTS = (("smollm", "smollm"), ("qwen", "qwen2"), ("llama-3", "llama-bpe"), ("gpt2", "gpt-2"))


def gguf_type(qw: QuantizedWeight) -> str | None:
    s = qw.spec
    if s.grid:
        return s.ggml.ggml
    if s.group_size != 32:
        return None
    if s.bits == 4:
        return "Q4_0" if s.sym else "Q4_1"
    if s.bits == 8 and s.sym:
        return "Q8_0"
    return None


def rope_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """GGUF row i holds Hugging Face row perm[i] (llama.cpp ``permute``)."""
    return (
        torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)
    )


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def encode_blocks(qw: QuantizedWeight, kind: str) -> np.ndarray:
    """(out, in) codes -> (out, in/32 * block_bytes) uint8 in the GGML block layout."""
    if qw.spec.grid:
        p = gguf_grids.GridParams(qw.scale, qw.zero, qw.super_scale)
        return gguf_grids.encode(qw.codes, p, qw.spec.ggml)
    out, inp = qw.codes.shape
    nb = inp // 32
    codes = qw.codes.reshape(out, nb, 32)
    d = _fp16_bytes(qw.scale)  # (out, nb, 2)
    if kind == "Q8_0":
        qs = (codes.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8)
        parts = [d, qs]
    else:
        qs = (codes[..., :16] | (codes[..., 16:] << 4)).numpy()
        parts = [d, qs]
        if kind == "Q4_1":
            m = -(qw.scale.half().float() * qw.zero)
            parts = [d, _fp16_bytes(m), qs]
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def decode_codes(raw: np.ndarray, kind: str, n_in: int) -> np.ndarray:
    """Independent block reader: uint8 rows of GGML blocks -> (rows, n_in) unsigned codes."""
    if kind not in ("Q4_0", "Q4_1", "Q8_0"):
        return gguf_grids.decode_codes(raw, kind, n_in)
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = raw.reshape(raw.shape[0], n_in // 32, size)
    if kind == "Q8_0":
        return (
            (blocks[..., 2:].view(np.int8).astype(np.int16) + 128)
            .astype(np.uint8)
            .reshape(raw.shape[0], n_in)
        )
    qs = blocks[..., size - 16 :]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(raw.shape[0], n_in)


@FORMATS.register(
    "gguf",
    help="GGUF file (llama.cpp, ollama), Llama family: Q4_0 / Q4_1 / Q8_0 from a uniform grid of "
    "32, K-quants and llama.cpp's file-type mixes from a --grid gguf:TYPE / llama.cpp:FTYPE run",
)
class GGUFExporter(Exporter):
    name = "gguf"
    single_file = True
    stores_gguf_grids = True
    reader_name = (
        "transformers GGUF loader (dequantizes with gguf's reader, undoes the q/k permutation)"
    )

    def scale_dtype(self, cfg: ExportConfig) -> torch.dtype:
        return torch.float16

    def other_dtype(self, name: str, cfg: ExportConfig) -> torch.dtype:
        if name.endswith("norm.weight") or cfg.dtype == "float32":
            return torch.float32
        return torch.float16

    def check(self, qm: QuantizedModel, cfg: ExportConfig) -> None:
        mt = qm.model.config.model_type
        if mt not in ARCHS:
            raise SlimkitError(
                f"GGUF export supports the Llama family ({', '.join(ARCHS)}); this model is {mt!r}. "
                "Use --format compressed-tensors or gptq."
            )
        fits = (
            "--grid llama.cpp:q4_k_m (or another GGUF grid), --wbits 4 --group-size 32 (Q4_1), "
            "--wbits 4 --group-size 32 --sym (Q4_0) or --wbits 8 --group-size 32 --sym (Q8_0)"
        )
        for name, qw in qm.layers.items():
            if gguf_type(qw) is None:
                raise unsupported(qm, self.name, "GGUF Q4_0/Q4_1/Q8_0 store groups of 32", fits)
            if qm.act_order(name):
                raise unsupported(qm, self.name, "act-order (GGUF blocks are consecutive)", fits)
        check_activations(qm, cfg, "none")
        self._tokenizer_json(qm)

    def reference_weight(self, qw: QuantizedWeight, cfg: ExportConfig) -> torch.Tensor:
        if qw.spec.grid:  # the run's own numbers are the stored ones
            return qw.dequantize()
        idx = qw.g_idx.long()
        d = qw.scale.half().float()
        if gguf_type(qw) == "Q4_1":
            m = (-(d * qw.zero)).half().float()
            return d[:, idx] * qw.codes.float() + m[:, idx]
        return d[:, idx] * (qw.codes.float() - qw.zero[:, idx])

    @staticmethod
    def _tokenizer_json(qm: QuantizedModel) -> dict:
        tok = qm.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        data = json.loads(backend.to_str()) if backend is not None else {}
        if data.get("model", {}).get("type") != "BPE":
            raise SlimkitError(
                "GGUF export writes byte-level BPE tokenizers (GPT-2 style, tokenizer.json); this "
                "model's tokenizer is not one. Use --format compressed-tensors or gptq."
            )
        return data

    @staticmethod
    def file_default(qm: QuantizedModel) -> str | None:
        """The file type's default GGML type (lower case): the grid's, or the one type of a
        uniform run's linears; None when nothing is quantized."""
        t = gguf_grids.default_type(qm.config.get("grid", "uniform"))
        if t is not None:
            return t
        kinds = {gguf_type(qw) for qw in qm.layers.values()}
        return sorted(kinds)[0].lower() if kinds else None

    @staticmethod
    def embedding_types(qm: QuantizedModel, cfg: ExportConfig) -> dict[str, str]:
        """GGML types of the token embedding and the output matrix, by Hugging Face name; an
        absent name is stored unquantized. ``llama.cpp`` follows llama.cpp's quantizer
        (``llama_tensor_get_type``): the output matrix (or the embedding when they are tied) is
        Q6_K, Q8_0 when its width is not a multiple of the file type's block or of 256, or the
        file is Q8_0; an untied embedding takes the file's default type (with the width
        fallback of :func:`slimkit.quant.gguf_grids.with_fallback`)."""
        default = GGUFExporter.file_default(qm)
        if default is None or cfg.gguf_embeddings == "f16":
            return {}
        c = qm.model.config
        if cfg.gguf_embeddings == "q8_0":
            out_kind = emb_kind = "q8_0"
        else:
            out_kind = gguf_grids.output_type(default, c.hidden_size)
            emb_kind = gguf_grids.with_fallback(default, c.hidden_size)
        kinds = {"model.embed_tokens.weight": out_kind}
        if not getattr(c, "tie_word_embeddings", False):
            kinds = {"model.embed_tokens.weight": emb_kind, "lm_head.weight": out_kind}
        return {k: v.upper() for k, v in kinds.items() if v is not None}

    @staticmethod
    def _ggml_quantize(t: torch.Tensor, kind: str) -> np.ndarray:
        """The bytes of the GGML blocks of ``t`` as read from an F16 file: llama.cpp's reference
        quantization (gguf's port of it) for the 32-block types, slimkit's round to nearest on
        the type's grid for the K-quants (gguf's package has no K-quant writer)."""
        import gguf

        x = t.detach().half().float()
        if kind in ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"):
            return gguf.quants.quantize(x.numpy(), getattr(gguf.GGMLQuantizationType, kind))
        return gguf_grids.quantize_tensor(x, kind)[0]

    def stored_tensor(
        self, name: str, t: torch.Tensor, qm: QuantizedModel, cfg: ExportConfig
    ) -> torch.Tensor:
        kind = self.embedding_types(qm, cfg).get(name)
        if kind is None:
            return super().stored_tensor(name, t, qm, cfg)
        import gguf

        raw = self._ggml_quantize(t, kind)
        deq = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind))
        return torch.from_numpy(np.ascontiguousarray(deq)).reshape(t.shape).float()

    def _permutations(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        c = model.config
        return {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}

    def write(self, qm: QuantizedModel, cfg: ExportConfig, out: Path) -> dict:
        import gguf

        model, c = qm.model, qm.model.config
        n_layers = c.num_hidden_layers
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
        w = gguf.GGUFWriter(str(out), "llama")
        kinds = {gguf_type(qw) for qw in qm.layers.values()}
        grid = qm.config.get("grid", "uniform")
        if gguf_grids.default_type(grid) is not None:
            ftype = gguf_grids.file_type(grid)
        else:
            ftype = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[sorted(kinds)[0]] if kinds else 1  # 1: F16
        self._metadata(w, qm, ftype, cfg)
        heads = self._permutations(model)
        tied = getattr(c, "tie_word_embeddings", False)
        emb_types = self.embedding_types(qm, cfg)
        for name, t in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise SlimkitError(f"GGUF: no llama.cpp tensor name for {name}")
            mod = name.rsplit(".", 1)[0]
            short = mod.rsplit(".", 1)[-1]
            if name.endswith(".weight") and mod in qm.layers:
                qw = qm.layers[mod]
                kind = gguf_type(qw)
                if short in heads:
                    perm = rope_permutation(qw.codes.shape[0], heads[short])
                    sup = None if qw.super_scale is None else qw.super_scale[perm]
                    qw = QuantizedWeight(
                        qw.codes[perm], qw.scale[perm], qw.zero[perm], qw.g_idx, qw.spec, sup
                    )
                w.add_tensor(
                    gname,
                    encode_blocks(qw, kind),
                    raw_dtype=getattr(gguf.GGMLQuantizationType, kind),
                )
            elif name in emb_types:
                w.add_tensor(
                    gname,
                    self._ggml_quantize(t, emb_types[name]),
                    raw_dtype=getattr(gguf.GGMLQuantizationType, emb_types[name]),
                )
            else:
                x = t.detach().float()
                if short in heads and name.endswith(".weight"):
                    x = x[rope_permutation(x.shape[0], heads[short])]
                np_dtype = (
                    np.float32 if self.other_dtype(name, cfg) == torch.float32 else np.float16
                )
                w.add_tensor(gname, x.numpy().astype(np_dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return {"gguf_types": sorted(kinds), "gguf_embedding_types": emb_types}

    def _metadata(self, w, qm: QuantizedModel, ftype: int, cfg: ExportConfig) -> None:
        import gguf

        c = qm.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(
            c, "rope_theta", 10000.0
        )
        rtype = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
        if rtype not in ("default", None):
            log.warning(
                "GGUF: rope scaling %r is not written; long-context behaviour may differ", rtype
            )
        w.add_name(qm.run.get("model", qm.path.name))
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(float(rope))
        w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        w.add_rope_dimension_count(head_dim)
        if head_dim != c.hidden_size // c.num_attention_heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("slimkit.base_model", str(qm.run.get("model_path") or qm.run.get("model", "")))
        w.add_string("slimkit.quantization", json.dumps(qm.config, sort_keys=True))
        self._tokenizer(w, qm, c.vocab_size, cfg)

    def _tokenizer(self, w, qm: QuantizedModel, vocab_size: int, cfg: ExportConfig) -> None:
        import gguf

        data = self._tokenizer_json(qm)
        tok = qm.tokenizer
        vocab = dict(data["model"]["vocab"])
        added = {t["id"]: t for t in data.get("added_tokens", [])}
        for i, t in added.items():
            vocab[t["content"]] = i
        by_id = {i: s for s, i in vocab.items()}
        tokens, types = [], []
        for i in range(vocab_size):
            if i in by_id:
                tokens.append(by_id[i])
                if i in added:
                    types.append(
                        gguf.TokenType.CONTROL
                        if added[i].get("special")
                        else gguf.TokenType.USER_DEFINED
                    )
                else:
                    types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
        name = " ".join(
            str(x)
            for x in (
                qm.run.get("model", ""),
                getattr(qm.model.config, "_name_or_path", ""),
                tok.name_or_path,
            )
        ).lower()
        pre = cfg.gguf_pre or next((p for hint, p in PRE_HINTS if hint in name), "default")
        if not cfg.gguf_pre and pre == "default":
            log.warning(
                "GGUF: unknown pre-tokenizer for this model; writing tokenizer.ggml.pre = 'default' "
                "(pass --gguf-pre NAME with llama.cpp's name for it if text tokenizes differently)"
            )
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for attr, add in (
            ("bos_token_id", w.add_bos_token_id),
            ("eos_token_id", w.add_eos_token_id),
            ("unk_token_id", w.add_unk_token_id),
            ("pad_token_id", w.add_pad_token_id),
        ):
            v = getattr(tok, attr, None)
            if v is None:
                v = getattr(qm.model.config, attr, None)
            if isinstance(v, int):
                add(v)
        w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
        if getattr(tok, "chat_template", None):
            w.add_chat_template(tok.chat_template)

    def read_codes(self, out: Path, qm: QuantizedModel) -> dict[str, torch.Tensor]:
        import gguf

        reader = gguf.GGUFReader(str(out))
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, qm.model.config.num_hidden_layers)
        by_gguf = {t.name: t for t in reader.tensors}
        heads = self._permutations(qm.model)
        res = {}
        for name, qw in qm.layers.items():
            t = by_gguf[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
            kind = t.tensor_type.name
            codes = torch.from_numpy(decode_codes(np.asarray(t.data), kind, qw.codes.shape[1]))
            short = name.rsplit(".", 1)[-1]
            if short in heads:  # back to the Hugging Face row order
                inv = torch.argsort(rope_permutation(codes.shape[0], heads[short]))
                codes = codes[inv]
            res[name] = codes
        return res

    def extra_checks(self, out: Path, qm: QuantizedModel) -> dict:
        """The tokenizer rebuilt from the file's metadata encodes like the original one."""
        from transformers import AutoTokenizer

        from slimkit.export.base import VERIFY_PROMPTS

        tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
        same = all(tok(t).input_ids == qm.tokenizer(t).input_ids for t in VERIFY_PROMPTS)
        return {"tokenizer_identical": same, "ok": same}

    def load(self, out: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            out.parent, gguf_file=out.name, dtype=torch.float32
        )
