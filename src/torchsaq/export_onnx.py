"""ONNX export of a quantized model: a QDQ graph (opset >= 21) with 4-bit weights that onnxruntime runs.

``saq.export(model, "model.onnx", example_inputs=(x,))`` (or ``torchsaq export CHECKPOINT model.onnx``) writes the
float graph of the model (traced by ``torch.onnx.export``'s TorchScript exporter) in which every quantized
layer computes with

* its weight as an integer initializer through ``DequantizeLinear`` (per-channel ``axis`` where the LSQ step
  is per channel), in the container of its bit width: INT4/UINT4 at 2..4 bits, INT8/UINT8 at 5..8 bits.
  LSQ: ``value = code * step``, codes in the signed b-bit range. LIQ (LIQ_wn) has the 2^k levels
  ``(2c/(2^k-1) - 1) * |clip|``, ``c = 0..2^k-1``, symmetric with no zero level: an integer zero point
  cannot express that half-step offset. Where they fit the container (k = 2, 3, 5, 6, 7) the levels are
  stored as the odd integers ``2c - (2^k-1)`` with scale ``|clip| / (2^k-1)`` (plain QDQ); at k = 4 and 8
  the odd integers (up to 15 and 255) would need the next container, so the codes ``c`` are stored (UINT4 /
  UINT8) with scale ``2|clip| / (2^k-1)`` and zero point ``2^(k-1) - 1``, and an ``Add`` of ``-|clip| /
  (2^k-1)`` after the DequantizeLinear supplies the half step;
* its input through ``QuantizeLinear -> DequantizeLinear`` with the learned step and zero point 0, UINT4 /
  INT4 (<= 4 bits) or UINT8 / INT8, unsigned where the quantizer is; a ``Clip`` to ``[lo*s, hi*s]`` follows
  where the code range is narrower than the container's (2/3-bit codes, LIQ's symmetric signed range).

Weight standardisation (LIQ's detached per-tensor one, LSQ's ``weight_standardize``) is folded in: the codes
are those of the standardised weight the layer computes with. Everything else (BatchNorm, LayerNorm, biases,
layers left in float) stays float32. ``quantized=False`` exports the same model in float32 (the layers'
float weights, no quantizers): the baseline for size and speed.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ._io import atomic_write
from .convert import eval_mode
from .layers import QuantConv1d, QuantConv2d, QuantLayer, QuantLinear
from .quantizer import STEP_EPS, LIQWeightQuantizer, LSQQuantizer

__all__ = ["export_onnx", "ONNX_FORMAT", "MIN_OPSET", "CONTAINERS", "onnx_layers"]

ONNX_FORMAT = "saq-onnx"
#: INT4/UINT4 Quantize/DequantizeLinear exist from opset 21
MIN_OPSET = 21
#: integer containers, narrowest first, with the range each holds
CONTAINERS: dict[str, tuple[int, int]] = {
    "UINT4": (0, 15), "INT4": (-8, 7), "UINT8": (0, 255), "INT8": (-128, 127)}
_TORCHSCRIPT_OPSET = 20  # the highest opset the TorchScript exporter knows; the graph is converted after
_DOMAIN = "saq"  # custom ops that mark the quantized layers in the exported graph, replaced before saving

if TYPE_CHECKING:
    from .export import ExportInfo

PathLike = Union[str, "os.PathLike[str]"]


def _onnx():
    """The ``onnx`` package, or an ImportError saying how to install it."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("ONNX export needs the onnx package: pip install 'torchsaq[onnx]' "
                          "(onnx and onnxruntime)") from e
    return onnx


def _container(lo: int, hi: int) -> str:
    """The narrowest integer container holding ``[lo, hi]``."""
    for name, (a, b) in CONTAINERS.items():
        if a <= lo and hi <= b:
            return name
    raise ValueError(f"no ONNX integer container holds the code range [{lo}, {hi}]")


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

    def values(self) -> Tensor:
        """What the graph computes: (ints - zero_point) * scale (+ shift)."""
        s = self.scale
        if self.axis is not None:
            shape = [1] * self.ints.dim()
            shape[self.axis] = -1
            s = s.view(shape)
        v = (self.ints - self.zero_point).float() * s
        return v if self.shift is None else v + self.shift


@dataclass
class _Act:
    """An input quantizer as QuantizeLinear -> DequantizeLinear (-> Clip) with a per-tensor scale."""

    scale: Tensor  # float32, 0-d
    lo: int
    hi: int
    container: str
    bits: int

    @property
    def clip(self) -> bool:
        """Whether the code range is narrower than the container's (then a Clip follows DequantizeLinear)."""
        return (self.lo, self.hi) != CONTAINERS[self.container]


