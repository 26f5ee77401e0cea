"""Quantizers, fake-quant modules and the quantization methods (RTN, GPTQ, SmoothQuant)."""
