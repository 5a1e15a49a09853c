"""Mixed precision from sharpness: per-layer weight bits under a budget, minimising the predicted loss increase.

For each allocated layer l and each bit-width b of ``choices`` the predicted loss increase is (HAWQ-V2/V3)::

    Omega_l(b) = s_l * ||Q_b(w_l) - w_l||^2,        s_l = tr(H_ll) / n_l

with ``H_ll`` the block of the loss Hessian w.r.t. the layer's *quantized* weights Q(w_l) (the quantity SAQ makes
flat; measured as :mod:`torchsaq.analysis` does, through the quantizer) and ``n_l`` its number of weights: the
mean Hessian trace. ``Q_b`` is the layer's own grid (LSQ: signed, per output channel where the layer has
per-channel steps; LIQ: its 2^b levels on the standardised weight) at b bits with the step that minimises the
squared error (a grid search): the noise quantization-aware training starts from. The allocation minimises
sum_l Omega_l(b_l) subject to one budget, exactly (:func:`solve`: a dynamic program over the Pareto frontier of
(cost, predicted loss), no approximation):

* ``avg_bits``: the mean weight bits of the allocated layers, weighted by their number of weights;
* ``size_bytes``: the whole model's size as :func:`torchsaq.summary` counts it (quantized weights at their bits,
  every other parameter at 32 bits), in bytes;
* ``bops``: the whole model's bit-operations per sample as :func:`torchsaq.summary` counts them.

The first and last layers (``quant_role`` "first"/"last", which :class:`torchsaq.QuantConfig` gives
``first_last_bits``) and layers kept in float (32 bits) are not allocated: they keep their bits and count as a
fixed part of a ``size_bytes`` / ``bops`` budget (the official SAQ generator leaves the first and last layers
alone too). ``activations="keep"`` keeps each layer's activation bits (the allocation maps a layer to
``[w_bits, a_bits]``); ``"same"`` gives the activations the weight bits (an int: HAWQ-V3's and the official
generator's default). The predicted loss counts weight noise only, either way.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..quant.convert import is_traced
from ..quant.layers import QuantLayer, quant_layers
from ..quant.quantizer import FLOAT_BITS, LIQWeightQuantizer, check_bits, qrange

__all__ = ["allocate_bits", "allocate", "Allocation", "AllocRow", "layer_sensitivities", "quantization_noise",
           "solve", "BUDGETS", "MEASURES", "ACTIVATIONS", "FRAGMENT_MARK"]

BUDGETS = ("avg_bits", "size_bytes", "bops")
MEASURES = ("trace", "none")
ACTIVATIONS = ("keep", "same")
#: the first line of every fragment :meth:`Allocation.to_yaml` writes (``torchsaq allocate`` replaces only those)
FRAGMENT_MARK = "# torchsaq allocate:"

Batch = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------------------------
# the exact solver
# ---------------------------------------------------------------------------------------------------------
def solve(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int) -> tuple[list[int], float]:
    """``argmin sum_l values[l][k_l]`` subject to ``sum_l costs[l][k_l] <= budget``: one choice ``k_l`` per layer.

    Exact (a multiple-choice knapsack): a dynamic program over the layers that keeps, after each layer, every
    partial assignment not dominated by another (no other has both a cost <= and a value <=) and whose cost
    still leaves room for the cheapest choices of the remaining layers. Costs are integers. Returns
    (choice indices, minimal value); ties go to the lower cost. A ValueError when
    even the cheapest assignment exceeds the budget.
    """
    if len(costs) != len(values) or any(len(c) != len(v) or not c for c, v in zip(costs, values)):
        raise ValueError("solve: costs and values must give the same non-empty choices per layer")
    rest = [0] * (len(costs) + 1)  # cheapest cost of layers l.. end
    for i in range(len(costs) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(int(c) for c in costs[i])
    if rest[0] > budget:
        raise ValueError(f"the budget is too small: the cheapest allocation costs {rest[0]}, the budget {budget}")
    # one frontier per layer, as arrays: cost, value, index of the parent state in the previous frontier, choice
    cost, value = np.zeros(1, dtype=np.int64), np.zeros(1)
    links: list[tuple[np.ndarray, np.ndarray]] = []
    for i, (cs, vs) in enumerate(zip(costs, values)):
        ck, vk = np.asarray(cs, dtype=np.int64), np.asarray(vs, dtype=np.float64)
        c, v = (cost[:, None] + ck[None, :]).ravel(), (value[:, None] + vk[None, :]).ravel()
        parent, choice = np.repeat(np.arange(len(cost)), len(ck)), np.tile(np.arange(len(ck)), len(cost))
        order = np.lexsort((v, c))  # by cost, then value
        order = order[c[order] + rest[i + 1] <= budget]
        c, v, parent, choice = c[order], v[order], parent[order], choice[order]
        # keep a state only if it is strictly better than every cheaper (or equally cheap, earlier) one
        keep = v < np.concatenate(([np.inf], np.minimum.accumulate(v)[:-1]))
        cost, value = c[keep], v[keep]
        links.append((parent[keep], choice[keep]))
    at = int(np.lexsort((cost, value))[0])  # the lowest value, then the lowest cost
    best = float(value[at])
    picks = []
    for parent, choice in reversed(links):
        picks.append(int(choice[at]))
        at = int(parent[at])
    return picks[::-1], best


# ---------------------------------------------------------------------------------------------------------
# the two factors: quantization noise and sensitivity
# ---------------------------------------------------------------------------------------------------------
def _grid_noise(u: Tensor, bits: int, liq: bool, per_channel: bool, candidates: int = 64) -> float:
    """min over the clip (per output channel if ``per_channel``) of ||Q_b(u) - u||^2 on the quantizer's grid."""
    if bits == FLOAT_BITS:
        return 0.0
    x = u.detach().double().reshape(u.shape[0], -1) if per_channel else u.detach().double().reshape(1, -1)
    top = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    best = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    for a in torch.linspace(1.0 / candidates, 1.0, candidates, dtype=torch.float64):
        clip = top * a
        if liq:  # 2^b levels from -c to c, no zero level (LIQ_wn)
            n = 2**bits - 1
            q = (torch.round((torch.clamp(x / clip, -1, 1) + 1) / 2 * n) / n * 2 - 1) * clip
        else:  # LSQ's signed grid, the clip at Qp steps
            qn, qp = qrange(bits, signed=True)
            step = clip / qp
            q = torch.clamp(torch.round(x / step), qn, qp) * step
        best = torch.minimum(best, (q - x).pow(2).sum(dim=1))
    return float(best.sum())


