"""Training: :func:`train` (one run from a :class:`TrainConfig`), its loop (:mod:`.engine`), the run folder and
checkpoints (:mod:`.checkpointer`, :mod:`.checkpoint`), the data sets and models registries (:mod:`.data`,
:mod:`.models`), devices and distributed runs (:mod:`.device`), metrics files (:mod:`.runlog`).

Layers below it: :mod:`torchsaq.quant`, :mod:`torchsaq.optim`. The runner's names load on first use
(``from torchsaq.train import train``), so ``torchsaq.train.config`` alone stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["train", "evaluate", "build_model", "build_optimizer", "wrap_sharpness", "build_scheduler",
           "lr_lambda", "param_groups", "build_data", "load_pretrained", "resolve_device", "format_result",
           "plot_history", "TrainingInterrupted", "CHECKPOINT_NAME"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".runner", __name__), name)
    globals()[name] = value
    return value
