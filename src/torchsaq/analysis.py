"""Sharpness measures and loss landscapes of (quantized) models, "through the quantizer".

Measures: the dominant Hessian eigenvalue (power iteration on Hessian-vector products), the Hessian trace
(Hutchinson), and SAM / m-sharpness (the worst loss increase in an L2 ball, by projected gradient
ascent). Plots: 1-D / 2-D loss landscapes along filter-normalised random directions (Li et al. 2018).

What is differentiated / perturbed (``wrt`` for the measures, ``where`` for the landscape):

* ``"quantized"`` (default) -- the quantized weights Q(w) of every :class:`~saq.layers.QuantLayer`. The
  perturbation is put on the layer hook ``perturb_post`` (added after quantizing), so derivatives are
  taken w.r.t. Q(w) itself: the quantity SAQ (case 3) makes flat.
* ``"latent"`` -- the float weights w, perturbed with ``perturb_pre`` (added before quantizing). Derivatives
  go through the quantizer's straight-through estimator (zero where w/s is clipped), and the landscape is the
  staircase the optimizer of the float weights actually walks on.

For the sharpness measures the float parameters that are not quantized (biases, BatchNorm/LayerNorm affine,
weights of layers left in float) are included too (``include_float=True``, as SAQ perturbs them); quantizer
scales (LSQ steps, LIQ clips) never are. Curvature through the activation quantizers is the straight-through
one (rounding is treated as the identity inside the clipping range), which is the curvature the training
gradients see.

All functions run the model in eval mode (BatchNorm running statistics, no dropout), restore each module's
mode and the perturbation hooks afterwards, and never write to the parameters: perturbed parameters are
passed through :func:`torch.func.functional_call`, so the model is left bit-for-bit unchanged.
``batches`` is a list (or iterable, materialised once) of ``(x, y)`` pairs; losses are averaged over the
batches weighted by their size, so ``criterion`` must return the mean loss of a batch.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._io import atomic_write, atomic_write_text
from .convert import eval_mode
from .layers import QuantLayer, quant_layers
from .quantizer import Quantizer

__all__ = [
    "hessian_top_eigenvalue", "hessian_trace", "sam_sharpness", "random_directions", "loss_landscape",
    "Landscape", "save_landscape", "load_landscape", "plot_landscapes", "run_landscape", "run_sharpness",
    "format_sharpness_table", "evaluate",
]

Criterion = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]
_WHERE = ("quantized", "latent")


# ---------------------------------------------------------------------------------------------------------
# the perturbation space: which tensors a measure perturbs, and how
# ---------------------------------------------------------------------------------------------------------
class _Space:
    """Named tensors to perturb: quantized-layer weights via the layer hook, other params via functional_call."""

    def __init__(self, model: nn.Module, where: str, include_float: bool, weights_only: bool = False):
        if where not in _WHERE:
            raise ValueError(f"wrt/where must be one of {', '.join(_WHERE)}, got {where!r}")
        self.model = model
        self.attr = "perturb_post" if where == "quantized" else "perturb_pre"
        self.where = where
        self.base = {n: p.detach() for n, p in model.named_parameters()}
        self.hooks: dict[str, QuantLayer] = {}
        for name, layer in quant_layers(model):
            self.hooks[f"{name}.weight" if name else "weight"] = layer
        steps = {id(q.scale) for q in model.modules() if isinstance(q, Quantizer)}
        self.floats: list[str] = []
        if include_float:
            for n, p in model.named_parameters():
                if n in self.hooks or id(p) in steps or not p.requires_grad:
                    continue
                if weights_only and p.dim() <= 1:  # biases / norm affine: direction 0 (Li et al.)
                    continue
                self.floats.append(n)
        self.names = [n for n in self.base if n in self.hooks or n in self.floats]
        if not self.names:
            raise ValueError("the model has no weight to perturb (no quantized layer and no float parameter)")

    def reference(self, name: str) -> Tensor:
        """The tensor a perturbation of ``name`` is added to: Q(w) (quantized hook), else w."""
        layer = self.hooks.get(name)
        if layer is not None and self.where == "quantized":
            with torch.no_grad():
                return layer.quantized_weight().detach()
        return self.base[name]

    def zeros(self, requires_grad: bool = False) -> list[Tensor]:
        return [torch.zeros_like(self.base[n]).requires_grad_(requires_grad) for n in self.names]

    def forward(self, deltas: Optional[Sequence[Optional[Tensor]]], x: Tensor) -> Tensor:
        """The model's output with ``deltas`` (aligned with ``names``; None = unperturbed) added."""
        params = dict(self.base)
        deltas = deltas if deltas is not None else [None] * len(self.names)
        for name, d in zip(self.names, deltas):
            layer = self.hooks.get(name)
            if layer is not None:
                setattr(layer, self.attr, d)
            elif d is not None:
                params[name] = params[name] + d
        try:
            return functional_call(self.model, params, (x,))
        finally:
            for layer in self.hooks.values():
                setattr(layer, self.attr, None)


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode, hooks cleared, qweight capture off; everything restored afterwards."""
    layers = [m for _, m in quant_layers(model)]
    saved = [(m.perturb_pre, m.perturb_post, m.capture_qweight) for m in layers]
    with eval_mode(model):
        try:
            for m in layers:
                m.perturb_pre, m.perturb_post, m.capture_qweight = None, None, False
            yield
        finally:
            for m, (pre, post, cap) in zip(layers, saved):
                m.perturb_pre, m.perturb_post, m.capture_qweight = pre, post, cap


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
        gv = sum((g * t).sum() for g, t in pairs)
        hs = torch.autograd.grad(gv, leaves, allow_unused=True)
        for acc, h in zip(out, hs):
            if h is not None:
                acc.add_(h, alpha=w)
    return out


def _check_common(criterion: Criterion, wrt: str) -> None:
    if not callable(criterion):
        raise ValueError("criterion must be a callable (outputs, targets) -> mean loss")
    if wrt not in _WHERE:
        raise ValueError(f"wrt must be one of {', '.join(_WHERE)}, got {wrt!r}")


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


def sam_sharpness(model: nn.Module, criterion: Criterion, batches: Iterable[Batch], rho: float = 0.05,
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


def evaluate(model: nn.Module, criterion: Criterion, batches: Iterable[Batch]) -> tuple[float, float]:
    """(mean loss, accuracy in %) of ``model`` on ``batches`` in eval mode; accuracy is nan for non-class outputs."""
    with _measuring(model), torch.no_grad():
        data = _materialise(batches, _device(model))
        loss = acc = 0.0
        for x, y, w in data:
            out = model(x)
            loss += float(criterion(out, y)) * w
            acc += _accuracy(out, y) * w
    return loss, acc


def loss_landscape(model: nn.Module, criterion: Criterion, batches: Iterable[Batch], dims: int = 1,
                   steps: int = 21, span: float = 1.0, seed: int = 0, where: str = "quantized",
                   progress: bool = True, directions: Optional[Sequence[dict[str, Tensor]]] = None) -> Landscape:
    """Loss and accuracy at w + a*d1 (+ b*d2) for a, b on ``linspace(-span, span, steps)``.

    Directions are :func:`random_directions` (filter-normalised, from ``seed``) unless given. With
    ``where="quantized"`` they are added to Q(w) (``perturb_post``); with ``"latent"`` to w before
    quantizing (``perturb_pre``), which shows the quantizer's staircase. Float weights get a*d directly.
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
            deltas = []
            for k, name in enumerate(space.names):
                parts = [dirs[a][k] * float(grid[i]) for a, i in enumerate(idx) if dirs[a][k] is not None]
                deltas.append(sum(parts[1:], parts[0]) if parts else None)
            loss = acc = 0.0
            for x, y, w in data:
                out = space.forward(deltas, x)
                loss += float(criterion(out, y)) * w
                acc += _accuracy(out, y) * w
            losses[idx] = loss
            accs[idx] = acc
    norms = [math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values())) for d in directions]
    meta = {"dims": dims, "steps": steps, "span": float(span), "seed": int(seed), "where": where,
            "num_tensors": len(directions[0]), "num_elements": int(sum(t.numel() for t in directions[0].values())),
            "direction_norms": norms, "filter_normalized": True}
    return Landscape(alphas=grid, betas=grid.copy() if dims == 2 else None, losses=losses, accuracies=accs, meta=meta)