def _weight_plan(layer: QuantLayer) -> Optional[_Weight]:
    """The integer weight of ``layer`` (None if its weight stays float)."""
    wq = layer.weight_quantizer
    if not wq.enabled:
        return None
    w = layer.standardized_weight(layer.weight.detach().float())  # LSQ's weight_standardize, if on
    codes = wq.integer(w).to(torch.int64)  # LIQ standardises inside integer()
    container = "INT4" if wq.bits <= 4 else "INT8"
    zero_point, shift = 0, None
    if isinstance(wq, LIQWeightQuantizer):
        n = 2**wq.bits - 1
        clip = wq._abs_clip().detach().float()
        ints, scale, axis = 2 * codes - n, (clip / n).reshape(()), None  # odd integers -n..n
        if n > CONTAINERS[container][1]:  # k = 4, 8: the codes, zero point 2^(k-1)-1, then a half step down
            container = "UINT4" if wq.bits <= 4 else "UINT8"
            ints, scale, zero_point, shift = codes, (2 * clip / n).reshape(()), (n - 1) // 2, (-clip / n).reshape(())
    elif isinstance(wq, LSQQuantizer):
        ints, scale, axis = codes, wq.step.detach().float().clamp_min(STEP_EPS), wq.channel_dim
        if axis is None:
            scale = scale.reshape(())
        if not wq.signed:
            container = "U" + container
    else:
        raise ValueError(f"ONNX export: no QDQ form for the {type(wq).__name__} weight quantizer")
    if isinstance(layer, nn.Linear):  # MatMul(x, W^T): store (in, out), per-channel along the columns
        ints = ints.t().contiguous()
        axis = None if axis is None else 1 - axis
    lo, hi = CONTAINERS[container]
    if ints.numel() and not (lo <= int(ints.min()) and int(ints.max()) <= hi):  # pragma: no cover - a bug if hit
        raise AssertionError(f"{layer} weight integers outside {container}")
    return _Weight(ints=ints, scale=scale, axis=axis, container=container, bits=wq.bits,
                   zero_point=zero_point, shift=shift)


def _act_plan(layer: QuantLayer, name: str) -> Optional[_Act]:
    """The input QDQ of ``layer`` (None if its input stays float)."""
    aq = layer.act_quantizer
    if not aq.enabled:
        return None
    if aq.channel_dim is not None:
        raise ValueError(f"ONNX export: layer {name} has a per-channel activation quantizer (not supported)")
    lo, hi = aq.code_range()
    scale = aq.step_size().float().clamp_min(STEP_EPS).reshape(())  # LSQ's step, LIQ's |clip| / levels
    return _Act(scale=scale, lo=lo, hi=hi, container=_container(lo, hi), bits=aq.bits)