def _layer_input(layer: QuantLayer) -> tuple[Tensor, bool, bool]:
    """(the tensor the weight quantizer rounds, LIQ grid?, per output channel?) of a layer."""
    wq = layer.weight_quantizer
    with torch.no_grad():
        u = wq.standardized(layer.weight.detach())
        if isinstance(wq, LIQWeightQuantizer):
            return u, True, False
        return u, False, wq.channel_dim is not None


def _layer_noise(layer: QuantLayer, bits: Iterable[int]) -> dict[int, float]:
    u, liq, per_channel = _layer_input(layer)
    return {b: _grid_noise(u, b, liq, per_channel) for b in bits}


def quantization_noise(model: nn.Module, choices: Iterable[int]) -> dict[str, dict[int, float]]:
    """layer name -> {bits: ||Q_b(w) - w||^2} for every quantized layer, on its own grid at the MSE-best step."""
    bits = [check_bits(b, "choices") for b in choices]
    return {name: _layer_noise(layer, bits) for name, layer in quant_layers(model)}


def layer_sensitivities(model: nn.Module, batches: Iterable[Batch], criterion: Optional[Any] = None,
                        samples: int = 32, seed: int = 0) -> dict[str, float]:
    """layer name -> mean Hessian trace tr(H_ll)/n_l w.r.t. the layer's quantized weights Q(w_l).

    Hutchinson, as :func:`torchsaq.analysis.hessian_trace`, in the space of every quantized layer's Q(w) at once:
    for a Rademacher v, v_l^T (H v)_l is an unbiased estimate of tr(H_ll), so ``samples`` Hessian-vector products
    give every layer's trace. Eval mode; the model is left unchanged.
    """
    from . import measures as ms

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    with ms._measuring(model):
        space = ms._Space(model, "quantized", include_float=False)
        data = ms._materialise(batches, ms._device(model))
        gen = ms._generator(seed)
        sums = [0.0] * len(space.names)
        for _ in range(samples):
            v = [(torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t) for t in space.zeros()]
            hv = ms._hvp(space, criterion, data, v)
            for i, (a, b) in enumerate(zip(v, hv)):
                sums[i] += float((a.double() * b.double()).sum())
    out = {}
    for i, pname in enumerate(space.names):
        layer = space.hooks[pname]
        out[layer._saq_name] = sums[i] / samples / layer.weight.numel()
    return out


