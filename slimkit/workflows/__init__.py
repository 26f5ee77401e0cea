"""End-to-end jobs behind the CLI: compress a model into a run directory, evaluate a model or a run.

The top of the stack: it may use every method package (quant, prune) and export; nothing below
imports it.
"""
