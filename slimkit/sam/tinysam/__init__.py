"""TinySAM (Shu et al., arXiv 2312.13789): full-stage distillation of a small SAM from a larger
one (losses in ``losses``, online hard prompt sampling in ``prompts``, the trainer in ``train``,
cached teacher embeddings in ``cache``), Q-TinySAM W8A8 post-training quantization of the image
encoder (``quant``) and point / box prompted evaluation (``evaluate``)."""