# ---------------------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocRow:
    """One quantized layer of an :class:`Allocation`. ``allocated`` False: a fixed layer (first/last, float).

    ``sensitivity``: the mean Hessian trace s_l (None for a fixed layer); ``predicted``: {bits: s_l *
    ||Q_b(w) - w||^2} over the choices (empty for a fixed layer).
    """

    name: str
    type: str
    role: Optional[str]
    params: int
    macs: Optional[int]
    w_bits: int
    a_bits: int
    allocated: bool
    sensitivity: Optional[float]
    predicted: dict[int, float]


@dataclass(frozen=True)
class Allocation:
    """What :func:`allocate` chose, and why: ``str()`` is a table; :attr:`layer_bits` goes to QuantConfig.

    ``budget``: one of :data:`BUDGETS`; ``limit`` the budget in its units (mean bits, bytes, BOPs per sample) and
    ``used`` what the allocation spends in the same units (``used <= limit``); ``predicted``: the predicted loss
    increase sum_l s_l ||Q_b(w_l) - w_l||^2 of the allocation; ``uniform``: {bits: (used, predicted)} of each
    uniform allocation of the choices, for comparison.
    """

    rows: list[AllocRow]
    budget: str
    limit: float
    used: float
    predicted: float
    uniform: dict[int, tuple[float, float]]
    activations: str
    measure: str

    @property
    def layer_bits(self) -> dict[str, Union[int, list[int]]]:
        """layer name (as a glob matching only it) -> bits (``activations="same"``) or [w_bits, a_bits]."""
        import glob

        return {glob.escape(r.name): (r.w_bits if self.activations == "same" else [r.w_bits, r.a_bits])
                for r in self.rows if r.allocated}

    def _budget_text(self, value: float) -> str:
        if self.budget == "avg_bits":
            return f"{value:.4g} mean weight bits (allocated layers)"
        if self.budget == "size_bytes":
            return f"{value:,.0f} bytes ({value / 2**20:.4f} MiB)"
        return f"{value:,.0f} BOPs ({value / 1e9:.4f} GBOPs) per sample"

    def __str__(self) -> str:
        choices = sorted({b for r in self.rows for b in r.predicted})
        head = (f"{'layer':<28} {'type':<7} {'role':<5} {'params':>9} {'mean tr(H)':>10} "
                + " ".join(f"{'dL@' + str(b):>9}" for b in choices) + f" {'w':>2} {'a':>2}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            name = r.name if len(r.name) <= 28 else "..." + r.name[-25:]
            sens = "fixed" if r.sensitivity is None else format(r.sensitivity, ".3g")
            cells = " ".join(f"{format(r.predicted[b], '.3g') if b in r.predicted else '-':>9}" for b in choices)
            lines.append(f"{name:<28} {r.type:<7} {r.role or '-':<5} {r.params:>9,} {sens:>10} {cells} "
                         f"{r.w_bits:>2} {r.a_bits:>2}")
        lines.append("-" * len(head))
        lines.append(f"budget: {self._budget_text(self.limit)}; used {self._budget_text(self.used)}; "
                     f"predicted loss increase {self.predicted:.4g} (sensitivity: {self.measure}; activations: "
                     f"{self.activations})")
        for b, (used, pred) in sorted(self.uniform.items()):
            fits = "fits" if used <= self.limit + 1e-9 else "over budget"
            lines.append(f"  uniform {b}-bit: {self._budget_text(used)} ({fits}), predicted {pred:.4g}")
        return "\n".join(lines)

    def to_yaml(self, recipe: Optional[Mapping[str, Any]] = None, comment: str = "") -> str:
        """A recipe fragment for ``torchsaq train --config``: ``recipe``'s keys, then ``layer_bits`` (this
        allocation's layers, then the patterns of ``recipe["layer_bits"]`` if any: the first match wins).

        Its first line starts with :data:`FRAGMENT_MARK`; ``comment`` lines follow as YAML comments.
        """
        import yaml

        head = [f"{FRAGMENT_MARK} {self._budget_text(self.limit)}, used {self._budget_text(self.used)}, "
                f"predicted loss increase {self.predicted:.4g}"]
        head += [f"# {line}" for line in comment.splitlines()]
        body = dict(recipe or {})
        ours = self.layer_bits
        earlier = dict(body.pop("layer_bits", None) or {})  # patterns of the recipe: after ours (first match wins)
        body["layer_bits"] = {**ours, **{k: v for k, v in earlier.items() if k not in ours}}
        return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------------------------
# allocate
# ---------------------------------------------------------------------------------------------------------
def _budget(avg_bits: Optional[float], size_bytes: Optional[float], bops: Optional[float]) -> tuple[str, float]:
    given = {k: v for k, v in (("avg_bits", avg_bits), ("size_bytes", size_bytes), ("bops", bops)) if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one budget: avg_bits, size_bytes or bops"
                         + (f" (got {', '.join(given)})" if given else ""))
    ((kind, value),) = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{kind} must be a positive number, got {value!r}")
    return kind, float(value)


def _layer_cost(kind: str, layer: QuantLayer, w: int, a: int) -> int:
    """What one layer at (w, a) bits spends of a budget of this kind, in integer units (bits, or BOPs)."""
    if kind == "bops":
        if layer._saq_macs is None:
            raise ValueError("bops: the layers' MACs are unknown (run the model once)")
        return int(layer._saq_macs) * w * a
    n = layer.weight.numel() * w
    if kind == "size_bytes":  # as summary.model_size_bits: an enabled quantizer's scale counts 32 bits
        n += sum(FLOAT_BITS * q.scale.numel() for q, b in ((layer.weight_quantizer, w), (layer.act_quantizer, a))
                 if b != FLOAT_BITS)
    return n


def _model_total(kind: str, model: nn.Module) -> int:
    from ..quant.summary import bops, model_size_bits

    return bops(model) if kind == "bops" else model_size_bits(model)


def _to_units(kind: str, cost: int, fixed: int, alloc_params: int) -> float:
    """An integer cost of the allocated layers (plus the fixed part) in the budget's own units."""
    if kind == "avg_bits":
        return cost / alloc_params
    return (fixed + cost) / (8 if kind == "size_bytes" else 1)


def _check_options(choices: Sequence[int], measure: Union[str, Mapping[str, float]], activations: str) -> list[int]:
    if isinstance(choices, (str, bytes)) or not choices:
        raise ValueError(f"choices must be a non-empty list of bit-widths, got {choices!r}")
    bits = sorted({check_bits(b, "choices") for b in choices})
    if isinstance(measure, str) and measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}, or give a mapping "
                         "layer name -> sensitivity")
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; choose one of {', '.join(ACTIVATIONS)}")
    return bits


