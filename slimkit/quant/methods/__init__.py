"""Quantization methods. Importing this package registers every method."""

from slimkit.quant.methods.awq import AWQConfig
from slimkit.quant.methods.base import (
    METHODS,
    QuantConfig,
    check_model_widths,
    config_class,
    method_for_config,
)
from slimkit.quant.methods.cbq import CBQConfig
from slimkit.quant.methods.gptq import GPTQConfig
from slimkit.quant.methods.rtn import RTNConfig
from slimkit.quant.methods.smoothquant import SmoothQuantConfig

__all__ = [
    "AWQConfig",
    "CBQConfig",
    "GPTQConfig",
    "METHODS",
    "QuantConfig",
    "RTNConfig",
    "check_model_widths",
    "SmoothQuantConfig",
    "config_class",
    "method_for_config",
]
