"""How often :class:`saq.SAQ` pays for the second pass (docs/method.md, "Efficient strategies").

Each strategy is a small object that runs one step through the optimizer's passes and keeps (and saves) its
own state:

* :class:`Full` -- the two-pass step on every iteration. No state.
* :class:`EveryK` (LookSAM) -- a two-pass step every ``k`` iterations stores ``g_v``, the component of the sharp
  gradient orthogonal to the plain one; the other iterations run one pass and add ``g_v`` back
  (:func:`saq.functional.add_orthogonal_`). State: ``g_v``, its norm and its size relative to the gradient.
* :class:`PrevGrad` -- one pass per iteration at the point perturbed by the perturbation built from the
  previous iteration's gradient; also runs without a closure (a forward pre-hook applies it). State: that
  perturbation, and whether the closure-free form is in use.
* :class:`Momentum` -- MSAM (Becker et al. 2024): one pass per iteration at the point perturbed by
  ``-rho * m / ||m||``, ``m`` the base optimizer's momentum after the last step (SGD's ``momentum_buffer``,
  Adam's first moment ``exp_avg``); no gradient is captured. Closure-free like ``prev_grad``. State: that
  perturbation.
* :class:`SubBatch` -- the two-pass step with the ascent pass on the first ``fraction`` of the batch (the
  closure takes its batch through :meth:`saq.SAQ.pass_batch`) and the update pass on all of it: the
  perturbation comes from this step's own samples, as in the full step, at ``1 + fraction`` passes' cost
  (m-sharpness: Foret et al. 2021 measured SAM's gain growing as the ascent's batch m shrinks). No state.

The state is saved in the ``"saq"`` entry of :meth:`saq.SAQ.state_dict` under the keys written here.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from . import _foreach as fe
from .._dtensor import is_dtensor, unsharded
from ..integrations.gradscaler import has_unscaled, inverse_scale, stepping_scaler
from ..registry import Registry
from .functional import add_orthogonal_, orthogonal_component_, sam_perturbation
from .passes import Passes, Scaler
from .perturb import Targets

__all__ = ["STRATEGIES", "Strategy", "Full", "EveryK", "PrevGrad", "Momentum", "SubBatch", "make_strategy",
           "momentum_of", "MOMENTUM_KEYS"]


class Strategy:
    """One sharpness-aware step per call of :meth:`step`; the base class is the two-pass step (``full``)."""

    name = "full"
    two_call = True       # first_step() / second_step() allowed
    closure_free = False  # step() without a closure allowed (without first_step())

    def step(self, passes: Passes, closure: Callable[[], Any], rho: float, scaler: Scaler) -> Any:
        if rho == 0:  # the perturbation is 0, the second pass would repeat the first: a plain step, one pass
            return passes.one_pass(closure, scaler, lambda: None, capture=False)
        return passes.two_pass(closure, rho, scaler)

    def step_without_closure(self, passes: Passes, opt: torch.optim.Optimizer) -> Any:  # pragma: no cover
        """The step of ``opt.step()`` with no closure after the caller's backward (closure_free strategies only)."""
        raise NotImplementedError

    def leave_closure_free(self) -> None:
        """A step with a closure begins: drop what a closure-free step left pending."""

    def on_nonfinite(self) -> None:
        """A step was rejected (non-finite loss or gradient)."""

    def state_dict(self, passes: Passes) -> dict[str, Any]:
        return {}

    def load_state_dict(self, saq: dict[str, Any], passes: Passes) -> None:
        pass

    def describe(self) -> str:
        return ""

    def pass_batch(self, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The part of the batch the pass running now sees (:meth:`saq.SAQ.pass_batch`): all of it."""
        return tensors


class Full(Strategy):
    """``full``: every iteration is a two-pass step. Cost: 2 forward/backward passes per iteration."""


class EveryK(Strategy):
    """``every_k`` (LookSAM): a two-pass step every ``k`` iterations stores ``g_v``; one pass in between.

    ``alpha="auto"`` re-adds ``g_v`` at the size it had relative to the gradient when it was measured.
    Device-side: a non-finite ``g_v`` keeps the previous one; a first ``g_v`` (no previous one) is checked on
    the host at the next step (:meth:`confirm`), until one finite ``g_v`` exists.
    """

    name = "every_k"
    two_call = False

    def __init__(self, k: int, alpha: Union[float, str]):
        self.k = k
        self.alpha = alpha
        self.gv: Optional[list[Optional[Tensor]]] = None
        self.gv_norm: Optional[Tensor] = None        # ||g_v|| on the device
        self.gv_ratio: Optional[Tensor] = None       # ||g_v|| / ||g|| at the full step that built g_v
        self.gv_unconfirmed: Optional[Tensor] = None  # device bool: whether a first g_v (no older one) is finite

    def describe(self) -> str:
        return f", k={self.k}, alpha={self.alpha}"

    def step(self, passes: Passes, closure: Callable[[], Any], rho: float, scaler: Scaler) -> Any:
        self.confirm()
        params = passes.params()
        if passes.step_count % self.k == 0 or self.gv is None or len(self.gv) != len(params):
            return passes.two_pass(closure, rho, scaler, after=lambda g_first: self.update(params, g_first))
        return passes.one_pass(closure, scaler, lambda: self.add(params), capture=False)

    @torch.no_grad()
    def update(self, params: list[Tensor], g_first: list[Optional[Tensor]]) -> None:
        """After a full step: g_v = g_s - (g_s.g / ||g||^2) g, built in the buffers of the first-pass g."""
        pairs = [(i, g, p.grad) for i, (p, g) in enumerate(zip(params, g_first))
                 if g is not None and p.grad is not None]
        if not pairs:
            return
        gf = [g for _, g, _ in pairs]
        ok, gvn, ratio = orthogonal_component_([s for _, _, s in pairs], gf)
        gv: list[Optional[Tensor]] = [None] * len(params)
        for (i, _, _), t in zip(pairs, gf):
            gv[i] = t
        old = self.gv
        if old is not None and self.gv_norm is not None and [t is None for t in old] == [t is None for t in gv]:
            fe.select_(ok, gf, [old[i] for i, _, _ in pairs])  # type: ignore[misc]
            self.gv_norm = torch.where(ok, gvn, self.gv_norm.to(gvn.device))
            prev = self.gv_ratio if self.gv_ratio is not None else torch.zeros((), dtype=torch.float64)
            self.gv_ratio = torch.where(ok, ratio, prev.to(ratio.device))
        else:  # no previous g_v to keep: zeros for now, dropped at the next step if it was not finite
            fe.zero_unless(ok, gf)
            self.gv_norm = torch.where(ok, gvn, 0.0)
            self.gv_ratio = torch.where(ok, ratio, 0.0)
            self.gv_unconfirmed = ok
        self.gv = gv

    def confirm(self) -> None:
        """Drop a first g_v that was not finite (one host read, only until a finite g_v exists)."""
        if self.gv_unconfirmed is not None:
            if not bool(self.gv_unconfirmed):
                self.gv = self.gv_norm = self.gv_ratio = None
            self.gv_unconfirmed = None

    @torch.no_grad()
    def add(self, params: list[Tensor]) -> None:
        """A plain iteration: g <- g + alpha * (||g|| / ||g_v||) * g_v."""
        assert self.gv is not None and self.gv_norm is not None
        present = [(p.grad, v) for p, v in zip(params, self.gv) if p.grad is not None]
        if self.alpha == 0 or (self.alpha == "auto" and self.gv_ratio is None):
            return
        alpha = self.gv_ratio if self.alpha == "auto" else self.alpha
        add_orthogonal_([g for g, _ in present], [v for _, v in present], self.gv_norm, alpha)  # type: ignore

    def state_dict(self, passes: Passes) -> dict[str, Any]:
        self.confirm()
        return {"gv": None if self.gv is None else list(self.gv),
                "gv_norm": 0.0 if self.gv_norm is None else float(self.gv_norm),
                "gv_ratio": 0.0 if self.gv_ratio is None else float(self.gv_ratio)}

    def load_state_dict(self, saq: dict[str, Any], passes: Passes) -> None:
        params = passes.params()
        gv = saq.get("gv")
        if gv is not None and len(gv) != len(params):
            raise ValueError(f"state_dict g_v has {len(gv)} entries but the optimizer has {len(params)} params")
        self.gv = None if gv is None else [None if t is None else t.to(p.device, p.dtype, copy=True)
                                           for t, p in zip(gv, params)]
        dev = next((t.device for t in self.gv or [] if t is not None), None)
        self.gv_norm = (None if self.gv is None
                        else torch.tensor(float(saq.get("gv_norm", 0.0)), dtype=torch.float32, device=dev))
        self.gv_ratio = (None if self.gv is None
                         else torch.tensor(float(saq.get("gv_ratio", 0.0)), dtype=torch.float64, device=dev))
        self.gv_unconfirmed = None


class PrevGrad(Strategy):
    """``prev_grad``: one pass per iteration, at the point perturbed by the previous iteration's perturbation.

    Without a closure (``loss.backward(); opt.step()``) the perturbation is applied by a forward pre-hook on the
    first training-mode forward after a step, and removed by the next step (or an eval forward).
    """

    name = "prev_grad"
    two_call = False
    closure_free = True

    def __init__(self, module: nn.Module, targets: Targets):
        self.targets = targets
        self.e_prev: Optional[list[Optional[Tensor]]] = None
        self.closure_free_mode = False
        ref = weakref.ref(self)  # the hook must not keep a discarded optimizer alive

        def pre_hook(mod: nn.Module, args: Any) -> None:
            strategy = ref()
            if strategy is not None:
                strategy._forward_pre_hook(mod)

        # first: FSDP2's own pre-hook (prepended) gathers the sharded parameters, which must be perturbed by then
        self.hook_handle = module.register_forward_pre_hook(pre_hook, prepend=True)

    @property
    def pending(self) -> bool:
        """Whether the closure-free form's perturbation is applied now."""
        return self.closure_free_mode and self.targets.active

    def _forward_pre_hook(self, module: nn.Module) -> None:
        """Closure-free: a training forward sees Q(w) + e_prev, an eval forward never does."""
        if not self.closure_free_mode:
            return
        if module.training and not self.pending and self.e_prev is not None:
            self.targets.apply(self.e_prev)
        elif not module.training and self.pending:
            self.targets.restore()

    def leave_closure_free(self) -> None:
        if self.pending:  # a closure-free forward ran, then a closure step: that forward is discarded
            self.targets.restore()
        self.closure_free_mode = False

    def step(self, passes: Passes, closure: Callable[[], Any], rho: float, scaler: Scaler) -> Any:
        return passes.one_pass(closure, scaler, lambda: self.stage(passes), perturbation=self.e_prev, capture=True)

    def step_without_closure(self, passes: Passes, opt: torch.optim.Optimizer) -> Any:
        """The caller's forward/backward ran at Q(w) + e_prev (applied by the pre-hook): undo it, take the base
        step, and build the next perturbation from this backward's gradients. Equals ``step(closure)``.

        Called by ``scaler.step(opt)``, the scaler is the optimizer's ``grad_scaler`` or, if none was given, the
        GradScaler running that step (:func:`stepping_scaler`; Lightning's 16-mixed): the captured Q(w) gradients
        are brought to the scale of the parameters' unscaled ones either way."""
        self.closure_free_mode = True
        if self.pending:
            self.targets.restore()
        passes.passes_last_step = 1
        sc = passes.scaler() or stepping_scaler(opt)
        if sc is not None:
            # AMP: scaler.step(opt) has unscaled the parameters' gradients before calling this step; the captured
            # gradients w.r.t. Q(w) are still scaled: bring them to the same scale (e's direction mixes both)
            if not has_unscaled(sc, opt):
                raise RuntimeError("saq.SAQ with a grad_scaler and no closure: call scaler.step(opt) (which unscales "
                                   "the gradients and skips overflowing steps), then scaler.update(); not opt.step()")
            inv = inverse_scale(sc)
            for layer in self.targets.layers:
                if layer.qweight_grad is not None:
                    layer.qweight_grad.mul_(inv.to(layer.qweight_grad))
        return passes.finish(None, None, [], False, None, lambda: self.stage(passes))

    @torch.no_grad()
    def stage(self, passes: Passes) -> None:
        """Build the next iteration's perturbation from this pass's (still scaled) gradients.

        A non-finite direction gives a zero perturbation (decided on the device).
        """
        self.e_prev = passes.perturbation(passes.rho_at(passes.step_count + 1))

    def on_nonfinite(self) -> None:
        self.e_prev = None

    def state_dict(self, passes: Passes) -> dict[str, Any]:
        return {"e_prev": None if self.e_prev is None else list(self.e_prev), "closure_free": self.closure_free_mode}

    def load_state_dict(self, saq: dict[str, Any], passes: Passes) -> None:
        ep = saq.get("e_prev")
        n = len(self.targets)
        if ep is not None and len(ep) != n:
            raise ValueError(f"state_dict e_prev has {len(ep)} entries, expected {n}")
        self.e_prev = None if ep is None else [None if t is None else t.to(r.device, r.dtype, copy=True)
                                               for t, r in zip(ep, self.targets.tensors())]
        self.closure_free_mode = bool(saq.get("closure_free", False))  # (opt.restore() removed a pending e)


#: where the base optimizers keep their momentum, in their per-parameter state: SGD (``momentum > 0``), then the
#: Adam family's first moment (Adam, AdamW, NAdam, RAdam, Adamax)
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def momentum_of(state: dict[str, Any]) -> Optional[Tensor]:
    """A parameter's momentum in its optimizer state (:data:`MOMENTUM_KEYS`), or None before its first step."""
    for key in MOMENTUM_KEYS:
        m = state.get(key)
        if isinstance(m, Tensor):
            return m
    return None


class Momentum(PrevGrad):
    """``momentum`` (MSAM, Becker et al. 2024): one pass per iteration at the point perturbed by
    ``e = -rho * m / ||m||``, ``m`` the base optimizer's momentum after the previous step, the norm global over
    the targets.

    The rule of the paper (SGD): ``w~_t = w_t - rho v_t / ||v_t||``, the gradient taken at ``w~_t``, then the
    plain momentum step from ``w_t``: ``v_{t+1} = mu v_t + g``, ``w_{t+1} = w_t - lr v_{t+1}``. The perturbation
    points where the optimizer has been going (it costs no pass and no captured gradient); with Adam/AdamW ``m``
    is the first moment. In case 3 it is added to Q(w) (as every case-3 perturbation), with the momentum of w.
    The first step (no momentum yet) is a plain step. Closure-free as ``prev_grad`` (the forward pre-hook
    applies the perturbation), and saved the same way.
    """

    name = "momentum"

    def step(self, passes: Passes, closure: Callable[[], Any], rho: float, scaler: Scaler) -> Any:
        loss = passes.one_pass(closure, scaler, None, perturbation=self.e_prev, capture=False)
        self.stage(passes)
        return loss

    def step_without_closure(self, passes: Passes, opt: torch.optim.Optimizer) -> Any:
        """The caller's forward/backward ran at the perturbed point (the pre-hook applied it): undo it, take the
        base step, and build the next perturbation from the momentum it left."""
        self.closure_free_mode = True
        if self.pending:
            self.targets.restore()
        passes.passes_last_step = 1
        loss = passes.finish(None, None, [], False, None, None)
        self.stage(passes)
        return loss

    @torch.no_grad()
    def stage(self, passes: Passes) -> None:
        """The next iteration's perturbation ``-rho m / ||m||`` from the momentum the last base step left
        (None before any: a plain step); a non-finite momentum gives a zero perturbation (on the device).

        FSDP2: a layer's perturbation is added to its unsharded weight in the forward, so its momentum is
        gathered; the parameters perturbed in their data keep their sharded momentum (as ``prev_grad``'s
        directions)."""
        rho = passes.rho_at(passes.step_count)
        state = passes.base_optimizer.state
        h = len(self.targets.layers)
        idx: list[int] = []
        srcs: list[Tensor] = []
        for j, t in enumerate(self.targets.tensors()):
            m = momentum_of(state.get(t, {}))
            if m is None:
                continue
            idx.append(j)
            srcs.append(unsharded(m) if j < h and is_dtensor(m) else m)
        if not srcs or rho == 0:
            self.e_prev = None
            return
        es, _ = sam_perturbation(srcs, -rho, zero_nonfinite=True)
        self.e_prev = self.targets.per_target(idx, es)


class SubBatch(Strategy):
    """``sub_batch``: a two-pass step whose ascent pass sees the first ``ceil(fraction * B)`` samples of the batch.

    The closure must take its batch through ``opt.pass_batch(x, y)`` (the first call of a step refuses one that
    does not: it would pay for a full ascent pass). The perturbation is built from the sub-batch's gradient
    (rho * g_sub / ||g_sub||, the mode's direction and places as in the full step), the update gradient is
    the whole batch's at the perturbed point. BatchNorm statistics are those of the update pass (the whole
    batch, at the perturbed point, as prev_grad's), not of the sub-batch. The step returns the update pass's
    loss (the only pass over the whole batch). With gradient accumulation each micro-batch is cut the same way.
    """

    name = "sub_batch"
    two_call = False

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.ascent = False       # the ascent pass is running
        self.taken = False        # the running pass took its batch through pass_batch
        self.bn_pre = fe.Snapshot()

    def describe(self) -> str:
        return f", fraction={self.fraction}"

    def pass_batch(self, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.taken = True
        if not self.ascent:
            return tensors
        return tuple(t[:max(1, math.ceil(self.fraction * t.shape[0]))] for t in tensors)

    def step(self, passes: Passes, closure: Callable[[], Any], rho: float, scaler: Scaler) -> Any:
        calls: list[Any] = []

        def run() -> Any:
            first = not calls
            if first:
                self.bn_pre.take(passes.bn_buffers())
            else:  # the update pass sets the statistics from where they were before the ascent pass
                self.bn_pre.put_back()
                passes.bn_mid.active = False
            self.ascent, self.taken = first, False
            try:
                loss = closure()
            finally:
                self.ascent = False
            if first and not self.taken:
                self.bn_pre.put_back()  # nothing of the refused step stays: statistics as before it
                raise RuntimeError("strategy='sub_batch': the closure must take its batch through opt.pass_batch("
                                   "x, y), which gives the ascent pass its sub-batch; it did not (a closure that "
                                   "ignores it pays for a full ascent pass: use strategy='full' for that)")
            calls.append(loss)
            return loss

        passes.two_pass(run, rho, scaler)
        return calls[-1]


#: the strategies (``SAQ(strategy=...)``, ``--strategy``): name -> a factory ``(module, targets, k, alpha, fraction)``
STRATEGIES: Registry[Callable[..., Strategy]] = Registry("strategy")
STRATEGIES.register("full", lambda module, targets, k, alpha, fraction: Full(),
                    description="two passes every step (the paper)")
STRATEGIES.register("every_k", lambda module, targets, k, alpha, fraction: EveryK(k, alpha),
                    description="LookSAM: a full step every k iterations, the stored sharp component reused in "
                                "between")
STRATEGIES.register("prev_grad", lambda module, targets, k, alpha, fraction: PrevGrad(module, targets),
                    description="one pass at the point perturbed by the previous step's gradient")
STRATEGIES.register("momentum", lambda module, targets, k, alpha, fraction: Momentum(module, targets),
                    description="MSAM: one pass at the point perturbed against the base optimizer's momentum "
                                "(SGD with momentum, Adam/AdamW)")
STRATEGIES.register("sub_batch", lambda module, targets, k, alpha, fraction: SubBatch(fraction),
                    description="the ascent pass on a fraction of the batch (m-sharpness), the update pass on all "
                                "of it: 1 + fraction passes")


def make_strategy(name: str, module: nn.Module, targets: Targets, k: int, alpha: Union[float, str],
                  fraction: float = 0.25) -> Strategy:
    return STRATEGIES.get(name)(module, targets, k, alpha, fraction)
