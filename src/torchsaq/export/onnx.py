"""ONNX export of a quantized model: a graph (opset >= 21) that onnxruntime runs, in two flavours.

``saq.export(model, "model.onnx", example_inputs=(x,))`` (or ``torchsaq export CHECKPOINT model.onnx``) writes the
float graph of the model (traced by ``torch.onnx.export``'s TorchScript exporter) in which every quantized
layer computes with

* ``onnx_mode="compact"`` (default): its weight as an integer initializer through ``DequantizeLinear``
  (per-channel ``axis`` where the LSQ step is per channel), in the container of its bit width: INT4/UINT4 at
  2..4 bits, INT8/UINT8 at 5..8 bits. LSQ: ``value = code * step``, codes in the signed b-bit range. LIQ
  (LIQ_wn) has the 2^k levels ``(2c/(2^k-1) - 1) * |clip|``, ``c = 0..2^k-1``, symmetric with no zero level: an
  integer zero point cannot express that half-step offset. Where they fit the container (k = 2, 3, 5, 6, 7) the
  levels are stored as the odd integers ``2c - (2^k-1)`` with scale ``|clip| / (2^k-1)`` (plain QDQ); at k = 4
  and 8 the odd integers (up to 15 and 255) would need the next container, so the codes ``c`` are stored (UINT4
  / UINT8) with scale ``2|clip| / (2^k-1)`` and zero point ``2^(k-1) - 1``, and an ``Add`` of ``-|clip| /
  (2^k-1)`` after the DequantizeLinear supplies the half step. Its input goes through ``QuantizeLinear ->
  DequantizeLinear -> Clip`` with the learned step and zero point 0, in UINT8 / INT8 (unsigned where the
  quantizer is) at every bit width, the Clip to ``[lo*s, hi*s]`` keeping the low-bit code range;
* ``onnx_mode="fast"``: its input as uint8 codes (``QuantizeLinear`` then a ``Clip`` on the integers; signed
  codes carry a zero point of 128) and its weight codes in an 8-bit initializer, into ``ConvInteger`` /
  ``MatMulInteger``; the exact int32 sums are cast to float and multiplied by ``input_step * weight_step`` (per
  output channel), then the bias is added: the numbers of the low-bit model on integer kernels. Layers without
  an integer form (a float input or weight, LIQ at 8 bits, grouped convolutions) keep the compact form.

In both flavours a Linear layer whose LSQ weight is quantized in groups (``QuantConfig(group_size=...)``) becomes
onnxruntime's ``com.microsoft.MatMulNBits`` (block = the group size, a power of two >= 16; 4-bit blocks for
2..4-bit codes with its default zero point 8, 8-bit blocks with zero point 128 for 5..8 bits), one scale per
block, at its default accuracy level (float activations): onnxruntime's blockwise low-bit CPU kernel.

Why the graph has this shape (onnxruntime 1.32's transformers, docs/onnx.md): nothing computes directly on a
``DequantizeLinear`` output. A Conv/Gemm/MatMul reading DQ'd inputs is a "QDQ node group" that onnxruntime
may rewrite with a meaning of its own (WeightBiasQuantization rounds a float bias to ``input_scale *
weight_scale``; DQMatMulToMatMulNBits quantizes the activations to int8 at accuracy level 4); a 4-bit Q/DQ pair
next to MaxPool is moved across it by QDQ propagation and MaxPool then runs on uint4, which it cannot. Hence the
8-bit activation containers, the Clip after every activation DQ, and for Linear weights a Clip to the weight's
own [min, max] (it changes no value).

Weight standardisation (LIQ's detached per-tensor one, LSQ's ``weight_standardize``) is folded in: the codes
are those of the standardised weight the layer computes with. Everything else (BatchNorm, LayerNorm, biases,
layers left in float) stays float32. ``quantized=False`` exports the same model in float32 (the layers' float
weights, no quantizers): the baseline for size and speed.
"""
from __future__ import annotations

import io as _io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_write
from .common import ExportInfo, PathLike, checked_layers, float_bytes, quantizer_prefixes, unwrap
from ..quant.convert import eval_mode
from ..quant.dynamic import TOKEN_EPS, dynamic_token_fake_quant
from ..quant.layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLayer, QuantLinear
from ..quant.quantizer import STEP_EPS, AffineCodes

__all__ = ["export_onnx", "ONNX_FORMAT", "ONNX_MODES", "MIN_OPSET", "CONTAINERS", "onnx_layers", "onnx_metadata",
           "OnnxModel", "OnnxIO"]

ONNX_FORMAT = "saq-onnx"
#: INT4/UINT4 Quantize/DequantizeLinear exist from opset 21
MIN_OPSET = 21
#: integer containers, narrowest first, with the range each holds
CONTAINERS: dict[str, tuple[int, int]] = {
    "UINT4": (0, 15), "INT4": (-8, 7), "UINT8": (0, 255), "INT8": (-128, 127)}
_TORCHSCRIPT_OPSET = 20  # the highest opset the TorchScript exporter knows; the graph is converted after
_MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulNBits)
_DOMAIN = "saq"  # custom ops that mark the quantized layers in the exported graph, replaced before saving