def _sensitivities(model: nn.Module, names: list[str], batches: list[Batch], measure: Union[str, Mapping[str, float]],
                   criterion: Any, samples: int, seed: int) -> tuple[dict[str, float], str]:
    if not isinstance(measure, str):
        missing = [n for n in names if n not in measure]
        if missing:
            raise ValueError(f"measure: no sensitivity given for {', '.join(missing[:3])}")
        return {n: float(measure[n]) for n in names}, "given"
    if measure == "none":
        return {n: 1.0 for n in names}, "none (1 per weight: the quantization noise alone)"
    s = layer_sensitivities(model, batches, criterion, samples=samples, seed=seed)
    # a negative estimate (non-convex point, Hutchinson noise) would reward noise: such a layer counts 0
    return {n: max(s[n], 0.0) for n in names}, f"mean Hessian trace, {samples} Hutchinson samples"


def allocate(model: nn.Module, data: Iterable[Batch], avg_bits: Optional[float] = None,
             size_bytes: Optional[float] = None, bops: Optional[float] = None,
             choices: Sequence[int] = (2, 3, 4, 8), measure: Union[str, Mapping[str, float]] = "trace",
             activations: str = "keep", criterion: Any = None, samples: int = 32, seed: int = 0,
             first_last: bool = False) -> Allocation:
    """Per-layer weight bits of a quantized model (steps initialised) that meet one budget and minimise the
    predicted loss increase; see the module docstring. Returns an :class:`Allocation` (its ``layer_bits``
    is what :func:`allocate_bits` returns).

    ``data``: (x, y) batches the Hessian is measured on (a list or a DataLoader; cross-entropy unless
    ``criterion``); ``measure``: ``"trace"`` (the mean Hessian trace, ``samples`` Hutchinson vectors), ``"none"``
    (sensitivity 1: minimise the quantization noise alone) or a mapping layer name -> sensitivity.
    ``first_last``: allocate the first and last layers too (their ``layer_bits`` entries then win over
    ``first_last_bits``); by default they keep their bits.
    """
    kind, limit = _budget(avg_bits, size_bytes, bops)
    bits = _check_options(choices, measure, activations)
    batches = list(data)
    layers = quant_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layer (call saq.quantize first)")
    if batches and (not is_traced(model) or any(m._saq_macs is None for _, m in layers)):
        from ..quant.summary import _measure_macs

        _measure_macs(model, batches[0][0][:1])
    alloc = [(n, m) for n, m in layers
             if (first_last or m.quant_role not in ("first", "last")) and m.w_bits != FLOAT_BITS]
    if not alloc:
        raise ValueError("no layer to allocate: every quantized layer is " + ("" if first_last else "first, last or ")
                         + "kept in float")
    names = [n for n, _ in alloc]
    sens, how = _sensitivities(model, names, batches, measure, criterion, samples, seed)
    pred = {n: {b: sens[n] * e for b, e in _layer_noise(m, bits).items()} for n, m in alloc}

    def a_of(m: QuantLayer, b: int) -> int:
        return b if activations == "same" else m.a_bits

    costs = [[_layer_cost(kind, m, b, a_of(m, b)) for b in bits] for _, m in alloc]
    fixed = _model_total(kind, model) - sum(_layer_cost(kind, m, m.w_bits, m.a_bits) for _, m in alloc)
    n_alloc = sum(m.weight.numel() for _, m in alloc)
    if kind == "avg_bits":
        cap = math.floor(limit * n_alloc + 1e-9 * n_alloc)
    else:
        cap = math.floor(limit * (8 if kind == "size_bytes" else 1) + 1e-9) - fixed
    try:
        picks, best = solve(costs, [[pred[n][b] for b in bits] for n in names], cap)
    except ValueError:
        least = _to_units(kind, sum(min(c) for c in costs), fixed, n_alloc)
        raise ValueError(f"{kind} budget {limit:g} is below the smallest allocation of choices {bits}: "
                         f"{least:.6g}") from None
    chosen = {n: bits[k] for n, k in zip(names, picks)}
    rows = [AllocRow(name=n, type=type(m).__name__.replace("Quant", ""), role=m.quant_role, params=m.weight.numel(),
                     macs=m._saq_macs, w_bits=chosen.get(n, m.w_bits),
                     a_bits=a_of(m, chosen[n]) if n in chosen else m.a_bits, allocated=n in chosen,
                     sensitivity=sens.get(n), predicted=pred.get(n, {})) for n, m in layers]
    used = _to_units(kind, sum(costs[i][k] for i, k in enumerate(picks)), fixed, n_alloc)
    uniform = {b: (_to_units(kind, sum(c[j] for c in costs), fixed, n_alloc), sum(pred[n][b] for n in names))
               for j, b in enumerate(bits)}
    return Allocation(rows=rows, budget=kind, limit=limit, used=used, predicted=best, uniform=uniform,
                      activations=activations, measure=how)


