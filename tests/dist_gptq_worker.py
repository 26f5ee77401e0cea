"""Run GPTQ on a tiny model (alone or under torchrun) and save the quantized weights (rank 0).

Usage: dist_gptq_worker.py OUT.safetensors [CHECKPOINT_DIR]"""

import sys

import torch
from safetensors.torch import save_file

from slimkit.core import dist
from slimkit.quant.api import quantize
from slimkit.quant.methods import GPTQConfig
from tests.conftest import random_ids, tiny_model

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_from_env()
    model = tiny_model("llama", layers=3)
    ids = random_ids(8, 32)
    model, report = quantize(
        model,
        GPTQConfig(wbits=3, group_size=32, batch_size=2, device="cpu"),
        ids,
        checkpoint_dir=sys.argv[2] if len(sys.argv) > 2 else None,
    )
    if dist.rank() == 0:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers" in k}
        for name, rec in report.records.items():
            state[name + ".codes"] = rec.codes
        save_file(state, sys.argv[1])
    if dist.is_dist():
        torch.distributed.destroy_process_group()