def _onnx():
    """The ``onnx`` package, or an ImportError saying how to install it."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("ONNX export needs the onnx package: pip install 'torchsaq[onnx]' "
                          "(onnx and onnxruntime)") from e
    return onnx


# -- what each quantized layer becomes ------------------------------------------------------------------
@dataclass
class _Weight:
    """A weight as integers (storage layout: Linear transposed to (in, out)) and their DequantizeLinear scale."""

    ints: Tensor  # int64 tensor of whole numbers
    scale: Tensor  # float32, 0-d (per tensor) or 1-D (per channel along ``axis``)
    axis: Optional[int]
    container: str
    bits: int
    zero_point: int = 0
    shift: Optional[Tensor] = None  # float32 0-d added after DequantizeLinear (LIQ at 4 and 8 bits)
    block: Optional[int] = None  # group-wise (Linear): scale (out, in/block), written as MatMulNBits
    gather: bool = False  # an embedding table (rows, dim), not transposed: group-wise, GatherBlockQuantized

    def values(self) -> Tensor:
        """What the graph computes: (ints - zero_point) * scale (+ shift)."""
        if self.block is not None and self.gather:  # ints (rows, dim), one scale per block of a row
            rows, dim = self.ints.shape
            return (self.ints.reshape(rows, dim // self.block, self.block).float()
                    * self.scale.unsqueeze(-1)).reshape(rows, dim)
        if self.block is not None:  # ints (in, out), one scale per block of `block` inputs of each output
            k, n = self.ints.shape
            v = self.ints.t().reshape(n, k // self.block, self.block).float() * self.scale.unsqueeze(-1)
            return v.reshape(n, k).t()
        s = self.scale
        if self.axis is not None:
            shape = [1] * self.ints.dim()
            shape[self.axis] = -1
            s = s.view(shape)
        v = (self.ints - self.zero_point).float() * s
        return v if self.shift is None else v + self.shift


@dataclass
class _Act:
    """An input quantizer as QuantizeLinear -> DequantizeLinear -> Clip with a per-tensor scale, zero point 0."""

    scale: Tensor  # float32, 0-d
    lo: int
    hi: int
    container: str  # UINT8 or INT8 whatever the bit width: see _act_plan
    bits: int
    #: int8 per token, computed from the input (``a_mode="dynamic_token"``): float ops, see _act_dynamic_token
    dynamic: bool = False


def _weight_plan(layer: QuantLayer) -> Optional[_Weight]:
    """The integer weight of ``layer`` (None if its weight stays float)."""
    wq = layer.weight_quantizer
    if not wq.enabled:
        return None
    w = layer.weight.detach().float()
    codes = wq.integer(w).to(torch.int64)  # LIQ standardises inside integer()
    width = 4 if wq.bits <= 4 else 8
    for form in wq.affine(codes):  # the first form whose integers fit the narrowest container of their sign
        if form.block_size is not None:
            return _nbits_plan(layer, form)
        container = f"{'INT' if form.lo < 0 else 'UINT'}{width}"
        if CONTAINERS[container][0] <= form.lo and form.hi <= CONTAINERS[container][1]:
            break
    else:
        raise ValueError(f"ONNX export: no QDQ form for the {type(wq).__name__} weight quantizer")
    ints, scale, axis, zero_point, shift = form.ints, form.scale, form.axis, form.zero_point, form.shift
    if isinstance(layer, nn.Linear):  # MatMul(x, W^T): store (in, out), per-channel along the columns
        ints = ints.t().contiguous()
        axis = None if axis is None else 1 - axis
    lo, hi = CONTAINERS[container]
    if ints.numel() and not (lo <= int(ints.min()) and int(ints.max()) <= hi):  # pragma: no cover - a bug if hit
        raise AssertionError(f"{layer} weight integers outside {container}")
    return _Weight(ints=ints, scale=scale, axis=axis, container=container, bits=wq.bits,
                   zero_point=zero_point, shift=shift)


def _nbits_plan(layer: QuantLayer, form: AffineCodes) -> _Weight:
    """A group-wise weight as onnxruntime's ``com.microsoft.MatMulNBits`` (Linear) or ``GatherBlockQuantized``
    (Embedding) takes it: 4-bit codes (2..4-bit LSQ codes, within [-8, 7], stored with the default zero point 8)
    or 8-bit codes (5..8 bits, zero point 128) in blocks of ``group_size`` inputs, one scale per block. Only
    Linear and Embedding layers and group sizes that are powers of two >= 16."""
    block = form.block_size
    assert block is not None
    name = getattr(layer, "_saq_name", type(layer).__name__)
    if (not isinstance(layer, (nn.Linear, nn.Embedding)) or form.lo < -128 or form.hi > 127 or block < 16
            or block & (block - 1)):
        raise ValueError(f"ONNX export: layer {name} quantizes its weight in groups of {block} (group_size): the "
                         "ONNX export writes group-wise weights as MatMulNBits / GatherBlockQuantized, which take "
                         "Linear / Embedding layers with signed weight codes and a group size that is a power of "
                         "two >= 16; export to .safetensors")
    container = "UINT4" if form.lo >= -8 and form.hi <= 7 else "UINT8"
    gather = isinstance(layer, nn.Embedding)
    return _Weight(ints=form.ints.contiguous() if gather else form.ints.t().contiguous(), scale=form.scale.float(),
                   axis=None, container=container, bits=layer.w_bits, block=block, gather=gather)


def _matmul_nbits(b: _Nodes, layer: str, w: _Weight, node: Any, accuracy_level: int = 0) -> None:
    """Replace ``node`` (the layer's MatMul reading its weight marker) by ``com.microsoft.MatMulNBits`` (with its
    ``accuracy_level`` attribute where it is not 0, the default: float activations)."""
    assert w.block is not None
    k, n = w.ints.shape
    bits = 4 if w.container == "UINT4" else 8
    q = (w.ints.t().reshape(n, k // w.block, w.block) + 2 ** (bits - 1)).to(torch.uint8)  # + the default zero point
    packed = (q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q).numpy()  # low nibble first, along K
    onnx = _onnx()
    bq = b.init(f"{layer}.weight_nbits", lambda nm: onnx.numpy_helper.from_array(packed, nm))
    s = b.init(f"{layer}.weight_scale", lambda nm: _float_initializer(nm, w.scale))
    b.nodes.append(onnx.helper.make_node("MatMulNBits", [node.input[0], bq, s], [node.output[0]],
                                         name=f"{layer}/MatMulNBits", domain=_MS_DOMAIN, K=k, N=n, bits=bits,
                                         block_size=w.block,
                                         **({"accuracy_level": accuracy_level} if accuracy_level else {})))


def _gather_nbits(b: _Nodes, layer: str, w: _Weight, node: Any) -> None:
    """Replace ``node`` (the embedding's Gather reading its weight marker) by ``com.microsoft.GatherBlockQuantized``:
    the rows it reads, dequantized (uint8 data, two 4-bit codes a byte, low nibble first, with the default zero
    point 2^(bits-1))."""
    assert w.block is not None
    rows, dim = w.ints.shape
    bits = 4 if w.container == "UINT4" else 8
    q = (w.ints + 2 ** (bits - 1)).to(torch.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4) if bits == 4 else q).contiguous().numpy()
    onnx = _onnx()
    bq = b.init(f"{layer}.weight_nbits", lambda nm: onnx.numpy_helper.from_array(packed, nm))
    s = b.init(f"{layer}.weight_scale", lambda nm: _float_initializer(nm, w.scale))
    b.nodes.append(onnx.helper.make_node("GatherBlockQuantized", [bq, node.input[1], s], [node.output[0]],
                                         name=f"{layer}/GatherBlockQuantized", domain=_MS_DOMAIN, bits=bits,
                                         block_size=w.block, gather_axis=0, quantize_axis=1))


def _act_plan(layer: QuantLayer, name: str) -> Optional[_Act]:
    """The input QDQ of ``layer`` (None if its input stays float)."""
    aq = layer.act_quantizer
    if not aq.enabled:
        return None
    if aq.channel_dim is not None:
        raise ValueError(f"ONNX export: layer {name} has a per-channel activation quantizer (not supported)")
    lo, hi = aq.code_range()
    if not aq.learned:  # dynamic per token: its scales are computed in the graph
        return _Act(scale=torch.ones(()), lo=lo, hi=hi, container="INT8", bits=aq.bits, dynamic=True)
    scale = aq.step_size().float().clamp_min(STEP_EPS).reshape(())  # LSQ's step, LIQ's |clip| / levels
    # 8-bit containers at every bit width (the Clip after DequantizeLinear keeps the low-bit range): onnxruntime's
    # QDQ propagation moves an activation's Q/DQ pair across MaxPool/Reshape/Transpose/... and then runs that op on
    # the integers, which has no 4-bit kernel (the session fails to load); at 8 bits that is exact (see docs/onnx.md)
    return _Act(scale=scale, lo=lo, hi=hi, container="INT8" if lo < 0 else "UINT8", bits=aq.bits)


@dataclass
class _Fast:
    """A layer of the fast flavour: uint8 activation codes and 8-bit weight codes into ConvInteger/MatMulInteger,
    whose exact int32 sums are scaled back to float by ``input_scale * weight_scale`` (per channel)."""

    ints: Tensor  # int64 weight codes, storage layout (Linear: (in, out)), within the container with zero point
    container: str  # UINT8 (ConvInteger: onnxruntime's fast kernel is u8u8) or INT8 (MatMulInteger: u8s8)
    zero_point: int
    out_scale: Tensor  # float32 0-d or 1-D (per output channel)
    a_scale: Tensor
    a_zero_point: int  # 0 (unsigned codes) or 128 (signed codes shifted into UINT8)
    a_lo: int  # the code range in the UINT8 container (zero point added)
    a_hi: int


def _fast_plan(layer: QuantLayer, w: Optional[_Weight], a: Optional[_Act]) -> Optional[_Fast]:
    """The integer-kernel form of a layer, or None where it stays on float kernels: a float weight or input, LIQ at
    8 bits (odd integers up to 255), grouped/depthwise convolutions (onnxruntime's ConvInteger runs them as one
    im2col + GEMM per group: several times slower than its float depthwise kernel)."""
    if w is None or a is None or a.dynamic or getattr(layer, "groups", 1) != 1 or w.block is not None:
        return None
    ints, scale = w.ints, w.scale
    if w.shift is not None:  # LIQ at 4/8 bits: (c - z) * S - S/2 = (2c - n) * S/2, the odd integers, n = 2z + 1
        ints, scale = 2 * ints - (2 * w.zero_point + 1), scale / 2
    elif w.zero_point:  # pragma: no cover - only LIQ has a weight zero point, and always with its half step
        return None
    if int(ints.min()) < -128 or int(ints.max()) > 127:  # LIQ at 8 bits: odd integers up to 255
        return None
    conv = not isinstance(layer, nn.Linear)
    out_scale = a.scale * scale
    if conv and out_scale.dim():  # per output channel, broadcast over (C, spatial...)
        out_scale = out_scale.reshape([-1] + [1] * (ints.dim() - 2))
    shift = 128 if a.lo < 0 else 0
    return _Fast(ints=ints + 128 if conv else ints, container="UINT8" if conv else "INT8",
                 zero_point=128 if conv else 0, out_scale=out_scale, a_scale=a.scale, a_zero_point=shift,
                 a_lo=a.lo + shift, a_hi=a.hi + shift)


# -- the traced graph: custom ops mark where the quantizers go -----------------------------------------
#: the dequantized weight each marker returns while tracing, by layer (kept out of the traced graph: as a traced
#: constant every weight would be in the graph in float32, a model of 1 GB a graph over protobuf's 2 GB)
_TRACE_VALUES: dict[str, Tensor] = {}


class _WeightDQ(torch.autograd.Function):
    """Forward: the dequantized weight; in the ONNX graph a ``saq::WeightDQ`` node replaced after export. Its only
    tensor input is a one-element placeholder; the values come from :data:`_TRACE_VALUES`."""

    @staticmethod
    def forward(ctx: Any, placeholder: Tensor, layer: str, shape: str) -> Tensor:
        state = torch._C._get_tracing_state()  # (a tensor from outside the trace, read untraced: the op's output)
        set_state = getattr(torch._C, "_set_tracing_state")
        set_state(None)
        try:
            return _TRACE_VALUES.pop(layer).clone()
        finally:
            set_state(state)

    @staticmethod
    def symbolic(g: Any, placeholder: Any, layer: str, shape: str) -> Any:  # shape: "rows,cols" (the tracer
        out = g.op(f"{_DOMAIN}::WeightDQ", placeholder, layer_s=layer)  # keeps strings, not lists, as arguments)
        out.setType(placeholder.type().with_sizes([int(d) for d in shape.split(",")]))
        return out


class _ActQDQ(torch.autograd.Function):
    """Forward: round(clamp(x/s, lo, hi)) * s; in the ONNX graph a ``saq::ActQDQ`` node replaced after export."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, lo: int, hi: int, layer: str) -> Tensor:
        return torch.div(x, scale.to(x.dtype)).clamp(lo, hi).round() * scale.to(x.dtype)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, lo: int, hi: int, layer: str) -> Any:
        out = g.op(f"{_DOMAIN}::ActQDQ", x, layer_s=layer)
        out.setType(x.type())
        return out


