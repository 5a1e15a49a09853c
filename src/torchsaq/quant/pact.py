"""PACT (Choi et al. 2018), as the official SAQ code pairs it (quan_models/pact.py): DoReFa's weights, and
activations clipped to a learned ``[0, alpha]``.

For k bits, ``n = 2^k - 1``, ``alpha = |clip|`` (starting at 1.0, as the official code's ``clip_value``):
``Q = round(clamp(a, 0, alpha) * n / alpha) * alpha / n``, computed as ``round(clamp(a / s, 0, n)) * s`` with
``s = alpha / n`` (the paper's rule: 2^k - 1 steps over [0, alpha]; the official code rounds ``clamp(a) * n``
without dividing by alpha, which only agrees at alpha = 1). Gradients (the paper's straight-through
estimator): w.r.t. ``a``, 1 inside ``[0, alpha]`` and 0 outside; w.r.t. ``alpha``, 1 where ``a >= alpha`` and
0 elsewhere (the rounding error inside the range is not propagated, unlike LSQ/LIQ). A signed input gets
``[-alpha, alpha]`` with ``m = 2^(k-1) - 1`` levels each side (alpha's gradient -1 below ``-alpha``). The paper
puts weight decay on alpha; torchsaq trains every quantizer scale without weight decay.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .dorefa import DoReFaWeightQuantizer
from .kernels import _codes
from .quantizer import LIQActQuantizer, NoOptions, Quantizer, register_quantizer

__all__ = ["PACTActQuantizer", "PACTWeightQuantizer", "pact"]


class _PACTFunction(torch.autograd.Function):
    """``round(clamp(x / s, lo, hi)) * s`` with ``s = alpha / hi``; PACT's gradients (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, lo: int, hi: int) -> Tensor:
        s = alpha / hi
        ctx.save_for_backward(x, s)
        ctx.lo, ctx.hi = lo, hi
        return _codes(x, s, lo, hi).mul_(s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None, None]:
        x, s = ctx.saved_tensors
        u = x / s
        above, below = u > ctx.hi, u < ctx.lo
        grad_x = grad * ~(above | below)
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            g = grad.double()
            grad_alpha = (g * above).sum() - (g * below).sum() * (1.0 if ctx.lo < 0 else 0.0)
            grad_alpha = grad_alpha.to(s.dtype).reshape(s.shape)
        return grad_x, grad_alpha, None, None


def pact(x: Tensor, alpha: Tensor, bits: int, signed: bool = False) -> Tensor:
    """PACT's fake-quantizer of ``x`` with clip ``alpha`` (> 0, 0-d) at ``bits`` bits."""
    hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return _PACTFunction.apply(x, alpha, -hi if signed else 0, hi)


class PACTActQuantizer(LIQActQuantizer):
    """PACT's activation quantizer: a learned clip alpha (module docstring); codes and export as LIQ's."""

    kind = "pact"

    def _quantize(self, x: Tensor, samples: int) -> Tensor:
        lo, hi = self.code_range()
        return _PACTFunction.apply(x, self._abs_clip().to(x.dtype), lo, hi)


class PACTWeightQuantizer(DoReFaWeightQuantizer):
    """PACT's weight quantizer: DoReFa's (:class:`torchsaq.quant.dorefa.DoReFaWeightQuantizer`)."""

    kind = "pact"


@register_quantizer("pact", description="PACT: activations clipped to a learned [0, alpha]; weights as DoReFa")
def make_pact(w_bits: int, a_bits: int, num_channels: int, options: NoOptions,
              a_signed: Optional[bool] = None, linear: bool = False) -> tuple[Quantizer, Quantizer]:
    return PACTWeightQuantizer(w_bits), PACTActQuantizer(a_bits, signed=a_signed)