def allocate_bits(model: nn.Module, data: Iterable[Batch], avg_bits: Optional[float] = None,
                  size_bytes: Optional[float] = None, bops: Optional[float] = None,
                  choices: Sequence[int] = (2, 3, 4, 8), measure: Union[str, Mapping[str, float]] = "trace",
                  **options: Any) -> dict[str, Union[int, list[int]]]:
    """``layer_bits`` (layer name -> bits, or [w_bits, a_bits]) for ``QuantConfig(layer_bits=...)`` / ``--layer-bits``
    that meets exactly one budget -- ``avg_bits`` (mean weight bits of the allocated layers, weighted by their
    number of weights), ``size_bytes`` (the model size as :func:`torchsaq.summary` counts it) or ``bops`` (per
    sample, as summary counts them) -- and minimises the predicted loss increase sum_l s_l ||Q_b(w_l) - w_l||^2,
    s_l the layer's mean Hessian trace w.r.t. its quantized weights. Solved exactly. The first and last layers
    keep ``first_last_bits``. ``options``: ``activations``, ``criterion``, ``samples``, ``seed`` of :func:`allocate`.

        layer_bits = saq.allocate_bits(model, [(x, y)], avg_bits=3)
        saq.quantize(fresh_model, saq.QuantConfig(w_bits=3, a_bits=3, layer_bits=layer_bits))
    """
    return allocate(model, data, avg_bits=avg_bits, size_bytes=size_bytes, bops=bops, choices=choices,
                    measure=measure, **options).layer_bits


