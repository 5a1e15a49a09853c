"""Where a sharpness-aware perturbation goes: the one rule the optimizer and the sharpness measures share.

docs/method.md, "Sharpness-aware steps":

==========  ====================================================  ==================================
mode        direction of a quantized layer's perturbation          the perturbation is added
==========  ====================================================  ==================================
``sam``     ``p.grad`` (the layer weight is a plain parameter)      to the float weight: Q(w + e)
``case1``   ``weight.grad``, through the STE                        after quantizing: Q(w) + e
``case2``   ``weight.grad``, through the STE                        before quantizing: Q(w + e)
``case3``   the gradient w.r.t. Q(w) (captured in the forward)      after quantizing: Q(w) + e
==========  ====================================================  ==================================

:class:`Mode` holds that table: each mode is a :class:`Direction` (where the direction is read) and a
:class:`Site` (where a quantized layer's perturbation is added; ``None`` for ``sam``). :class:`Targets` is the
list of tensors one perturbation moves -- the quantized layers perturbed at the site, then the parameters
perturbed in their data (norm affine, biases, layers left in float) -- with the directions read from them,
apply / restore, and the capture of Q(w) and of its gradient.

The analysis names the site with ``where`` (:data:`WHERE`): ``"quantized"`` perturbs Q(w) (as case 3),
``"latent"`` perturbs w before quantizing (as case 2).
"""
from __future__ import annotations

import contextlib
from enum import Enum
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from . import _foreach as fe
from .._dtensor import is_dtensor, mean_over_mesh, unsharded
from ..quant.layers import QuantLayer, quant_layers
from ..quant.quantizer import Quantizer
from ..registry import Registry

__all__ = ["Site", "Direction", "Mode", "MODES", "WHERE", "site_of", "Targets", "cleared"]


class Site(Enum):
    """Where a quantized layer's perturbation is added: to the float weight or to the quantized one."""

    BEFORE = "before quantizing"  # Q(w + e): the layer's ``perturb_pre``
    AFTER = "after quantizing"    # Q(w) + e: the layer's ``perturb_post``

    def put(self, layer: QuantLayer, e: Optional[Tensor]) -> None:
        """Set (``None``: clear) the perturbation of ``layer`` at this site."""
        if self is Site.BEFORE:
            layer.perturb_pre = e
        else:
            layer.perturb_post = e

    def get(self, layer: QuantLayer) -> Optional[Tensor]:
        return layer.perturb_pre if self is Site.BEFORE else layer.perturb_post

    def reference(self, layer: QuantLayer, captured: bool = True) -> Optional[Tensor]:
        """The tensor a perturbation at this site is added to (ASAM's ``|t|``, a direction's filter norms).

        Before quantizing: ``w``. After quantizing: Q(w), the one captured by the last forward if ``captured``
        (None if none was), else computed now (no perturbation may be set on the layer).
        """
        if self is Site.BEFORE:
            return layer.weight
        if captured:
            return layer.qweight
        with torch.no_grad():
            return layer.quantized_weight().detach()


class Direction(Enum):
    """Where the direction of a quantized layer's perturbation is read after a backward pass."""

    WEIGHT_GRAD = "weight.grad"     # dL/dw, through the straight-through estimator
    QWEIGHT_GRAD = "qweight_grad"   # dL/dQ(w), accumulated in the capture probe's .grad

    def read(self, layer: QuantLayer) -> Optional[Tensor]:
        return layer.weight.grad if self is Direction.WEIGHT_GRAD else layer.qweight_grad

    @property
    def captured(self) -> bool:
        """Whether the direction is a buffer of the capture (the optimizer may overwrite it)."""
        return self is Direction.QWEIGHT_GRAD


class Mode(Enum):
    """The four perturbation modes (see the module docstring), registered by name in :data:`MODES` with their
    descriptions; the members name them for the rule table."""

    SAM = "sam"
    CASE1 = "case1"
    CASE2 = "case2"
    CASE3 = "case3"

    @classmethod
    def parse(cls, name: str) -> "Mode":
        if isinstance(name, Mode):
            return name
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}") from None

    @property
    def direction(self) -> Optional[Direction]:
        return _RULES[self][0]

    @property
    def site(self) -> Optional[Site]:
        return _RULES[self][1]

    def needs_capture(self, adaptive: bool) -> bool:
        """Whether a pass must capture Q(w) and its gradient: for the direction (case 3) or ASAM's T (case 1)."""
        return self.direction is Direction.QWEIGHT_GRAD or (adaptive and self.site is Site.AFTER)


