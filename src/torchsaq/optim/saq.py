"""Sharpness-aware steps for quantized (and float) models: SAM, SAQ cases 1-3, their ASAM forms, cheaper strategies.

:class:`SAQ` wraps any torch optimizer (the *base* optimizer) the way davda54/sam does, and is itself a
``torch.optim.Optimizer``::

    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt = saq.SAQ(model, base, rho=0.05)               # mode="case3" (SAQ) is the default
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=steps)   # or on opt: same param_groups
    for x, y in loader:
        def closure():
            loss = criterion(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)        # both passes, perturb, restore, base step; returns the first pass's loss
        opt.zero_grad(); sched.step()

Modes (docs/method.md, "Sharpness-aware steps"). All of them run one code path; they differ only in where the
direction of a quantized layer's perturbation is read and where the perturbation is added:

==========  =============================================  ==========================================
mode        direction read from                            perturbation added to
==========  =============================================  ==========================================
``sam``     ``p.grad`` of every perturbed parameter        the parameter data (w + e before quantizing)
``case1``   ``layer.weight.grad`` (through the STE)        ``layer.perturb_post``: Q(w) + e
``case2``   ``layer.weight.grad`` (through the STE)        ``layer.perturb_pre``:  Q(w + e)
``case3``   ``layer.qweight_grad`` (w.r.t. Q(w)): SAQ      ``layer.perturb_post``: Q(w) + e
==========  =============================================  ==========================================

In cases 1-3 the parameters that are not the weight of a quantized layer (norm affine, biases, and quantizer
step sizes only with ``perturb_steps=True``) are perturbed in their data, like SAM. The norm is the global L2
norm over every perturbed tensor together: ``e = rho * g / ||g||``. ``adaptive=True`` gives the ASAM form
``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` and ``w`` the tensor the perturbation is added to (the
float weight for case 2 and for data-perturbed parameters, Q(w) for cases 1 and 3). Mode ``sam`` with
quantizer steps excluded (``perturb_steps=False``) equals case 2 numerically: both compute Q(w + e) with the
same e.

Strategies (docs/method.md, "Efficient strategies"):

* ``"full"``: every iteration is a full two-pass step. Cost: 2 forward/backward passes per iteration.
* ``"every_k"`` (LookSAM): a full step every ``k`` iterations, which stores the component of the sharp
  gradient orthogonal to the plain one, ``g_v = g_s - (g_s.g / ||g||^2) g`` (global dot and norms over the
  base optimizer's parameters); the other iterations do one pass and step with
  ``g + alpha * (||g|| / ||g_v||) * g_v``. Cost: about ``1 + 1/k`` passes per iteration. ``alpha="auto"``
  (default) takes alpha = ||g_v|| / ||g|| of the full step that measured g_v; LookSAM's fixed 0.7 adds the
  stored component at 0.7 ||g|| whatever its measured size (2-5x larger here), see ``docs``/README.
* ``"prev_grad"``: one pass per iteration, at the point perturbed by ``e_prev``, the perturbation built
  from the previous iteration's gradient (case 3: w.r.t. the quantized weights; case 1/2/sam: their own
  gradients and places) captured in that same single pass. The first iteration is unperturbed. Cost: 1 pass.
  It needs no closure: ``loss.backward(); opt.step()`` (or ``scaler.step(opt)``) is the same step, so it drops
  into loops that never pass one (a forward pre-hook applies ``e_prev`` at the next training forward).
* ``"momentum"`` (MSAM): one pass per iteration, at the point perturbed by ``-rho * m / ||m||``, ``m`` the base
  optimizer's momentum after the previous step (SGD's buffer, Adam's first moment); no gradient is captured.
  Closure-free as ``prev_grad``. Cost: 1 pass.

``opt.passes_last_step`` says how many forward/backward passes the last step ran (1 or 2).

Gradient accumulation (N micro-batches per optimizer step, each loss scaled by its share of the samples,
1/N for equal micro-batches). Without BatchNorm the step equals one step over the concatenated batch, for
every strategy (BatchNorm normalises and updates its statistics per micro-batch, N updates per pass):

* ``step(closure)``: the closure runs forward + backward over all N micro-batches and returns their loss.
  ``full`` calls it twice: the perturbation is built from the gradient accumulated over the N micro-batches,
  and the second call re-runs all N at the perturbed point, so the sharp gradient is accumulated too; one
  base step. ``every_k``: its full steps likewise (``g_v`` from the accumulated plain and sharp gradients);
  its one-pass steps add ``g_v`` to the accumulated gradient. ``prev_grad``: one call, every micro-batch at
  the point ``e_prev`` gives; the next perturbation comes from the accumulated gradient.
* Closure-free ``prev_grad`` (``for each micro-batch: loss.backward()``, then ``opt.step()``): the pre-hook
  applies ``e_prev`` at the first training forward after a step and leaves it applied (the same tensors) for
  the other micro-batches; it is removed by the step (or an eval forward, and the next training forward puts
  the same one back). The step builds the next perturbation from the accumulated gradients (case 3's
  gradient w.r.t. Q(w) accumulates over the backward passes as ``.grad`` does). accelerate's
  ``accumulate()``, which calls ``opt.step()`` at every micro-batch but steps only at the last, is the same.
* Two-call form: accumulate the N backward passes before ``first_step()`` and again before ``second_step()``.
* DDP: run the backward of every micro-batch but the last under ``model.no_sync()``; the ascent pass of a full
  step is under ``no_sync()`` as a whole anyway.

Rules this wrapper follows:

* BatchNorm (any ``_NormBase`` with running statistics) is updated once per step: the statistics are
  snapshotted after the first pass and put back after the second.
* Randomness: before the first pass the CPU RNG state (and the CUDA RNG state of every CUDA device holding a
  parameter) is saved and it is restored before the second pass, so both passes draw the same dropout /
  stochastic-depth masks. The second pass consumes the same draws, so after the step the RNG is exactly where
  one ordinary forward/backward pass would have left it.
* DistributedDataParallel: ``model`` may be the DDP wrapper. The first (ascent) backward of a full step runs
  under ``model.no_sync()``: every replica perturbs with its own gradient; the second backward is
  all-reduced, so the update is identical on every replica. Exception: the full steps of ``every_k`` run the
  first backward synchronised, because their gradient also defines the stored ``g_v`` that later iterations
  add to the synchronised gradient (it must be the same on every replica).
* FSDP2 (``fully_shard``; parameters and gradients are DTensors sharded on dim 0): every backward averages the
  gradients over the ranks, so the ascent is global: the norms are taken over all shards, case 3's gradient
  w.r.t. Q(w) (captured unsharded, from each rank's samples) is averaged over the ranks, a quantized layer's
  perturbation is the unsharded tensor added in the forward; the step equals single-process SAQ on the whole
  batch (without BatchNorm, which normalises per rank). Quantizers must be initialised before ``fully_shard``
  (refused otherwise). Parameters replaced in the base optimizer after construction (accelerate's FSDP2
  ``prepare``) are followed at the next step.
* Non-finite loss or gradients (no grad scaler): ``nonfinite="raise"`` raises :class:`FloatingPointError`,
  ``"skip"`` skips the step; either way the weights (and BatchNorm statistics) are left exactly as before.
  The check is made once, at the end of the step (the first loss, the first-pass direction's norm, the
  second loss and the final gradient norm, read together), so a non-finite first pass still runs the
  second pass, whose result is then discarded.
* Host-device syncs: ``step(closure)`` reads the device once per step (that finiteness check; none of its
  own with a grad scaler, whose ``step`` reads its inf flag). The perturbation scale, every_k's coefficients
  and the fall-backs for non-finite values are computed on the device, so the CPU keeps queueing kernels.
  Exceptions: every_k reads one more flag on the step after a full step that had no earlier g_v (until
  one finite g_v exists), and the two-call form also reads ``first_step``'s return value.
* AMP: pass ``grad_scaler=torch.amp.GradScaler(...)``; the closure then calls ``scaler.scale(loss).backward()``.
  The perturbation comes from the scaled gradients (the scale cancels in the normalisation; non-finite ->
  a zero perturbation), the final gradients are unscaled with ``scaler.unscale_(base)``, clipped if
  ``max_grad_norm`` is set, and ``scaler.step(base)``/``scaler.update()`` run; a skipped step leaves the weights
  exactly as before.
* Memory: the ``full`` strategy keeps at most one extra copy of the perturbed tensors: the saved originals of
  the data-perturbed parameters, and the perturbation itself for hook-perturbed layers (case 3 reuses the
  buffer of ``qweight_grad``). ``every_k`` also keeps ``g_v`` (persistent) and the first-pass gradient during a
  full step; ``prev_grad`` keeps ``e_prev`` between iterations. The saved originals and the BatchNorm
  snapshots are buffers allocated at the first step and reused by every later one.

Two-call form (loops that cannot use a closure; ``strategy="full"`` only)::

    loss_fn(model(x), y).backward()          # under model.no_sync() with DDP
    opt.first_step(zero_grad=True)           # perturb
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)          # restore, (unscale, clip,) base step

Dropout masks are the caller's business in this form: save ``torch.get_rng_state()`` before the first forward
and restore it before the second to replay them. AMP in the two-call form: either pass ``grad_scaler`` to the
constructor and use ``first_step``/``second_step`` as above, or do it by hand::

    scaler.scale(loss).backward(); opt.first_step()
    scaler.scale(loss2).backward()
    opt.restore()                 # undo the perturbation
    scaler.step(opt)              # opt.step() without a closure = (clip,) base step
    scaler.update()
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .._dtensor import is_dtensor
from ..integrations.frameworks import closure_free_hint
from ..quant.layers import quant_layers
from ..quant.quantizer import Quantizer
from .functional import DEFAULT_RHO
from .passes import NONFINITE, Passes
from .perturb import MODES, Mode, Targets
from .strategies import STRATEGIES, Strategy, make_strategy

__all__ = ["SAQ", "rho_warmup", "MODES", "STRATEGIES"]


def _unwrap(model: nn.Module) -> tuple[nn.Module, Optional[DistributedDataParallel]]:
    """The module holding the layers, and the DDP wrapper if there is one (also through torch.compile)."""
    ddp = None
    module = model
    while True:
        if isinstance(module, DataParallel):
            raise ValueError("nn.DataParallel is not supported (its replicas lose the perturbation hook); "
                             "use DistributedDataParallel")
        if isinstance(module, DistributedDataParallel):
            if ddp is None:
                ddp = module
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile wrapper
            module = module._orig_mod  # type: ignore[assignment]
        else:
            return module, ddp


class _RhoWarmup:
    """rho(step): 0 before ``start``, then rising linearly from 0 to ``rho`` over ``warmup_steps``, constant after."""

    def __init__(self, rho: float, warmup_steps: int, start: int = 0):
        self.rho = rho
        self.warmup_steps = warmup_steps
        self.start = start

    def __call__(self, step: int) -> float:
        step -= self.start
        if step < 0:
            return 0.0
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return self.rho
        return self.rho * step / self.warmup_steps

    def __repr__(self) -> str:
        start = f", start={self.start}" if self.start else ""
        return f"rho_warmup(rho={self.rho}, warmup_steps={self.warmup_steps}{start})"


def _check_rho(rho: Any) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")


def rho_warmup(rho: float, warmup_steps: int, start: int = 0) -> Callable[[int], float]:
    """A ``rho_schedule`` for :class:`SAQ`: 0 for the first ``start`` steps, then linear from 0 to ``rho`` over
    ``warmup_steps`` steps, then ``rho``.

    The official recipes warm rho up during the first epochs (pass epochs * steps_per_epoch). A step whose rho is
    0 is a plain step of the base optimizer at the cost of one pass (``start``: sharpness-aware steps only in the
    later part of training).
    """
    _check_rho(rho)
    for name, v in (("warmup_steps", warmup_steps), ("start", start)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return _RhoWarmup(float(rho), warmup_steps, start)


def _check_options(model: Any, base_optimizer: Any, rho: Any, mode: Any, strategy: Any, k: Any, alpha: Any,
                   eta: Any, nonfinite: Any, max_grad_norm: Any, rho_schedule: Any, grad_scaler: Any,
                   fraction: Any = 0.25) -> None:
    """ValueError for any constructor argument of :class:`SAQ` out of its domain."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(base_optimizer, torch.optim.Optimizer) or isinstance(base_optimizer, SAQ):
        raise ValueError("base_optimizer must be a torch.optim.Optimizer (not a SAQ), got "
                         f"{type(base_optimizer).__name__}")
    _check_rho(rho)
    Mode.parse(mode)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the every_k period) must be an int >= 1, got {k!r}")
    if alpha != "auto" and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                                and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0 or 'auto', got {alpha!r}")
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise ValueError(f"fraction (the sub_batch ascent pass's share of the batch) must be in (0, 1], got "
                         f"{fraction!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be None or > 0, got {max_grad_norm!r}")
    if rho_schedule is not None and not callable(rho_schedule):
        raise ValueError("rho_schedule must be a callable step -> rho (e.g. saq.rho_warmup(rho, steps))")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise ValueError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")


