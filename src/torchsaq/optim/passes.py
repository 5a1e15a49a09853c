"""The passes of a sharpness-aware step, as an object the strategies receive (:class:`Passes`).

One step is built from these pieces: the two-pass step (first pass, ascent, second pass at the perturbed point,
restore, base step), the one-pass step (a pass at a given perturbation, base step), the ascent (the perturbation
from the gradients present), BatchNorm snapshots (the statistics updated once per step; rolled back on a
rejected step), dropout replay (both passes draw the same masks), the non-finite check (one host-device sync
per step) and the base step (unscale, clip, step). :class:`torchsaq.SAQ` owns one and is the
``torch.optim.Optimizer`` front; a strategy (:mod:`.strategies`) decides which pieces a step runs, and can be
driven by a :class:`Passes` alone (``tests/test_strategies.py``).

Rules (the module docstring of :mod:`.saq` has the whole list): finiteness without a grad scaler is checked once,
at the end of the step: a non-finite first pass still runs the second one (at a garbage point; the weights are
restored anyway) and the step is then rejected. With a grad scaler the scaler checks, and a non-finite direction
gives a zero perturbation (computed on the device).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

from . import _foreach as fe
from .._dtensor import unsharded
from ._update import base_step, finite, first_failure
from .functional import DEFAULT_RHO, sam_perturbation
from .perturb import Targets
from ..quant.layers import quant_layers

__all__ = ["Passes", "Scaler", "NONFINITE"]

Scaler = Optional[torch.amp.GradScaler]
NONFINITE = ("raise", "skip")


class Passes:
    """The pass machinery of one sharpness-aware optimizer (see the module docstring).

    ``module``: the model without its DDP / torch.compile wrappers; ``ddp``: the DDP wrapper, if any (the ascent
    backward of a full step runs under its ``no_sync()``); ``base_optimizer``: the optimizer taking the final
    step; ``targets``: what is perturbed and where. ``rho``/``rho_schedule``: the radius (the schedule, when
    given, replaces it at every step). ``adaptive``/``eta``: ASAM; ``need_capture``: whether the passes must
    capture Q(w) and its gradient (:meth:`torchsaq.optim.perturb.Mode.needs_capture`). ``max_grad_norm``: clip
    before the base step; ``nonfinite``: ``"raise"`` or ``"skip"`` a step with a non-finite loss or gradient
    (without a grad scaler); ``grad_scaler``: the AMP scaler the steps use unless given another.
    ``on_nonfinite``: called when a step is rejected (the strategy drops its stored state).
    """

    def __init__(self, module: nn.Module, base_optimizer: torch.optim.Optimizer, targets: Targets, *,
                 ddp: Optional[DistributedDataParallel] = None, rho: float = DEFAULT_RHO,
                 rho_schedule: Optional[Callable[[int], float]] = None, adaptive: bool = False, eta: float = 0.01,
                 need_capture: bool = True, max_grad_norm: Optional[float] = None, nonfinite: str = "raise",
                 grad_scaler: Scaler = None) -> None:
        self.module, self.ddp, self.base_optimizer = module, ddp, base_optimizer
        self.targets = targets
        self.rho, self.rho_schedule = rho, rho_schedule
        self.adaptive, self.eta = adaptive, eta
        self.need_capture = need_capture
        self.max_grad_norm, self.nonfinite, self.grad_scaler = max_grad_norm, nonfinite, grad_scaler
        self.on_nonfinite: Callable[[], None] = lambda: None
        self.quant_layers = [m for _, m in quant_layers(module)]
        self.norm_modules = [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]
        self.step_count = 0        # steps taken (or skipped); the argument of rho_schedule
        self.passes_last_step = 0  # forward/backward passes the last step ran
        # the snapshots keep their buffers from step to step
        self.bn_pre = fe.Snapshot()   # BatchNorm statistics before the step (rolled back on a non-finite step)
        self.bn_mid = fe.Snapshot()   # ... after the first pass (put back after the second)
        self.set_capture(True)

    # -- what a step reads ---------------------------------------------------------------------------------
    def params(self) -> list[Tensor]:
        return [p for g in self.base_optimizer.param_groups for p in g["params"]]

    def rho_at(self, step: int) -> float:
        if self.rho_schedule is None:
            return self.rho
        r = float(self.rho_schedule(step))
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"rho_schedule({step}) returned {r}; it must be a finite number >= 0")
        return r

    def scaler(self, grad_scaler: Scaler = None) -> Scaler:
        """The enabled scaler of this step: ``grad_scaler`` if given, else the one set here; None if disabled."""
        s = grad_scaler if grad_scaler is not None else self.grad_scaler
        return s if s is not None and s.is_enabled() else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the base optimizer's gradients and the quantized layers' ``qweight_grad``."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        for layer in self.quant_layers:
            layer.zero_qweight_grad()

    # -- the steps -------------------------------------------------------------------------------------------
    def two_pass(self, closure: Callable[[], Any], rho: float, scaler: Scaler,
                 after: Optional[Callable[[list[Optional[Tensor]]], None]] = None) -> Any:
        """First pass, perturb, second pass at the perturbed point, restore, base step.

        ``after(g_first)`` runs with a copy of the first pass's gradients before the base step (every_k). That
        gradient must then be the same on every replica, so the first backward is synchronised under DDP.
        """
        rollback = scaler is None
        if rollback:
            self.bn_pre.take(self.bn_buffers())
        sync = contextlib.nullcontext() if (after is not None or self.ddp is None) else self.ddp.no_sync()
        with self.replayed_rng(), sync:  # the second pass draws the same dropout masks
            loss = closure()
        self.passes_last_step = 1
        g_first = None
        if after is not None:
            with torch.no_grad():
                grads = [p.grad for p in self.params()]
                copies = iter(fe.clone([g for g in grads if g is not None]))
                g_first = [None if g is None else next(copies) for g in grads]
        ok = self.ascent(rho, safe=scaler is not None)
        checks = [("loss of the first pass", finite(loss)), ("gradient of the first pass", ok)] if rollback else []
        self.zero_grad()
        try:
            loss2 = closure()
        finally:
            self.restore()
        self.passes_last_step = 2
        hook = (lambda: after(g_first)) if after is not None else None  # type: ignore[arg-type]
        return self.finish(loss, loss2, checks, rollback, scaler, hook)

    def one_pass(self, closure: Callable[[], Any], scaler: Scaler, hook: Optional[Callable[[], None]],
                 perturbation: Optional[list[Optional[Tensor]]] = None, capture: bool = True) -> Any:
        """One forward/backward (at the point ``perturbation`` gives, if any), then the base step.

        ``capture=False``: the pass needs no Q(w) gradient (every_k's plain iterations).
        """
        rollback = scaler is None
        if rollback:
            self.bn_pre.take(self.bn_buffers())
        if perturbation is not None:
            self.targets.apply(perturbation)
        if not capture:
            self.set_capture(False)
        try:
            loss = closure()
        finally:
            self.restore()
        self.passes_last_step = 1
        return self.finish(loss, loss, [], rollback, scaler, hook)

    def finish(self, loss: Any, loss_check: Any, checks: list[tuple[str, Tensor | bool]], rollback: bool,
               scaler: Scaler, hook: Optional[Callable[[], None]]) -> Any:
        """Non-finite check (the step's one host-device sync), strategy hook, (unscale,) clip, base step, counter."""
        params = [p for p in self.params() if p.grad is not None]
        total = None
        if scaler is None:
            total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # (all of them)
            what = "loss or gradient of the pass at the perturbed point"
            failed = first_failure(checks + [(what, finite(loss_check)), (what, torch.isfinite(unsharded(total)))])
            if failed is not None:
                return self.reject(failed, rollback, loss)
        if hook is not None:
            hook()
            total = None  # the hook may have changed the gradients
        base_step(self.base_optimizer, params, grad_scaler=scaler, max_grad_norm=self.max_grad_norm, grad_norm=total)
        self.step_count += 1
        return loss

    def nonfinite_message(self, what: str) -> str:
        return (f"saq.SAQ: non-finite {what}; the step was not taken and the weights are unchanged. "
                "Pass nonfinite='skip' to skip such steps, or use a torch.amp.GradScaler with AMP.")

    def reject(self, what: str, rollback: bool, loss: Any) -> Any:
        """A non-finite step: statistics rolled back, then raised or skipped (``nonfinite``)."""
        if rollback:
            self.bn_pre.put_back()
        if self.nonfinite == "raise":
            raise FloatingPointError(self.nonfinite_message(what))
        self.on_nonfinite()
        self.step_count += 1
        return loss

    @torch.no_grad()
    def ascent(self, rho: float, clobber: bool = True, safe: bool = False) -> Tensor | bool:
        """Build e from the gradients of the first pass and apply it; snapshot BatchNorm statistics.

        Returns whether the direction was finite (a device bool; True if there was none). ``safe``: make a
        non-finite direction a zero perturbation (otherwise e is garbage and the caller rejects the step).
        """
        self.bn_mid.take(self.bn_buffers())
        idx, srcs, refs, owned = self.targets.directions(self.adaptive, clobber)
        res = sam_perturbation(srcs, rho, refs=refs, eta=self.eta, owned=owned, zero_nonfinite=safe) if srcs else None
        self.targets.drop_captures()
        self.set_capture(False)  # the second pass needs no Q(w) gradient
        if res is None:
            return True
        es, ok = res
        self.targets.apply(self.targets.per_target(idx, es))
        return ok

    def perturbation(self, rho: float) -> Optional[list[Optional[Tensor]]]:
        """The perturbation the gradients present give (``p.grad`` kept; a non-finite direction gives zeros, on
        the device), per target, or None if there is nothing to perturb along or ``rho`` is 0."""
        idx, srcs, refs, owned = self.targets.directions(self.adaptive, clobber=False)
        res = None
        if rho > 0:
            res = sam_perturbation(srcs, rho, refs=refs, eta=self.eta, owned=owned, zero_nonfinite=True)
        self.targets.drop_captures()
        return None if res is None else self.targets.per_target(idx, res[0])

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the perturbation (weights bit-exact) and put BatchNorm statistics back to their first-pass values."""
        self.targets.restore()
        self.bn_mid.put_back()
        self.set_capture(True)

    # -- small utilities ------------------------------------------------------------------------------------
    def set_capture(self, on: bool) -> None:
        if self.need_capture:
            self.targets.capture(on)

    def bn_buffers(self) -> list[Tensor]:
        return [b for m in self.norm_modules for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                if b is not None]

    def replayed_rng(self) -> contextlib.AbstractContextManager:
        """A block whose random draws are replayed after it: the CPU RNG and that of each CUDA device holding
        a parameter are put back as they were before it."""
        devices = sorted({p.device.index or 0 for p in self.params() if p.device.type == "cuda"})
        return torch.random.fork_rng(devices=devices, device_type="cuda")
