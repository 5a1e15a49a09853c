"""Per-layer report of a quantized model: bits, steps, model size in bits and bit-operations (BOPs).

Conventions (stated so the numbers can be checked by hand):

* size: the weight of each quantized layer at its ``w_bits``; every other parameter (biases, norm
  affine parameters, layers left in float, and the scales -- LSQ steps, LIQ clips -- of the enabled
  quantizers) at 32 bits.
  Buffers (BatchNorm running statistics) are not counted: they fold into the preceding layer.
  The float size is every parameter of the float model (no steps) at 32 bits.
* BOPs per sample: sum over the quantized Conv/Linear layers of ``MACs x w_bits x a_bits``, a layer at
  32 bits counting 32. MACs per sample are recorded by the first forward pass (:func:`saq.quantize`'s
  trace), or measured now from ``example_inputs``. Operations outside Conv/Linear modules (attention
  matmuls, norms, layers excluded from quantization) are not counted.
* step columns: the spacing between adjacent quantization levels -- LSQ's step; for LIQ ``2|c|/(2^k-1)``
  for weights (in standard deviations of the weight) and ``|c|/(2^k-1)`` for unsigned activations
  (``|c|/(2^(k-1)-1)`` signed); ``token`` for dynamic per-token activations (``a_mode="dynamic_token"``: a step
  per token, computed from each input).
"""
from __future__ import annotations

import statistics
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .convert import _float_pass, is_traced, trace
from .dynamic import a_mode_of
from .layers import QuantLayer, quant_layers
from .quantizer import FLOAT_BITS, Quantizer

__all__ = ["summary", "model_size_bits", "bops", "Summary", "LayerRow"]


@dataclass(frozen=True)
class LayerRow:
    """One quantized layer of :class:`Summary`; step statistics are ``None`` before initialisation.

    Steps are the spacing between adjacent levels (LSQ's step; LIQ's clip over its number of intervals).
    """

    name: str
    type: str
    role: Optional[str]
    w_bits: int
    a_bits: int
    per_channel: bool
    params: int
    w_step_mean: Optional[float]
    w_step_min: Optional[float]
    w_step_max: Optional[float]
    a_step: Optional[float]
    a_signed: Optional[bool]
    macs: Optional[int]
    quantizer: str = "lsq"
    #: LSQ's weight group size (``pc`` shows ``g<G>``); None: per channel or per tensor
    group_size: Optional[int] = None
    #: how the input is quantized (``QuantConfig.a_mode``): "dynamic_token" (``a_step`` shows ``token``: a step per
    #: token, computed from each input; ``a_step`` is None) or "static"
    a_mode: str = "static"

    @property
    def bops(self) -> Optional[int]:
        return None if self.macs is None else self.macs * self.w_bits * self.a_bits


