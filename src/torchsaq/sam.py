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

``opt.passes_last_step`` says how many forward/backward passes the last step ran (1 or 2).

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

import contextlib
import math
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.amp.grad_scaler import OptState
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype as _group_by_device_dtype

from .layers import QuantLayer, quant_layers
from .quantizer import Quantizer

__all__ = ["SAQ", "rho_warmup", "MODES", "STRATEGIES"]

MODES = ("sam", "case1", "case2", "case3")
STRATEGIES = ("full", "every_k", "prev_grad")
NONFINITE = ("raise", "skip")
_EPS = 1e-12

# mode -> (where a quantized layer's perturbation direction is read, where the perturbation is added)
_HOOKS: dict[str, tuple[Optional[str], Optional[str]]] = {
    "sam": (None, None),
    "case1": ("weight_grad", "perturb_post"),
    "case2": ("weight_grad", "perturb_pre"),
    "case3": ("qweight_grad", "perturb_post"),
}


# -- fused per-(device, dtype) helpers --------------------------------------------------------------------
# Nothing here reads a device value on the host: a step makes its decisions on the device (torch.where, masks)
# and reads its finiteness flags once, at the end (``_first_failure``), so the CPU never waits for the GPU
# in the middle of a step (a launch-bound CNN loses its queued work at every such wait).
def _map(fn: Callable[..., Any], *lists: Sequence[Tensor]) -> list:
    """Apply a ``torch._foreach_*`` op to aligned tensor lists, one call per (device, dtype) bucket.

    Returns the op's per-tensor results (if any) in the original order.
    """
    n = len(lists[0])
    out: list = [None] * n
    if n == 0:
        return out
    # torch's C++ grouping (what its optimizers use), by the first list's tensors; the tensors at one index
    # share a device (a dtype mismatch there only sends that bucket down torch's per-tensor path)
    groups = _group_by_device_dtype([list(lst) for lst in lists], with_indices=True).values()
    for tensors, idx in groups:
        res = fn(*tensors)
        if res is not None:
            for i, r in zip(idx, res):
                out[i] = r
    return out


def _norm(ts: Sequence[Tensor]) -> Tensor:
    """Global L2 norm (float32, on the first tensor's device) over all tensors of ``ts``."""
    if not ts:
        return torch.zeros(())
    dev = ts[0].device
    parts: list[Tensor] = []

    def bucket(group: list[Tensor]) -> None:
        norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        parts.append(torch.linalg.vector_norm(torch.stack(norms)).to(dev))

    _map(bucket, ts)
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Global dot product a.b (float64 device scalar) by polarisation, (||a+b||^2 - ||a-b||^2) / 4."""
    s = _map(torch._foreach_add, a, b)
    plus = _norm(s).double() ** 2
    del s
    d = _map(torch._foreach_sub, a, b)
    minus = _norm(d).double() ** 2
    return (plus - minus) / 4.0


def _on(x: Tensor, like: Tensor) -> Tensor:
    """The 0-dim ``x`` on ``like``'s device and in its dtype (what a fused foreach op takes as a tensor scalar)."""
    return x.to(device=like.device, dtype=like.dtype)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.view(_INT_OF_SIZE[t.element_size()]) for t in ts]


def _zero_unless(ok: Tensor, ts: Sequence[Tensor]) -> None:
    """In place: ``ts`` unchanged where the device bool ``ok`` is true, else all zeros (NaN and inf too).

    A float multiply by 0 keeps NaN and inf, so the bit patterns are multiplied by 1 or 0 as integers.
    """
    if ts:
        _map(lambda b: torch._foreach_mul_(b, _on(ok, b[0])), _bits(ts))


def _select_(ok: Tensor, ts: Sequence[Tensor], others: Sequence[Tensor]) -> None:
    """In place: ``ts`` where the device bool ``ok`` is true, else ``others`` (which are overwritten), bit-exact."""
    if ts:
        _zero_unless(ok, ts)
        _zero_unless(~ok, others)
        _map(torch._foreach_add_, _bits(ts), _bits(others))  # x + 0 as integers: exactly x