_RULES: dict[Mode, tuple[Optional[Direction], Optional[Site]]] = {
    Mode.SAM: (None, None),
    Mode.CASE1: (Direction.WEIGHT_GRAD, Site.AFTER),
    Mode.CASE2: (Direction.WEIGHT_GRAD, Site.BEFORE),
    Mode.CASE3: (Direction.QWEIGHT_GRAD, Site.AFTER),
}

#: the sharpness-aware modes (``saq.SAQ(mode=...)``, ``--sharpness`` beside "none"): name -> :class:`Mode`
MODES: Registry[Mode] = Registry("mode")
MODES.register("sam", Mode.SAM, description="SAM: perturb the float weights (and steps) along their gradient")
MODES.register("case1", Mode.CASE1,
               description="case 1 (mismatch): gradient w.r.t. w through the STE, added after quantizing")
MODES.register("case2", Mode.CASE2,
               description="case 2 (diminishment): gradient w.r.t. w through the STE, added before quantizing")
MODES.register("case3", Mode.CASE3, description="case 3, SAQ: gradient w.r.t. Q(w), added after quantizing")

#: which weights the sharpness measures and loss landscapes perturb (``torchsaq.analysis``: ``wrt``/``where``):
#: name -> the :class:`Site` (Q(w) as case 3, or w before quantizing as case 2)
WHERE: Registry[Site] = Registry("where")
WHERE.register("quantized", Site.AFTER, description="the quantized weights Q(w)")
WHERE.register("latent", Site.BEFORE, description="the float (latent) weights w, before quantization")


def site_of(where: str, what: str = "where") -> Site:
    """The :class:`Site` a ``where`` of :data:`WHERE` names; ValueError (naming ``what``) for anything else."""
    if where not in WHERE:
        raise ValueError(f"{what} must be one of {', '.join(WHERE)}, got {where!r}")
    return WHERE.get(where)


def _global_direction(g: Tensor, weight: Tensor) -> Tensor:
    """The direction ``g`` of a layer whose ``weight`` is sharded (FSDP2) as the plain, unsharded tensor of the
    whole batch, the same on every rank: ``weight.grad`` (sharded, already averaged over the ranks) gathered, or
    the gradient w.r.t. Q(w) (captured in the forward from this rank's batch: unsharded) averaged over the ranks
    in place (a buffer of the capture)."""
    return unsharded(g) if is_dtensor(g) else mean_over_mesh(g, weight)


