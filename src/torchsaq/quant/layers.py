"""Quantized Conv1d / Conv2d / Linear: the float layer plus a weight and an input-activation quantizer.

The layers are the float classes with their ``__class__`` swapped (see :func:`saq.quantize`), so they keep
their parameters, names and hooks. Each has the slots a sharpness-aware perturbation uses; only
:mod:`saq.perturb` (its ``Site`` and ``Targets``) sets them, for the optimizer and the analysis alike:

* ``perturb_pre``  -- a tensor added to the float weight *before* quantization (SAQ case 2),
* ``perturb_post`` -- a tensor added to the quantized weight *after* quantization (cases 1 and 3),
* ``capture_qweight = True`` -- the forward keeps the quantized weight it used (``qweight``) and the
  backward accumulates the gradient w.r.t. it in ``qweight_grad`` (the gradient SAQ case 3 perturbs with).
  No tensor hook: the forward adds a zero leaf tensor (the probe) to Q(w), and autograd accumulates dL/dQ(w)
  in the probe's ``.grad`` as it does for a parameter, so a compiled forward has no side effect to break on.

The forward is the quantized one only: the execution-order trace and the MAC count of :func:`saq.quantize`
run the float class's forward with a forward hook (``convert._float_pass``).

The quantizers are LSQ or LIQ (:class:`saq.quantizer.Quantizer`); for LIQ the quantized weight of a
convolution is in the standardised domain (what the official code convolves with), and the hooks act on it
all the same.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._dtensor import is_dtensor
from .dynamic import DynamicTokenQuantizer
from .quantizer import FLOAT_BITS, QUANTIZERS, LSQQuantizer, Quantizer

__all__ = ["QuantLayer", "QuantConv1d", "QuantConv2d", "QuantLinear", "QuantEmbedding", "QUANT_CLASSES",
           "quant_layers", "num_samples", "macs_per_sample", "float_class"]


if TYPE_CHECKING:
    # every QuantLayer is a Conv/Linear module at run time (its class swapped in by saq.quantize): type checkers
    # see the mixin as an nn.Module so its users get the module API; at run time it stays a plain mixin
    _Module = nn.Module
else:
    _Module = object


class QuantLayer(_Module):
    """Mixin holding the quantizers and the perturbation hook; concrete classes define ``_float_forward``."""

    weight: Tensor  # the float layer's Parameter
    weight_quantizer: Quantizer
    act_quantizer: Quantizer
    quant_role: Optional[str]
    perturb_pre: Optional[Tensor]
    perturb_post: Optional[Tensor]
    qweight: Optional[Tensor]
    _probe: Optional[Tensor]  # zeros added to Q(w) while capturing: its .grad is dL/dQ(w) (no hook, compiles)
    _saq_macs: Optional[int]
    _saq_name: str  # the layer's qualified name in the model, set by saq.quantize

    def _init_quant(self, w_bits: int, a_bits: int, quantizer: str, options: Any,
                    a_signed: Optional[bool] = None, a_mode: str = "static") -> None:
        """Attach the quantizers (kind ``quantizer`` with its ``options`` dataclass, see
        :data:`torchsaq.quant.quantizer.QUANTIZERS`; ``a_mode="dynamic_token"``: a Linear layer's input quantizer is
        :class:`torchsaq.quant.dynamic.DynamicTokenQuantizer`) and the hooks."""
        name = getattr(self, "_saq_name", type(self).__name__)
        wq, aq = QUANTIZERS.get(quantizer).make(w_bits, a_bits, self.weight.shape[0], options, a_signed=a_signed,
                                                linear=isinstance(self, (nn.Linear, nn.Embedding)))
        if a_mode == "dynamic_token" and not isinstance(self, nn.Embedding):  # (a lookup's input: indices)
            if not isinstance(self, nn.Linear):
                raise ValueError(f"a_mode='dynamic_token' quantizes each token (row) of a Linear layer's input; layer "
                                 f"{name} is a {float_class(self).__name__}: exclude it")
            aq = DynamicTokenQuantizer(a_bits)
        wq.bind(self.weight.shape, name)
        self.weight_quantizer = wq.to(self.weight.device)
        self.act_quantizer = aq.to(self.weight.device)
        self.quant_role = None  # "first" / "last" once the execution order is known
        self.perturb_pre = None
        self.perturb_post = None
        self._probe = None
        self.capture_qweight = False
        self.qweight = None
        self._saq_macs = None  # multiply-accumulates per sample, recorded by the trace

    # -- bits ------------------------------------------------------------------------------------------
    @property
    def w_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int:
        return self.act_quantizer.bits

    def set_bits(self, w_bits: int, a_bits: int) -> None:
        if self.weight_quantizer.is_initialized or (self.act_quantizer.is_initialized and self.act_quantizer.learned):
            raise RuntimeError("cannot change the bit-width of a layer whose steps are already initialised")
        self.weight_quantizer.bits = w_bits
        self.act_quantizer.bits = a_bits

    # -- the quantized weight and the perturbation hook ------------------------------------------------
    @property
    def weight_standardize(self) -> bool:
        """LSQ's ``weight_standardize`` option, which its weight quantizer applies (False for the other kinds)."""
        wq = self.weight_quantizer
        return isinstance(wq, LSQQuantizer) and wq.standardize

    @weight_standardize.setter
    def weight_standardize(self, on: bool) -> None:
        if isinstance(self.weight_quantizer, LSQQuantizer):
            self.weight_quantizer.standardize = bool(on)
        elif on:
            raise ValueError("weight_standardize is an LSQ option")

    def standardized_weight(self, w: Tensor) -> Tensor:
        """The tensor the weight quantizer rounds for ``w`` (:meth:`Quantizer.standardized`)."""
        return self.weight_quantizer.standardized(w)

    def quantized_weight(self) -> Tensor:
        """Q(w [+ perturb_pre]) [+ perturb_post]: the weight tensor this layer computes with."""
        w = self.weight
        if self.perturb_pre is not None:
            w = w + self.perturb_pre
        wq = self.weight_quantizer(w)  # (LSQ's weight_standardize and LIQ_wn's standardisation happen inside)
        if self.capture_qweight and torch.is_grad_enabled():
            self.qweight = wq.detach()
            if not torch.compiler.is_compiling():
                self._check_probe()  # the model may have moved (.to) since the capture began
            wq = wq + self._probe  # backward accumulates dL/dQ(w) in the probe's .grad, like a parameter's
        if self.perturb_post is not None:
            wq = wq + self.perturb_post
        return wq

    # -- capture of dL/dQ(w) ---------------------------------------------------------------------------
    @property
    def capture_qweight(self) -> bool:
        """While True, training forwards keep Q(w) (``qweight``) and accumulate dL/dQ(w) (``qweight_grad``)."""
        return self._capture

    @capture_qweight.setter
    def capture_qweight(self, on: bool) -> None:
        self._capture = bool(on)
        if on:
            self._check_probe()

    def _check_probe(self) -> None:
        """A zero leaf tensor like the weight (made outside the forward, so a compiled forward only reads it)."""
        w, p = self.weight, self._probe
        if p is None or p.shape != w.shape or p.device != w.device or p.dtype != w.dtype:
            grad = None if p is None else p.grad
            if is_dtensor(w):  # FSDP2 outside the forward: the forward adds it to the unsharded (plain) weight
                self._probe = torch.zeros(w.shape, device=w.device, dtype=w.dtype).requires_grad_()
            else:
                self._probe = torch.zeros_like(w, memory_format=torch.contiguous_format).requires_grad_()
            if grad is not None and grad.shape == w.shape:
                self._probe.grad = grad.to(self._probe)

    @property
    def qweight_grad(self) -> Optional[Tensor]:
        """dL/dQ(w) accumulated over the captured backward passes since the last :meth:`zero_qweight_grad`."""
        return None if self._probe is None else self._probe.grad

    def zero_qweight_grad(self) -> None:
        if self._probe is not None:
            self._probe.grad = None

    def forward(self, x: Tensor) -> Tensor:
        return self._float_forward(self.act_quantizer(x, samples=num_samples(self, x)), self.quantized_weight())

    def _float_forward(self, x: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        base = super().extra_repr()
        role = f", role={self.quant_role}" if self.quant_role else ""
        kind = "" if self.weight_quantizer.kind == "lsq" else f", quantizer={self.weight_quantizer.kind}"
        return f"{base}, w_bits={self.w_bits}, a_bits={self.a_bits}{kind}{role}"


class QuantConv1d(QuantLayer, nn.Conv1d):
    def _float_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantConv2d(QuantLayer, nn.Conv2d):
    def _float_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    def _float_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)