def _check_strategy_needs(strategy: str, base_optimizer: torch.optim.Optimizer, adaptive: Any) -> None:
    """ValueError where ``strategy`` cannot run with this base optimizer or option (never ignored silently)."""
    if strategy != "momentum":
        return
    if adaptive:
        raise ValueError("strategy='momentum' (MSAM) perturbs along the base optimizer's momentum; it has no ASAM "
                         "form: pass adaptive=False, or use strategy='prev_grad' or 'full' with adaptive=True")
    for group in base_optimizer.param_groups:
        if not (float(group.get("momentum", 0) or 0) > 0 or "betas" in group):
            raise ValueError(f"strategy='momentum' (MSAM) perturbs along the base optimizer's momentum, but "
                             f"{type(base_optimizer).__name__} here keeps none (momentum="
                             f"{group.get('momentum', 'n/a')}): use SGD with momentum > 0 or Adam/AdamW, or "
                             "strategy='prev_grad'")


def _check_sharded(module: nn.Module) -> None:
    """FSDP2 (parameters that are DTensors): every enabled quantizer must be initialised before ``fully_shard``.

    A quantizer initialises its scale in its first training forward, in place; under FSDP2 that forward sees the
    gathered (unsharded) copy, so the sharded parameter would keep its placeholder while the quantizer counts as
    initialised (and each rank would initialise from its own batch)."""
    if not any(is_dtensor(p) for p in module.parameters()):
        return
    fresh = [n for n, q in module.named_modules() if isinstance(q, Quantizer) and q.enabled and not q.is_initialized]
    if fresh:
        raise ValueError(f"saq.SAQ under FSDP2: {len(fresh)} quantizer(s) are not initialised (e.g. {fresh[0]}); "
                         "initialise them before fully_shard, with saq.calibrate(model, batches) or one training-"
                         "mode forward pass, the same on every rank (an initialisation after sharding is lost)")