# -- the traced graph: custom ops mark where the quantizers go -----------------------------------------
class _WeightDQ(torch.autograd.Function):
    """Forward: the dequantized weight; in the ONNX graph a ``saq::WeightDQ`` node replaced after export."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, layer: str) -> Tensor:
        return values.clone()

    @staticmethod
    def symbolic(g: Any, values: Any, layer: str) -> Any:
        out = g.op(f"{_DOMAIN}::WeightDQ", values, layer_s=layer)
        out.setType(values.type())
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
        if self._onnx_act is not None:
            a = self._onnx_act
            x = _ActQDQ.apply(x, a.scale, a.lo, a.hi, self._onnx_name)
        if self._onnx_weight is None:
            return layer._float_forward(x, layer.weight_quantizer(layer.standardized_weight(layer.weight)))
        w = _WeightDQ.apply(self._onnx_weight.values(), self._onnx_name)
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


_EXPORT_CLASSES: dict[type, type] = {QuantConv1d: _OnnxConv1d, QuantConv2d: _OnnxConv2d, QuantLinear: _OnnxLinear}


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


def _clip_as_max_min(nodes: list[Any], containers: set[str]) -> list[Any]:
    """Each Clip that feeds a 4-bit QuantizeLinear (a ReLU6, say) as Max -> Min: the same values, loadable.

    onnxruntime 1.32's ClipQuantFusion reads the zero point of a QuantizeLinear that follows a Clip and
    fails to load the whole model when that zero point is INT4/UINT4.
    """
    if not containers & {"INT4", "UINT4"}:
        return nodes
    helper = _onnx().helper
    producer = {o: n for n in nodes for o in n.output}
    clips = {id(producer[n.input[0]]) for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] in producer
             and producer[n.input[0]].op_type == "Clip" and producer[n.input[0]].domain in ("", "ai.onnx")}
    out: list[Any] = []
    for n in nodes:
        if id(n) not in clips:
            out.append(n)
            continue
        x, lo, hi = (list(n.input) + ["", ""])[:3]
        if lo:
            y = n.output[0] if not hi else f"{n.name or n.output[0]}/max_out"
            out.append(helper.make_node("Max", [x, lo], [y], name=f"{n.name}/max"))
            x = y
        if hi:
            out.append(helper.make_node("Min", [x, hi], [n.output[0]], name=f"{n.name}/min"))
        if not lo and not hi:
            out.append(helper.make_node("Identity", [x], [n.output[0]], name=n.name))
    return out


def _rewrite(proto: Any, weights: dict[str, _Weight], acts: dict[str, _Act], opset: int) -> Any:
    """Convert to ``opset`` and replace the ``saq::`` marker nodes by DequantizeLinear (-> Add) / Q -> DQ (-> Clip)."""
    _onnx()  # a clear error if onnx is missing
    from onnx import helper, version_converter

    proto = version_converter.convert_version(proto, opset)
    graph = proto.graph
    inits: list[Any] = []
    made: set[str] = set()

    def once(key: str, make: Any) -> None:
        if key not in made:
            made.add(key)
            inits.extend(make())

    nodes: list[Any] = []
    for node in graph.node:
        if node.domain != _DOMAIN:
            nodes.append(node)
            continue
        layer = next(a.s.decode() for a in node.attribute if a.name == "layer")
        if node.op_type == "WeightDQ":
            w = weights[layer]
            q, s, z, b = (f"{layer}.weight_quantized", f"{layer}.weight_scale", f"{layer}.weight_zero_point",
                          f"{layer}.weight_shift")
            once(q, lambda: [_int_initializer(q, w.ints.numpy(), w.container), _float_initializer(s, w.scale)]
                 + ([_int_initializer(z, np.full((), w.zero_point), w.container)] if w.zero_point else [])
                 + ([_float_initializer(b, w.shift)] if w.shift is not None else []))
            kw: dict[str, Any] = {} if w.axis is None else {"axis": w.axis}
            out = node.output[0] if w.shift is None else f"{layer}/weight_dq_out"
            nodes.append(helper.make_node("DequantizeLinear", [q, s] + ([z] if w.zero_point else []), [out],
                                          name=f"{layer}/weight_dq", **kw))
            if w.shift is not None:
                nodes.append(helper.make_node("Add", [out, b], [node.output[0]], name=f"{layer}/weight_shift"))
        elif node.op_type == "ActQDQ":
            a = acts[layer]
            s, z = f"{layer}.input_scale", f"{layer}.input_zero_point"
            lo, hi = f"{layer}.input_min", f"{layer}.input_max"
            once(s, lambda: [_float_initializer(s, a.scale), _int_initializer(z, np.zeros((), np.int64), a.container)]
                 + ([_float_initializer(lo, a.scale * a.lo), _float_initializer(hi, a.scale * a.hi)] if a.clip else []))
            # the Clip to a narrower code range comes after the DequantizeLinear (same values: the bounds are
            # lo*s and hi*s, what DQ gives for lo and hi): before QuantizeLinear, onnxruntime 1.32's
            # ClipQuantFusion fails to load the model for INT4/UINT4 zero points
            dq = f"{layer}/input_dq_out" if a.clip else node.output[0]
            nodes.append(helper.make_node("QuantizeLinear", [node.input[0], s, z], [f"{layer}/input_q_out"],
                                          name=f"{layer}/input_q"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{layer}/input_q_out", s, z], [dq],
                                          name=f"{layer}/input_dq"))
            if a.clip:
                nodes.append(helper.make_node("Clip", [dq, lo, hi], [node.output[0]], name=f"{layer}/input_clip"))
        else:  # pragma: no cover - only the two markers above are emitted
            raise ValueError(f"ONNX export: unexpected marker node {node.op_type}")
    del graph.node[:]
    graph.node.extend(_clip_as_max_min(nodes, {a.container for a in acts.values()}))
    graph.initializer.extend(inits)
    # drop what only the markers read: the float weights and step constants traced into the graph
    while True:
        used = _used_names(graph)
        dead = [n for n in graph.node if n.op_type == "Constant" and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = _used_names(graph)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    keep_vi = [v for v in graph.value_info if v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    ops = [o for o in proto.opset_import if o.domain != _DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(ops)
    return proto


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
    proto = _onnx().load(os.fspath(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("saq_format") != ONNX_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a torchsaq ONNX export")
    return json.loads(props["saq_layers"])


@torch.no_grad()
def export_onnx(model: nn.Module, path: PathLike, example_inputs: Any, opset: int = MIN_OPSET,
                dynamic_batch: bool = True, quantized: bool = True, verbose: bool = False) -> "ExportInfo":
    """Write ``model`` (converted by :func:`saq.quantize`, steps initialised) as an ONNX QDQ graph to ``path``.

    ``example_inputs``: a tensor or a tuple of positional inputs to trace with; with ``dynamic_batch`` the
    first dimension of the inputs and the output is symbolic. ``opset`` >= 21 (INT4 Quantize/DequantizeLinear).
    ``quantized=False`` writes the float32 model instead (the layers' float weights, no quantizers), as a
    baseline. The model is left as it was. Returns an :class:`saq.export.ExportInfo`.
    """
    from .export import ExportInfo, _checked_layers, _float_bytes, _quantizer_prefixes, _unwrap

    onnx = _onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"export: ONNX opset must be an int >= {MIN_OPSET} (INT4 QuantizeLinear), got {opset!r}")
    if example_inputs is None:
        raise ValueError("export: an ONNX export traces the model: give example_inputs=(x,) (a batch of inputs)")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if os.path.isdir(path):
        raise ValueError(f"export: {os.fspath(path)} is a folder; give a file name such as model.onnx")
    if os.path.exists(path) and not _is_onnx_export(os.fspath(path)):
        raise ValueError(f"export: {os.fspath(path)} exists and is not a torchsaq ONNX export; refusing to replace it")
    model = _unwrap(model)
    layers = _checked_layers(model)
    names = {id(m): n for n, m in layers}
    weights: dict[str, _Weight] = {}
    acts: dict[str, _Act] = {}
    record: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        if quantized:
            w, a = _weight_plan(layer), _act_plan(layer, name)
            if w is not None:
                weights[name] = w
            if a is not None:
                acts[name] = a
            record[name] = {
                "quantizer": layer.weight_quantizer.kind, "role": layer.quant_role,
                "w_bits": layer.w_bits, "w_container": w.container if w else "FLOAT", "w_axis": w.axis if w else None,
                "a_bits": layer.a_bits, "a_container": a.container if a else "FLOAT",
                "a_range": [a.lo, a.hi] if a else None}
    input_names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    dynamic = {n: {0: "batch"} for n in [*input_names, "output"]} if dynamic_batch else None
    swapped: list[tuple[nn.Module, type]] = []
    buf = io.BytesIO()
    try:
        for _, layer in layers:
            swapped.append((layer, type(layer)))
            layer.__class__ = _EXPORT_CLASSES[type(layer)]
            assert isinstance(layer, _OnnxLayer)
            layer._onnx_name = names[id(layer)]
            layer._onnx_weight = weights.get(layer._onnx_name)
            layer._onnx_act = acts.get(layer._onnx_name)
            layer._onnx_float = not quantized
        with eval_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's tracer and deprecation notes
            # (torch.onnx.export's stub types ``f`` as a path; the TorchScript exporter writes to a file object too)
            torch.onnx.export(model, args, buf,  # type: ignore[arg-type]
                              dynamo=False, opset_version=_TORCHSCRIPT_OPSET,
                              custom_opsets={_DOMAIN: 1} if quantized else None, input_names=input_names,
                              output_names=["output"],
                              dynamic_axes=dynamic, do_constant_folding=True)
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            for attr in ("_onnx_name", "_onnx_weight", "_onnx_act", "_onnx_float"):
                m.__dict__.pop(attr, None)
    proto = _rewrite(onnx.load_from_string(buf.getvalue()), weights, acts, opset)
    proto.producer_name = "torchsaq"
    meta = {"saq_format": ONNX_FORMAT, "saq_quantized": json.dumps(quantized), "saq_layers": json.dumps(record)}
    config = getattr(model, "_saq_config", None)
    if config is not None:
        meta["saq_config"] = json.dumps(config.to_dict())
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    path = os.fspath(path)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    info = ExportInfo(path=path, file_bytes=os.path.getsize(path),
                      float_bytes=_float_bytes(model.state_dict(), _quantizer_prefixes(model)), layers=len(layers))
    if verbose:
        print(info)
    return info