class QuantEmbedding(QuantLayer, nn.Embedding):
    """An ``nn.Embedding`` with a quantized table (weight-only: its input is indices, never quantized; its input
    quantizer stays at 32 bits). LSQ: a step per row (per token), or per group of ``group_size`` elements of a
    row. No multiply-accumulates (a lookup)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._float_forward(x, self.quantized_weight())

    def _float_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(x, weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, False)


#: float class -> quantized class; only these exact types are converted (nn.Embedding only when
#: ``QuantConfig.embedding_bits`` is set)
QUANT_CLASSES: dict[type, type] = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear,
                                   nn.Embedding: QuantEmbedding}


#: a layer with a weight whose first dim is the output channels: what num_samples / macs_per_sample measure
WeightLayer = Union[nn.Conv1d, nn.Conv2d, nn.Linear, QuantLayer]


def num_samples(layer: WeightLayer, x: Tensor) -> int:
    """How many samples the input ``x`` of a Conv/Linear ``layer`` holds: its batch size, 1 for an unbatched
    (or empty) input."""
    if isinstance(layer, nn.Linear):
        batched = x.dim() >= 2  # (B, in) or (B, T, in): tokens count per sample
    else:
        batched = x.dim() == layer.weight.dim()  # conv: (B, C, ...) vs unbatched (C, ...)
    return x.shape[0] if batched and x.shape[0] > 0 else 1


def macs_per_sample(layer: WeightLayer, x: Tensor, out: Tensor) -> int:
    """MACs of one call of a Conv/Linear ``layer`` per sample: output elements per sample x weight elements per
    output element (an embedding lookup: none)."""
    if isinstance(layer, nn.Embedding):
        return 0
    return out.numel() // num_samples(layer, x) * layer.weight[0].numel()


def float_class(layer: QuantLayer) -> type:
    """The float class (``nn.Conv2d``, ...) a quantized layer's class derives from."""
    return next(c for c in type(layer).__mro__ if c in QUANT_CLASSES)


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """All quantized layers of ``model`` as (qualified name, layer), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def is_quantized_layer(m: nn.Module) -> bool:
    return isinstance(m, QuantLayer) and (m.w_bits != FLOAT_BITS or m.a_bits != FLOAT_BITS)