@dataclass(frozen=True)
class Summary:
    """Result of :func:`summary`; ``str()`` is a fixed-width table. Sizes in bits, MACs/BOPs per sample."""

    rows: list[LayerRow]
    size_bits: int
    float_bits: int
    macs: Optional[int]
    bops: Optional[int]
    other_params: int = field(default=0)

    @property
    def compression(self) -> float:
        """float32 size / quantized size."""
        return self.float_bits / self.size_bits

    def __str__(self) -> str:
        def fmt(v: Any, spec: str = "") -> str:
            return "-" if v is None else format(v, spec)

        head = (f"{'layer':<32} {'type':<8} {'q':<3} {'role':<5} {'w':>2} {'a':>2} {'pc':>2} {'params':>9} "
                f"{'w_step mean':>11} {'min':>9} {'max':>9} {'a_step':>9} {'a_sgn':>5} {'MACs':>11} {'BOPs':>14}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            name = r.name if len(r.name) <= 32 else "..." + r.name[-29:]
            lines.append(
                f"{name:<32} {r.type:<8} {r.quantizer:<3} {fmt(r.role):<5} {r.w_bits:>2} {r.a_bits:>2} "
                f"{('g' + str(r.group_size)) if r.group_size else ('y' if r.per_channel else 'n'):>2} "
                f"{r.params:>9,} {fmt(r.w_step_mean, '.3g'):>11} {fmt(r.w_step_min, '.3g'):>9} "
                f"{fmt(r.w_step_max, '.3g'):>9} {'token' if r.a_mode != 'static' else fmt(r.a_step, '.3g'):>9} "
                f"{fmt(None if r.a_signed is None else ('y' if r.a_signed else 'n')):>5} "
                f"{fmt(r.macs, ','):>11} {fmt(r.bops, ','):>14}")
        lines.append("-" * len(head))
        mib = 8 * 2**20
        lines.append(f"size: {self.size_bits:,} bits ({self.size_bits / mib:.3f} MiB); float32 parameters: "
                     f"{self.float_bits:,} bits ({self.float_bits / mib:.3f} MiB); compression {self.compression:.2f}x "
                     "(parameters only; an export file also holds buffers such as BatchNorm statistics); "
                     f"{self.other_params:,} other params at 32 bits")
        if self.bops is None or self.macs is None:
            lines.append("MACs/BOPs: unknown (run one forward pass first, or pass example_inputs)")
        else:
            lines.append(f"per sample: {self.macs:,} MACs, {self.bops:,} BOPs ({self.bops / 1e9:.3f} GBOPs; "
                         f"float32 {self.macs * FLOAT_BITS * FLOAT_BITS / 1e9:.3f} GBOPs)")
        return "\n".join(lines)


def _layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    layers = quant_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layer (call saq.quantize first)")
    return layers


@torch.no_grad()
def _measure_macs(model: nn.Module, example_inputs: Any) -> None:
    """Record MACs per sample of every quantized layer with one float forward pass (as the trace does)."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not is_traced(model):
        trace(model, *args)  # what the first forward would do; records MACs too
    else:
        _float_pass(model, *args)


def _steps(q: Quantizer) -> Optional[torch.Tensor]:
    """The learned steps of an enabled, initialised quantizer (a dynamic one has none: its steps depend on the
    input)."""
    return q.step_size().float().reshape(-1) if q.enabled and q.is_initialized and q.learned else None


def model_size_bits(model: nn.Module) -> int:
    """Model size in bits: quantized weights at their bits, every other parameter (steps included) at 32."""
    layers = _layers(model)
    quantized = {id(m.weight): m.w_bits for _, m in layers}
    disabled_steps = {id(q.scale) for _, m in layers for q in (m.weight_quantizer, m.act_quantizer) if not q.enabled}
    total = 0
    for p in model.parameters():
        if id(p) in disabled_steps:
            continue
        total += p.numel() * quantized.get(id(p), FLOAT_BITS)
    return total


def _float_bits(model: nn.Module) -> int:
    steps = {id(q.scale) for q in model.modules() if isinstance(q, Quantizer)}
    return sum(p.numel() for p in model.parameters() if id(p) not in steps) * FLOAT_BITS


def bops(model: nn.Module, example_inputs: Any = None) -> int:
    """Bit-operations per sample: sum of MACs x w_bits x a_bits over the quantized layers (32 if float)."""
    layers = _layers(model)
    if example_inputs is not None:
        _measure_macs(model, example_inputs)
    total = 0
    for _, m in layers:
        if m._saq_macs is None:
            raise ValueError("bops: MACs unknown (the model has not run a forward pass since saq.quantize); "
                             "pass example_inputs")
        total += m._saq_macs * m.w_bits * m.a_bits
    return total


def summary(model: nn.Module, example_inputs: Any = None) -> Summary:
    """Per-layer table (bits, per-channel, #params, step statistics, MACs, BOPs) plus size and BOP totals.

    ``example_inputs`` (a tensor or a tuple of inputs) is run once in eval mode to measure MACs when they
    are not known yet; without it, MACs/BOPs are ``None`` until the model has run a forward pass.
    """
    layers = _layers(model)
    if example_inputs is not None:
        _measure_macs(model, example_inputs)
    rows = []
    layer_params = 0
    for name, m in layers:
        ws, as_ = _steps(m.weight_quantizer), _steps(m.act_quantizer)
        bias = getattr(m, "bias", None)  # the nn.Conv/nn.Linear side of the layer
        n = m.weight.numel() + (bias.numel() if bias is not None else 0)
        layer_params += n
        rows.append(LayerRow(
            name=name, type=type(m).__name__.replace("Quant", ""), role=m.quant_role,
            w_bits=m.w_bits, a_bits=m.a_bits, per_channel=m.weight_quantizer.channel_dim is not None,
            params=n,
            w_step_mean=None if ws is None else statistics.fmean(ws.tolist()),
            w_step_min=None if ws is None else float(ws.min()),
            w_step_max=None if ws is None else float(ws.max()),
            a_step=None if as_ is None else float(as_.mean()),
            a_signed=m.act_quantizer.signed if m.act_quantizer.enabled else None,
            macs=m._saq_macs, quantizer=m.weight_quantizer.kind,
            group_size=getattr(m.weight_quantizer, "group_size", None),
            a_mode=a_mode_of(m.act_quantizer) if m.act_quantizer.enabled else "static"))
    float_bits = _float_bits(model)
    known = all(r.macs is not None for r in rows)
    return Summary(rows=rows, size_bits=model_size_bits(model), float_bits=float_bits,
                   macs=sum(r.macs for r in rows) if known else None,  # type: ignore[misc]
                   bops=sum(r.bops for r in rows) if known else None,  # type: ignore[misc]
                   other_params=float_bits // FLOAT_BITS - layer_params)


class _CallableModule(types.ModuleType):
    """Once ``saq.summary`` is imported as a submodule, Python binds ``saq.summary`` to it; stay callable."""

    def __call__(self, model: nn.Module, example_inputs: Any = None) -> Summary:
        return summary(model, example_inputs)


sys.modules[__name__].__class__ = _CallableModule
