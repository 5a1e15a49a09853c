"""The sharpness measures and loss landscapes of :mod:`saq.analysis` (see its docstring).

Which tensors are perturbed and where is :class:`saq.perturb.Targets`' rule, the one the optimizer uses:
``where="quantized"`` is :attr:`saq.perturb.Site.AFTER` (Q(w) + e, derivatives w.r.t. Q(w)), ``"latent"`` is
:attr:`~saq.perturb.Site.BEFORE` (Q(w + e), derivatives through the STE); the other perturbed parameters go
through :func:`torch.func.functional_call`, so the model is never written to.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..quant.convert import eval_mode
from ..quant.layers import QuantLayer, quant_layers
from ..optim.functional import DEFAULT_RHO
from ..optim.perturb import WHERE, Targets, cleared, site_of

__all__ = [
    "hessian_top_eigenvalue", "hessian_trace", "sam_sharpness", "random_directions", "loss_landscape",
    "Landscape", "evaluate", "WHERE",
]

Criterion = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------------------------
# the perturbation space: which tensors a measure perturbs, and how
# ---------------------------------------------------------------------------------------------------------
class _Space:
    """The tensors a measure perturbs (:class:`Targets`, in ``named_parameters`` order), by name.

    Quantized-layer weights are perturbed at the site ``where`` names (through the layer), the other
    parameters through ``functional_call``; quantizer steps/clips never.
    """

    def __init__(self, model: nn.Module, where: str, include_float: bool, weights_only: bool = False):
        site = site_of(where, "wrt/where")
        self.model = model
        self.base = {n: p.detach() for n, p in model.named_parameters()}
        qweights = {id(m.weight) for _, m in quant_layers(model)}
        candidates = [p for p in model.parameters() if p.requires_grad or id(p) in qweights]
        self.targets = Targets.select(model, site, candidates, unquantized=include_float, weights_only=weights_only)
        chosen = {id(t) for t in self.targets.tensors()}
        self.names = [n for n, p in model.named_parameters() if id(p) in chosen]
        by_weight = {id(m.weight): m for m in self.targets.layers}
        self.hooks: dict[str, QuantLayer] = {n: by_weight[id(p)] for n, p in model.named_parameters()
                                             if id(p) in by_weight}
        if not self.names:
            raise ValueError("the model has no weight to perturb (no quantized layer and no float parameter)")

    def reference(self, name: str) -> Tensor:
        """The tensor a perturbation of ``name`` is added to: Q(w) (``where="quantized"``), else w."""
        layer = self.hooks.get(name)
        if layer is not None:
            return self.targets.site.reference(layer, captured=False).detach()  # type: ignore[union-attr]
        return self.base[name]

    def zeros(self, requires_grad: bool = False) -> list[Tensor]:
        return [torch.zeros_like(self.base[n]).requires_grad_(requires_grad) for n in self.names]

    def forward(self, deltas: Optional[Sequence[Optional[Tensor]]], x: Tensor) -> Tensor:
        """The model's output with ``deltas`` (aligned with ``names``; None = unperturbed) added."""
        params = dict(self.base)
        at_layer: dict[int, Optional[Tensor]] = {}
        for name, d in zip(self.names, deltas if deltas is not None else [None] * len(self.names)):
            layer = self.hooks.get(name)
            if layer is not None:
                at_layer[id(layer)] = d
            elif d is not None:
                params[name] = params[name] + d
        with self.targets.at_layers([at_layer.get(id(m)) for m in self.targets.layers]):
            return functional_call(self.model, params, (x,))


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode, no layer perturbed or capturing; everything restored afterwards."""
    with eval_mode(model), cleared(model):
        yield


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _materialise(batches: Iterable[Batch], device: torch.device) -> list[tuple[Tensor, Tensor, float]]:
    """List of (x, y, weight) with weights n_b / N (the loss is averaged over samples)."""
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and all(torch.is_tensor(b) for b in batches):
        raise ValueError("batches must be a list of (x, y) pairs, not a single (x, y) pair: wrap it as [(x, y)]")
    out = []
    for i, b in enumerate(batches):
        if not (isinstance(b, (tuple, list)) and len(b) >= 2 and torch.is_tensor(b[0]) and torch.is_tensor(b[1])):
            raise ValueError(f"batch {i} is not an (x, y) pair of tensors (got {type(b).__name__})")
        out.append((b[0].to(device), b[1].to(device)))
    if not out:
        raise ValueError("no batch was given")
    total = sum(len(x) for x, _ in out)
    return [(x, y, len(x) / total) for x, y in out]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _norm(a: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _loss_grad(space: _Space, criterion: Criterion, data, deltas: Sequence[Tensor]) -> tuple[float, list[Tensor]]:
    """Loss and gradient w.r.t. the perturbation at ``deltas``, averaged over ``data``."""
    total = 0.0
    grads = [torch.zeros_like(d) for d in deltas]
    for x, y, w in data:
        leaves = [d.detach().requires_grad_(True) for d in deltas]
        loss = criterion(space.forward(leaves, x), y)
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        for acc, g in zip(grads, gs):
            if g is not None:
                acc.add_(g, alpha=w)
        total += float(loss.detach()) * w
    return total, grads


def _hvp(space: _Space, criterion: Criterion, data, v: Sequence[Tensor]) -> list[Tensor]:
    """Hessian-vector product H v at the unperturbed point (double backward), averaged over ``data``."""
    out = [torch.zeros_like(t) for t in v]
    for x, y, w in data:
        leaves = space.zeros(requires_grad=True)
        loss = criterion(space.forward(leaves, x), y)
        gs = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        pairs = [(g, t) for g, t in zip(gs, v) if g is not None and g.requires_grad]
        if not pairs:
            continue
        gv = cast(Tensor, sum((g * t).sum() for g, t in pairs))  # (pairs is not empty)
        hs = torch.autograd.grad(gv, leaves, allow_unused=True)
        for acc, h in zip(out, hs):
            if h is not None:
                acc.add_(h, alpha=w)
    return out


def _check_common(criterion: Criterion, wrt: str) -> None:
    if not callable(criterion):
        raise ValueError("criterion must be a callable (outputs, targets) -> mean loss")
    site_of(wrt, "wrt")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------------------------------------------------
# sharpness measures
# ---------------------------------------------------------------------------------------------------------
def hessian_top_eigenvalue(model: nn.Module, criterion: Criterion, batches: Iterable[Batch], iters: int = 20,
                           tol: float = 1e-3, wrt: str = "quantized", include_float: bool = True,
                           seed: int = 0) -> float:
    """Dominant Hessian eigenvalue of the loss by power iteration on Hessian-vector products.

    Power iteration finds the eigenvalue of largest magnitude (the top one near a minimum). Stops after
    ``iters`` products or when the Rayleigh quotient changes by less than ``tol`` (relative).
    """
    _check_common(criterion, wrt)
    if iters < 1 or not tol >= 0:
        raise ValueError(f"iters must be >= 1 and tol >= 0, got iters={iters}, tol={tol}")
    with _measuring(model):
        space = _Space(model, wrt, include_float)
        data = _materialise(batches, _device(model))
        gen = _generator(seed)
        v = [torch.randn(t.shape, generator=gen).to(t) for t in space.zeros()]
        n = _norm(v)
        v = [t / n for t in v]
        lam: Optional[float] = None
        for _ in range(iters):
            hv = _hvp(space, criterion, data, v)
            new = _dot(v, hv)
            hn = _norm(hv)
            if hn == 0.0:
                return 0.0
            v = [t / hn for t in hv]
            converged = lam is not None and abs(new - lam) <= tol * max(abs(lam), 1e-12)
            lam = new
            if converged:
                break
        assert lam is not None  # iters >= 1
        return float(lam)


def hessian_trace(model: nn.Module, criterion: Criterion, batches: Iterable[Batch], samples: int = 64,
                  wrt: str = "quantized", include_float: bool = True, seed: int = 0,
                  return_stderr: bool = False) -> Union[float, tuple[float, float]]:
    """Hutchinson estimate of tr(H): the mean of v^T H v over ``samples`` Rademacher vectors v.

    With ``return_stderr=True`` returns ``(trace, standard error of the mean)`` (nan for one sample).
    """
    _check_common(criterion, wrt)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    with _measuring(model):
        space = _Space(model, wrt, include_float)
        data = _materialise(batches, _device(model))
        gen = _generator(seed)
        est = []
        for _ in range(samples):
            v = [(torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t) for t in space.zeros()]
            est.append(_dot(v, _hvp(space, criterion, data, v)))
    arr = np.asarray(est, dtype=np.float64)
    mean = float(arr.mean())
    stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return (mean, stderr) if return_stderr else mean


def _sharpness_on(space: _Space, criterion: Criterion, data, rho: float, steps: int, gen: torch.Generator) -> float:
    """max over the iterates of L(w+e) - L(w), e from projected normalised gradient ascent in ||e|| <= rho."""
    zero = space.zeros()
    base, g = _loss_grad(space, criterion, data, zero)
    best = 0.0
    e = zero
    for _ in range(steps):
        gn = _norm(g)
        if gn == 0.0:  # stationary point (e.g. an exact minimum): start from a random direction
            if any(bool(t.any()) for t in e):
                break
            g = [torch.randn(t.shape, generator=gen).to(t) for t in zero]
            gn = _norm(g)
        e = [a + (rho / gn) * b for a, b in zip(e, g)]
        en = _norm(e)
        if en > rho:
            e = [t * (rho / en) for t in e]
        loss, g = _loss_grad(space, criterion, data, e)
        best = max(best, loss - base)
    return best


def sam_sharpness(model: nn.Module, criterion: Criterion, batches: Iterable[Batch], rho: float = DEFAULT_RHO,
                  m: Optional[int] = None, steps: int = 5, wrt: str = "quantized", include_float: bool = True,
                  seed: int = 0) -> float:
    """SAM sharpness max_{||e||<=rho} L(w+e) - L(w), estimated by projected gradient ascent.

    The first step is SAM's e = rho g/||g||; each further step adds rho * (normalised gradient at w+e) and
    projects back on the ball. Returns the largest increase seen (a lower bound of the true maximum;
    ``steps=1`` is the one-step SAM sharpness). ``m``: m-sharpness -- each batch is split into chunks of
    ``m`` samples, each chunk gets its own worst perturbation, and the results are averaged by size.
    """
    _check_common(criterion, wrt)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"m must be None or a positive int, got {m!r}")
    with _measuring(model):
        space = _Space(model, wrt, include_float)
        data = _materialise(batches, _device(model))
        gen = _generator(seed)
        if m is None:
            return _sharpness_on(space, criterion, data, rho, steps, gen)
        total, count = 0.0, 0
        for x, y, _ in data:
            for xs, ys in zip(torch.split(x, m), torch.split(y, m)):
                total += _sharpness_on(space, criterion, [(xs, ys, 1.0)], rho, steps, gen) * len(xs)
                count += len(xs)
        return total / count


# ---------------------------------------------------------------------------------------------------------
# loss landscape (Li et al. 2018)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Landscape:
    """Losses (and accuracies) on a 1-D line or 2-D plane through the weights.

    ``losses[i]`` is at ``alphas[i]``; in 2-D ``losses[i, j]`` is at ``(alphas[i], betas[j])``. Accuracies
    are nan when the outputs are not class logits.
    """

    alphas: np.ndarray
    losses: np.ndarray
    accuracies: np.ndarray
    betas: Optional[np.ndarray] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return 1 if self.betas is None else 2


def random_directions(model: nn.Module, dims: int = 1, seed: int = 0,
                      where: str = "quantized") -> list[dict[str, Tensor]]:
    """``dims`` filter-normalised Gaussian directions, one tensor per weight (name -> direction).

    Each filter (slice along dim 0) of a direction is rescaled to the norm of the same filter of the
    weight it perturbs: Q(w) for quantized layers with ``where="quantized"``, w otherwise. 1-D parameters
    (biases, norm affine) and quantizer steps get no direction (Li et al.'s "ignore biases and BN").
    The Gaussian draw depends only on ``seed`` and the weight shapes, so checkpoints of one architecture
    share the same raw directions and their landscapes can be compared on the same axes.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    with _measuring(model):
        space = _Space(model, where, include_float=True, weights_only=True)
        gen = _generator(seed)
        out = []
        for _ in range(dims):
            direction = {}
            for name in space.names:
                ref = space.reference(name)
                d = torch.randn(ref.shape, generator=gen, dtype=torch.float64)  # weights have dim >= 2
                r = ref.detach().to("cpu", torch.float64)
                dn = d.reshape(d.shape[0], -1).norm(dim=1)
                rn = r.reshape(r.shape[0], -1).norm(dim=1)
                scale = (rn / (dn + 1e-10)).reshape([-1] + [1] * (d.dim() - 1))
                direction[name] = (d * scale).to(ref.device, ref.dtype)
            out.append(direction)
    return out


def _accuracy(out: Tensor, y: Tensor) -> float:
    if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point() and len(out) == len(y):
        return 100.0 * float((out.argmax(dim=1) == y).double().mean())  # percent, as saq.train reports
    return float("nan")


def _loss_accuracy(forward: Callable[[Tensor], Tensor], criterion: Criterion, data) -> tuple[float, float]:
    """(mean loss, accuracy in %) of ``forward`` over materialised ``data`` (the batches weighted by size)."""
    loss = acc = 0.0
    for x, y, w in data:
        out = forward(x)
        loss += float(criterion(out, y)) * w
        acc += _accuracy(out, y) * w
    return loss, acc


def evaluate(model: nn.Module, criterion: Criterion, batches: Iterable[Batch]) -> tuple[float, float]:
    """(mean loss, accuracy in %) of ``model`` on ``batches`` in eval mode; accuracy is nan for non-class outputs."""
    with _measuring(model), torch.no_grad():
        return _loss_accuracy(model, criterion, _materialise(batches, _device(model)))


def loss_landscape(model: nn.Module, criterion: Criterion, batches: Iterable[Batch], dims: int = 1,
                   steps: int = 21, span: float = 1.0, seed: int = 0, where: str = "quantized",
                   progress: bool = True, directions: Optional[Sequence[dict[str, Tensor]]] = None) -> Landscape:
    """Loss and accuracy at w + a*d1 (+ b*d2) for a, b on ``linspace(-span, span, steps)``.

    Directions are :func:`random_directions` (filter-normalised, from ``seed``) unless given. With
    ``where="quantized"`` they are added to Q(w) (after quantizing); with ``"latent"`` to w before
    quantizing, which shows the quantizer's staircase. Float weights get a*d directly.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    if steps < 2 or not span > 0:
        raise ValueError(f"steps must be >= 2 and span > 0, got steps={steps}, span={span}")
    if not callable(criterion):
        raise ValueError("criterion must be a callable (outputs, targets) -> mean loss")
    if directions is None:
        directions = random_directions(model, dims, seed, where)
    elif len(directions) != dims:
        raise ValueError(f"{dims}-D landscape needs {dims} direction(s), got {len(directions)}")
    from tqdm.auto import tqdm

    grid = np.linspace(-span, span, steps)
    with _measuring(model), torch.no_grad():
        space = _Space(model, where, include_float=True, weights_only=True)
        for d in directions:
            unknown = set(d) - set(space.names)
            if unknown:
                raise ValueError(f"direction has tensors the model cannot perturb: {sorted(unknown)[:3]}")
            for n, t in d.items():
                if t.shape != space.base[n].shape:
                    raise ValueError(f"direction for {n} has shape {tuple(t.shape)}, "
                                     f"the weight {tuple(space.base[n].shape)}")
        dirs = [[d.get(n) for n in space.names] for d in directions]
        data = _materialise(batches, _device(model))
        points = [(i,) for i in range(steps)] if dims == 1 else [(i, j) for i in range(steps) for j in range(steps)]
        shape = (steps,) * dims
        losses = np.full(shape, np.nan)
        accs = np.full(shape, np.nan)
        for idx in tqdm(points, desc=f"landscape ({where})", disable=not progress, leave=False):
            deltas: list[Optional[Tensor]] = []
            for k, name in enumerate(space.names):
                parts = [d_ak * float(grid[i]) for a, i in enumerate(idx) if (d_ak := dirs[a][k]) is not None]
                deltas.append(sum(parts[1:], parts[0]) if parts else None)
            losses[idx], accs[idx] = _loss_accuracy(lambda x: space.forward(deltas, x), criterion, data)
    norms = [math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values())) for d in directions]
    meta = {"dims": dims, "steps": steps, "span": float(span), "seed": int(seed), "where": where,
            "num_tensors": len(directions[0]), "num_elements": int(sum(t.numel() for t in directions[0].values())),
            "direction_norms": norms, "filter_normalized": True}
    return Landscape(alphas=grid, betas=grid.copy() if dims == 2 else None, losses=losses, accuracies=accs, meta=meta)