def save_landscape(landscape: Landscape, path: Union[str, Path]) -> Path:
    """Write a landscape as ``.npz`` (arrays + JSON meta; :func:`load_landscape` reads it) or ``.csv``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        arrays = {"alphas": landscape.alphas, "losses": landscape.losses, "accuracies": landscape.accuracies,
                  "meta": np.array(json.dumps(landscape.meta))}
        if landscape.betas is not None:
            arrays["betas"] = landscape.betas
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)
    elif path.suffix == ".csv":
        lines = ["alpha,loss,accuracy" if landscape.dims == 1 else "alpha,beta,loss,accuracy"]
        for i, a in enumerate(landscape.alphas):
            if landscape.dims == 1:
                lines.append(f"{a:.6g},{landscape.losses[i]:.9g},{landscape.accuracies[i]:.6g}")
            else:
                for j, b in enumerate(landscape.betas):  # type: ignore[arg-type]
                    lines.append(f"{a:.6g},{b:.6g},{landscape.losses[i, j]:.9g},{landscape.accuracies[i, j]:.6g}")
        atomic_write_text(path, "\n".join(lines) + "\n")
    else:
        raise ValueError(f"landscape files are .npz or .csv, got {path.name!r}")
    return path


def load_landscape(path: Union[str, Path]) -> Landscape:
    """Read a landscape written by :func:`save_landscape` as ``.npz`` (no pickles)."""
    with np.load(Path(path), allow_pickle=False) as z:
        return Landscape(alphas=z["alphas"], losses=z["losses"], accuracies=z["accuracies"],
                         betas=z["betas"] if "betas" in z.files else None, meta=json.loads(str(z["meta"])))


def plot_landscapes(landscapes: dict[str, Landscape], path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Plot landscapes: 1-D curves overlaid (loss, and accuracy when known); 2-D loss contours side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless (Agg)

    if not landscapes:
        raise ValueError("no landscape to plot")
    dims = {ls.dims for ls in landscapes.values()}
    if len(dims) != 1:
        raise ValueError("cannot plot 1-D and 2-D landscapes together")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dims == {1}:
        with_acc = any(np.isfinite(ls.accuracies).any() for ls in landscapes.values())
        fig = Figure(figsize=(11 if with_acc else 6, 4.2), layout="constrained")
        axes = fig.subplots(1, 2 if with_acc else 1, squeeze=False)[0]
        for label, ls in landscapes.items():
            axes[0].plot(ls.alphas, ls.losses, marker=".", label=label)
            if with_acc:
                axes[1].plot(ls.alphas, ls.accuracies, marker=".", label=label)
        axes[0].set_ylabel("loss")
        if with_acc:
            axes[1].set_ylabel("accuracy (%)")
        for ax in axes:
            ax.set_xlabel("alpha (filter-normalised direction)")
            ax.grid(alpha=0.3)
            ax.legend()
    else:
        n = len(landscapes)
        fig = Figure(figsize=(4.6 * n + 1, 4.2), layout="constrained")
        axes = fig.subplots(1, n, squeeze=False)[0]
        finite = np.concatenate([ls.losses[np.isfinite(ls.losses)].ravel() for ls in landscapes.values()])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        levels = np.linspace(lo, hi if hi > lo else lo + 1.0, 21)
        cs = None
        for ax, (label, ls) in zip(axes, landscapes.items()):
            a, b = np.meshgrid(ls.alphas, ls.betas, indexing="ij")
            cs = ax.contour(a, b, ls.losses, levels=levels, cmap="viridis")
            ax.clabel(cs, fontsize=7, fmt="%.3g")
            ax.plot([0], [0], "r+")
            ax.set_title(label)
            ax.set_xlabel("alpha")
            ax.set_ylabel("beta")
            ax.set_aspect("equal")
        if cs is not None:
            fig.colorbar(cs, ax=list(axes), label="loss")
    if title:
        fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:] or "png"))
    return path


# ---------------------------------------------------------------------------------------------------------
# checkpoint drivers (used by `torchsaq landscape` / `torchsaq sharpness`)
# ---------------------------------------------------------------------------------------------------------
def _eval_transform_view(bundle: Any) -> Any:
    """The training set with the evaluation transform (no augmentation), where the dataset allows it.

    Uses the test set's ``transform`` on a shallow copy of the training set (or of the dataset under a
    ``Subset``); datasets without a ``transform`` attribute (e.g. tensor datasets) are used as they are.
    """
    train = bundle.train
    eval_tf = getattr(getattr(bundle, "test", None), "transform", None)
    inner = train.dataset if isinstance(train, torch.utils.data.Subset) else train
    if eval_tf is None or not hasattr(inner, "transform"):
        return train
    view = copy.copy(inner)
    view.transform = eval_tf
    if isinstance(train, torch.utils.data.Subset):
        return torch.utils.data.Subset(view, train.indices)
    return view


def _fixed_batches(cfg: Any, num_samples: int, batch_size: int, seed: int, device: str) -> list[Batch]:
    """The first ``num_samples`` of a ``seed``-ed permutation of the training set, in batches on ``device``."""
    from .data import build_datasets

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    bundle = build_datasets(cfg.dataset, cfg.data_dir, img_size=cfg.img_size, val_split=cfg.val_split, seed=cfg.seed,
                            augment=False)
    ds = _eval_transform_view(bundle)
    idx = torch.randperm(len(ds), generator=_generator(seed))[:num_samples].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size, shuffle=False)
    return [(x.to(device), y.to(device)) for x, y in loader]


def _labels(paths: Sequence[str]) -> list[str]:
    """Shortest path suffixes that tell the checkpoints apart (e.g. 'sgd/best.pt', 'saq/best.pt')."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def run_landscape(checkpoints: Sequence[str], output_dir: Union[str, Path], dims: int = 1, steps: int = 21,
                  span: float = 1.0, num_samples: int = 512, batch_size: int = 256, seed: int = 0,
                  where: str = "quantized", device: str = "cpu", progress: bool = True) -> dict[str, str]:
    """Landscapes of several checkpoints on one fixed training subset, same seed: one plot, .npz/.csv each.

    Returns the written paths: ``"plot"`` and ``"npz:<label>"`` / ``"csv:<label>"`` per checkpoint.
    The loss is plain cross-entropy (no label smoothing) on the training subset of the first checkpoint's
    data set, with evaluation transforms.
    """
    from .checkpoint import load_model

    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    out = Path(output_dir)
    criterion = nn.CrossEntropyLoss()
    labels = _labels(checkpoints)
    results: dict[str, Landscape] = {}
    written: dict[str, str] = {}
    batches = None
    loaded = [load_model(ckpt, device) for ckpt in checkpoints]  # all of them first: one data set or none
    kind = [(cfg.dataset, tuple(info.get("input_shape") or ()), info.get("num_classes")) for _, cfg, info in loaded]
    if len(set(kind)) > 1:
        seen = "; ".join(f"{label}: {ds} {shape}, {classes} classes"
                         for label, (ds, shape, classes) in zip(labels, kind))
        raise ValueError(f"landscape: the checkpoints are of different data sets ({seen}); "
                         "compare checkpoints of one data set")
    out.mkdir(parents=True, exist_ok=True)
    for label, ckpt, (model, cfg, _) in zip(labels, checkpoints, loaded):
        if batches is None:
            batches = _fixed_batches(cfg, num_samples, batch_size, seed, device)
        ls = loss_landscape(model, criterion, batches, dims=dims, steps=steps, span=span, seed=seed,
                            where=where, progress=progress)
        ls.meta.update(checkpoint=str(ckpt), label=label, num_samples=sum(len(x) for x, _ in batches))
        results[label] = ls
        stem = label.replace("/", "_").replace("\\", "_")
        for ext in ("npz", "csv"):
            written[f"{ext}:{label}"] = str(save_landscape(ls, out / f"landscape_{dims}d_{where}_{stem}.{ext}"))
    plot = plot_landscapes(results, out / f"landscape_{dims}d_{where}.png",
                           title=f"{dims}-D loss landscape ({where} weights, seed {seed})")
    written["plot"] = str(plot)
    return written


