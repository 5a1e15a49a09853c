"""Quantization: the quantizers (fake-quantizers with bit-exact integer codes), the layers that hold them, the
conversion of a float model (:func:`quantize`, :func:`calibrate`), the LSQ kernels and the size summary.

Layers below it: only :mod:`torchsaq.registry` and torch. Everything else in torchsaq builds on this package.
"""
from __future__ import annotations

from .convert import QuantConfig, calibrate, quantize
from .kernels import get_lsq_backend, set_lsq_backend
from .layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLayer, QuantLinear, quant_layers
from .quantizer import (LIQActQuantizer, LIQWeightQuantizer, LSQQuantizer, NotInitializedError, Quantizer, lsq,
                        qrange)

from . import dorefa, pact  # noqa: E402,F401  (register the "dorefa" and "pact" quantizers)

__all__ = ["QuantConfig", "quantize", "calibrate", "lsq", "qrange", "Quantizer", "LSQQuantizer", "LIQWeightQuantizer",
           "LIQActQuantizer", "NotInitializedError", "set_lsq_backend", "get_lsq_backend", "QuantLayer", "QuantConv1d",
           "QuantConv2d", "QuantLinear", "QuantEmbedding", "quant_layers"]
