"""The names torchsaq's options accept, as plain tuples and help dicts: a read-only view of the registries
(:mod:`torchsaq.registry`), kept for code written against torchsaq 0.1. The registries are the definition:
:data:`torchsaq.optim.perturb.MODES`, :data:`torchsaq.optim.strategies.STRATEGIES`,
:data:`torchsaq.quant.quantizer.QUANTIZERS`, ... ; new code reads those (``reg.names()``, ``reg.help()``).

Data sets and models are registries too: ``torchsaq.train.data.list_datasets()`` and
``torchsaq.train.models.list_models()``.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [  # noqa: F822 - the names are read from the registries on first use (__getattr__)
    "MODES", "MODE_HELP", "SHARPNESS", "SHARPNESS_HELP", "STRATEGIES", "STRATEGY_HELP", "QUANTIZERS",
    "QUANTIZER_HELP", "ACT_GRAD_SCALES", "ACT_GRAD_SCALE_HELP", "WHERE", "WHERE_HELP", "LSQ_BACKENDS",
    "LSQ_BACKEND_HELP", "OPTIMIZERS", "OPTIMIZER_HELP", "SCHEDULES", "SCHEDULE_HELP", "describe"]

#: the tuple / help-dict name -> (module, registry)
_SOURCES = {
    "MODES": ("optim.perturb", "MODES"), "SHARPNESS": ("train.config", "SHARPNESS"),
    "STRATEGIES": ("optim.strategies", "STRATEGIES"), "QUANTIZERS": ("quant.quantizer", "QUANTIZERS"),
    "ACT_GRAD_SCALES": ("quant.convert", "ACT_GRAD_SCALES"), "WHERE": ("optim.perturb", "WHERE"),
    "LSQ_BACKENDS": ("quant.kernels", "LSQ_BACKENDS"), "OPTIMIZERS": ("train.optimizers", "OPTIMIZERS"),
    "SCHEDULES": ("train.optimizers", "SCHEDULES"),
}
_HELP = {"MODE_HELP": "MODES", "SHARPNESS_HELP": "SHARPNESS", "STRATEGY_HELP": "STRATEGIES",
         "QUANTIZER_HELP": "QUANTIZERS", "ACT_GRAD_SCALE_HELP": "ACT_GRAD_SCALES", "WHERE_HELP": "WHERE",
         "LSQ_BACKEND_HELP": "LSQ_BACKENDS", "OPTIMIZER_HELP": "OPTIMIZERS", "SCHEDULE_HELP": "SCHEDULES"}


def _registry(name: str) -> Any:
    module, attr = _SOURCES[name]
    return getattr(importlib.import_module(f"torchsaq.{module}"), attr)


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        return _registry(name).names()
    if name in _HELP:
        return _registry(_HELP[name]).help()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe(help_: dict[str, str]) -> str:
    """``"a: what a is; b: what b is"`` for a help text."""
    return "; ".join(f"{name}: {text}" for name, text in help_.items())
