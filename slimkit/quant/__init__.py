"""Quantizers, fake-quant modules and the quantization methods (RTN, GPTQ, SmoothQuant, AWQ, CBQ)."""

from slimkit.quant import block_state as _block_state  # noqa: F401  (checkpoints carry quant state)