def _mul_owned(ts: Sequence[Tensor], owned: Sequence[bool], by: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """``ts * by``: in place where ``owned``, new tensors elsewhere. ``by``: a 0-dim device scalar or a list."""
    out = list(ts)
    for inplace in (True, False):
        sel = [i for i, o in enumerate(owned) if bool(o) is inplace]
        if not sel:
            continue
        op = torch._foreach_mul_ if inplace else torch._foreach_mul
        xs = [ts[i] for i in sel]
        if torch.is_tensor(by):
            res = _map(lambda a: op(a, _on(by, a[0])), xs)
        else:
            res = _map(op, xs, [by[i] for i in sel])
        if not inplace:
            for i, x in zip(sel, res):
                out[i] = x
    return out


def _clone(ts: Sequence[Tensor]) -> list[Tensor]:
    out = [torch.empty_like(t) for t in ts]
    if out:
        _map(torch._foreach_copy_, out, ts)
    return out


class _Snapshot:
    """Copies of a list of tensors, to put back bit-exactly; the copy buffers are allocated once and reused.

    ``take`` copies the tensors in (one fused copy per (device, dtype)), ``put_back`` copies them back once.
    """

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.copies: list[Tensor] = []
        self.active = False

    def take(self, tensors: list[Tensor]) -> None:
        c = self.copies
        if len(c) != len(tensors) or any(x.shape != t.shape or x.dtype != t.dtype or x.device != t.device
                                         for x, t in zip(c, tensors)):
            self.copies = [torch.empty_like(t) for t in tensors]
        self.tensors = tensors
        if tensors:
            _map(torch._foreach_copy_, self.copies, tensors)
        self.active = True

    def put_back(self) -> None:
        if self.active and self.tensors:
            _map(torch._foreach_copy_, self.tensors, self.copies)
        self.active = False


def _finite(value: Any) -> Tensor | bool:
    """Whether a closure's return value is finite: a device bool for a tensor (not read here), else a bool."""
    if torch.is_tensor(value):
        return torch.isfinite(value.detach()).all()
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return True


def _first_failure(checks: Sequence[tuple[str, Tensor | bool]]) -> Optional[str]:
    """The description of the first failed finiteness check, or None: the step's one host-device sync.

    ``checks`` holds (description, device bool or bool); the device flags are read in one transfer.
    """
    flags = [f for _, f in checks if torch.is_tensor(f)]
    values = iter(torch.stack([f.to(flags[0].device) for f in flags]).tolist() if flags else ())
    for what, f in checks:
        if not (next(values) if torch.is_tensor(f) else f):
            return what
    return None


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
    """rho(step) rising linearly from 0 at step 0 to ``rho`` at ``warmup_steps``, constant after."""

    def __init__(self, rho: float, warmup_steps: int):
        self.rho = rho
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return self.rho
        return self.rho * max(step, 0) / self.warmup_steps

    def __repr__(self) -> str:
        return f"rho_warmup(rho={self.rho}, warmup_steps={self.warmup_steps})"


def _check_rho(rho: Any) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")


def rho_warmup(rho: float, warmup_steps: int) -> Callable[[int], float]:
    """A ``rho_schedule`` for :class:`SAQ`: linear from 0 at step 0 to ``rho`` at ``warmup_steps``, then ``rho``.

    The official recipes warm rho up during the first epochs (pass epochs * steps_per_epoch).
    """
    _check_rho(rho)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    return _RhoWarmup(float(rho), warmup_steps)


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
        strategy: ``"full"`` (2 passes/iteration), ``"every_k"`` (~1 + 1/k), ``"prev_grad"`` (1).
        k, alpha: the ``every_k`` period and the weight of the stored orthogonal component. ``"auto"``
            (default) re-adds g_v at the size it had relative to the gradient when it was measured; 0.7 is
            LookSAM's published value, which over-weights a g_v that is mostly mini-batch noise (README).
        grad_scaler: a ``torch.amp.GradScaler`` for AMP (see the module docstring).
        max_grad_norm: clip the final (unscaled) gradient to this global norm before the base step.
        nonfinite: ``"raise"`` or ``"skip"`` on a non-finite loss or gradient (without a grad scaler).
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, rho: float = 0.05,
                 mode: str = "case3", *, adaptive: bool = False, eta: float = 0.01,
                 perturb_unquantized: bool = True, perturb_steps: Optional[bool] = None,
                 strategy: str = "full", k: int = 5, alpha: Union[float, str] = "auto",
                 rho_schedule: Optional[Callable[[int], float]] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None,
                 max_grad_norm: Optional[float] = None, nonfinite: str = "raise"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(base_optimizer, torch.optim.Optimizer) or isinstance(base_optimizer, SAQ):
            raise ValueError("base_optimizer must be a torch.optim.Optimizer (not a SAQ), got "
                             f"{type(base_optimizer).__name__}")
        _check_rho(rho)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (the every_k period) must be an int >= 1, got {k!r}")
        if alpha != "auto" and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                                    and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0 or 'auto', got {alpha!r}")
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

        module, ddp = _unwrap(model)
        base_params = [p for g in base_optimizer.param_groups for p in g["params"]]
        model_ids = {id(p) for p in module.parameters()}
        foreign = [p for p in base_params if id(p) not in model_ids]
        if foreign:
            raise ValueError(f"the base optimizer updates {len(foreign)} tensor(s) that are not parameters of the "
                             f"model (first shape {tuple(foreign[0].shape)}); build it from model.parameters()")
        trainable = [p for p in base_params if p.requires_grad]
        trainable_ids = {id(p) for p in trainable}
        layers = quant_layers(module)
        if perturb_steps is None:
            perturb_steps = mode == "sam"

        hook_layers: list[QuantLayer] = []
        if mode != "sam":
            if not layers:
                raise ValueError(f"mode {mode!r} needs a quantized model (call saq.quantize(model, ...) first); "
                                 "use mode='sam' for a float model")
            hook_layers = [m for _, m in layers if id(m.weight) in trainable_ids]
            if not hook_layers:
                raise ValueError(f"mode {mode!r}: none of the quantized layers' weights is trained by the base "
                                 "optimizer")
        hooked_ids = {id(m.weight) for m in hook_layers}
        step_ids = {id(q.scale) for q in module.modules() if isinstance(q, Quantizer)}
        weight_ids = {id(m.weight) for m in module.modules()
                      if isinstance(m, (QuantLayer, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}
        data_params: list[Tensor] = []
        for p in trainable:
            if id(p) in hooked_ids:
                continue
            if id(p) in step_ids:
                if perturb_steps:
                    data_params.append(p)
            elif perturb_unquantized or (mode == "sam" and id(p) in weight_ids):
                data_params.append(p)
        if not hook_layers and not data_params:
            raise ValueError("nothing to perturb: no trainable parameter matches the mode / perturb_* options")

        self._initialised = False
        super().__init__([{"params": list(g["params"])} for g in base_optimizer.param_groups], {})
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups  # the same list: LR schedulers work on either
        self.state = base_optimizer.state
        self.defaults = base_optimizer.defaults
        self._initialised = True

        self.model = model
        self.module = module
        self._ddp = ddp
        self.rho = float(rho)
        self.mode = mode
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self.perturb_unquantized = bool(perturb_unquantized)
        self.perturb_steps = bool(perturb_steps)
        self.strategy = strategy
        self.k = k
        self.alpha: Union[float, str] = alpha if alpha == "auto" else float(alpha)
        self.rho_schedule = rho_schedule
        self.grad_scaler = grad_scaler
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.nonfinite = nonfinite
        self.passes_last_step = 0

        self._src, self._dst = _HOOKS[mode]
        self._hook_layers = hook_layers
        self._data_params = data_params
        self._quant_layers = [m for _, m in layers]
        self._norm_modules = [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]
        # capture Q(w) and its gradient where the direction or ASAM's T needs them
        self._need_capture = mode == "case3" or (mode == "case1" and self.adaptive)
        self._set_capture(True)
        # strategy state (saved in state_dict)
        self._step = 0
        self._gv: Optional[list[Optional[Tensor]]] = None
        self._gv_norm: Optional[Tensor] = None  # ||g_v|| on the device
        self._gv_ratio: Optional[Tensor] = None  # ||g_v|| / ||g|| at the full step that built g_v (alpha="auto")
        self._gv_unconfirmed: Optional[Tensor] = None  # device bool: whether a first g_v (no older one) is finite
        self._e_prev: Optional[list[Optional[Tensor]]] = None
        # transient state (never saved); the snapshots keep their buffers from step to step
        self._saved = _Snapshot()    # the data-perturbed parameters while perturbed
        self._bn_pre = _Snapshot()   # BatchNorm statistics before the step (rolled back on a non-finite step)
        self._bn_mid = _Snapshot()   # ... after the first pass (put back after the second)
        self._hooked: list[QuantLayer] = []
        self._first_done = False
        self._skip_pending = False
        # closure-free prev_grad (``loss.backward(); opt.step()``): e_prev is applied by a forward pre-hook on
        # the first training-mode forward after a step, and removed by the next step() (or an eval forward)
        self._closure_free = False
        self._pending_applied = False
        self._pre_hook = None
        if strategy == "prev_grad":
            ref = weakref.ref(self)  # the hook must not keep a discarded optimizer alive

            def pre_hook(mod: nn.Module, args: Any) -> None:
                opt = ref()
                if opt is not None:
                    opt._forward_pre_hook(mod, args)

            self._pre_hook = module.register_forward_pre_hook(pre_hook)

    # -- torch.optim.Optimizer surface ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (the groups are shared)."""
        if not getattr(self, "_initialised", False):
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the base optimizer's gradients and the quantized layers' ``qweight_grad``."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        for layer in self._quant_layers:
            layer.zero_qweight_grad()
            layer.qweight = None

    def __repr__(self) -> str:
        extra = f", k={self.k}, alpha={self.alpha}" if self.strategy == "every_k" else ""
        return (f"SAQ(mode={self.mode!r}, rho={self.rho}, adaptive={self.adaptive}, strategy={self.strategy!r}"
                f"{extra}, base={self.base_optimizer.__class__.__name__})")

    @property
    def step_count(self) -> int:
        """Number of steps taken (or skipped) so far; the argument of ``rho_schedule``."""
        return self._step

    @property
    def current_rho(self) -> float:
        """The rho the next step will use."""
        return self._rho_at(self._step)

    def _rho_at(self, step: int) -> float:
        if self.rho_schedule is None:
            return self.rho
        r = float(self.rho_schedule(step))
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"rho_schedule({step}) returned {r}; it must be a finite number >= 0")
        return r

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _scaler(self, grad_scaler: Optional[torch.amp.GradScaler]) -> Optional[torch.amp.GradScaler]:
        s = grad_scaler if grad_scaler is not None else self.grad_scaler
        return s if s is not None and s.is_enabled() else None

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
        if closure is None:
            if self.strategy == "prev_grad" and not self._first_done:
                return self._closure_free_step()
            if not (self._first_done or self._saved.active or self._hooked):
                # a loop that calls opt.step() / scaler.step(opt) after its own backward would otherwise
                # train plain QAT while reporting SAQ: refuse, never step plainly
                raise RuntimeError(
                    f"saq.SAQ.step() was called without a closure and without first_step(): strategy "
                    f"{self.strategy!r} must run the forward/backward itself (at the perturbed point), so this "
                    "would be a plain, non-sharpness-aware step. Pass opt.step(closure) with a closure that runs "
                    "forward + backward and returns the loss, or use the two-call form first_step() / "
                    "second_step() (strategy='full').")
            return self._second_half(scaler=None)
        if self._pending_applied:  # a closure-free forward ran, then a closure step: that forward is discarded
            self._remove_pending()
        self._closure_free = False
        if self._saved.active or self._hooked:
            raise RuntimeError("step(closure) called while a first_step() perturbation is applied; "
                               "call second_step() or restore() first")
        scaler = self._scaler(grad_scaler)
        closure = torch.enable_grad()(closure)
        rho = self._rho_at(self._step)
        if self.strategy == "full":
            return self._two_pass(closure, rho, scaler, keep_first=False)
        if self.strategy == "every_k":
            self._confirm_gv()
            if self._step % self.k == 0 or self._gv is None or len(self._gv) != len(self._params()):
                return self._two_pass(closure, rho, scaler, keep_first=True)
            return self._one_pass(closure, scaler, hook=self._apply_gv, perturb=False)
        return self._one_pass(closure, scaler, hook=self._stage_next, perturb=True)

    def _closure_free_step(self) -> Any:
        """prev_grad without a closure: the caller's forward/backward ran at Q(w) + e_prev (applied by the
        forward pre-hook); undo it, take the base step, and build the next perturbation from this backward's
        gradients, applied at the next training forward. Equals ``step(closure)`` step for step."""
        self._closure_free = True
        self._remove_pending()
        self.passes_last_step = 1
        sc = self._scaler(None)
        if sc is not None:
            # AMP: scaler.step(opt) has unscaled the parameters' gradients before calling this step; the captured
            # gradients w.r.t. Q(w) are still scaled: bring them to the same scale (e's direction mixes both)
            state = sc._per_optimizer_states.get(id(self), {})
            if state.get("stage") is not OptState.UNSCALED:
                raise RuntimeError("saq.SAQ with a grad_scaler and no closure: call scaler.step(opt) (which unscales "
                                   "the gradients and skips overflowing steps), then scaler.update(); not opt.step()")
            inv = sc._scale.double().reciprocal()  # type: ignore[union-attr]
            for layer in self._hook_layers:
                if layer.qweight_grad is not None:
                    layer.qweight_grad.mul_(inv.to(layer.qweight_grad))
        return self._finish(None, None, [], False, None, self._stage_next)

    def _forward_pre_hook(self, module: nn.Module, args: Any) -> None:
        """Closure-free prev_grad: a training forward sees Q(w) + e_prev, an eval forward never does."""
        if not self._closure_free:
            return
        if module.training and not self._pending_applied and self._e_prev is not None:
            with torch.no_grad():
                self._apply_stored(self._e_prev)
            self._pending_applied = True
        elif not module.training and self._pending_applied:
            self._remove_pending()

    @torch.no_grad()
    def _unperturb(self) -> None:
        """Remove whatever perturbation is applied: data-perturbed parameters bit-exact, layer hooks cleared."""
        self._saved.put_back()
        for layer in self._hooked:
            setattr(layer, self._dst, None)  # type: ignore[arg-type]
        self._hooked = []
        self._pending_applied = False

    def _remove_pending(self) -> None:
        if self._pending_applied:
            self._unperturb()

    def first_step(self, zero_grad: bool = True) -> bool:
        """Two-call form, after the first backward: perturb along the gradients now held.

        Returns whether a perturbation was applied (False: non-finite gradients with a grad scaler or with
        ``nonfinite="skip"``; the next ``second_step`` then skips the step unless a grad scaler decides).
        """
        if self.strategy != "full":
            raise ValueError(f"first_step/second_step support strategy='full' only (this optimizer uses "
                             f"{self.strategy!r}); use step(closure)")
        if self._saved.active or self._hooked:
            raise RuntimeError("first_step() called twice without second_step() / restore()")
        # the gradients may be used as scratch space only if they are cleared afterwards; a non-finite
        # direction gives a zero perturbation (the second pass may run)
        ok = bool(self._ascent(self._rho_at(self._step), clobber=zero_grad, safe=True))  # one host-device sync
        self._first_done = True
        if not ok and self._scaler(None) is None:
            if self.nonfinite == "raise":
                self.restore()
                self._first_done = False
                raise FloatingPointError(self._nonfinite_message("gradient of the first pass"))
            self._skip_pending = True
        if zero_grad:
            self.zero_grad()
        return ok

    def second_step(self, zero_grad: bool = False) -> None:
        """Two-call form, after the second backward: restore the weights, (unscale, clip,) base step."""
        if self.strategy != "full":
            raise ValueError("first_step/second_step support strategy='full' only; use step(closure)")
        self._second_half(scaler=self._scaler(None))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the perturbation (weights bit-exact) and put BatchNorm statistics back to their first-pass values."""
        self._unperturb()
        self._bn_mid.put_back()
        self._set_capture(True)

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Base optimizer state + strategy state (step counter, every_k's g_v, prev_grad's e_prev)."""
        saq: dict[str, Any] = {"step": self._step, "mode": self.mode, "strategy": self.strategy,
                               "num_targets": self._num_targets()}
        if self.strategy == "every_k":
            self._confirm_gv()
            saq["gv"] = None if self._gv is None else list(self._gv)
            saq["gv_norm"] = 0.0 if self._gv_norm is None else float(self._gv_norm)
            saq["gv_ratio"] = 0.0 if self._gv_ratio is None else float(self._gv_ratio)
        if self.strategy == "prev_grad":
            saq["e_prev"] = None if self._e_prev is None else list(self._e_prev)
            saq["closure_free"] = self._closure_free
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
        n = self._num_targets()
        for key, mine in (("mode", self.mode), ("strategy", self.strategy), ("num_targets", n)):
            if saq.get(key) != mine:
                raise ValueError(f"state_dict was saved with {key}={saq.get(key)!r} but this optimizer has "
                                 f"{key}={mine!r}")
        self.restore()
        self.base_optimizer.load_state_dict(state_dict["base"])
        # Optimizer.load_state_dict rebinds the base's lists: share them again
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._step = int(saq["step"])
        params = self._params()
        if self.strategy == "every_k":
            gv = saq.get("gv")
            if gv is not None and len(gv) != len(params):
                raise ValueError(f"state_dict g_v has {len(gv)} entries but the optimizer has {len(params)} params")
            self._gv = None if gv is None else [None if t is None else t.to(p.device, p.dtype, copy=True)
                                                for t, p in zip(gv, params)]
            dev = next((t.device for t in self._gv or [] if t is not None), None)
            self._gv_norm = (None if self._gv is None
                             else torch.tensor(float(saq.get("gv_norm", 0.0)), dtype=torch.float32, device=dev))
            self._gv_ratio = (None if self._gv is None
                              else torch.tensor(float(saq.get("gv_ratio", 0.0)), dtype=torch.float64, device=dev))
            self._gv_unconfirmed = None
        if self.strategy == "prev_grad":
            ep = saq.get("e_prev")
            if ep is not None and len(ep) != n:
                raise ValueError(f"state_dict e_prev has {len(ep)} entries, expected {n}")
            refs = [m.weight for m in self._hook_layers] + list(self._data_params)
            self._e_prev = None if ep is None else [None if t is None else t.to(r.device, r.dtype, copy=True)
                                                    for t, r in zip(ep, refs)]
            self._closure_free = bool(saq.get("closure_free", False))  # (restore() above removed a pending e)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        self._first_done = self._skip_pending = False

    # -- strategy bodies --------------------------------------------------------------------------------------
    # Finiteness (without a grad scaler) is checked once, at the end of the step, with one host-device sync:
    # a non-finite first pass still runs the second one (at a garbage point; the weights are restored anyway)
    # and the step is then rejected. With a grad scaler the scaler checks, and a non-finite direction gives a
    # zero perturbation (computed on the device).
    def _two_pass(self, closure: Callable[[], Any], rho: float, scaler: Optional[torch.amp.GradScaler],
                  keep_first: bool) -> Any:
        """First pass, perturb, second pass at the perturbed point, restore, base step."""
        rollback = scaler is None
        if rollback:
            self._bn_pre.take(self._bn_buffers())
        rng = self._rng_get()
        # every_k's first gradient also defines g_v, which must be identical on all replicas: synchronise it
        sync = contextlib.nullcontext() if (keep_first or self._ddp is None) else self._ddp.no_sync()
        with sync:
            loss = closure()
        self.passes_last_step = 1
        g_first = None
        if keep_first:
            with torch.no_grad():
                params = self._params()
                have = [p.grad is not None for p in params]
                cl = iter(_clone([p.grad for p in params if p.grad is not None]))
                g_first = [next(cl) if h else None for h in have]
        ok = self._ascent(rho, safe=scaler is not None)
        checks = [("loss of the first pass", _finite(loss)), ("gradient of the first pass", ok)] if rollback else []
        self.zero_grad()
        self._rng_set(rng)
        try:
            loss2 = closure()
        finally:
            self.restore()
        self.passes_last_step = 2
        hook = (lambda: self._update_gv(g_first)) if keep_first else None
        return self._finish(loss, loss2, checks, rollback, scaler, hook)

    def _one_pass(self, closure: Callable[[], Any], scaler: Optional[torch.amp.GradScaler],
                  hook: Callable[[], None], perturb: bool) -> Any:
        """One forward/backward (prev_grad: at the point perturbed by e_prev), then the base step."""
        rollback = scaler is None
        if rollback:
            self._bn_pre.take(self._bn_buffers())
        if perturb:
            if self._e_prev is not None:
                self._apply_stored(self._e_prev)
        else:
            self._set_capture(False)  # every_k's plain iterations need no Q(w) gradient
        try:
            loss = closure()
        finally:
            self.restore()
        self.passes_last_step = 1
        return self._finish(loss, loss, [], rollback, scaler, hook)

    def _second_half(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        self.restore()
        self.passes_last_step = 2 if self._first_done else 1
        self._first_done = False
        if self._skip_pending:
            self._skip_pending = False
            self._step += 1
            return None
        self._finish(None, None, [], False, scaler, None)
        return None

    def _finish(self, loss: Any, loss_check: Any, checks: list[tuple[str, Tensor | bool]], rollback: bool,
                scaler: Optional[torch.amp.GradScaler], hook: Optional[Callable[[], None]]) -> Any:
        """Non-finite check (the step's one host-device sync), strategy hook, (unscale,) clip, base step, counter."""
        params = [p for p in self._params() if p.grad is not None]
        total = None
        if scaler is None:
            total = torch.nn.utils.get_total_norm([p.grad for p in params])
            what = "loss or gradient of the pass at the perturbed point"
            failed = _first_failure(checks + [(what, _finite(loss_check)), (what, torch.isfinite(total))])
            if failed is not None:
                return self._nonfinite(failed, rollback, loss)
        if hook is not None:
            hook()
            total = None  # the hook may have changed the gradients
        if scaler is not None:
            scaler.unscale_(self.base_optimizer)
            if self.max_grad_norm is not None and params:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            scaler.step(self.base_optimizer)
            scaler.update()
        else:
            if self.max_grad_norm is not None and params:
                if total is None:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                else:
                    torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, total)
            self.base_optimizer.step()
        self._step += 1
        return loss

    def _nonfinite_message(self, what: str) -> str:
        return (f"saq.SAQ: non-finite {what}; the step was not taken and the weights are unchanged. "
                "Pass nonfinite='skip' to skip such steps, or use a torch.amp.GradScaler with AMP.")

    def _nonfinite(self, what: str, rollback: bool, loss: Any) -> Any:
        if rollback:
            self._bn_pre.put_back()
        if self.nonfinite == "raise":
            raise FloatingPointError(self._nonfinite_message(what))
        if self.strategy == "prev_grad":
            self._e_prev = None
        self._step += 1
        return loss

    # -- the perturbation: one code path for every mode ------------------------------------------------------
    def _sources(self, clobber: bool) -> tuple[list[int], list[Tensor], list[Optional[Tensor]], list[bool]]:
        """(target index, direction source, tensor the perturbation is added to, source may be overwritten)."""
        idx: list[int] = []
        srcs: list[Tensor] = []
        ws: list[Optional[Tensor]] = []
        owned: list[bool] = []
        for j, layer in enumerate(self._hook_layers):
            if self._src == "qweight_grad":
                g, own = layer.qweight_grad, True
            else:
                g, own = layer.weight.grad, clobber
            if g is None:
                continue
            w = None
            if self.adaptive:
                w = layer.weight if self._dst == "perturb_pre" else layer.qweight
                if w is None:
                    raise RuntimeError(f"mode {self.mode!r} with adaptive=True needs the quantized weight of the "
                                       "pass, but a layer ran without capture_qweight")
            idx.append(j)
            srcs.append(g)
            ws.append(w)
            owned.append(own)
        h = len(self._hook_layers)
        for j, p in enumerate(self._data_params):
            if p.grad is None:
                continue
            idx.append(h + j)
            srcs.append(p.grad)
            ws.append(p if self.adaptive else None)
            owned.append(clobber)
        return idx, srcs, ws, owned

    @torch.no_grad()
    def _perturbation(self, rho: float, srcs: list[Tensor], ws: list[Optional[Tensor]],
                      owned: list[bool]) -> tuple[list[Tensor], Tensor, list[bool], Tensor]:
        """(d, scale, d_is_ours, ok) with e = scale * d; ``scale`` (float64) and ``ok`` are device scalars.

        ``ok`` says whether the norm is finite; if not, ``scale`` is 0 (but d may hold NaN or inf).
        """
        if self.adaptive:
            t = _map(torch._foreach_abs, ws)
            _map(lambda a: torch._foreach_add_(a, self.eta), t)
            d = _mul_owned(srcs, owned, t)       # T g
            norm = _norm(d)                      # ||T g||
            _map(torch._foreach_mul_, d, t)      # T^2 g
            del t
            ours = [True] * len(d)
        else:
            d, ours = srcs, list(owned)
            norm = _norm(d)
        ok = torch.isfinite(norm)
        scale = torch.where(ok, rho / (norm.double() + _EPS), 0.0)  # float64, as rho / (float(norm) + eps)
        return d, scale, ours, ok

    @torch.no_grad()
    def _ascent(self, rho: float, clobber: bool = True, safe: bool = False) -> Tensor | bool:
        """Build e from the gradients of the first pass and apply it; snapshot BatchNorm statistics.

        Returns whether the direction was finite (a device bool; True if there was none). ``safe``: make a
        non-finite direction a zero perturbation (otherwise e is garbage and the caller rejects the step).
        """
        self._bn_mid.take(self._bn_buffers())
        idx, srcs, ws, owned = self._sources(clobber=clobber)
        res = self._perturbation(rho, srcs, ws, owned) if srcs else None
        self._drop_captures()
        self._set_capture(False)  # the second pass needs no Q(w) gradient
        if res is None:
            return True
        d, scale, ours, ok = res
        es = _mul_owned(d, ours, scale)
        if safe:
            _zero_unless(ok, es)
        self._apply_stored(self._per_target(idx, es))
        return ok

    @torch.no_grad()
    def _apply_stored(self, es: list[Optional[Tensor]]) -> None:
        """Add a per-target perturbation (data: saved copy for exact restore; layers: the hook)."""
        h = len(self._hook_layers)
        data = [(self._data_params[j - h], e) for j, e in enumerate(es) if j >= h and e is not None]
        if data:
            ps = [p for p, _ in data]
            self._saved.take(ps)
            _map(torch._foreach_add_, ps, [e for _, e in data])
        for layer, e in zip(self._hook_layers, es[:h]):
            if e is not None:
                setattr(layer, self._dst, e)  # type: ignore[arg-type]
                self._hooked.append(layer)

    @torch.no_grad()
    def _stage_next(self) -> None:
        """prev_grad: build next iteration's perturbation from this pass's (still scaled) gradients.

        A non-finite direction gives a zero perturbation (decided on the device).
        """
        rho = self._rho_at(self._step + 1)
        idx, srcs, ws, owned = self._sources(clobber=False)  # p.grad is the update gradient: keep it
        res = self._perturbation(rho, srcs, ws, owned) if rho > 0 else None
        self._drop_captures()
        if res is None:
            self._e_prev = None
            return
        d, scale, ours, ok = res
        es = _mul_owned(d, ours, scale)
        _zero_unless(ok, es)
        self._e_prev = self._per_target(idx, es)

    @torch.no_grad()
    def _update_gv(self, g_first: Optional[list[Optional[Tensor]]]) -> None:
        """every_k full step: g_v = g_s - (g_s.g / ||g||^2) g, built in the buffers of g.

        A non-finite g_v (grad scaler overflow) keeps the previous one, selected on the device; a first g_v is
        checked on the host at the next step (``_confirm_gv``).
        """
        assert g_first is not None
        params = self._params()
        pairs = [(i, g, p.grad) for i, (p, g) in enumerate(zip(params, g_first))
                 if g is not None and p.grad is not None]
        if not pairs:
            return
        gf = [g for _, g, _ in pairs]
        gs = [s for _, _, s in pairs]
        gg = _norm(gf).double() ** 2
        dot = _dot(gs, gf)
        c = torch.where(gg > 0, dot / gg, 0.0)
        _map(lambda a: torch._foreach_mul_(a, _on(-c, a[0])), gf)
        _map(torch._foreach_add_, gf, gs)
        gvn = _norm(gf)
        ok = torch.isfinite(gg) & torch.isfinite(dot) & torch.isfinite(gvn)
        ratio = torch.where(gg > 0, gvn.double() / gg.sqrt(), 0.0)
        gv: list[Optional[Tensor]] = [None] * len(params)
        for (i, _, _), t in zip(pairs, gf):
            gv[i] = t
        old = self._gv
        if old is not None and self._gv_norm is not None and [t is None for t in old] == [t is None for t in gv]:
            _select_(ok, gf, [old[i] for i, _, _ in pairs])  # type: ignore[misc]
            self._gv_norm = torch.where(ok, gvn, self._gv_norm.to(gvn.device))
            prev = self._gv_ratio if self._gv_ratio is not None else torch.zeros((), dtype=torch.float64)
            self._gv_ratio = torch.where(ok, ratio, prev.to(ratio.device))
        else:  # no previous g_v to keep: zeros for now, dropped at the next step if it was not finite
            _zero_unless(ok, gf)
            self._gv_norm = torch.where(ok, gvn, 0.0)
            self._gv_ratio = torch.where(ok, ratio, 0.0)
            self._gv_unconfirmed = ok
        self._gv = gv

    def _confirm_gv(self) -> None:
        """every_k: drop a first g_v that was not finite (one host read, only until a finite g_v exists)."""
        if self._gv_unconfirmed is not None:
            if not bool(self._gv_unconfirmed):
                self._gv = self._gv_norm = self._gv_ratio = None
            self._gv_unconfirmed = None

    @torch.no_grad()
    def _apply_gv(self) -> None:
        """every_k plain iteration: g <- g + alpha * (||g|| / ||g_v||) * g_v (coefficient on the device).

        ``alpha="auto"`` uses the ratio ||g_v|| / ||g|| measured at the full step that built g_v, i.e.
        g <- g + (||g|| / ||g_full||) * g_v: the stored component keeps the size it had relative to the gradient.
        """
        assert self._gv is not None and self._gv_norm is not None
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        pairs = [(p.grad, v) for p, v in zip(params, self._gv) if p.grad is not None and v is not None]
        if not pairs or self.alpha == 0 or (self.alpha == "auto" and self._gv_ratio is None):
            return
        gvn = self._gv_norm.double()
        alpha: Union[float, Tensor] = self.alpha if self.alpha != "auto" else self._gv_ratio.to(gvn.device)  # type: ignore[union-attr]
        coef = torch.where(gvn > 0, alpha * _norm(grads).double().to(gvn.device) / gvn, 0.0)
        add = _map(lambda v: torch._foreach_mul(v, _on(coef, v[0])), [v for _, v in pairs])
        _map(torch._foreach_add_, [g for g, _ in pairs], add)

    # -- small utilities ------------------------------------------------------------------------------------
    def _num_targets(self) -> int:
        """Perturbation targets: the hook-perturbed layers, then the data-perturbed parameters."""
        return len(self._hook_layers) + len(self._data_params)

    def _per_target(self, idx: list[int], es: list[Tensor]) -> list[Optional[Tensor]]:
        """The perturbations ``es`` of targets ``idx`` as a list over all targets (None: not perturbed)."""
        full: list[Optional[Tensor]] = [None] * self._num_targets()
        for j, e in zip(idx, es):
            full[j] = e
        return full

    def _set_capture(self, on: bool) -> None:
        if self._need_capture:
            for layer in self._hook_layers:
                layer.capture_qweight = on

    def _drop_captures(self) -> None:
        for layer in self._hook_layers:
            layer.qweight_grad = None
            layer.qweight = None

    def _bn_buffers(self) -> list[Tensor]:
        return [b for m in self._norm_modules for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                if b is not None]

    def _rng_get(self) -> tuple[Tensor, list[tuple[int, Tensor]]]:
        devs = sorted({p.device.index or 0 for p in self._params() if p.device.type == "cuda"})
        return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devs]

    @staticmethod
    def _rng_set(state: tuple[Tensor, list[tuple[int, Tensor]]]) -> None:
        torch.set_rng_state(state[0])
        for d, s in state[1]:
            torch.cuda.set_rng_state(s, d)
