"""torchsaq: Sharpness-Aware Quantization (SAQ) for PyTorch -- LSQ quantization-aware training made flatter.

    import torchsaq as saq
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4))
    opt = saq.SAQ(model, torch.optim.SGD(model.parameters(), lr=0.01), rho=0.05)
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any, Optional

from .quant.convert import QuantConfig, calibrate, quantize
from .quant.kernels import get_lsq_backend, set_lsq_backend
from .quant.layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLayer, QuantLinear, quant_layers
from .quant.quantizer import (LIQActQuantizer, LIQWeightQuantizer, LSQQuantizer, NotInitializedError, Quantizer, lsq,
                             qrange)

__version__ = "0.1.0"

# heavier parts load on first use (keeps `import torchsaq` and the CLI start-up fast; `import torchsaq` needs
# only torch: optional dependencies are imported where they are used, see _optional.py).
# name -> (module, attribute; None: the module itself)
_LAZY: dict[str, tuple[str, Optional[str]]] = {
    "SAQ": ("optim.saq", "SAQ"), "rho_warmup": ("optim.saq", "rho_warmup"),
    "export": ("export", "export"), "load_exported": ("export", "load_exported"),
    "summary": ("quant.summary", "summary"), "model_size_bits": ("quant.summary", "model_size_bits"),
    "bops": ("quant.summary", "bops"),
    "create_model": ("train.models", "create_model"), "list_models": ("train.models", "list_models"),
    "register_model": ("train.models", "register_model"),
    "allocate_bits": ("analysis.allocate", "allocate_bits"), "Allocation": ("analysis.allocate", "Allocation"),
    "TrainConfig": ("train.config", "TrainConfig"), "SharpnessConfig": ("train.config", "SharpnessConfig"),
    "list_datasets": ("train.data", "list_datasets"), "register_dataset": ("train.data", "register_dataset"),
    "load_trained": ("train.checkpoint", "load_trained"),
    "analysis": ("analysis", None), "allocate": ("analysis.allocate", None), "vocab": ("vocab", None),
    "models": ("train.models", None), "data": ("train.data", None), "train": ("train", None),
    "checkpoint": ("train.checkpoint", None),
}

__all__ = [
    "QuantConfig", "quantize", "calibrate", "lsq", "qrange", "Quantizer", "LSQQuantizer", "LIQWeightQuantizer",
    "LIQActQuantizer", "NotInitializedError", "set_lsq_backend", "get_lsq_backend",
    "QuantLayer", "QuantConv1d", "QuantConv2d", "QuantLinear", "QuantEmbedding", "quant_layers", *_LAZY,
]

#: the flat module paths of torchsaq <= 0.1 -> their homes in the packages (docs/architecture.md); importing an
#: old path gives the new module itself (``torchsaq.sam is torchsaq.optim.saq``), so pickles and user code that
#: name the old paths keep working. New code imports the new paths.
MOVED = {
    "_foreach": "optim._foreach", "_update": "optim._update", "functional": "optim.functional",
    "perturb": "optim.perturb", "strategies": "optim.strategies", "sam": "optim.saq",
    "kernels": "quant.kernels", "_triton_lsq": "quant._triton_lsq", "quantizer": "quant.quantizer",
    "layers": "quant.layers", "convert": "quant.convert", "summary": "quant.summary",
    "export_onnx": "export.onnx", "checkpoint": "train.checkpoint", "checkpointer": "train.checkpointer",
    "config": "train.config", "data": "train.data", "device": "train.device", "runlog": "train.runlog",
    "engine": "train.engine", "models": "train.models", "allocate": "analysis.allocate",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import ``torchsaq.<old>`` (and ``torchsaq.<old>.<sub>``) as the module that moved (:data:`MOVED`)."""

    @staticmethod
    def target(fullname: str) -> Optional[str]:
        prefix, _, rest = fullname.partition(".")
        if prefix != __name__ or not rest:
            return None
        head, dot, tail = rest.partition(".")
        return f"{__name__}.{MOVED[head]}{dot}{tail}" if head in MOVED else None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(fullname, self) if self.target(fullname) else None

    def create_module(self, spec: Any) -> types.ModuleType:
        return importlib.import_module(self.target(spec.name) or spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'torchsaq' has no attribute {name!r}")
    path, attr = _LAZY[name]
    module = importlib.import_module(f".{path}", __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