_WEIGHT_LAYERS = (QuantLayer, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Targets:
    """The tensors one perturbation moves, in a fixed order: ``layers`` (perturbed at ``site`` through the
    layer), then ``params`` (perturbed in their data). A perturbation is a list aligned with that order
    (``None``: that target is not perturbed)."""

    def __init__(self, layers: Sequence[QuantLayer], params: Sequence[Tensor], site: Optional[Site],
                 direction: Optional[Direction] = None):
        if layers and site is None:
            raise ValueError("quantized layers are perturbed at a site")
        self.layers = list(layers)
        self.params = list(params)
        self.site = site
        self.direction = direction
        self._saved = fe.Snapshot()   # the data-perturbed parameters while perturbed
        self._hooked: list[QuantLayer] = []

    @classmethod
    def select(cls, module: nn.Module, mode: Mode | Site | None, candidates: Iterable[Tensor], *,
               unquantized: bool = True, steps: bool = False, weights_only: bool = False) -> "Targets":
        """The targets among ``candidates`` (parameters of ``module``), in their order.

        A quantized layer whose weight is a candidate is perturbed at the site (a :class:`Mode`, or a bare
        :class:`Site` for a measure); with mode ``sam`` (or no site) its weight is a plain parameter. Of the
        other candidates: quantizer steps/clips if ``steps``; the rest if ``unquantized`` (1-D ones not if
        ``weights_only``), and in mode ``sam`` the weights of Conv/Linear layers whatever ``unquantized`` says.
        """
        site = mode.site if isinstance(mode, Mode) else mode
        direction = mode.direction if isinstance(mode, Mode) else None
        candidates = list(candidates)
        ids = {id(p) for p in candidates}
        layers = [m for _, m in quant_layers(module) if id(m.weight) in ids] if site is not None else []
        hooked = {id(m.weight) for m in layers}
        step_ids = {id(q.scale) for q in module.modules() if isinstance(q, Quantizer)}
        weight_ids = {id(m.weight) for m in module.modules() if isinstance(m, _WEIGHT_LAYERS)}
        params = []
        for p in candidates:
            if id(p) in hooked:
                continue
            if id(p) in step_ids:
                if steps:
                    params.append(p)
            elif (unquantized and not (weights_only and p.dim() <= 1)) or (site is None and id(p) in weight_ids):
                params.append(p)
        return cls(layers, params, site, direction)

    def __len__(self) -> int:
        return len(self.layers) + len(self.params)

    def tensors(self) -> list[Tensor]:
        """The tensor of each target: the layer's float weight, or the parameter."""
        return [m.weight for m in self.layers] + self.params

    # -- directions -----------------------------------------------------------------------------------------
    def directions(self, adaptive: bool, clobber: bool
                   ) -> tuple[list[int], list[Tensor], Optional[list[Tensor]], list[bool]]:
        """What the last backward left: (target index, direction, reference for ASAM or None, may overwrite).

        Targets without a gradient are left out. ``clobber``: the parameters' ``.grad`` may be overwritten
        (a captured gradient w.r.t. Q(w) always may).

        FSDP2 (a layer's weight is a DTensor outside the forward): a layer's perturbation is added in the forward
        to the unsharded weight, so its direction (and ASAM's reference) is the unsharded, global one
        (:func:`_global_direction`); the parameters perturbed in their data keep their sharded ``.grad``.
        """
        idx: list[int] = []
        srcs: list[Tensor] = []
        refs: list[Tensor] = []
        owned: list[bool] = []
        for j, layer in enumerate(self.layers):
            assert self.direction is not None and self.site is not None
            g = self.direction.read(layer)
            if g is None:
                continue
            if is_dtensor(layer.weight):
                g = _global_direction(g, layer.weight)
            if adaptive:
                w = self.site.reference(layer)
                if w is None:
                    raise RuntimeError(f"the perturbation {self.site.value} with adaptive=True needs the "
                                       "quantized weight of the pass, but a layer ran without capturing it")
                refs.append(unsharded(w))
            idx.append(j)
            srcs.append(g)
            owned.append(self.direction.captured or clobber)
        h = len(self.layers)
        for j, p in enumerate(self.params):
            if p.grad is None:
                continue
            idx.append(h + j)
            srcs.append(p.grad)
            if adaptive:
                refs.append(p)
            owned.append(clobber)
        return idx, srcs, (refs if adaptive else None), owned

    def per_target(self, idx: Sequence[int], es: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """The perturbations ``es`` of targets ``idx`` as a list over all targets (None: not perturbed)."""
        full: list[Optional[Tensor]] = [None] * len(self)
        for j, e in zip(idx, es):
            full[j] = e
        return full

    # -- apply / restore ------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether a perturbation is applied."""
        return self._saved.active or bool(self._hooked)

    @torch.no_grad()
    def apply(self, es: Sequence[Optional[Tensor]]) -> None:
        """Add a per-target perturbation: data in place (a copy kept for a bit-exact restore), layers at the site."""
        h = len(self.layers)
        data = [(self.params[j - h], e) for j, e in enumerate(es) if j >= h and e is not None]
        if data:
            ps = [p for p, _ in data]
            self._saved.take(ps)
            fe.foreach(torch._foreach_add_, ps, [e for _, e in data])
        for layer, e in zip(self.layers, es[:h]):
            if e is not None:
                self.site.put(layer, e)  # type: ignore[union-attr]
                self._hooked.append(layer)

    @torch.no_grad()
    def restore(self) -> None:
        """Remove whatever perturbation is applied: data-perturbed parameters bit-exact, layer sites cleared."""
        self._saved.put_back()
        for layer in self._hooked:
            self.site.put(layer, None)  # type: ignore[union-attr]
        self._hooked = []

    @contextlib.contextmanager
    def at_layers(self, deltas: Sequence[Optional[Tensor]]) -> Iterator[None]:
        """Within the block, each layer computes with its perturbation of ``deltas`` (aligned with ``layers``)."""
        try:
            for layer, d in zip(self.layers, deltas):
                self.site.put(layer, d)  # type: ignore[union-attr]
            yield
        finally:
            for layer in self.layers:
                self.site.put(layer, None)  # type: ignore[union-attr]

    # -- capture of Q(w) and its gradient -------------------------------------------------------------------
    def capture(self, on: bool) -> None:
        """Make the layers' next forward passes keep Q(w) (``qweight``) and its gradient (``qweight_grad``)."""
        for layer in self.layers:
            layer.capture_qweight = on

    def drop_captures(self) -> None:
        for layer in self.layers:
            layer.zero_qweight_grad()
            layer.qweight = None


@contextlib.contextmanager
def cleared(model: nn.Module) -> Iterator[None]:
    """Within the block no quantized layer of ``model`` is perturbed or captures; their state comes back after."""
    layers = [m for _, m in quant_layers(model)]
    saved = [(m.perturb_pre, m.perturb_post, m.capture_qweight) for m in layers]
    try:
        for m in layers:
            m.perturb_pre, m.perturb_post, m.capture_qweight = None, None, False
        yield
    finally:
        for m, (pre, post, cap) in zip(layers, saved):
            m.perturb_pre, m.perturb_post, m.capture_qweight = pre, post, cap
