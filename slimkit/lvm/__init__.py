"""DeLVM (Guo et al., ICML 2024): autoregressive vision models over VQ tokens of visual
sentences, with long-tail augmentation and distillation.

- ``vq.py``: the VQ tokenizer (a VQ-VAE with EMA or straight-through codebook, dead-code
  restarts), encode / decode and round-trip metrics;
- ``images.py``: offline image sources (generated scenes with instance masks, bundled photos,
  a folder of images);
- ``sentences.py``: the tasks (image -> annotation pairs), visual sentences and token shards;
- ``augment.py``: the long-tail augmentation of the rare task (six-crop, flips, resized crops);
- ``train.py``: the tokenizer trainer and the autoregressive trainer (with KD) on the shared loop;
- ``prompt.py``: in-context prompting with a token budget, per-task metrics, picture grids.
"""
