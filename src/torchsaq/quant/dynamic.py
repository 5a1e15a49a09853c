"""Dynamic per-token activation fake-quantization: torchao's 8da4w activations (``QuantConfig(a_mode=...)``).

``a_mode="dynamic_token"`` gives every Linear layer an int8 asymmetric quantizer of its input whose scale and zero
point are computed from each token's row (the last dimension) on the fly, with nothing learned; the weights keep the
layer's own quantizer (group-wise LSQ with ``group_size``: torchao's ``Int8DynActInt4WeightQATQuantizer``, whose
weights are group-wise int4, with learned steps here instead of torchao's min/max ones).

The rule is torchao's (``choose_qparams_affine`` with ``MappingType.ASYMMETRIC``, then ``_fake_quantize_affine``),
per row of ``x`` (``qmin, qmax = -128, 127``, ``eps = torch.finfo(torch.float32).eps``)::

    lo = min(min(row), 0);  hi = max(max(row), 0)                      # the range always holds 0
    scale = max((hi - lo) / 255, eps)
    zero_point = clamp(qmin - round(lo / scale), qmin, qmax)
    q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)
    y = (q - zero_point) * scale

``round`` is half to even (torch.round). The gradient is straight-through: ``dL/dx = dL/dy`` where
``qmin <= round(x * (1 / scale)) + zero_point <= qmax`` and 0 where the code was clamped; the scale and zero point are
detached, as in torchao (its ``choose_qparams_affine`` runs under ``torch.no_grad``). Half-precision inputs are
quantized in float32 (torchao's float32 activation scales) and the result cast back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .quantizer import FLOAT_BITS, Quantizer, check_bits

__all__ = ["DynamicTokenQuantizer", "token_qparams", "dynamic_token_fake_quant", "DYNAMIC_BITS", "TOKEN_EPS",
           "a_mode_of", "make_act_quantizer"]

#: the only bit-width of the dynamic per-token quantizer (int8: torchao's 8da4w); 32 disables it
DYNAMIC_BITS = 8
#: smallest per-token scale (torchao's 8da4w activation eps: float32's machine epsilon)
TOKEN_EPS = float(torch.finfo(torch.float32).eps)
_QMIN, _QMAX = -128, 127


def token_qparams(x: Tensor) -> tuple[Tensor, Tensor]:
    """The per-row (last dimension) int8 asymmetric ``(scale, zero_point)`` of ``x``, shaped ``[..., 1]`` (module
    docstring); no gradient."""
    with torch.no_grad():
        lo = torch.amin(x, dim=-1, keepdim=True).clamp(max=0)
        hi = torch.amax(x, dim=-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / float(_QMAX - _QMIN)).clamp(min=TOKEN_EPS)
        zero_point = (_QMIN - torch.round(lo / scale)).clamp(_QMIN, _QMAX)
    return scale, zero_point


class _DynamicTokenFQ(torch.autograd.Function):
    """Per-token fake-quantization with the straight-through gradient (zero where a code was clamped)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        scale, zero_point = token_qparams(x)
        v = torch.round(x * (1.0 / scale)) + zero_point
        ctx.save_for_backward((v >= _QMIN) & (v <= _QMAX))  # one byte per element
        return (v.clamp(_QMIN, _QMAX) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside


def dynamic_token_fake_quant(x: Tensor) -> Tensor:
    """``x`` fake-quantized per token (row of the last dimension) to int8, torchao's 8da4w rule (module docstring).
    float16/bfloat16 inputs are quantized in float32 and cast back."""
    if x.numel() == 0:
        return x
    if x.dtype in (torch.float16, torch.bfloat16):
        return _DynamicTokenFQ.apply(x.float()).to(x.dtype)
    return _DynamicTokenFQ.apply(x)


class DynamicTokenQuantizer(Quantizer):
    """A Linear layer's input quantizer for ``QuantConfig(a_mode="dynamic_token")``: int8, per token, the scale and
    zero point computed from each input (:func:`dynamic_token_fake_quant`). Nothing is learned or initialised from
    data (it counts as initialised from the start); ``step`` is a fixed placeholder buffer (1.0), kept so the
    quantizer has the state layout of the others. Bits: 8, or 32 (disabled: a first/last layer kept float)."""

    kind = "dynamic_token"
    param_name = "step"
    learned = False
    step: Tensor  # the placeholder buffer

    def __init__(self, bits: int = DYNAMIC_BITS):
        super().__init__(bits, signed=True)
        self.initialized.fill_(True)
        self._initialized = True

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        check_bits(value)
        if value not in (DYNAMIC_BITS, FLOAT_BITS):
            raise ValueError(f"a_mode='dynamic_token' quantizes activations to int8 per token: their bits must be 8 "
                             f"(or 32: float), got {value}")
        self._bits = value

    def _sync_flags(self) -> None:
        super()._sync_flags()
        self.initialized.fill_(True)  # nothing to initialise, whatever a loaded state says
        self._initialized = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, dynamic per-token asymmetric (torchao 8da4w activations)"

    def _init_scale(self, stat: Tensor) -> None:
        pass  # dynamic: nothing to initialise

    def _quantize(self, x: Tensor, samples: int) -> Tensor:
        return dynamic_token_fake_quant(x)

    def code_range(self) -> tuple[int, int]:
        return _QMIN, _QMAX

    def integer(self, x: Tensor) -> Tensor:
        """The int8 codes ``q`` of ``x`` (each row with its own scale and zero point: :func:`token_qparams`)."""
        scale, zero_point = token_qparams(x)
        return (torch.round(x * (1.0 / scale)) + zero_point).clamp(_QMIN, _QMAX)

    def dequantize(self, codes: Tensor, x: Optional[Tensor] = None) -> Tensor:
        """``(codes - zero_point) * scale`` with the rows' parameters of the input ``x`` the codes came from."""
        if x is None:
            raise ValueError("a dynamic per-token quantizer dequantizes with the scales of the input the codes came "
                             "from: pass it as x")
        scale, zero_point = token_qparams(x)
        return (codes - zero_point) * scale

    def step_size(self) -> Tensor:
        """The placeholder 1.0 (the real step is per token, computed from each input)."""
        return self.step.detach()


def a_mode_of(q: Quantizer) -> str:
    """The ``QuantConfig.a_mode`` an input quantizer implements: ``"dynamic_token"`` or ``"static"``."""
    return "static" if q.learned else q.kind


def make_act_quantizer(a_mode: str, a_bits: int) -> Optional[Quantizer]:
    """A new input quantizer of ``a_mode`` at ``a_bits`` bits; None for ``"static"`` (the kind's own one)."""
    return DynamicTokenQuantizer(a_bits) if a_mode == "dynamic_token" else None
