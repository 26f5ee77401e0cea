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

Families: Llama / Mistral, Qwen2, Qwen3, Gemma-3 and Phi-3 (:mod:`slimkit.export.gguf_families`
says what each needs; tensor names come from the ``gguf`` package's map). For Llama the rows of
the q and k projections are permuted from the Hugging Face rotary layout to GGML's as llama.cpp's
converter does (whole rows move, so each row's groups move with it); transformers' GGUF loader
undoes it. Gemma's norm weights are stored as 1 + w. Tokenizers: byte-level BPE and
SentencePiece-style BPE (:mod:`slimkit.export.gguf_vocab`).
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
from slimkit.export.gguf_families import FAMILIES, GGUFFamily, family_for
from slimkit.export.gguf_vocab import tokenizer_json, vocab_kind, write_tokenizer
from slimkit.quant import gguf_grids
from slimkit.quant.quantizer import QuantizedWeight

log = logging.getLogger("slimkit")
ARCHS = tuple(FAMILIES)  # the transformers model types GGUF export writes


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
    help="GGUF file (llama.cpp, ollama) of Llama / Mistral, Qwen2, Qwen3, Gemma-3 or Phi-3: "
    "Q4_0 / Q4_1 / Q8_0 from a uniform grid of 32, K-quants and llama.cpp's file-type mixes from a --grid gguf:TYPE / llama.cpp:FTYPE run",
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
        # vectors (norms, biases) in F32 as llama.cpp's converter stores every 1-D tensor
        if name.endswith(("norm.weight", ".bias")) or cfg.dtype == "float32":
            return torch.float32
        return torch.float16

    def check(self, qm: QuantizedModel, cfg: ExportConfig) -> None:
        family_for(qm.model.config)
        self._source_config = qm.model.config  # what load() builds a non-Llama model from
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
        if not (qm.path / "tokenizer.json").is_file():
            # transformers would make up an empty tokenizer of the model type
            raise SlimkitError(
                f"GGUF files carry the tokenizer, and {qm.path} has no tokenizer.json: quantize "
                "from a model directory with its tokenizer, or use --format compressed-tensors "
                "or gptq."
            )
        vocab_kind(tokenizer_json(qm.tokenizer))

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
            offset = self._norm_offset(qm.model, name)
            if offset:  # stored as offset + w, read back as (offset + w) - offset
                x = t.detach().float() + offset
                return (x.to(self.other_dtype(name, cfg)).float() - offset).float()
            return super().stored_tensor(name, t, qm, cfg)
        import gguf

        raw = self._ggml_quantize(t, kind)
        deq = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind))
        return torch.from_numpy(np.ascontiguousarray(deq)).reshape(t.shape).float()

    @staticmethod
    def _norm_offset(model: nn.Module, name: str) -> float:
        fam = FAMILIES.get(model.config.model_type)
        return fam.norm_offset if fam is not None and name.endswith("norm.weight") else 0.0

    def _permutations(self, model: nn.Module) -> dict[str, int]:
        c = model.config
        if not FAMILIES[c.model_type].permute_qk:
            return {}
        return {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}

    def write(self, qm: QuantizedModel, cfg: ExportConfig, out: Path) -> dict:
        import gguf

        model, c = qm.model, qm.model.config
        fam = family_for(c)
        names = gguf.get_tensor_name_map(fam.model_arch, c.num_hidden_layers)
        w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[fam.model_arch])
        kinds = {gguf_type(qw) for qw in qm.layers.values()}
        grid = qm.config.get("grid", "uniform")
        if gguf_grids.default_type(grid) is not None:
            ftype = gguf_grids.file_type(grid)
        else:
            # 0 / 1: all F32 / mostly F16
            fp = 0 if cfg.dtype == "float32" else 1
            ftype = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[sorted(kinds)[0]] if kinds else fp
        self._metadata(w, qm, fam, ftype, cfg)
        heads = self._permutations(model)
        tied = getattr(c, "tie_word_embeddings", False)
        emb_types = self.embedding_types(qm, cfg)
        for name, t in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise SlimkitError(
                    f"GGUF: no llama.cpp tensor name for {name} ({fam.arch.lower()} architecture)"
                )
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
                x = t.detach().float() + self._norm_offset(model, name)
                if short in heads and name.endswith(".weight"):
                    x = x[rope_permutation(x.shape[0], heads[short])]
                np_dtype = (
                    np.float32 if self.other_dtype(name, cfg) == torch.float32 else np.float16
                )
                w.add_tensor(gname, x.numpy().astype(np_dtype))
        for gname, x in fam.tensors(c).items():  # e.g. Phi-3's LongRoPE factors
            w.add_tensor(gname, x)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return {"gguf_types": sorted(kinds), "gguf_embedding_types": emb_types}

    def _metadata(
        self, w, qm: QuantizedModel, fam: GGUFFamily, ftype: int, cfg: ExportConfig
    ) -> None:
        import gguf

        c = qm.model.config
        title = str(qm.run.get("model", qm.path.name))
        vocab = qm.tokenizer.get_vocab() if qm.tokenizer is not None else {}
        need = [t for t in ("<s>", "</s>", "<unk>", "<|endoftext|>") if t not in vocab]
        if ("phi3" in title.lower() or "phi-3" in title.lower()) and need:
            log.warning(
                "GGUF: llama.cpp treats a model named %r as Phi-3 and looks up %s, which this "
                "vocabulary lacks: it will refuse the file (rename the run directory)",
                title,
                ", ".join(need),
            )
        w.add_name(title)
        fam.metadata(w, c)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("slimkit.base_model", str(qm.run.get("model_path") or qm.run.get("model", "")))
        w.add_string("slimkit.base_model_id", str(qm.run.get("model", "")))
        w.add_string("slimkit.quantization", json.dumps(qm.config, sort_keys=True))
        name = " ".join(
            str(x)
            for x in (
                qm.run.get("model", ""),
                getattr(c, "_name_or_path", ""),
                getattr(qm.tokenizer, "name_or_path", ""),
            )
        )
        write_tokenizer(w, qm.tokenizer, c, c.vocab_size, cfg.gguf_pre, name)

    def read_codes(self, out: Path, qm: QuantizedModel) -> dict[str, torch.Tensor]:
        import gguf

        reader = gguf.GGUFReader(str(out))
        c = qm.model.config
        names = gguf.get_tensor_name_map(family_for(c).model_arch, c.num_hidden_layers)
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
        """The tokenizer rebuilt from the file's metadata encodes like the original one. Where
        transformers' GGUF tokenizer builder cannot rebuild this architecture's vocabulary at
        all (it expects e.g. Qwen's own special tokens), the check is reported as not made."""
        from transformers import AutoTokenizer

        from slimkit.export.base import VERIFY_PROMPTS

        try:
            tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
        except Exception as e:  # a third-party reader's limit, not evidence about the file
            note = f"transformers could not rebuild the tokenizer: {type(e).__name__}: {e}"
            log.warning("GGUF verify: %s", note)
            return {"tokenizer_identical": None, "tokenizer_note": note[:300]}
        same = all(tok(t).input_ids == qm.tokenizer(t).input_ids for t in VERIFY_PROMPTS)
        return {"tokenizer_identical": same, "ok": same}

    def load(self, out: Path) -> nn.Module:
        """The file as transformers' GGUF loader reads it: for Llama the whole model (config from
        the metadata too); for the other families the tensors (gguf's dequantizer, transformers'
        name map and norm offsets) into the exported run's own config, since transformers'
        config reader drops settings llama.cpp keeps elsewhere (Gemma-3's layer types and
        attention scale, a Qwen3 head size)."""
        from transformers import AutoModelForCausalLM

        config = getattr(self, "_source_config", None)
        if config is None or FAMILIES[config.model_type].arch == "LLAMA":
            return AutoModelForCausalLM.from_pretrained(
                out.parent, gguf_file=out.name, dtype=torch.float32
            )
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = load_gguf_checkpoint(str(out), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(
            {k: torch.as_tensor(v).float() for k, v in state.items()}, strict=False
        )
        missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise SlimkitError(
                f"{out}: transformers read other tensors ({(missing or unexpected)[:3]})"
            )
        if config.tie_word_embeddings:
            model.tie_weights()
        return model.eval()