class _ActDynamicToken(torch.autograd.Function):
    """Forward: the per-token int8 fake-quantization; in the ONNX graph a ``saq::ActDynamicToken`` node replaced
    after export."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: str) -> Tensor:
        return dynamic_token_fake_quant(x)

    @staticmethod
    def symbolic(g: Any, x: Any, layer: str) -> Any:
        out = g.op(f"{_DOMAIN}::ActDynamicToken", x, layer_s=layer)
        out.setType(x.type())
        return out


class _OnnxLayer:
    """Mixin swapped in for the export: the layer's forward with the marked QDQ (or in float)."""

    _onnx_name: str
    _onnx_weight: Optional[_Weight]
    _onnx_act: Optional[_Act]
    _onnx_float: bool

    def forward(self, x: Tensor) -> Tensor:
        layer: Any = self
        if self._onnx_float:
            return layer._float_forward(x, layer.weight)
        if self._onnx_act is not None and self._onnx_act.dynamic:
            x = _ActDynamicToken.apply(x, self._onnx_name)
        elif self._onnx_act is not None:
            a = self._onnx_act
            x = _ActQDQ.apply(x, a.scale, a.lo, a.hi, self._onnx_name)
        if self._onnx_weight is None:
            return layer._float_forward(x, layer.weight_quantizer(layer.weight))
        values = self._onnx_weight.values()
        _TRACE_VALUES[self._onnx_name] = values
        w = _WeightDQ.apply(values.new_zeros(()), self._onnx_name, ",".join(str(int(d)) for d in values.shape))
        if isinstance(self, nn.Linear):  # w is (in, out): MatMul without a Transpose in the graph
            out = torch.matmul(x, w)
            return out if layer.bias is None else out + layer.bias
        return layer._float_forward(x, w)


