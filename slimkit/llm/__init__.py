"""LLM plumbing: model loading, block maps per family, the block-wise pipeline, evaluation."""
