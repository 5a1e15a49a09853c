"""Export a trained quantized model as real low-bit integers plus scales (safetensors, no pickle).

Format (one ``.safetensors`` file, metadata ``{"format": "saq-export", "version": "2", "layers": JSON}``):

* ``<layer>.weight_codes``: the weight's integer codes. 2/3/4-bit codes are stored as ``code - Qn`` in a
  ``uint8`` bit stream of 2/3/4 bits per code, first code in the lowest bits (four 2-bit codes per byte,
  eight 3-bit codes per three bytes, two 4-bit codes per byte); 5..8-bit codes are ``int8`` (signed range)
  or ``uint8`` (unsigned range). Version 1 files (3-bit codes in nibbles) still load. Weights kept at 32 bits are
  stored as float under their usual ``<layer>.weight`` key. LSQ codes are signed (``value = code * step``);
  LIQ codes are ``0..2^k-1`` (``value = (code / (2^k-1) * 2 - 1) * |clip|``, in the standardised domain).
* ``<layer>.weight_quantizer.step`` / ``.act_quantizer.step`` (LSQ) or ``.clip`` (LIQ): the learned
  scales (float32).
* every other ``state_dict`` tensor (biases, BatchNorm/LayerNorm, layers left in float) unchanged.
* tied weights: a quantized layer whose weight Parameter a float module also uses (GPT-2's ``lm_head`` and
  ``wte`` with one of them quantized) stores its codes and steps, and the float table is stored once, under the
  float module's key (named by the layer's ``tied_float`` entry): the codes are the layer's quantizer applied to
  that table, which the loader checks. Two quantized layers sharing a weight each store their own codes.
* ``layers``: per quantized layer its quantizer kind, type, weight shape, bits, signedness, per-channel
  dim, whether the codes are of the standardised weight, its role (first/last), MACs per sample when
  known, and for LIQ the weight's mean and std the codes were standardised with (``w_mean``/``w_std``;
  informative: the layer computes with the standardised values, so outputs do not depend on them); ``a_mode``
  ``"dynamic_token"`` where the inputs are quantized per token on the fly (torchao's 8da4w; absent: static steps).
* ``sha256``: a hash of every tensor (name, dtype, shape, bytes) and every other metadata entry. A file
  whose content does not match it (edited, truncated, corrupted) is refused, and so are codes outside their
  declared bit width and metadata that is missing a key or holds a wrong type.

:func:`load_exported` rebuilds the weight as the quantizer's values of the codes in a freshly converted
model and turns standardisation off there, so ``Q(weight) = weight`` reproduces the exported integers
exactly and the model computes what the exporting model computed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from typing import Any, Optional

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from .._io import atomic_write
from .common import (ExportInfo, PathLike, checked_layers, float_bytes, is_quantizer_flag,
                     quantizer_prefixes, tied_float_keys, unwrap)
from ..quant.convert import A_MODES, _drop_trace_hook
from ..quant.dynamic import a_mode_of, make_act_quantizer
from ..quant.layers import QuantLayer, quant_layers
from ..quant.quantizer import FLOAT_BITS, QUANTIZERS, LSQQuantizer, Quantizer, check_bits, make_quantizers, qrange

__all__ = ["export_safetensors", "load_exported", "ExportInfo", "pack_codes", "unpack_codes", "FORMAT", "VERSION"]

FORMAT = "saq-export"
#: 2: 3-bit codes take 3 bits (eight in three bytes); version 1 packed them as nibbles, and still loads
VERSION = "2"
READABLE_VERSIONS = ("1", "2")
_CODES = ".weight_codes"

# -- packing -------------------------------------------------------------------------------------------
def _slot(bits: int, version: str = VERSION) -> int:
    """Bits one code takes in the file: its own width at 2..4 bits (version 1 gave 3-bit codes 4), 8 above."""
    if bits > 4:
        return 8
    return 4 if bits == 3 and version == "1" else bits


def _packed_bytes(numel: int, bits: int, version: str = VERSION) -> int:
    """Bytes of ``numel`` packed codes: ceil(numel * slot / 8)."""
    return -(-numel * _slot(bits, version) // 8)


def _group(slot: int) -> tuple[int, int]:
    """(codes, bytes) of one packing group: 4 codes in 1 byte at 2 bits, 8 in 3 at 3 bits, 2 in 1 at 4 bits."""
    codes = 8 // math.gcd(slot, 8)
    return codes, codes * slot // 8


def pack_codes(codes: Tensor, bits: int, signed: bool) -> Tensor:
    """Pack integer codes (any shape, values in the ``bits``-bit range) into a flat byte tensor.

    2..4-bit codes are stored as ``code - Qn`` in a little-endian bit stream of ``bits`` bits each (first
    code in the lowest bits of the first byte: four 2-bit codes a byte, eight 3-bit codes in three bytes,
    two 4-bit codes a byte), ``ceil(n * bits / 8)`` bytes; 5..8-bit codes are ``int8`` (signed) or ``uint8``.
    """
    check_bits(bits)
    if bits == FLOAT_BITS:
        raise ValueError("pack_codes: 32 bits means 'not quantized'; there are no codes to pack")
    qn, qp = qrange(bits, signed)
    c = codes.detach().flatten().to(torch.int16)
    if c.numel() and (int(c.min()) < qn or int(c.max()) > qp):
        raise ValueError(f"codes outside the {bits}-bit {'signed' if signed else 'unsigned'} range [{qn}, {qp}]")
    return _pack(c, qn, _slot(bits))


def _pack(c: Tensor, qn: int, slot: int) -> Tensor:
    """Flat int16 codes in ``slot``-bit fields (8: one int8/uint8 byte each) as a flat byte tensor."""
    if slot == 8:
        return c.to(torch.int8 if qn < 0 else torch.uint8).cpu()
    n = c.numel()
    per, nbytes = _group(slot)
    u = (c - qn).to(torch.int32)
    u = torch.cat([u, u.new_zeros((-n) % per)]).view(-1, per)
    word = u[:, 0].clone()
    for j in range(1, per):  # at most 8 codes x 3 bits = 24 bits: fits an int32
        word |= u[:, j] << (slot * j)
    packed = torch.stack([(word >> (8 * i)) & 0xFF for i in range(nbytes)], dim=1).reshape(-1).to(torch.uint8)
    return packed[: -(-n * slot // 8)].cpu()


def unpack_codes(packed: Tensor, bits: int, signed: bool, numel: int, version: str = VERSION) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as an int16 tensor (flat).

    ``version="1"`` reads the first export format, which packed 3-bit codes as nibbles like 4-bit ones.
    """
    qn, _ = qrange(bits, signed)
    slot = _slot(bits, version)
    if slot == 8:
        out = packed.to(torch.int16)
    else:
        per, nbytes = _group(slot)
        b = packed.reshape(-1).to(torch.int32)
        b = torch.cat([b, b.new_zeros((-b.numel()) % nbytes)]).view(-1, nbytes)
        word = b[:, 0].clone()
        for i in range(1, nbytes):
            word |= b[:, i] << (8 * i)
        shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * slot
        out = ((word.reshape(-1, 1) >> shifts) & ((1 << slot) - 1)).reshape(-1)
        out = out[: packed.numel() * 8 // slot].to(torch.int16) + qn
    if out.numel() < numel:
        raise ValueError(f"packed weight holds {out.numel()} codes, expected {numel}")
    return out[:numel]


# -- helpers ---------------------------------------------------------------------------------------------
def _codes_signed(q: Quantizer) -> bool:
    """Whether a quantizer's integer codes need the signed range (LIQ weight codes do not)."""
    return q.code_range()[0] < 0


def _layer_meta(name: str, layer: QuantLayer) -> dict[str, Any]:
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    meta = {
        "quantizer": wq.kind,
        "type": type(layer).__name__,
        "shape": list(layer.weight.shape),
        "w_bits": wq.bits, "w_signed": wq.signed, "w_channel_dim": wq.channel_dim,
        "a_bits": aq.bits, "a_signed": aq.signed, "a_channel_dim": aq.channel_dim,
        "w_initialized": wq.is_initialized, "a_initialized": aq.is_initialized,
        "weight_standardized": bool(wq.standardize and wq.enabled),
        "role": layer.quant_role,
        "macs": getattr(layer, "_saq_macs", None),
    }
    if getattr(wq, "group_size", None) is not None:  # (only then: files without groups stay as they were)
        meta["w_group_size"] = wq.group_size
    if a_mode_of(aq) != "static":  # (likewise)
        meta["a_mode"] = a_mode_of(aq)
    if wq.standardize and wq.enabled and not layer.weight_standardize:  # (LSQ's per-channel statistics: none)
        w = layer.weight.detach().float()
        meta["w_mean"], meta["w_std"] = float(w.mean()), float(w.std()) if w.numel() > 1 else 1.0
    return meta


def _digest(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of every tensor (name, dtype, shape, raw bytes) and every metadata entry but the hash itself."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "sha256"):
        h.update(json.dumps(["meta", key, metadata[key]]).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(json.dumps(["tensor", key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # (numpy's stub: no __buffer__)
    return h.hexdigest()


def _is_export(path: str) -> bool:
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is "not an export"
        return False


# -- export -------------------------------------------------------------------------------------------------
@torch.no_grad()
def export_safetensors(model: nn.Module, path: PathLike, example_inputs: Any = None, verbose: bool = False,
                       **onnx_options: Any) -> ExportInfo:
    """Write ``model`` (converted by :func:`saq.quantize`, steps initialised) as integers + steps to ``path``.

    The file is a safetensors file (no pickle), written atomically. It replaces an earlier torchsaq export at
    ``path`` but never any other file (a checkpoint, say). Returns an :class:`ExportInfo` with the file size
    and the float32 model size; ``verbose`` also prints it. ``example_inputs`` is ignored (the ONNX format
    traces with it); other options are the ONNX format's and refused here.
    """
    if onnx_options:
        raise ValueError(f"export: {', '.join(sorted(onnx_options))} apply to .onnx files only")
    if os.path.isdir(path):
        raise ValueError(f"export: {os.fspath(path)} is a folder; give a file name such as model.safetensors")
    if os.path.exists(path) and not _is_export(os.fspath(path)):
        raise ValueError(f"export: {os.fspath(path)} exists and is not a torchsaq export (a checkpoint?); "
                         "refusing to replace it")
    model = unwrap(model)
    layers = checked_layers(model)

    prefixes = quantizer_prefixes(model)
    state = model.state_dict()
    model_bytes = float_bytes(state, prefixes)
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    tied = tied_float_keys(model, layers)
    for name, layer in layers:
        meta[name] = info = _layer_meta(name, layer)
        if name in tied:  # the float table is stored under the float module's key; these codes are of it
            info["tied_float"] = tied[name]
        wq = layer.weight_quantizer
        if wq.enabled:
            codes = wq.integer(layer.weight.detach().float())  # (standardised inside, where it is on)
            signed = _codes_signed(wq)
            tensors[name + _CODES] = pack_codes(codes, wq.bits, signed)
            state.pop(name + ".weight")
            info["numel"] = layer.weight.numel()
            info["packing"] = {8: "int8" if signed else "uint8", 4: "nibble", 3: "3-bit", 2: "crumb"}[_slot(wq.bits)]
    seen: set[int] = set()
    for key, value in state.items():
        if is_quantizer_flag(key, prefixes):
            continue
        t = value.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:  # a tied float tensor: safetensors stores copies
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    metadata = {"format": FORMAT, "version": VERSION, "layers": json.dumps(meta)}
    config = getattr(model, "_saq_config", None)
    if config is not None:
        metadata["config"] = json.dumps(config.to_dict())
    metadata["sha256"] = _digest(tensors, metadata)
    path = os.fspath(path)
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
    result = ExportInfo(path=path, file_bytes=os.path.getsize(path),
                        float_bytes=model_bytes, layers=len(layers))
    if verbose:
        print(result)
    return result


# -- load -------------------------------------------------------------------------------------------------
def _read(path: PathLike) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"load_exported: no such file {path!r}")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"load_exported: {path!r} is not a safetensors file ({e})") from e
    if metadata.get("format") != FORMAT or "layers" not in metadata:
        raise ValueError(f"load_exported: {path!r} is a safetensors file but not a torchsaq export "
                         f"(metadata format={metadata.get('format')!r})")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"load_exported: unsupported torchsaq export version {metadata.get('version')!r} (this "
                         f"torchsaq "
                         f"reads versions {', '.join(READABLE_VERSIONS)}; a newer torchsaq wrote it?)")
    if "sha256" not in metadata:
        raise ValueError(f"load_exported: {path!r} has no content hash (written by an older torchsaq?); "
                         "export it again")
    if _digest(tensors, metadata) != metadata["sha256"]:
        raise ValueError(f"load_exported: {path!r} does not match its content hash: its codes or metadata were "
                         "edited or corrupted after export")
    try:
        layers = json.loads(metadata["layers"])
    except json.JSONDecodeError as e:
        raise ValueError(f"load_exported: corrupt layer metadata in {path!r}: {e}") from e
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ValueError(f"load_exported: corrupt layer metadata in {path!r}: not a mapping of layer -> entries")
    return tensors, layers, metadata["version"]


_NONE = type(None)
#: metadata entry -> accepted types (bool is not an int here)
_SCHEMA: dict[str, tuple] = {
    "type": (str,), "shape": (list,), "w_bits": (int,), "w_signed": (bool, _NONE), "w_channel_dim": (int, _NONE),
    "a_bits": (int,), "a_signed": (bool, _NONE), "a_channel_dim": (int, _NONE), "w_initialized": (bool,),
    "a_initialized": (bool,), "weight_standardized": (bool,), "role": (str, _NONE), "quantizer": (str,),
    "w_group_size": (int, _NONE), "a_mode": (str,), "tied_float": (str,),
}
#: entries older files (and layers without weight groups, static activation steps or tied weights) may lack (their
#: default)
_OPTIONAL = {"quantizer": "lsq", "w_group_size": None, "a_mode": "static", "tied_float": None}


def _check_meta(name: str, info: dict[str, Any]) -> None:
    """Every metadata entry a layer needs, of the right type and range, or a one-line ValueError."""
    def bad(msg: str) -> ValueError:
        return ValueError(f"load_exported: layer {name} metadata: {msg}")

    for key, types_ in _SCHEMA.items():
        if key not in info and key in _OPTIONAL:
            continue
        if key not in info:
            raise bad(f"{key!r} is missing")
        v = info[key]
        if (isinstance(v, bool) and bool not in types_) or not isinstance(v, types_):
            raise bad(f"{key!r} is {v!r}, expected {' or '.join('null' if t is _NONE else t.__name__ for t in types_)}")
    if info.get("quantizer", "lsq") not in QUANTIZERS:
        raise bad(f"'quantizer' is {info['quantizer']!r}, expected one of {', '.join(QUANTIZERS)}")
    a_mode = info.get("a_mode", "static")
    if a_mode not in A_MODES:
        raise bad(f"'a_mode' is {a_mode!r}, expected one of {', '.join(A_MODES)}")
    if a_mode != "static" and (info["a_bits"] not in (8, FLOAT_BITS) or info["type"] != "QuantLinear"):
        raise bad(f"'a_mode' {info['a_mode']!r} is int8 per token on a QuantLinear, not {info['a_bits']}-bit "
                  f"{info['type']} inputs")
    shape = info["shape"]
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise bad(f"'shape' is {shape!r}, expected a list of positive ints")
    for key in ("w_bits", "a_bits"):
        try:
            check_bits(info[key], key)
        except ValueError as e:
            raise bad(str(e)) from None
    if info["w_channel_dim"] is not None and not 0 <= info["w_channel_dim"] < len(shape):
        raise bad(f"'w_channel_dim' {info['w_channel_dim']} is not a dimension of the weight {shape}")
    group = info.get("w_group_size")
    if group is not None and (group < 1 or info["w_channel_dim"] != 0 or info.get("quantizer", "lsq") != "lsq"
                              or math.prod(shape[1:]) % group):
        raise bad(f"'w_group_size' {group} does not fit an LSQ weight {shape} with 'w_channel_dim' "
                  f"{info['w_channel_dim']}")
    if info["w_bits"] != FLOAT_BITS:
        if info["w_signed"] is None:
            raise bad("'w_signed' is null for a quantized weight")
        if info.get("numel") != math.prod(shape):
            raise bad(f"'numel' is {info.get('numel')!r}, the weight shape {shape} holds {math.prod(shape)}")
    if info.get("macs") is not None and (isinstance(info["macs"], bool) or not isinstance(info["macs"], int)):
        raise bad(f"'macs' is {info['macs']!r}, expected an int or null")


def _scale_ok(scale: Optional[Tensor], channel_dim: Optional[int], size: Optional[int], what: str,
              groups: Optional[tuple[int, int]] = None) -> None:
    """The file's step / clip must be finite floating point and 1-D: one per tensor, or one per channel; or
    ``groups`` = ``(channels, groups per channel)`` where the weight is quantized in groups."""
    if scale is None:
        return
    if groups is not None:
        if tuple(scale.shape) != groups:
            raise ValueError(f"load_exported: {what} scale has shape {tuple(scale.shape)}, expected {groups}")
    elif (scale.dim() != 1 or (channel_dim is None and scale.numel() != 1)
            or (size is not None and scale.numel() != size)):
        raise ValueError(f"load_exported: {what} scale has shape {tuple(scale.shape)}")
    if not scale.is_floating_point() or not bool(torch.isfinite(scale).all()):
        raise ValueError(f"load_exported: {what} scale is not finite floating point")


def _configure(q: Quantizer, bits: int, signed: Optional[bool], channel_dim: Optional[int],
               scale: Optional[Tensor], initialized: bool, what: str, group_size: Optional[int] = None) -> None:
    """Set a quantizer's bits/signedness/per-channel (or per-group: LSQ's ``group_size``) scale (LSQ step, LIQ
    clip) from the export."""
    q.bits = check_bits(int(bits), what)
    q.signed = signed
    q.channel_dim = channel_dim
    if isinstance(q, LSQQuantizer):
        q.group_size = group_size
    if scale is not None:
        old = q.scale
        scale = scale.to(device=old.device, dtype=old.dtype)
        if scale.dim() != (1 if group_size is None else 2) or (channel_dim is None and scale.numel() != 1):
            raise ValueError(f"load_exported: {what} {q.param_name} has shape {tuple(scale.shape)}")
        if scale.shape == old.shape:
            old.data.copy_(scale)
        else:  # per-channel in the file, per-tensor in the fresh model (or vice versa)
            setattr(q, q.param_name, nn.Parameter(scale.clone(), requires_grad=old.requires_grad))
    q.initialized.fill_(bool(initialized))
    q._initialized = bool(initialized)


@torch.no_grad()
def load_exported(path: PathLike, model: nn.Module) -> nn.Module:
    """Fill ``model`` (same architecture, converted by :func:`saq.quantize`) from an :func:`export` file.

    Weights become the quantizer's values of the codes (``codes * step`` for LSQ; weight standardisation is
    switched off, the codes being of the standardised weight where it was on); the quantizer kind,
    scales, bits, signedness and roles come from the file, and the model is marked traced, so it computes
    exactly what the exported model computed. Returns ``model``.

    Tied weights: a layer whose file entry names a float table (``tied_float``) gets that table as its weight
    (its quantizer reproduces the codes from it, checked); any other quantized layer whose weight Parameter another
    module of ``model`` shares gets a Parameter of its own (untied: one Parameter cannot hold two layers'
    different quantized tables, nor a float module's table and a quantized one).

    All or nothing: the file is read and checked completely (content hash, metadata, architecture, codes
    within their bit width) before the model is touched, so a failing load leaves ``model`` as it was.
    """
    tensors, meta, version = _read(path)
    target = unwrap(model)
    layers = dict(quant_layers(target))
    _check_architecture(meta, layers)
    # the file's quantizer kind wins, as its bits do: new quantizers, attached once the checks pass
    swaps = _swapped_quantizers(meta, layers)
    rest = _float_tensors(target, tensors, swaps)
    weights = _decode_weights(meta, layers, swaps, tensors, version)
    # commit: everything above succeeded, so nothing below can fail half-way
    _apply(target, meta, layers, swaps, tensors, rest, weights)
    return model


def _check_architecture(meta: dict[str, Any], layers: dict[str, QuantLayer]) -> None:
    """load_exported's first step: the metadata is well-formed and names the model's quantized layers, with
    their classes and weight shapes."""
    if not layers:
        raise ValueError("load_exported: the model has no quantized layer (call saq.quantize on it first)")
    for name, info in meta.items():
        _check_meta(name, info)
    missing = [n for n in meta if n not in layers]
    extra = [n for n in layers if n not in meta]
    if missing or extra:
        raise ValueError("load_exported: architecture mismatch: "
                         + (f"layers in the file but not in the model: {missing[:5]}; " if missing else "")
                         + (f"layers in the model but not in the file: {extra[:5]}" if extra else ""))
    for name, info in meta.items():
        layer = layers[name]
        if type(layer).__name__ != info["type"]:
            raise ValueError(f"load_exported: layer {name} is {type(layer).__name__} in the model, "
                             f"{info['type']} in the file")
        if list(layer.weight.shape) != list(info["shape"]):
            raise ValueError(f"load_exported: layer {name} weight shape {list(layer.weight.shape)} in the model, "
                             f"{info['shape']} in the file")


def _swapped_quantizers(meta: dict[str, Any], layers: dict[str, QuantLayer]) -> dict[str, tuple[Quantizer, Quantizer]]:
    """New (weight, activation) quantizers for the layers whose quantizer kind or activation mode (``a_mode``)
    differs from the file's."""
    swaps: dict[str, tuple[Quantizer, Quantizer]] = {}
    for name, info in meta.items():
        kind, a_mode, layer = info.get("quantizer", "lsq"), info.get("a_mode", "static"), layers[name]
        if kind != layer.weight_quantizer.kind or a_mode != a_mode_of(layer.act_quantizer):
            wq, aq = make_quantizers(kind, int(info["w_bits"]), int(info["a_bits"]), layer.weight.shape[0],
                                     per_channel=info["w_channel_dim"] is not None, a_signed=info["a_signed"],
                                     linear=isinstance(layer, nn.Linear))
            swaps[name] = (wq, make_act_quantizer(a_mode, int(info["a_bits"])) or aq)
    return swaps


def _float_tensors(target: nn.Module, tensors: dict[str, Tensor],
                   swaps: dict[str, tuple[Quantizer, Quantizer]]) -> dict[str, Tensor]:
    """The file's tensors other than codes and quantizer scales, after checking the key set and the shapes."""
    # every other tensor: exact key set and shapes (quantizer scales are checked against the metadata)
    prefixes = quantizer_prefixes(target)
    state = target.state_dict()
    for name, pair in swaps.items():
        for role, q in zip(("weight_quantizer", "act_quantizer"), pair):
            old = f"{name}.{role}."
            state = {k: v for k, v in state.items() if not k.startswith(old)}
            state.update({old + k: v for k, v in q.state_dict().items()})
    expected = {k: v for k, v in state.items() if not is_quantizer_flag(k, prefixes)}
    provided = {(k[: -len(_CODES)] + ".weight" if k.endswith(_CODES) else k) for k in tensors}
    missing_keys = sorted(set(expected) - provided)
    extra_keys = sorted(provided - set(expected))
    if missing_keys or extra_keys:
        raise ValueError("load_exported: architecture mismatch: "
                         + (f"missing in the file: {missing_keys[:5]}; " if missing_keys else "")
                         + (f"not in the model: {extra_keys[:5]}" if extra_keys else ""))
    rest: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(_CODES) or key.rpartition(".")[0] in prefixes:
            continue
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"load_exported: shape mismatch for {key}: {tuple(expected[key].shape)} in the "
                             f"model, {tuple(value.shape)} in the file")
        rest[key] = value
    return rest


def _decode_weights(meta: dict[str, Any], layers: dict[str, QuantLayer], swaps: dict[str, tuple[Quantizer, Quantizer]],
                    tensors: dict[str, Tensor], version: str) -> dict[str, Tensor]:
    """The integer weights, decoded by quantizers configured from the file (the model's are not touched)."""
    # decode and check everything on quantizers configured from the file, apart from the model's (nothing is
    # changed yet): scales, codes within their declared bit width, the weights they stand for
    weights: dict[str, Tensor] = {}
    for name, info in meta.items():
        layer = layers[name]
        wq, aq = swaps.get(name) or make_quantizers(
            info.get("quantizer", "lsq"), FLOAT_BITS, FLOAT_BITS, layer.weight.shape[0],
            per_channel=info["w_channel_dim"] is not None, linear=isinstance(layer, nn.Linear))
        wq, aq = copy.deepcopy(wq).to(layer.weight.device), copy.deepcopy(aq).to(layer.weight.device)
        w_scale = tensors.get(f"{name}.weight_quantizer.{wq.param_name}")
        a_scale = tensors.get(f"{name}.act_quantizer.{aq.param_name}")
        cdim, group = info["w_channel_dim"], info.get("w_group_size")
        groups = None if group is None else (info["shape"][0], math.prod(info["shape"][1:]) // group)
        _scale_ok(w_scale, cdim, info["shape"][cdim] if cdim is not None else None, f"{name} weights", groups)
        _scale_ok(a_scale, info["a_channel_dim"], None, f"{name} activations")
        _configure(wq, info["w_bits"], info["w_signed"], cdim, w_scale, info["w_initialized"], f"{name} weights",
                   group)
        _configure(aq, info["a_bits"], info["a_signed"], info["a_channel_dim"], a_scale, info["a_initialized"],
                   f"{name} activations")
        key = name + _CODES
        if info["w_bits"] == FLOAT_BITS:
            if key in tensors:
                raise ValueError(f"load_exported: layer {name} is declared 32-bit but the file has integer codes "
                                 "for it")
            continue
        if key not in tensors or w_scale is None:
            raise ValueError(f"load_exported: the file has no integer weight (codes and scale) for layer {name}")
        bits, numel, signed = info["w_bits"], math.prod(info["shape"]), _codes_signed(wq)
        packed = tensors[key]
        dtype = (torch.int8 if signed else torch.uint8) if _slot(bits, version) == 8 else torch.uint8
        if packed.dtype != dtype or packed.dim() != 1 or packed.numel() != _packed_bytes(numel, bits, version):
            raise ValueError(f"load_exported: layer {name}: {tuple(packed.shape)} {packed.dtype} codes do not fit "
                             f"{numel} {bits}-bit weights")
        codes = unpack_codes(packed, bits, signed, numel, version)
        qn, qp = wq.code_range()
        if numel and (int(codes.min()) < qn or int(codes.max()) > qp):
            raise ValueError(f"load_exported: layer {name}: codes outside the declared {bits}-bit "
                             f"{'signed' if qn < 0 else 'unsigned'} range [{qn}, {qp}]")
        codes = codes.reshape(info["shape"]).to(device=layer.weight.device, dtype=torch.float32)
        tied = info.get("tied_float")
        if tied is not None:  # the float table the codes were computed from: the layer's weight stays float
            table = tensors.get(tied)
            if table is None or list(table.shape) != list(info["shape"]):
                raise ValueError(f"load_exported: layer {name} is tied to {tied}, which the file does not hold "
                                 f"as a {info['shape']} table")
            wq.standardize = bool(info["weight_standardized"])
            table = table.to(device=layer.weight.device, dtype=torch.float32)
            if not torch.equal(wq.integer(table).float(), codes):
                raise ValueError(f"load_exported: layer {name}: its codes are not its quantizer's codes of the tied "
                                 f"table {tied} (the file is inconsistent)")
            weights[name] = table.to(layer.weight.dtype)
            continue
        weights[name] = wq.dequantize(codes).to(layer.weight.dtype)
    return weights


def _apply(target: nn.Module, meta: dict[str, Any], layers: dict[str, QuantLayer],
           swaps: dict[str, tuple[Quantizer, Quantizer]], tensors: dict[str, Tensor], rest: dict[str, Tensor],
           weights: dict[str, Tensor]) -> None:
    """load_exported's last step, after every check passed: quantizers, float tensors, integer weights."""
    for name, (wq, aq) in swaps.items():
        layer = layers[name]
        layer.weight_quantizer, layer.act_quantizer = wq.to(layer.weight.device), aq.to(layer.weight.device)
    for name, info in meta.items():
        layer = layers[name]
        wq, aq = layer.weight_quantizer, layer.act_quantizer
        _configure(wq, info["w_bits"], info["w_signed"], info["w_channel_dim"],
                   tensors.get(f"{name}.weight_quantizer.{wq.param_name}"), info["w_initialized"], f"{name} weights",
                   info.get("w_group_size"))
        _configure(aq, info["a_bits"], info["a_signed"], info["a_channel_dim"],
                   tensors.get(f"{name}.act_quantizer.{aq.param_name}"), info["a_initialized"], f"{name} activations")
        layer.quant_role = info["role"]
        layer._saq_macs = info.get("macs")
    # float tensors first (a 32-bit weight is among them), then the integer weights
    target.load_state_dict(rest, strict=False)
    users: dict[int, int] = {}  # Parameter -> how many modules use it (tied weights)
    for m in target.modules():
        for p in m.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    for name, w in weights.items():
        layer = layers[name]
        if meta[name].get("tied_float") is not None:  # the float table; its quantizer rounds it as on export
            layer.weight.copy_(w)
            layer.weight_quantizer.standardize = bool(meta[name]["weight_standardized"])
            continue
        if users.get(id(layer.weight), 1) > 1:  # shared: this layer's quantized table in a Parameter of its own
            layer.weight = nn.Parameter(w.clone(), requires_grad=layer.weight.requires_grad)
        else:
            layer.weight.copy_(w)
        # the codes already are of the standardised weight, if it was: Q(weight) = weight from now on
        layer.weight_standardize = False
        layer.weight_quantizer.standardize = False
    _drop_trace_hook(target)  # first/last are known from the file: no trace on the next forward