def _select_targets(module: nn.Module, mode: Mode, base_optimizer: torch.optim.Optimizer,
                    perturb_unquantized: bool, perturb_steps: bool, exclude: Sequence[str] = ()) -> Targets:
    """The perturbation targets among the parameters the base optimizer trains (see :class:`Targets`), less
    the parameters whose names match a glob of ``exclude`` (a pattern that matches no parameter is an error)."""
    base_params = [p for g in base_optimizer.param_groups for p in g["params"]]
    model_ids = {id(p) for p in module.parameters()}
    foreign = [p for p in base_params if id(p) not in model_ids]
    if foreign:
        raise ValueError(f"the base optimizer updates {len(foreign)} tensor(s) that are not parameters of the "
                         f"model (first shape {tuple(foreign[0].shape)}); build it from model.parameters()")
    if mode is not Mode.SAM and not quant_layers(module):
        raise ValueError(f"mode {mode.value!r} needs a quantized model (call saq.quantize(model, ...) first); "
                         "use mode='sam' for a float model")
    trainable = [p for p in base_params if p.requires_grad]
    if exclude:
        names = {id(p): n for n, p in module.named_parameters()}
        for pattern in exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names.values()):
                raise ValueError(f"perturb_exclude pattern {pattern!r} matches no parameter of the model "
                                 f"(e.g. {', '.join(list(names.values())[:3])}, ...)")
        trainable = [p for p in trainable if not any(fnmatch.fnmatchcase(names[id(p)], pat) for pat in exclude)]
    targets = Targets.select(module, mode, trainable, unquantized=perturb_unquantized, steps=perturb_steps)
    if mode is not Mode.SAM and not targets.layers:
        raise ValueError(f"mode {mode.value!r}: none of the quantized layers' weights is trained by the base "
                         "optimizer")
    if not len(targets):
        raise ValueError("nothing to perturb: no trainable parameter matches the mode / perturb_* options")
    return targets