def run_sharpness(checkpoint: str, num_samples: int = 512, batch_size: int = 256, rho: float = 0.05,
                  m: Optional[int] = None, iters: int = 20, samples: int = 64, steps: int = 5, seed: int = 0,
                  wrt: str = "quantized", device: str = "cpu") -> dict[str, Any]:
    """All sharpness measures of one checkpoint on a fixed training subset (cross-entropy, eval mode).

    The subset is the first ``num_samples`` of a ``seed``-ed permutation of the training set, read with
    the evaluation transform (no augmentation). Returns one row for :func:`format_sharpness_table`.
    """
    from .checkpoint import load_model

    model, cfg, _ = load_model(checkpoint, device)
    batches = _fixed_batches(cfg, num_samples, batch_size, seed, device)
    criterion = nn.CrossEntropyLoss()
    loss, acc = evaluate(model, criterion, batches)
    trace, trace_se = hessian_trace(model, criterion, batches, samples=samples, wrt=wrt, seed=seed,
                                    return_stderr=True)  # type: ignore[misc]
    return {
        "checkpoint": str(checkpoint), "wrt": wrt, "num_samples": sum(len(x) for x, _ in batches),
        "loss": loss, "accuracy": acc,
        "hessian_top_eigenvalue": hessian_top_eigenvalue(model, criterion, batches, iters=iters, wrt=wrt, seed=seed),
        "hessian_trace": trace, "hessian_trace_stderr": trace_se,
        "sam_sharpness": sam_sharpness(model, criterion, batches, rho=rho, m=m, steps=steps, wrt=wrt, seed=seed),
        "rho": rho, "m": m,
    }


def format_sharpness_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`run_sharpness` results (columns: every key, in first-seen order)."""
    if not rows:
        raise ValueError("no rows to format")
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
