"""slimkit: efficient deep learning toolkit.

Quantize a causal LM from Python:

    >>> import slimkit
    >>> model, tok = slimkit.load_model("smollm2-135m")                        # doctest: +SKIP
    >>> calib = slimkit.data.calibration_windows(tok, "wiki-offline", 32, 512)  # doctest: +SKIP
    >>> model, result = slimkit.quantize(model, slimkit.GPTQConfig(wbits=4, group_size=64), calib)  # doctest: +SKIP
    >>> slimkit.save_quantized(model, tok, "out", result)  # doctest: +SKIP

``slimkit.compress(model, config, calib)`` runs any registered method (quantization or
pruning), chosen by the config's type.
"""

from slimkit import data
from slimkit.core.errors import SlimkitError
from slimkit.llm.compress import CompressionResult, compress
from slimkit.llm.evaluate import perplexity
from slimkit.llm.models import load_model
from slimkit.prune import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune
from slimkit.quant.api import quantize, save_quantized
from slimkit.quant.methods import (
    AWQConfig,
    CBQConfig,
    GPTQConfig,
    QuantConfig,
    RTNConfig,
    SmoothQuantConfig,
)
from slimkit.tinylm import pangu_pi as _pangu_pi  # noqa: F401  (registers pangu_pi with the Auto classes)

__version__ = "0.1.0"
__all__ = [
    "AWQConfig",
    "CBQConfig",
    "CompressionResult",
    "GPTQConfig",
    "MagnitudeConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "prune",
    "QuantConfig",
    "RTNConfig",
    "SlimkitError",
    "SmoothQuantConfig",
    "compress",
    "data",
    "load_model",
    "perplexity",
    "quantize",
    "save_quantized",
]
