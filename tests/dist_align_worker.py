"""The GPT4Image alignment loss on one fixed global batch, alone or under torchrun: OUT.pt.

Each rank projects its slice of the batch with the same head, computes the loss over the global
batch and back-propagates; gradients are averaged over ranks as the shared trainer does. Rank 0
saves the loss and the head's gradients."""

import sys

import torch

from slimkit.core import dist
from slimkit.distill.text_align import AlignHead, clip_align_loss

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_from_env()
    torch.manual_seed(0)
    batch, d_in, d_txt = 8, 12, 6
    feats = torch.randn(batch, d_in)
    text = torch.nn.functional.normalize(torch.randn(batch, d_txt), dim=1)
    text[5] = text[2]  # a duplicate target, masked out of the negatives
    keys = torch.arange(batch)
    head = AlignHead(d_in, d_txt, "mlp", batch_norm=False)
    world, r = dist.world_size(), dist.rank()
    sl = slice(r * batch // world, (r + 1) * batch // world)
    loss = clip_align_loss(head(feats[sl]), text, 0.2, keys)
    loss.backward()
    grads = [p.grad for p in head.parameters()]
    for g in grads:  # the trainer's average over ranks
        dist.all_reduce_sum(g)
        g /= world
    if r == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, sys.argv[1])
    if dist.is_dist():
        torch.distributed.destroy_process_group()