class _OnnxConv1d(_OnnxLayer, QuantConv1d):
    pass


class _OnnxConv2d(_OnnxLayer, QuantConv2d):
    pass


class _OnnxLinear(_OnnxLayer, QuantLinear):
    pass


class _OnnxEmbedding(_OnnxLayer, QuantEmbedding):
    pass


_EXPORT_CLASSES: dict[type, type] = {QuantConv1d: _OnnxConv1d, QuantConv2d: _OnnxConv2d, QuantLinear: _OnnxLinear,
                                     QuantEmbedding: _OnnxEmbedding}


# -- rewriting the traced graph ---------------------------------------------------------------------------
def _int_initializer(name: str, ints: np.ndarray, container: str) -> Any:
    """An integer initializer; 4-bit values packed two per byte, first element in the low nibble (ONNX spec)."""
    onnx = _onnx()
    TP = onnx.TensorProto
    dims = list(ints.shape)
    flat = np.ascontiguousarray(ints, dtype=np.int64).reshape(-1)
    if container in ("INT4", "UINT4"):
        nib = (flat & 0xF).astype(np.uint8)
        if nib.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        raw = (nib[0::2] | (nib[1::2] << 4)).tobytes()
        return onnx.helper.make_tensor(name, getattr(TP, container), dims, raw, raw=True)
    dtype = {"INT8": np.int8, "UINT8": np.uint8}[container]
    return onnx.numpy_helper.from_array(flat.astype(dtype).reshape(dims), name)


def _float_initializer(name: str, t: Tensor) -> Any:
    return _onnx().numpy_helper.from_array(t.detach().cpu().float().numpy(), name)


