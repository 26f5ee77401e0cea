"""What quantization leaves on a block beside its weights, for the pipeline's checkpoints.

The records of the block's quantized linears (integer codes, scales, zero points, g_idx) and
their input quantizers travel with the block's file, in the same keys as always: tensors
``@q.{linear}.{codes,scale,zero,g_idx}`` with the spec as metadata ``{linear}``, and
``@act.{linear}`` (spec) with tensors ``@act_absmax.{linear}`` / ``@act_clip.{linear}``.
Registered when ``slimkit.quant`` is imported.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from slimkit.llm.block_maps import get_module
from slimkit.llm.pipeline import BlockState, BlockwisePipeline, register_block_state
from slimkit.quant import activations as acts
from slimkit.quant.activations import ACT_KEYS, ActSpec
from slimkit.quant.quantizer import QuantizedWeight, QuantSpec


class QuantRecords(BlockState):
    """``pipe.records`` of the block's linears."""

    def save(self, pipe: BlockwisePipeline, block_id: int):
        prefix = f"{pipe.bmap.blocks}.{block_id}."
        tensors, meta = {}, {}
        for name, rec in pipe.records.items():
            if name.startswith(prefix):
                tensors.update({f"@q.{k}": v.contiguous() for k, v in rec.tensors(name).items()})
                meta[name] = json.dumps(rec.spec.__dict__)
        return tensors, meta

    def load(self, pipe, block_id, tensors, meta) -> set[str]:
        used = set()
        for name, spec_json in meta.items():
            if name.startswith("@"):
                continue
            pipe.records[name] = QuantizedWeight.from_tensors(
                tensors, f"@q.{name}", QuantSpec(**json.loads(spec_json))
            )
            used.add(name)
        return used


class InputQuantizers(BlockState):
    """Activation quantizers attached to the block's linears."""

    def save(self, pipe: BlockwisePipeline, block_id: int):
        tensors: dict[str, torch.Tensor] = {}
        meta = {}
        for name, m in pipe.named_linears(block_id).items():
            hook = acts.hook_of(m)
            if hook is not None:
                meta[f"@act.{name}"] = json.dumps(hook.spec.__dict__)
                for k, v in acts.saved_params(hook).items():
                    tensors[f"@{k}.{name}"] = v
        return tensors, meta

    def load(self, pipe, block_id, tensors, meta) -> set[str]:
        used = set()
        for key, spec_json in meta.items():
            if not key.startswith("@act."):
                continue
            name = key[len("@act.") :]
            acts.attach_saved(
                get_module(pipe.model, name),
                ActSpec(**json.loads(spec_json)),
                {k: tensors[f"@{k}.{name}"] for k in ACT_KEYS if f"@{k}.{name}" in tensors},
            )
            used.add(key)
        return used

    def strip(self, module: nn.Module) -> None:
        acts.strip(module)


register_block_state(QuantRecords())
register_block_state(InputQuantizers())
