"""torchsaq: Sharpness-Aware Quantization (SAQ) for PyTorch -- LSQ quantization-aware training made flatter.

    import torchsaq as saq
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4))
    opt = saq.SAQ(model, torch.optim.SGD(model.parameters(), lr=0.01), rho=0.05)
"""
from __future__ import annotations

import importlib
from typing import Any

from .convert import QuantConfig, calibrate, quantize
from .kernels import get_lsq_backend, set_lsq_backend
from .layers import QuantConv1d, QuantConv2d, QuantLayer, QuantLinear, quant_layers
from .quantizer import LIQActQuantizer, LIQWeightQuantizer, LSQQuantizer, NotInitializedError, Quantizer, lsq, qrange

__version__ = "0.1.0"

# heavier parts load on first use (keeps `import torchsaq` and the CLI start-up fast; `import torchsaq` needs
# only torch: optional dependencies are imported where they are used, see _optional.py)
_LAZY = {
    "SAQ": "sam", "rho_warmup": "sam",
    "export": "export", "load_exported": "export",
    "summary": "summary", "model_size_bits": "summary", "bops": "summary",
    "create_model": "models", "list_models": "models", "register_model": "models",
    "allocate_bits": "allocate", "Allocation": "allocate",
    "TrainConfig": "config", "SharpnessConfig": "config",
    "list_datasets": "data", "register_dataset": "data",
    "load_trained": "checkpoint",
    "analysis": None, "allocate": None, "vocab": None, "models": None, "data": None, "train": None, "checkpoint": None,
}

__all__ = [
    "QuantConfig", "quantize", "calibrate", "lsq", "qrange", "Quantizer", "LSQQuantizer", "LIQWeightQuantizer",
    "LIQActQuantizer", "NotInitializedError", "set_lsq_backend", "get_lsq_backend",
    "QuantLayer", "QuantConv1d", "QuantConv2d", "QuantLinear", "quant_layers", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'torchsaq' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value
