"""2:4 sparse checkpoints in compressed-tensors' ``sparse-24-bitmask`` layout (vLLM's 2:4 path).

Per pruned Linear (prefix = module name): ``{prefix}.compressed`` the two kept values of every
group of four input columns, (out, in / 2), in the export dtype; ``{prefix}.bitmask`` the kept
positions, bit-packed along the input dimension (numpy ``packbits``, little bit order),
(out, ceil(in / 8)) uint8; ``{prefix}.shape`` [[out], [in]]. ``config.json`` carries
``quantization_config.sparsity_config`` (format ``sparse-24-bitmask``, structure ``2:4``).

compressed-tensors 0.20 keeps this format only as a legacy config (its writer and decompressor
were removed), so ``--verify`` reads the files back with the package's ``unpack_bitmasks`` and
slimkit's scatter into a plain transformers model. Pruned-and-quantized runs (marlin-24) are not
exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.export.base import (
    FORMATS,
    ExportConfig,
    Exporter,
    QuantizedModel,
    copy_side_files,
    plain_model,
)
from slimkit.export.compressed_tensors import dense_tensors
from slimkit.llm.block_maps import get_module


def load_pruned(run_dir: str | Path) -> QuantizedModel:
    from slimkit.llm.models import load_model
    from slimkit.quant.api import QUANT_JSON

    p = Path(run_dir)
    if (p / QUANT_JSON).is_file():
        raise SlimkitError(
            f"{p} is pruned and quantized: 2:4 + int4 (marlin-24) is not exported here; export its "
            "quantized weights with --format compressed-tensors (dense packed) or gptq"
        )
    if not (p / "sparsity.json").is_file():
        raise SlimkitError(
            f"{p} is not a pruned slimkit run (no sparsity.json); run `slimkit prune ... --sparsity 2:4`"
        )
    sparsity = json.loads((p / "sparsity.json").read_text())
    model, tok = load_model(str(p))
    layers = sorted(sparsity.get("per_layer", {}))
    if not layers:
        raise SlimkitError(f"{p}/sparsity.json lists no pruned layers")
    run = json.loads((p / "report.json").read_text()) if (p / "report.json").is_file() else {}
    meta = {
        "config": {},
        "method": run.get("method", "prune"),
        "sparse_layers": layers,
        "sparsity": sparsity,
    }
    return QuantizedModel(p, model, tok, meta, {}, {}, run)


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """The two largest |w| of every group of 4 input columns (zeros fill groups with < 2 non-zeros)."""
    out, inp = w.shape
    g = w.abs().reshape(out, inp // 4, 4)
    idx = g.topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(out, inp)


@FORMATS.register(
    "sparse-24", help="2:4 sparse compressed-tensors sparse-24-bitmask directory (vLLM)"
)
class Sparse24Exporter(Exporter):
    name = "sparse-24"
    reader_name = "compressed-tensors unpack_bitmasks + values scatter into transformers"

    def load_source(self, run_dir):
        return load_pruned(run_dir)

    def check(self, qm: QuantizedModel, cfg: ExportConfig) -> None:
        for name in qm.meta["sparse_layers"]:
            m = get_module(qm.model, name)
            if not isinstance(m, nn.Linear):
                raise SlimkitError(
                    f"sparse-24 writes nn.Linear layers; {name} is a {type(m).__name__}"
                )
            w = m.weight.detach()
            if w.shape[1] % 4:
                raise SlimkitError(f"{name}: input width {w.shape[1]} is not a multiple of 4")
            nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
            if (nz > 2).any():
                raise SlimkitError(
                    f"{name} is not 2:4 sparse ({int((nz > 2).sum())} groups of 4 with more than 2 "
                    "non-zeros): prune with --sparsity 2:4"
                )

    def write(self, qm: QuantizedModel, cfg: ExportConfig, out: Path) -> dict:
        from compressed_tensors.config import Sparse24BitMaskConfig

        tensors, total, zeros = {}, 0, 0
        for name in qm.meta["sparse_layers"]:
            w = get_module(qm.model, name).weight.detach().to(cfg.torch_dtype)
            mask = two_four_mask(w)
            tensors[f"{name}.compressed"] = w[mask].reshape(w.shape[0], w.shape[1] // 2)
            bits = np.packbits(mask.numpy(), axis=-1, bitorder="little")
            tensors[f"{name}.bitmask"] = torch.from_numpy(bits)
            tensors[f"{name}.shape"] = torch.tensor(list(w.shape)).reshape(-1, 1)
            total += w.numel()
            zeros += int((w == 0).sum())
        skip = {f"{n}.weight" for n in qm.meta["sparse_layers"]}
        tensors.update(dense_tensors(qm.model, skip, cfg.torch_dtype))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        linears = {n for n, m in qm.model.named_modules() if isinstance(m, nn.Linear)}
        sp = Sparse24BitMaskConfig(
            global_sparsity=zeros / max(total, 1),
            targets=sorted(qm.meta["sparse_layers"]),
            ignore=sorted(linears - set(qm.meta["sparse_layers"])),
        )
        import compressed_tensors

        config = qm.model.config.to_dict()
        config["dtype"] = cfg.dtype
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "version": compressed_tensors.__version__,
            "sparsity_config": sp.model_dump(exclude_none=True),
        }
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(qm, out)
        return {"sparsity_in_pruned_layers": zeros / max(total, 1)}

    def read_codes(self, out: Path, qm: QuantizedModel) -> dict[str, torch.Tensor]:
        return {}

    def load(self, out: Path) -> nn.Module:
        return load_sparse24(out)

    def extra_checks(self, out: Path, qm: QuantizedModel) -> dict:
        """Every pruned weight decoded from the files equals the run's weight in the export dtype."""
        dense = read_sparse24(out)
        bad = []
        for name in qm.meta["sparse_layers"]:
            got = dense[name]
            want = get_module(qm.model, name).weight.detach().to(got.dtype)
            if not torch.equal(got, want):
                bad.append(name)
        return {
            "sparse_weights_identical": not bad,
            "layers_with_different_weights": bad[:5],
            "ok": not bad,
        }


def read_sparse24(out: Path) -> dict[str, torch.Tensor]:
    from compressed_tensors.utils import unpack_bitmasks

    state = load_file(str(out / "model.safetensors"))
    dense = {}
    for key in state:
        if not key.endswith(".bitmask"):
            continue
        name = key[: -len(".bitmask")]
        shape = state[f"{name}.shape"].flatten().tolist()
        mask = unpack_bitmasks(state[key], shape)
        w = torch.zeros(shape, dtype=state[f"{name}.compressed"].dtype)
        w[mask] = state[f"{name}.compressed"].flatten()
        dense[name] = w
    return dense


def load_sparse24(out: Path) -> nn.Module:
    state = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()
             if not k.endswith((".bitmask", ".compressed", ".shape"))}  # fmt: skip
    state.update({f"{n}.weight": w.float() for n, w in read_sparse24(out).items()})
    return plain_model(out, state, "sparse")
