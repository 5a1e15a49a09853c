"""Sharpness-aware optimization: :class:`SAQ` (a torch.optim.Optimizer front over a base optimizer), the
strategies that decide how often the ascent pass is paid, the perturbation rule (which tensors, where: the
Mode -> (Direction, Site) table shared with :mod:`torchsaq.analysis`) and the stateless maths
(:mod:`.functional`, :mod:`._foreach`, :mod:`._update`).

Layers below it: :mod:`torchsaq.quant` (the layers it perturbs), :mod:`torchsaq.integrations` (GradScaler).
"""
from __future__ import annotations

from .perturb import MODES, Direction, Mode, Site, Targets
from .saq import SAQ, rho_warmup
from .strategies import STRATEGIES, Strategy

__all__ = ["SAQ", "rho_warmup", "MODES", "Mode", "Direction", "Site", "Targets", "STRATEGIES", "Strategy"]
