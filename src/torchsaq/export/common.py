"""What every export format shares: the report of what was written, and the checks a model passes before export.

The formats (:mod:`.safetensors`, :mod:`.onnx`) import from here, never from each other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn

from ..quant.convert import is_traced
from ..quant.layers import QuantLayer, quant_layers
from ..quant.quantizer import Quantizer

__all__ = ["ExportInfo", "PathLike", "unwrap", "checked_layers", "float_bytes", "quantizer_prefixes",
           "is_quantizer_flag", "QUANT_FLAGS", "tied_float_keys"]

PathLike = Union[str, "os.PathLike[str]"]
#: quantizer buffers carried in a format's metadata instead of its tensors
QUANT_FLAGS = ("initialized", "is_signed")


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export` wrote: the file and its size against the float32 model's parameters+buffers."""

    path: str
    file_bytes: int
    float_bytes: int
    layers: int

    @property
    def ratio(self) -> float:
        """How many times smaller the export is than the float32 model."""
        return self.float_bytes / self.file_bytes

    def __str__(self) -> str:
        if self.ratio >= 1:
            versus = f"{self.ratio:.2f}x smaller than"
        else:  # a tiny model: the file's headers and metadata outweigh what quantization saves
            versus = f"{1 / self.ratio:.2f}x larger than"
        return (f"{self.path}: {self.file_bytes / 1024:.1f} KiB file for {self.layers} quantized layers, "
                f"{versus} the float32 state dict ({self.float_bytes / 1024:.1f} KiB of parameters and buffers)")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel/DistributedDataParallel/torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_quantizer_flag(key: str, quantizer_prefixes: set[str]) -> bool:
    prefix, _, last = key.rpartition(".")
    return last in QUANT_FLAGS and prefix in quantizer_prefixes


def quantizer_prefixes(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Quantizer)}


def float_bytes(state: dict[str, Tensor], quantizer_prefixes: set[str]) -> int:
    """Bytes of the float model's state_dict with every floating tensor at float32 (quantizer state excluded)."""
    total = 0
    for k, v in state.items():
        if k.rpartition(".")[0] in quantizer_prefixes:
            continue
        total += v.numel() * (4 if v.is_floating_point() else v.element_size())
    return total


def check_not_shared(model: nn.Module, layers: list[tuple[str, QuantLayer]]) -> None:
    """A layer registered under two names does not round-trip (each name stores its own codes and steps):
    refused, naming both places. Tied weights are exported (see :func:`tied_float_keys`)."""
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantLayer) and id(m) in names:
            raise ValueError(f"export: layer {names[id(m)]} is registered twice (also as {name}); an export stores "
                             "each name's codes separately: give each place its own layer")
        names.setdefault(id(m), name)


def tied_float_keys(model: nn.Module, layers: list[tuple[str, QuantLayer]]) -> dict[str, str]:
    """Quantized layers whose weight Parameter a float module also uses (tied weights: GPT-2's ``lm_head`` and
    ``wte`` with only one of them quantized), mapped to that module's ``state_dict`` key.

    Such a file stores the float table once (under the float module's key) and the layer's codes: the loader
    gives the shared Parameter the float table, and the layer's quantizer (same steps) computes its codes from it.
    Two quantized layers sharing a weight each store their own codes and steps (and are untied on load)."""
    quantized = {id(layer.weight): name for name, layer in layers if layer.weight_quantizer.enabled}
    keys: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantLayer) and m.weight_quantizer.enabled:
            continue
        for pname, p in m.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) in quantized:
                keys.setdefault(quantized[id(p)], f"{name}.{pname}" if name else pname)
    return keys


def checked_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """The quantized layers of an exportable model: traced, scales initialised and finite, no perturbation."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("export: the model has no quantized layer (call saq.quantize first)")
    check_not_shared(model, layers)
    low = [(n, m.weight.dtype) for n, m in layers if m.weight.dtype != torch.float32]
    if low:  # the codes would be computed in float32 while the forward rounds in the layer's own dtype
        raise ValueError(f"export: layer {low[0][0]} runs in {str(low[0][1]).replace('torch.', '')}, and an export "
                         "stores the float32 model's codes, which can differ by one step: export model.float() "
                         "(the float32 model, whose outputs the export reproduces exactly)")
    if not is_traced(model):
        raise ValueError("export: the model has not run yet (first/last layers unknown): calibrate or train it first")
    uninit = [f"{n}.{qn}" for n, m in layers for qn, q in (("weight_quantizer", m.weight_quantizer),
                                                          ("act_quantizer", m.act_quantizer))
              if q.enabled and not q.is_initialized]
    if uninit:
        raise ValueError(f"export: step sizes not initialised for {', '.join(uninit[:5])}"
                         f"{' ...' if len(uninit) > 5 else ''}: run saq.calibrate or train the model first")
    # (a step <= 0 is exported as it is: the forward pass and load_exported both use the smallest step there)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"export: the model holds non-finite values ({len(bad)}: {', '.join(bad[:3])}): it "
                         "diverged; export a checkpoint from before that")
    for n, m in layers:
        for p in (m.perturb_pre, m.perturb_post):
            if p is not None and bool(p.detach().ne(0).any()):
                raise ValueError(f"export: layer {n} carries an active sharpness-aware perturbation; "
                                 "export between optimizer steps")
    return layers
