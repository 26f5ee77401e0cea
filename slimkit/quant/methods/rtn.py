"""RTN: round every linear's weight to the nearest grid point (no data needed for weights)."""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.llm.block_maps import weight_of
from slimkit.llm.pipeline import Window
from slimkit.quant.methods.base import QuantConfig, WeightQuantMethod, register_method
from slimkit.quant.quantizer import quantize_weight


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest. ``clip='mse'`` gives the ``rtn-mse`` variant.

    Example:
        >>> model, report = slimkit.quantize(model, RTNConfig(wbits=4, group_size=64), calib)  # doctest: +SKIP
    """


@register_method("rtn", RTNConfig, help="round to nearest (min-max or MSE range)")
class RTN(WeightQuantMethod):
    def on_window(self, win: Window) -> None:
        pipe = win.pipe
        for b in win.block_ids:
            self.attach_activation_quantizers(win, b)
            for name, m in win.named_linears(b).items():
                w = (
                    weight_of(m, pipe.bmap.transposed).detach().clone().float()
                )  # the write below is in place
                qw = quantize_weight(w, self.spec_of(m))
                self.write(pipe, name, m, qw)
                err = float(((qw.dequantize() - w).norm() / w.norm().clamp(min=1e-30)) ** 2)
                pipe.log.append({"window": win.index, "layer": name, "weight_rel_err": err})
