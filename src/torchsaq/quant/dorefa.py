"""DoReFa-Net's quantizers (Zhou et al. 2016), as the official SAQ code has them (quan_models/dorefa.py).

For k bits, ``n = 2^k - 1``:

* weights: ``t = tanh(w)``, ``u = t / max|t| * 0.5 + 0.5`` (in [0, 1]; the max over the whole tensor, in the
  graph), ``Q = 2 * round(u * n) / n - 1``: 2^k levels from -1 to 1, no zero level, no learned parameter;
  straight-through round, the gradient reaching w through tanh and the max. Codes are ``round(u * n)``, 0..n.
* activations: ``Q = round(clamp(a, 0, 1) * n) / n`` (the official code: ReLU, then a clip at 1.0), computed
  as ``round(clamp(a / s, 0, n)) * s`` with ``s = 1/n`` (the same levels; what ONNX QuantizeLinear computes).
  A signed input (decided from the data, as for the other kinds) gets the symmetric range ``[-1, 1]`` with
  ``m = 2^(k-1) - 1`` levels each side. The first layer's clip is ``max|a|`` of the first data instead of 1.0
  (raw normalised inputs reach 2-4), fixed like the others.

Neither quantizer learns anything: their ``clip`` parameter is fixed at 1.0 (kept so that every quantizer has
one scale and the state dicts, exports and summaries treat all kinds alike).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .quantizer import LIQActQuantizer, NoOptions, Quantizer, _UnitGrid, check_bits, register_quantizer

__all__ = ["DoReFaWeightQuantizer", "DoReFaActQuantizer"]


class _Fixed:
    """A quantizer whose clip stays at its initial value: never trained, whatever the bit-width."""

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        self._bits = check_bits(value)
        self.scale.requires_grad_(False)  # type: ignore[attr-defined]


class DoReFaWeightQuantizer(_Fixed, _UnitGrid, Quantizer):
    """DoReFa's weight quantizer (see the module docstring). ``standardize`` is the tanh normalisation (an
    export's grid weights are loaded with it off: ``Q(weight) = weight`` there)."""

    kind = "dorefa"
    param_name = "clip"
    clip: torch.nn.Parameter

    def __init__(self, bits: int):
        super().__init__(bits, signed=True)
        self.standardize = True

    @torch.no_grad()
    def _init_scale(self, stat: Tensor) -> None:
        self.clip.fill_(1.0)

    def _normalized(self, w: Tensor) -> Tensor:
        """tanh(w) / max|tanh(w)| in [-1, 1] (or ``w`` itself, already on the grid, with ``standardize`` off)."""
        if not self.standardize:
            return w
        t = torch.tanh(w)
        return t / t.abs().max().clamp_min(1e-12)

    def _unit(self, w: Tensor) -> Tensor:
        """(normalised w * 0.5 + 0.5) * n: the codes before rounding."""
        return (self._normalized(w) * 0.5 + 0.5) * (2**self.bits - 1)

    def _grid_clip(self) -> Tensor:
        return self.clip.detach().reshape(())  # fixed at 1.0


class DoReFaActQuantizer(_Fixed, LIQActQuantizer):
    """DoReFa's activation quantizer: LIQ's activation quantizer with its clip fixed at 1.0 (module docstring)."""

    kind = "dorefa"


@register_quantizer("dorefa", description="DoReFa: tanh-normalised weights on 2^k levels in [-1, 1], "
                                          "activations clipped to [0, 1]; nothing learned")
def make_dorefa(w_bits: int, a_bits: int, num_channels: int, options: NoOptions,
                a_signed: Optional[bool] = None, linear: bool = False) -> tuple[Quantizer, Quantizer]:
    return DoReFaWeightQuantizer(w_bits), DoReFaActQuantizer(a_bits, signed=a_signed)

