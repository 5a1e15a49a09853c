"""What torchsaq needs of ``torch.amp.GradScaler`` beyond its public API, in one place.

A closure-free ``prev_grad`` step called by ``scaler.step(opt)`` (Lightning's ``precision="16-mixed"``, loops that
never pass ``grad_scaler=`` to :class:`torchsaq.SAQ`) must find that scaler and its current scale, to bring the
captured gradients w.r.t. Q(w) (which the scaler does not unscale) to the scale of the unscaled parameter
gradients. torch has no public way to ask "which scaler is stepping me" nor "has it unscaled this optimizer", so
this module reads GradScaler's private ``_per_optimizer_states`` (per optimizer id: ``{"stage": OptState, ...}``)
and ``_scale``, and the caller frames of ``GradScaler.step``. :data:`PRIVATE` lists what is relied on;
``tests/test_integrations.py`` fails loudly the day torch changes any of it.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

__all__ = ["stepping_scaler", "has_unscaled", "inverse_scale", "PRIVATE"]

#: GradScaler's private attributes this module reads (tests check they still exist and mean the same)
PRIVATE = ("_per_optimizer_states", "_scale")
#: how many frames up from the optimizer's step GradScaler.step may be (step -> _maybe_opt_step -> the
#: Optimizer.step wrapper -> SAQ.step -> the strategy -> here)
_MAX_DEPTH = 8


def stepping_scaler(opt: torch.optim.Optimizer, depth: int = 1) -> Optional[torch.amp.GradScaler]:
    """The enabled GradScaler whose ``step(opt)`` is running now, if any, read from the callers' frames
    (``depth``: frames to skip, the caller's own)."""
    frame = sys._getframe(depth)
    for _ in range(_MAX_DEPTH):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return None
        s = frame.f_locals.get("self")
        if isinstance(s, torch.amp.GradScaler) and s.is_enabled() and id(opt) in s._per_optimizer_states:
            return s
    return None


def has_unscaled(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> bool:
    """Whether ``scaler`` has unscaled ``opt``'s gradients in this iteration (``scaler.step(opt)`` does first)."""
    state: Any = scaler._per_optimizer_states.get(id(opt), {})
    return state.get("stage") is OptState.UNSCALED


def inverse_scale(scaler: torch.amp.GradScaler) -> Tensor:
    """1 / the scaler's current scale, in float64 on the scale's device."""
    return scaler._scale.double().reciprocal()  # type: ignore[union-attr]