def _check_state_shapes(base: Any, params: list[Tensor], targets: list[Tensor], saved: dict[str, Any]) -> None:
    """A state saved for a model of another width (the same number of tensors) is refused at load, naming the
    first mismatch: the base optimizer's per-parameter state and every_k's g_v against the parameters,
    prev_grad's e_prev against the perturbed tensors."""
    def check(what: str, saved_t: Any, shape: Any) -> None:
        if torch.is_tensor(saved_t) and saved_t.dim() and tuple(saved_t.shape) != tuple(shape):
            raise ValueError(f"state_dict {what} has shape {tuple(saved_t.shape)} but this optimizer's is "
                             f"{tuple(shape)}: it was saved for another model")

    for index, entry in (base.get("state") or {}).items() if isinstance(base, dict) else ():
        if isinstance(index, int) and 0 <= index < len(params) and isinstance(entry, dict):
            for key, value in entry.items():
                check(f"base state {key!r} of parameter {index}", value, params[index].shape)
    for key in ("e_prev", "gv"):
        got = saved.get(key)
        if isinstance(got, (list, tuple)):
            for i, (t, ref) in enumerate(zip(got, targets if key == "e_prev" else params)):
                check(f"{key}[{i}]", t, ref.shape)


def _delegated(name: str, doc: str) -> Any:
    """An attribute of :class:`SAQ` kept by its :class:`Passes` (what the passes read)."""
    return property(lambda self: getattr(self._passes, name), lambda self, v: setattr(self._passes, name, v),
                    doc=doc)


