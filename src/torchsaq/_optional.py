"""Optional dependencies: imported where they are used, with an ImportError that names the extra to install.

``import torchsaq`` needs only torch (the core dependencies are torch and safetensors); the command line,
the data sets, plots, TensorBoard, timm models and ONNX export each come with an extra of the
distribution (``pip install 'torchsaq[cli]'``; pyproject.toml lists them).
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Iterable

__all__ = ["require", "missing", "install_hint", "DISTRIBUTIONS"]

#: import name -> the distribution pip installs it from, where they differ
DISTRIBUTIONS = {"yaml": "PyYAML", "sklearn": "scikit-learn", "PIL": "Pillow"}


def install_hint(extra: str) -> str:
    return f"pip install 'torchsaq[{extra}]'"


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or an ImportError naming the distribution and ``pip install 'torchsaq[EXTRA]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        dist = DISTRIBUTIONS.get(module.split(".")[0], module.split(".")[0])
        raise ImportError(f"{purpose} needs {dist}, which is not installed or failed to import ({e}): "
                          f"{install_hint(extra)}") from e


def missing(modules: Iterable[str]) -> list[str]:
    """The distributions of the top-level ``modules`` that cannot be found (nothing is imported)."""
    out = []
    for m in modules:
        top = m.split(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(DISTRIBUTIONS.get(top, top))
    return out