# ---------------------------------------------------------------------------------------------------------
# the checkpoint driver of `torchsaq allocate`
# ---------------------------------------------------------------------------------------------------------
#: the fields a fragment carries over from the checkpoint's config (what the layer names and fixed bits depend on)
_RECIPE_FIELDS = ("dataset", "data_dir", "model", "model_kwargs", "img_size", "w_bits", "a_bits", "first_last_bits",
                  "quantizer", "per_channel", "weight_standardize", "act_grad_scale", "exclude")


def check_fragment_path(path: Union[str, os.PathLike]) -> None:
    """A ValueError unless ``path`` is free or holds a fragment ``torchsaq allocate`` wrote (:data:`FRAGMENT_MARK`)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"allocate: {p} is a folder; give a file name such as allocation.yaml")
    if not p.exists():
        return
    try:
        with open(p, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        first = ""
    if not first.startswith(FRAGMENT_MARK):
        raise ValueError(f"allocate: {p} exists and was not written by torchsaq allocate; refusing to replace it")


def run_allocate(checkpoint: str, output: Optional[str], budget: dict[str, float], choices: Sequence[int],
                 activations: str = "keep", measure: str = "trace", first_last: bool = False, samples: int = 32,
                 num_samples: int = 512, batch_size: int = 256, seed: int = 0,
                 device: str = "cpu") -> tuple[Allocation, Optional[Path]]:
    """Allocate the bits of a checkpoint's model on a fixed training subset (the one ``torchsaq sharpness`` uses)
    and write the recipe fragment to ``output`` (atomically; only over a fragment written here). ``budget``:
    one of ``{"avg_bits": ..}``, ``{"size_bytes": ..}``, ``{"bops": ..}``. Returns (allocation, written path).

    The fragment holds the checkpoint's data set, model and quantization options, ``pretrained`` (the checkpoint:
    ``torchsaq train --config`` fine-tunes it at the new bits; its steps are re-initialised) and ``layer_bits``.
    """
    from .._io import atomic_write_text
    from .drivers import _fixed_batches
    from ..train.checkpoint import load_model
    from ..train.runner import CHECKPOINT_NAME

    unknown = sorted(set(budget) - set(BUDGETS))
    if unknown:
        raise ValueError(f"unknown budget {', '.join(unknown)}; give one of {', '.join(BUDGETS)}")
    _budget(*(budget.get(k) for k in BUDGETS))  # exactly one, checked before the model loads
    if output is not None:
        check_fragment_path(output)
    model, cfg, info = load_model(checkpoint, device)
    batches = _fixed_batches(cfg, num_samples, batch_size, seed, device)
    result = allocate(model, batches, avg_bits=budget.get("avg_bits"), size_bytes=budget.get("size_bytes"),
                      bops=budget.get("bops"), choices=choices, measure=measure, activations=activations,
                      samples=samples, seed=seed, first_last=first_last)
    if output is None:
        return result, None
    source = Path(checkpoint)
    source = source / CHECKPOINT_NAME if source.is_dir() else source
    recipe = {k: getattr(cfg, k) for k in _RECIPE_FIELDS if getattr(cfg, k) not in (None, [], {})}
    recipe["pretrained"] = str(source.resolve())
    if cfg.layer_bits:  # the checkpoint's own patterns still decide the layers that are not allocated
        recipe["layer_bits"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.layer_bits.items()}
    fragment = result.to_yaml(recipe, comment=(
        f"from {source} (epoch {info['epoch']}); sensitivity on {sum(len(x) for x, _ in batches)} training "
        f"samples, seed {seed}\nlayer_bits: the allocated layers"
        f"{' (the first/last keep first_last_bits)' if not first_last else ''}; "
        f"train with: torchsaq train --config {output}"))
    return result, atomic_write_text(output, fragment)