class SAQ(torch.optim.Optimizer):
    """Sharpness-aware wrapper around a base optimizer: SAM, SAQ cases 1-3, ASAM, and cheaper strategies.

    Args:
        model: the model (optionally wrapped in DistributedDataParallel / torch.compile) the base optimizer trains.
        base_optimizer: a ``torch.optim.Optimizer`` over (a subset of) ``model.parameters()``.
        rho: perturbation radius (> 0); ``rho_schedule(step)``, when given, replaces it at every step.
        mode: ``"case3"`` (SAQ, default), ``"case1"``, ``"case2"`` or ``"sam"`` (see the module docstring).
        adaptive: ASAM form ``e = rho * T^2 g / ||T g||``, ``T = |w| + eta``.
        perturb_unquantized: also perturb the parameters that are not a quantized layer's weight (norm
            affine, biases, ...), as the official code does. In mode ``"sam"``, False restricts the
            perturbation to the weights of quantized / Conv / Linear layers.
        perturb_steps: perturb the quantizer step sizes too; ``None`` means True for ``"sam"``, False otherwise.
        perturb_exclude: parameter-name globs never perturbed (they still train), e.g. ``("pos_embed",
            "cls_token")`` or ``("*norm*",)`` for a ViT's position embedding and class token or its LayerNorms.
        strategy: ``"full"`` (2 passes/iteration), ``"every_k"`` (~1 + 1/k), ``"prev_grad"`` (1), ``"momentum"``
            (1; MSAM, along the base optimizer's momentum),
            ``"sub_batch"`` (1 + fraction; the closure takes its batch through :meth:`pass_batch`).
        k, alpha: the ``every_k`` period and the weight of the stored orthogonal component. ``"auto"``
            (default) re-adds g_v at the size it had relative to the gradient when it was measured; 0.7 is
            LookSAM's published value, which over-weights a g_v that is mostly mini-batch noise (README).
        fraction: the ``sub_batch`` ascent pass's share of the batch (the first ``ceil(fraction * B)`` samples).
        grad_scaler: a ``torch.amp.GradScaler`` for AMP (see the module docstring).
        max_grad_norm: clip the final (unscaled) gradient to this global norm before the base step.
        nonfinite: ``"raise"`` or ``"skip"`` on a non-finite loss or gradient (without a grad scaler).

    Which tensors are perturbed and where: :mod:`saq.perturb`; the formulas: :mod:`saq.functional`; each
    strategy: :mod:`saq.strategies`; the final update: :mod:`saq._update`. This class runs the passes.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, rho: float = DEFAULT_RHO,
                 mode: str = "case3", *, adaptive: bool = False, eta: float = 0.01,
                 perturb_unquantized: bool = True, perturb_steps: Optional[bool] = None,
                 perturb_exclude: Sequence[str] = (),
                 strategy: str = "full", k: int = 5, alpha: Union[float, str] = "auto", fraction: float = 0.25,
                 rho_schedule: Optional[Callable[[int], float]] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, nonfinite: str = "raise"):
        _check_options(model, base_optimizer, rho, mode, strategy, k, alpha, eta, nonfinite, max_grad_norm,
                       rho_schedule, grad_scaler, fraction)
        module, ddp = _unwrap(model)
        _check_sharded(module)
        _check_strategy_needs(strategy, base_optimizer, adaptive)
        kind = Mode.parse(mode)
        perturb_steps = kind is Mode.SAM if perturb_steps is None else perturb_steps
        if isinstance(perturb_exclude, str):
            perturb_exclude = (perturb_exclude,)
        targets = _select_targets(module, kind, base_optimizer, perturb_unquantized, perturb_steps,
                                  tuple(perturb_exclude))

        self._initialised = False
        super().__init__([{"params": list(g["params"])} for g in base_optimizer.param_groups], {})
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups  # the same list: LR schedulers work on either
        self.state = base_optimizer.state
        self.defaults = base_optimizer.defaults
        self._initialised = True

        self.model, self.module, self._ddp = model, module, ddp
        self.mode = kind.value
        self.perturb_unquantized = bool(perturb_unquantized)
        self.perturb_steps = bool(perturb_steps)
        self.perturb_exclude = tuple(perturb_exclude)
        self.strategy = strategy
        self.k = k
        self.alpha: Union[float, str] = alpha if alpha == "auto" else float(alpha)
        self.fraction = float(fraction)
        # the pass machinery the strategy drives; it holds the options the passes read (delegated below)
        self._passes = Passes(module, base_optimizer, targets, ddp=ddp, rho=float(rho), rho_schedule=rho_schedule,
                              adaptive=bool(adaptive), eta=float(eta), need_capture=kind.needs_capture(bool(adaptive)),
                              max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
                              nonfinite=nonfinite, grad_scaler=grad_scaler)
        self._quant_layers = self._passes.quant_layers
        self._strategy: Strategy = make_strategy(strategy, module, targets, k, self.alpha, self.fraction)
        self._passes.on_nonfinite = self._on_nonfinite
        # transient state of the two-call form (never saved)
        self._first_done = False
        self._skip_pending = False
        self._param_ids = self._ids()  # the tensors the targets were selected from (see _follow_params)

    rho = _delegated("rho", "perturbation radius (> 0); rho_schedule, when set, replaces it")
    rho_schedule = _delegated("rho_schedule", "step -> rho, or None")
    adaptive = _delegated("adaptive", "ASAM form")
    eta = _delegated("eta", "ASAM's eta")
    max_grad_norm = _delegated("max_grad_norm", "clip the final gradient to this global norm (None: no clipping)")
    nonfinite = _delegated("nonfinite", "'raise' or 'skip' on a non-finite loss or gradient")
    grad_scaler = _delegated("grad_scaler", "the torch.amp.GradScaler of the steps, or None")
    passes_last_step = _delegated("passes_last_step", "forward/backward passes the last step ran (1 or 2)")
    _step = _delegated("step_count", "steps taken (or skipped) so far")
    _targets = _delegated("targets", "what is perturbed and where")

    def _on_nonfinite(self) -> None:
        self._strategy.on_nonfinite()

    # -- torch.optim.Optimizer surface ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (the groups are shared); its parameters are perturbed like the
        others (a quantized layer's weight at Q(w), as the mode says). The perturbation targets are chosen
        again, so the strategy's stored state (prev_grad's e_prev, every_k's g_v) starts afresh."""
        if not getattr(self, "_initialised", False):
            return super().add_param_group(param_group)
        self.restore()
        self.base_optimizer.add_param_group(param_group)
        try:
            self._reselect()
        except ValueError:
            self.base_optimizer.param_groups.pop()  # all or nothing
            raise

    def _ids(self) -> list[int]:
        return [id(p) for p in self._params()]

    def _follow_params(self) -> None:
        """Select the targets again if the base optimizer's parameters were replaced since (accelerate's FSDP2
        ``prepare`` puts the sharded DTensor parameters in the optimizer after ``fully_shard``); the strategy's
        stored state starts afresh, as after :meth:`add_param_group`."""
        ids = self._ids()
        if ids == self._param_ids:
            return
        self.restore()
        _check_sharded(self.module)
        self._reselect()

    def _reselect(self) -> None:
        """Select the perturbation targets again from the base optimizer's parameters (a ValueError, and nothing
        changed, if they are not the model's); the strategy's stored state starts afresh."""
        targets = _select_targets(self.module, Mode.parse(self.mode), self.base_optimizer, self.perturb_unquantized,
                                  self.perturb_steps, self.perturb_exclude)
        self._passes.set_capture(False)
        self._targets = targets
        self._passes.set_capture(True)
        self._strategy = make_strategy(self.strategy, self.module, targets, self.k, self.alpha, self.fraction)
        self._param_ids = self._ids()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the base optimizer's gradients and the quantized layers' ``qweight_grad``.

        The Q(w) the last forward captured (``qweight``, ASAM's reference) is kept: Lightning's closure zeroes
        the gradients between its forward and its backward. The step drops it after use.
        """
        self._passes.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (f"SAQ(mode={self.mode!r}, rho={self.rho}, adaptive={self.adaptive}, strategy={self.strategy!r}"
                f"{self._strategy.describe()}, base={self.base_optimizer.__class__.__name__})")

    def pass_batch(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The part of a batch the pass running now should see, for a closure to take its batch through::

            def closure():
                xb, yb = opt.pass_batch(x, y)
                loss = criterion(model(xb), yb)
                loss.backward()
                return loss

        ``strategy="sub_batch"``: its ascent pass gets the first ``ceil(fraction * B)`` rows of each tensor
        (``B`` its first dimension), its update pass all of them. Every other strategy: the tensors unchanged.
        """
        return self._strategy.pass_batch(tensors)

    @property
    def step_count(self) -> int:
        """Number of steps taken (or skipped) so far; the argument of ``rho_schedule``."""
        return self._step

    @property
    def current_rho(self) -> float:
        """The rho the next step will use."""
        return self._rho_at(self._step)

    def _rho_at(self, step: int) -> float:
        return self._passes.rho_at(step)

    def _params(self) -> list[Tensor]:
        return self._passes.params()

    # -- the public steps -------------------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], Any]] = None,
             grad_scaler: Optional[torch.amp.GradScaler] = None) -> Any:
        """One sharpness-aware step; ``closure`` runs forward + backward and returns the loss.

        The closure may zero the gradients first, as torch closures often do. Returns the loss of the first
        pass. Without a closure, only after ``first_step()`` (the two-call AMP recipe's ``scaler.step(opt)``):
        undo the perturbation, then (clip and) take the base optimizer's step with the gradients present.
        Without a closure and without ``first_step()``: ``strategy="prev_grad"`` takes the one-pass SAQ step
        from the gradients of the caller's own backward (``loss.backward(); opt.step()``; the next training
        forward sees the new perturbation, an eval forward never does; with AMP pass ``grad_scaler=`` here and
        call ``scaler.step(opt)``); the two-pass strategies raise, since the step would not be sharpness-aware.
        """
        if not self._first_done:
            self._follow_params()
        if closure is None:
            if self._strategy.closure_free and not self._first_done:
                return self._strategy.step_without_closure(self._passes, self)
            if not (self._first_done or self._targets.active):
                # a loop that calls opt.step() / scaler.step(opt) after its own backward would otherwise
                # train plain QAT while reporting SAQ: refuse, never step plainly
                raise RuntimeError(
                    f"saq.SAQ.step() was called without a closure and without first_step(): strategy "
                    f"{self.strategy!r} must run the forward/backward itself (at the perturbed point), so this "
                    "would be a plain, non-sharpness-aware step. Pass opt.step(closure) with a closure that runs "
                    "forward + backward and returns the loss, or use the two-call form first_step() / "
                    "second_step() (strategy='full'). " + closure_free_hint())
            return self._second_half(scaler=None)
        self._strategy.leave_closure_free()
        if self._targets.active:
            raise RuntimeError("step(closure) called while a first_step() perturbation is applied; "
                               "call second_step() or restore() first")
        closure = torch.enable_grad()(closure)
        return self._strategy.step(self._passes, closure, self._rho_at(self._step), self._passes.scaler(grad_scaler))

    def first_step(self, zero_grad: bool = True) -> bool:
        """Two-call form, after the first backward: perturb along the gradients now held.

        Returns whether a perturbation was applied (False: non-finite gradients with a grad scaler or with
        ``nonfinite="skip"``; the next ``second_step`` then skips the step unless a grad scaler decides).
        """
        self._check_two_call()
        if self._targets.active:
            raise RuntimeError("first_step() called twice without second_step() / restore()")
        self._follow_params()
        # the gradients may be used as scratch space only if they are cleared afterwards; a non-finite
        # direction gives a zero perturbation (the second pass may run)
        ok = bool(self._passes.ascent(self._rho_at(self._step), clobber=zero_grad, safe=True))  # one host-device sync
        self._first_done = True
        if not ok and self._passes.scaler() is None:
            if self.nonfinite == "raise":
                self.restore()
                self._first_done = False
                raise FloatingPointError(self._passes.nonfinite_message("gradient of the first pass"))
            self._skip_pending = True
        if zero_grad:
            self.zero_grad()
        return ok

    def second_step(self, zero_grad: bool = False) -> None:
        """Two-call form, after the second backward: restore the weights, (unscale, clip,) base step."""
        self._check_two_call()
        self._second_half(scaler=self._passes.scaler())
        if zero_grad:
            self.zero_grad()

    def _check_two_call(self) -> None:
        if not self._strategy.two_call:
            raise ValueError(f"first_step/second_step support strategy='full' only (this optimizer uses "
                             f"{self.strategy!r}); use step(closure)")

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the perturbation (weights bit-exact) and put BatchNorm statistics back to their first-pass values."""
        self._passes.restore()

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Base optimizer state + strategy state (step counter, every_k's g_v, prev_grad's e_prev)."""
        saq: dict[str, Any] = {"step": self._step, "mode": self.mode, "strategy": self.strategy,
                               "num_targets": len(self._targets)}
        saq.update(self._strategy.state_dict(self._passes))
        out: dict[str, Any] = {"base": self.base_optimizer.state_dict(), "saq": saq}
        if self.grad_scaler is not None:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; the mode, strategy and perturbed tensors must match."""
        if not isinstance(state_dict, dict) or "base" not in state_dict or "saq" not in state_dict:
            raise ValueError("not a saq.SAQ state_dict (expected keys 'base' and 'saq'); to load a plain "
                             "optimizer state use opt.base_optimizer.load_state_dict")
        saq = state_dict["saq"]
        for key, mine in (("mode", self.mode), ("strategy", self.strategy), ("num_targets", len(self._targets))):
            if saq.get(key) != mine:
                raise ValueError(f"state_dict was saved with {key}={saq.get(key)!r} but this optimizer has "
                                 f"{key}={mine!r}")
        _check_state_shapes(state_dict["base"], self._params(), list(self._targets.tensors()), saq)
        self.restore()
        self.base_optimizer.load_state_dict(state_dict["base"])
        # Optimizer.load_state_dict rebinds the base's lists: share them again
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._step = int(saq["step"])
        self._strategy.load_state_dict(saq, self._passes)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        self._first_done = self._skip_pending = False

    # -- the two-call form's second half -------------------------------------------------------------------
    def _second_half(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        self.restore()
        self.passes_last_step = 2 if self._first_done else 1
        self._first_done = False
        if self._skip_pending:
            self._skip_pending = False
            self._step += 1
            return None
        self._passes.finish(None, None, [], False, scaler, None)
        return None
