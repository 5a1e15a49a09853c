"""The parameter update that ends a training step: finiteness check, (unscale,) clip, base step.

Shared by :class:`saq.SAQ` and the trainer's plain quantization-aware path (``engine.train_step``), so both
update the weights the same way::

    failed = first_failure([("loss", finite(loss)), ("gradient", torch.isfinite(total))])  # no grad scaler
    base_step(optimizer, params, grad_scaler=scaler, max_grad_norm=1.0, grad_norm=total)

:func:`first_failure` is the step's one host-device sync: it reads every device flag in one transfer. With a
``torch.amp.GradScaler`` no check is needed: ``scaler.step`` skips a step whose gradients are not finite.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["finite", "first_failure", "base_step"]


def finite(value: Any) -> Tensor | bool:
    """Whether a loss (or any closure's return value) is finite: a device bool for a tensor (not read here),
    a bool for a number, True for anything else (e.g. None)."""
    if torch.is_tensor(value):
        return torch.isfinite(value.detach()).all()
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return True


def first_failure(checks: Sequence[tuple[str, Tensor | bool]]) -> Optional[str]:
    """The description of the first failed finiteness check, or None.

    ``checks`` holds (description, device bool or bool); the device flags are read in one transfer.
    """
    flags = [f for _, f in checks if torch.is_tensor(f)]
    values = iter(torch.stack([f.to(flags[0].device) for f in flags]).tolist() if flags else ())
    for what, f in checks:
        if not (next(values) if torch.is_tensor(f) else f):
            return what
    return None


def base_step(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], *,
              grad_scaler: Optional[torch.amp.GradScaler] = None, max_grad_norm: Optional[float] = None,
              grad_norm: Optional[Tensor] = None) -> None:
    """Step ``optimizer`` with the gradients held by ``params``, clipped to ``max_grad_norm`` if given.

    With an enabled ``grad_scaler``: ``scaler.unscale_(optimizer)``, clip, ``scaler.step(optimizer)`` (which skips
    a step with non-finite gradients) and ``scaler.update()``. Without one: clip, ``optimizer.step()``;
    ``grad_norm``, the global gradient norm of ``params`` if already computed, saves clipping its recomputation.
    ``params`` are the tensors clipped together (those without a gradient are ignored).
    """
    params = [p for p in params if p.grad is not None]
    if grad_scaler is not None and grad_scaler.is_enabled():
        grad_scaler.unscale_(optimizer)
        if max_grad_norm is not None and params:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        grad_scaler.step(optimizer)
        grad_scaler.update()
        return
    if max_grad_norm is not None and params:
        if grad_norm is None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm)
    optimizer.step()
