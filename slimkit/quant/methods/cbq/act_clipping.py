"""CBQ's learnable activation quantizer: a clipping ratio of the input's range, trained with the
window (``--abits`` below 16)."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.quant.activations import ActQuantHook, ActSpec, quantize_activation


class LearnableActQuant(ActQuantHook, nn.Module):
    """Activation fake-quantizer with a learnable clipping ratio sigmoid(logit) (fp32)."""

    def __init__(self, spec: ActSpec, absmax: torch.Tensor | None, learn: bool, device):
        nn.Module.__init__(self)
        ActQuantHook.__init__(self, spec, absmax)
        self.learn = learn
        self.logit = nn.Parameter(torch.tensor(4.0, device=device), requires_grad=learn)

    @property
    def clip(self) -> torch.Tensor | None:  # type: ignore[override]
        return torch.sigmoid(self.logit) if self.learn else None

    @clip.setter
    def clip(self, value) -> None:  # ActQuantHook.__init__ assigns None
        pass

    def __call__(self, module: nn.Module, args: tuple) -> tuple:  # type: ignore[override]
        return (quantize_activation(args[0], self.spec, self.absmax, self.clip), *args[1:])