def _used_names(graph: Any) -> set[str]:
    """Every value name a node (in ``graph`` or its subgraphs) reads, and the graph outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used |= _used_names(sub)
    return used


class _Nodes:
    """The node list and the initializers being built by :func:`_rewrite` (each initializer added once)."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._made: set[str] = set()

    def init(self, name: str, make: Any) -> str:
        """Add the initializer ``make(name)`` unless one of that name exists already; returns ``name``."""
        if name not in self._made:
            self._made.add(name)
            self.inits.append(make(name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        self.nodes.append(_onnx().helper.make_node(op, inputs, outputs, name=name, **attrs))


def _weight_dq(b: _Nodes, layer: str, w: _Weight, out: str, shield: bool) -> None:
    """The integer weight through DequantizeLinear (then an Add of the half step for LIQ at 4 and 8 bits).

    ``shield`` (Linear layers): then a Clip that changes nothing. A MatMul/Gemm whose only DequantizeLinear input
    is its weight is what onnxruntime's DQMatMulToMatMulNBits fuses into MatMulNBits, at accuracy level 4 by
    default: int8 blockwise quantization of the activations, another model.
    """
    q = b.init(f"{layer}.weight_quantized", lambda n: _int_initializer(n, w.ints.numpy(), w.container))
    s = b.init(f"{layer}.weight_scale", lambda n: _float_initializer(n, w.scale))
    inputs = [q, s]
    if w.zero_point:
        z = f"{layer}.weight_zero_point"
        inputs.append(b.init(z, lambda n: _int_initializer(n, np.full((), w.zero_point), w.container)))
    kw: dict[str, Any] = {} if w.axis is None else {"axis": w.axis}
    dq = out if w.shift is None and not shield else f"{layer}/weight_dq_out"
    b.node("DequantizeLinear", inputs, [dq], f"{layer}/weight_dq", **kw)
    if w.shift is not None:
        shift = w.shift
        sh = b.init(f"{layer}.weight_shift", lambda n: _float_initializer(n, shift))
        b.node("Add", [dq, sh], [f"{layer}/weight_shifted" if shield else out], f"{layer}/weight_shift")
        dq = f"{layer}/weight_shifted"
    if shield:  # a Clip to the weight's own [min, max]: changes no value, and no DequantizeLinear feeds the MatMul
        v = w.values()
        lo = b.init(f"{layer}.weight_min", lambda n: _float_initializer(n, v.min()))
        hi = b.init(f"{layer}.weight_max", lambda n: _float_initializer(n, v.max()))
        b.node("Clip", [dq, lo, hi], [out], f"{layer}/weight_clip")


def _act_qdq(b: _Nodes, layer: str, a: _Act, x: str, out: str) -> None:
    """QuantizeLinear -> DequantizeLinear -> Clip to the code range ``[lo*s, hi*s]``, on every activation.

    The Clip stays even where the range is the container's: a compute node (Conv, Gemm, MatMul) that reads a
    DequantizeLinear directly forms a QDQ node group, which onnxruntime may rewrite with a meaning of its own
    (WeightBiasQuantization rounds a float bias to the grid ``input_scale * weight_scale``; QLinearConv/QGemm
    requantize). After a Clip it is a float op on float values, which no optimization level changes.
    """
    s = b.init(f"{layer}.input_scale", lambda n: _float_initializer(n, a.scale))
    z = b.init(f"{layer}.input_zero_point", lambda n: _int_initializer(n, np.zeros((), np.int64), a.container))
    lo = b.init(f"{layer}.input_min", lambda n: _float_initializer(n, a.scale * a.lo))
    hi = b.init(f"{layer}.input_max", lambda n: _float_initializer(n, a.scale * a.hi))
    b.node("QuantizeLinear", [x, s, z], [f"{layer}/input_q_out"], f"{layer}/input_q")
    b.node("DequantizeLinear", [f"{layer}/input_q_out", s, z], [f"{layer}/input_dq_out"], f"{layer}/input_dq")
    b.node("Clip", [f"{layer}/input_dq_out", lo, hi], [out], f"{layer}/input_clip")


def _act_dynamic_token(b: _Nodes, layer: str, a: _Act, x: str, out: str) -> None:
    """torchao's per-token int8 rule (:mod:`torchsaq.quant.dynamic`) in float ops, as PyTorch computes it:
    ``lo, hi = min(ReduceMin(x), 0), max(ReduceMax(x), 0)`` over the last axis; ``s = max((hi - lo) / 255, eps)``;
    ``zp = Clip(qmin - Round(lo / s))``; ``y = (Clip(Round(x * Reciprocal(s)) + zp) - zp) * s``. (DynamicQuantizeLinear
    has one scale per tensor and a uint8 range: not this.)"""
    def const(tag: str, value: float) -> str:
        return b.init(f"{layer}.input_{tag}", lambda n: _float_initializer(n, torch.tensor(value)))

    def op(kind: str, inputs: list[str], tag: str, **attrs: Any) -> str:
        name = out if tag == "out" else f"{layer}/input_{tag}_out"
        b.node(kind, inputs, [name], f"{layer}/input_{tag}", **attrs)
        return name

    axes = b.init(f"{layer}.input_axes", lambda n: _onnx().numpy_helper.from_array(np.array([-1], np.int64), n))
    zero, lo_q, hi_q = const("zero", 0.0), const("qmin", float(a.lo)), const("qmax", float(a.hi))
    lo = op("Min", [op("ReduceMin", [x, axes], "row_min", keepdims=1), zero], "lo")
    hi = op("Max", [op("ReduceMax", [x, axes], "row_max", keepdims=1), zero], "hi")
    levels = const("levels", float(a.hi - a.lo))
    s = op("Max", [op("Div", [op("Sub", [hi, lo], "range"), levels], "scale_raw"), const("eps", TOKEN_EPS)], "scale")
    zp = op("Clip", [op("Sub", [lo_q, op("Round", [op("Div", [lo, s], "lo_steps")], "lo_round")], "zp_raw"), lo_q,
                     hi_q], "zero_point")
    v = op("Add", [op("Round", [op("Mul", [x, op("Reciprocal", [s], "inv_scale")], "steps")], "round"), zp], "codes")
    op("Mul", [op("Sub", [op("Clip", [v, lo_q, hi_q], "clip"), zp], "centred"), s], "out")


def _fast_layer(b: _Nodes, layer: str, f: _Fast, node: Any, x: str) -> None:
    """Replace ``node`` (the layer's Conv or MatMul) and its markers by QuantizeLinear (UINT8) -> Clip (the code
    range, on the integers) -> ConvInteger/MatMulInteger -> Cast -> Mul (-> Add of a Conv's bias)."""
    onnx = _onnx()
    s = b.init(f"{layer}.input_scale", lambda n: _float_initializer(n, f.a_scale))
    z = b.init(f"{layer}.input_zero_point", lambda n: _int_initializer(n, np.full((), f.a_zero_point), "UINT8"))
    lo = b.init(f"{layer}.input_min", lambda n: _int_initializer(n, np.full((), f.a_lo), "UINT8"))
    hi = b.init(f"{layer}.input_max", lambda n: _int_initializer(n, np.full((), f.a_hi), "UINT8"))
    wq = b.init(f"{layer}.weight_quantized", lambda n: _int_initializer(n, f.ints.numpy(), f.container))
    wz = b.init(f"{layer}.weight_zero_point", lambda n: _int_initializer(n, np.full((), f.zero_point), f.container))
    os_ = b.init(f"{layer}.output_scale", lambda n: _float_initializer(n, f.out_scale))
    b.node("QuantizeLinear", [x, s, z], [f"{layer}/input_q_out"], f"{layer}/input_q")
    b.node("Clip", [f"{layer}/input_q_out", lo, hi], [f"{layer}/input_codes"], f"{layer}/input_clip")
    acc, bias = f"{layer}/acc", (node.input[2] if node.op_type == "Conv" and len(node.input) > 2 else "")
    op = "ConvInteger" if node.op_type == "Conv" else "MatMulInteger"
    int_node = onnx.helper.make_node(op, [f"{layer}/input_codes", wq, z, wz], [acc], name=f"{layer}/{op}")
    if op == "ConvInteger":
        int_node.attribute.extend(node.attribute)
    b.nodes.append(int_node)
    b.node("Cast", [acc], [f"{layer}/acc_float"], f"{layer}/cast", to=onnx.TensorProto.FLOAT)
    scaled = f"{layer}/scaled" if bias else node.output[0]
    b.node("Mul", [f"{layer}/acc_float", os_], [scaled], f"{layer}/rescale")
    if bias:
        spatial = len(f.ints.shape) - 2
        shape = b.init(f"{layer}.bias_shape", lambda n: onnx.numpy_helper.from_array(
            np.array([-1] + [1] * spatial, np.int64), n))
        b.node("Reshape", [bias, shape], [f"{layer}/bias_column"], f"{layer}/bias_reshape")
        b.node("Add", [scaled, f"{layer}/bias_column"], [node.output[0]], f"{layer}/bias_add")


def _marker_layer(node: Any) -> str:
    return next(a.s.decode() for a in node.attribute if a.name == "layer")


def _drop_unused(graph: Any) -> None:
    """Remove what only the markers read: the float weights and step constants traced into the graph."""
    while True:
        used = _used_names(graph)
        dead = [n for n in graph.node if n.op_type == "Constant" and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = _used_names(graph)
    for field in (graph.initializer, graph.value_info):
        keep = [t for t in field if t.name in used]
        del field[:]
        field.extend(keep)


def _rewrite(proto: Any, weights: dict[str, _Weight], acts: dict[str, _Act], opset: int,
             fast: Optional[dict[str, "_Fast"]] = None, nbits_accuracy_level: int = 0) -> tuple[Any, set[str]]:
    """Convert to ``opset`` and replace the ``saq::`` marker nodes: DequantizeLinear (-> Add) for a weight,
    Q -> DQ -> Clip for an activation; the layers in ``fast`` become integer kernels (:func:`_fast_layer`).
    Returns the model and the layers that did."""
    _onnx()  # a clear error if onnx is missing
    from onnx import version_converter

    proto = version_converter.convert_version(proto, opset)
    graph = proto.graph
    b = _Nodes()
    # in fast mode, the Conv/MatMul reading a fast layer's weight marker is replaced (its markers with it)
    weight_out = {n.output[0]: _marker_layer(n) for n in graph.node if n.domain == _DOMAIN and n.op_type == "WeightDQ"}
    act_out = {n.output[0]: n for n in graph.node if n.domain == _DOMAIN and n.op_type == "ActQDQ"}
    act_in = {k: n.input[0] for k, n in act_out.items()}
    for node in graph.node:  # a layer whose Conv/MatMul does not read its two markers directly stays in float
        layer = next((weight_out[i] for i in node.input[1:2] if i in weight_out), None)
        if layer in (fast or {}) and (node.op_type not in ("Conv", "MatMul") or node.input[0] not in act_out
                                      or _marker_layer(act_out[node.input[0]]) != layer):
            fast = {k: v for k, v in (fast or {}).items() if k != layer}  # (a padding mode other than zeros)
    fast = fast or {}
    nbits = {k for k, w in weights.items() if w.block is not None}
    for node in graph.node:
        compute = next((weight_out[i] for i in node.input if i in weight_out), None) if node.domain != _DOMAIN else None
        if compute in nbits and weights[compute].gather:
            if node.op_type != "Gather" or node.input[0] not in weight_out:  # pragma: no cover - Embedding: Gather
                raise ValueError(f"ONNX export: layer {compute}'s weight feeds a {node.op_type}, not a Gather")
            _gather_nbits(b, compute, weights[compute], node)
        elif compute in nbits:
            if node.op_type != "MatMul" or node.input[1] not in weight_out:  # pragma: no cover - Linear: MatMul
                raise ValueError(f"ONNX export: layer {compute}'s weight feeds a {node.op_type}, not a MatMul")
            _matmul_nbits(b, compute, weights[compute], node, nbits_accuracy_level)
        elif compute in fast:
            _fast_layer(b, compute, fast[compute], node, act_in[node.input[0]])
        elif node.domain != _DOMAIN:
            b.nodes.append(node)
        elif _marker_layer(node) in fast:
            continue  # folded into the integer kernel above
        elif node.op_type == "WeightDQ" and _marker_layer(node) in nbits:
            continue  # read by the MatMulNBits above
        elif node.op_type == "WeightDQ":
            name = _marker_layer(node)
            _weight_dq(b, name, weights[name], node.output[0], shield=weights[name].ints.dim() == 2)
        elif node.op_type == "ActQDQ":
            _act_qdq(b, _marker_layer(node), acts[_marker_layer(node)], node.input[0], node.output[0])
        elif node.op_type == "ActDynamicToken":
            _act_dynamic_token(b, _marker_layer(node), acts[_marker_layer(node)], node.input[0], node.output[0])
        else:  # pragma: no cover - only the two markers above are emitted
            raise ValueError(f"ONNX export: unexpected marker node {node.op_type}")
    del graph.node[:]
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.inits)
    _drop_unused(graph)
    ops = [o for o in proto.opset_import if o.domain != _DOMAIN]
    if nbits:
        ops.append(_onnx().helper.make_opsetid(_MS_DOMAIN, 1))
    del proto.opset_import[:]
    proto.opset_import.extend(ops)
    return proto, set(fast)


# -- export -----------------------------------------------------------------------------------------------
def _is_onnx_export(path: str) -> bool:
    """Whether ``path`` holds an ONNX file written by this module (the only kind an export may replace)."""
    try:
        proto = _onnx().load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - anything unreadable is "not an export"
        return False
    return any(p.key == "saq_format" and p.value == ONNX_FORMAT for p in proto.metadata_props)


def onnx_layers(path: PathLike) -> dict[str, dict[str, Any]]:
    """The per-layer record (bits, containers, per-channel axis) a torchsaq ONNX export carries in its metadata."""
    return json.loads(onnx_metadata(path)["saq_layers"])


def onnx_metadata(path: PathLike) -> dict[str, str]:
    """The metadata entries of a torchsaq ONNX export (``saq_onnx_mode``, ``saq_checkpoint``, ``saq_dataset``, ...)."""
    try:
        proto = _onnx().load(os.fspath(path), load_external_data=False)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, a truncated file, a folder: one line
        raise ValueError(f"{os.fspath(path)} is not a readable ONNX file ({type(e).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("saq_format") != ONNX_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a torchsaq ONNX export")
    return props


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime in its default session (default ``SessionOptions``), as a module that
    takes and returns tensors: ``saq.engine.evaluate(OnnxModel("model.onnx"), loader)`` scores the file itself."""

    def __init__(self, path: PathLike) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError as e:  # pragma: no cover - the test extra installs it
            raise ImportError("running an ONNX file needs onnxruntime: pip install 'torchsaq[onnx]'") from e
        self.path = os.fspath(path)
        self.session = onnxruntime.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.version = onnxruntime.__version__

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


@dataclass(frozen=True)
class OnnxIO:
    """The graph's input and output names and their symbolic axes (``torch.onnx.export``'s ``dynamic_axes``), for a
    model whose inputs are not one batch (a causal LM with a KV cache: see :mod:`torchsaq.export.causal_lm`).
    ``root``: the attribute of the traced wrapper that holds the quantized model (its layers are checked and named
    from there); empty when the traced module is the model itself."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: Optional[dict[str, dict[int, str]]] = None
    root: str = ""


def _plans(layers: list[tuple[str, QuantLayer]], mode: str) -> tuple[
        dict[str, _Weight], dict[str, _Act], dict[str, _Fast], dict[str, dict[str, Any]]]:
    """What each quantized layer becomes (weights, activations, integer-kernel layers) and the metadata record."""
    weights: dict[str, _Weight] = {}
    acts: dict[str, _Act] = {}
    fast: dict[str, _Fast] = {}
    record: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        if type(layer) not in _EXPORT_CLASSES:
            raise ValueError(f"ONNX export: layer {name} is a {type(layer).__name__}, which the ONNX export does not "
                             "write yet; export to .safetensors (or exclude the layer from quantization)")
        w, a = _weight_plan(layer), _act_plan(layer, name)
        f = _fast_plan(layer, w, a) if mode == "fast" else None
        if w is not None:
            weights[name] = w
        if a is not None:
            acts[name] = a
        if f is not None:
            fast[name] = f
        record[name] = {
            "quantizer": layer.weight_quantizer.kind, "role": layer.quant_role,
            "w_bits": layer.w_bits, "w_container": f.container if f else w.container if w else "FLOAT",
            "w_axis": w.axis if w else None,
            "a_bits": layer.a_bits, "a_container": "UINT8" if f else a.container if a else "FLOAT",
            "a_range": [a.lo, a.hi] if a else None, **({"a_mode": "dynamic_token"} if a and a.dynamic else {}),
            "kernel": ("ConvInteger" if not isinstance(layer, nn.Linear) else "MatMulInteger") if f
            else ("GatherBlockQuantized" if w.gather else "MatMulNBits") if w is not None and w.block is not None
            else "float"}
        if w is not None and w.block is not None:
            record[name].update(w_container=w.container, w_block=w.block)
    return weights, acts, fast, record


def _trace(model: nn.Module, layers: list[tuple[str, QuantLayer]], args: tuple, weights: dict[str, _Weight],
           acts: dict[str, _Act], quantized: bool, dynamic_batch: bool, io: Optional["OnnxIO"] = None) -> bytes:
    """The TorchScript exporter's ONNX bytes of ``model``, its quantized layers marked by ``saq::`` nodes."""
    if io is None:
        input_names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
        output_names = ["output"]
        dynamic: Optional[dict[str, dict[int, str]]] = (
            {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None)
    else:
        input_names, output_names, dynamic = list(io.inputs), list(io.outputs), io.dynamic_axes
    swapped: list[tuple[nn.Module, type]] = []
    buf = _io.BytesIO()
    try:
        for name, layer in layers:
            swapped.append((layer, type(layer)))
            layer.__class__ = _EXPORT_CLASSES[type(layer)]
            assert isinstance(layer, _OnnxLayer)
            layer._onnx_name = name
            layer._onnx_weight = weights.get(name)
            layer._onnx_act = acts.get(name)
            layer._onnx_float = not quantized
        with eval_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's tracer and deprecation notes
            # (torch.onnx.export's stub types ``f`` as a path; the TorchScript exporter writes to a file object too)
            torch.onnx.export(model, args, buf,  # type: ignore[arg-type]
                              dynamo=False, opset_version=_TORCHSCRIPT_OPSET,
                              custom_opsets={_DOMAIN: 1} if quantized else None, input_names=input_names,
                              output_names=output_names,
                              dynamic_axes=dynamic, do_constant_folding=True)
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            for attr in ("_onnx_name", "_onnx_weight", "_onnx_act", "_onnx_float"):
                m.__dict__.pop(attr, None)
    return buf.getvalue()


#: what ``onnx_mode`` selects: the file for size (INT4 weights, float kernels) or for speed (8-bit integer kernels)
ONNX_MODES = ("compact", "fast")


@torch.no_grad()
def export_onnx(model: nn.Module, path: PathLike, example_inputs: Any, opset: int = MIN_OPSET,
                dynamic_batch: bool = True, quantized: bool = True, verbose: bool = False,
                onnx_mode: str = "compact", metadata: Optional[dict[str, str]] = None,
                io: Optional[OnnxIO] = None, nbits_accuracy_level: int = 0) -> ExportInfo:
    """Write ``model`` (converted by :func:`saq.quantize`, steps initialised) as an ONNX graph to ``path``.

    ``example_inputs``: a tensor or a tuple of positional inputs to trace with; with ``dynamic_batch`` the
    first dimension of the inputs and the output is symbolic. ``opset`` >= 21 (INT4 Quantize/DequantizeLinear).
    ``onnx_mode="compact"`` (default): INT4 weights through DequantizeLinear, float kernels (the smallest file);
    ``"fast"``: 8-bit weight codes and uint8 activation codes (the low-bit ranges kept by a Clip on the integers)
    into ConvInteger/MatMulInteger, the same numbers on onnxruntime's integer kernels (see docs/onnx.md).
    ``quantized=False`` writes the float32 model instead (the layers' float weights, no quantizers), as a
    baseline. ``metadata``: more string entries for the file's metadata (``torchsaq export`` records the
    checkpoint and data set there, which ``torchsaq eval model.onnx`` reads). ``io``: input/output names and
    symbolic axes other than one batched input and output (:class:`OnnxIO`; ``dynamic_batch`` is then ignored).
    ``nbits_accuracy_level``: MatMulNBits' ``accuracy_level`` for group-wise Linear layers. 0 (default): float
    activations, the model's numbers. 4: onnxruntime quantizes each MatMulNBits input to int8 per block and runs
    its integer kernel, several times faster on CPU but no longer the PyTorch model's numbers (an approximation
    whose error is to be measured; see docs/onnx.md).
    The model is left as it was. Returns an :class:`saq.export.ExportInfo`.
    """
    onnx = _onnx()
    if isinstance(nbits_accuracy_level, bool) or nbits_accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"export: nbits_accuracy_level must be 0..4 (MatMulNBits' accuracy_level), got "
                         f"{nbits_accuracy_level!r}")
    if onnx_mode not in ONNX_MODES:
        raise ValueError(f"export: onnx_mode must be one of {', '.join(map(repr, ONNX_MODES))}, got {onnx_mode!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"export: ONNX opset must be an int >= {MIN_OPSET} (INT4 QuantizeLinear), got {opset!r}")
    if example_inputs is None:
        raise ValueError("export: an ONNX export traces the model: give example_inputs=(x,) (a batch of inputs)")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if os.path.isdir(path):
        raise ValueError(f"export: {os.fspath(path)} is a folder; give a file name such as model.onnx")
    if os.path.exists(path) and not _is_onnx_export(os.fspath(path)):
        raise ValueError(f"export: {os.fspath(path)} exists and is not a torchsaq ONNX export; refusing to replace it")
    model = unwrap(model)
    inner = getattr(model, io.root) if io is not None and io.root else model  # the quantized model
    layers = checked_layers(inner)
    weights, acts, fast, record = _plans(layers, onnx_mode) if quantized else ({}, {}, {}, {})
    traced = _trace(model, layers, args, weights, acts, quantized, dynamic_batch, io)
    proto, integer = _rewrite(onnx.load_from_string(traced), weights, acts, opset, fast, nbits_accuracy_level)
    for name in set(fast) - integer:  # no integer form after all: the compact form (see _rewrite)
        w, a = weights.get(name), acts[name]
        record[name].update(kernel="float", w_container=w.container if w else "FLOAT", a_container=a.container)
    proto.producer_name = "torchsaq"
    meta = {**(metadata or {}), "saq_format": ONNX_FORMAT, "saq_quantized": json.dumps(quantized),
            "saq_layers": json.dumps(record), "saq_onnx_mode": onnx_mode if quantized else "float"}
    if nbits_accuracy_level and quantized:
        meta["saq_nbits_accuracy_level"] = str(nbits_accuracy_level)
    config = getattr(inner, "_saq_config", None)
    if config is not None:
        meta["saq_config"] = json.dumps(config.to_dict())
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    path = os.fspath(path)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    info = ExportInfo(path=path, file_bytes=os.path.getsize(path),
                      float_bytes=float_bytes(inner.state_dict(), quantizer_prefixes(inner)), layers=len(layers))
    if verbose:
        print(info)
    return info
