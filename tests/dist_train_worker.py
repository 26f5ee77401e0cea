"""Run one registered trainer (alone or under torchrun) from a YAML config: NAME CONFIG.yaml OUT."""

import sys

import torch

from slimkit.core import dist
from slimkit.core.config import from_dict, load_yaml
from slimkit.train import TRAINERS, discover

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_from_env()
    discover()
    name, cfg_file, out = sys.argv[1:4]
    cfg = from_dict(TRAINERS.meta(name)["config"], load_yaml(cfg_file))
    TRAINERS.get(name)(cfg, out=out)
    if dist.is_dist():
        torch.distributed.destroy_process_group()
