"""The base optimizers and learning-rate schedules of ``torchsaq train``, as registries (``--optimizer``,
``--lr-schedule``): a new one is one entry here. Light (torch only): :class:`TrainConfig` validates against them."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..registry import Registry

TrainConfig = Any  # a torchsaq.train.config.TrainConfig (not imported: the config validates against these)

__all__ = ["OPTIMIZERS", "SCHEDULES"]

#: base optimizers: name -> ``make(param_groups, cfg)``
OPTIMIZERS: Registry[Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.register(
    "sgd", lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                               nesterov=cfg.nesterov and cfg.momentum > 0),
    description="SGD with momentum")
OPTIMIZERS.register("adamw", lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr), description="AdamW")


def _cosine(it: int, warm: int, total: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    t = min((it - warm) / max(total - warm, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _step(it: int, warm: int, total: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    epoch = it // max(steps_per_epoch, 1)
    return cfg.step_gamma ** sum(epoch >= int(m) for m in cfg.step_milestones)


#: learning-rate schedules after the warm-up: name -> ``factor(it, warm, total, steps_per_epoch, cfg)``
SCHEDULES: Registry[Callable[[int, int, int, int, TrainConfig], float]] = Registry("lr schedule")
SCHEDULES.register("cosine", _cosine, description="cosine decay to 0")
SCHEDULES.register("step", _step, description="multiply by step_gamma at each of step_milestones")
SCHEDULES.register("constant", lambda it, warm, total, steps_per_epoch, cfg: 1.0, description="constant")
