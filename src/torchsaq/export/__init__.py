"""Export a trained quantized model: one module per format, chosen by the file name's suffix.

* :mod:`.common`: what every format shares (:class:`ExportInfo`, the checks a model passes before export);
* :mod:`.safetensors`: integers + scales in a safetensors file (``*.safetensors``, the default; :func:`load_exported`);
* :mod:`.onnx`: an ONNX QDQ graph run by onnxruntime (``*.onnx``; docs/onnx.md).

A new format is one module with a writer ``write(model, path, example_inputs, verbose, **options) -> ExportInfo``
and one :data:`FORMATS` entry (its suffixes and where its writer lives, imported on first use).
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..registry import Registry
from .common import ExportInfo, PathLike
from .safetensors import FORMAT, VERSION, load_exported, pack_codes, unpack_codes

__all__ = ["export", "load_exported", "ExportInfo", "pack_codes", "unpack_codes", "FORMAT", "VERSION", "FORMATS",
           "ExportFormat", "format_of"]


@dataclass(frozen=True)
class ExportFormat:
    """An export format: the file-name ``suffixes`` it is chosen by, and its writer as ``"module:function"``
    (relative to this package, imported on first use: a format's dependencies load only when it is written)."""

    suffixes: tuple[str, ...]
    writer: str

    def load(self) -> Callable[..., ExportInfo]:
        module, _, name = self.writer.partition(":")
        return getattr(importlib.import_module(module, __name__), name)


#: export formats by name; the first is the default (a file name no format claims)
FORMATS: Registry[ExportFormat] = Registry("export format")
FORMATS.register("safetensors", ExportFormat((".safetensors",), ".safetensors:export_safetensors"),
                 description="integer codes + scales in a safetensors file (no pickle); load_exported reads it")
FORMATS.register("onnx", ExportFormat((".onnx",), ".onnx:export_onnx"),
                 description="an ONNX QDQ graph for onnxruntime (opset 21, INT4 weights; onnx_mode compact or fast)")


def format_of(path: PathLike) -> str:
    """The name of the format a file name asks for: the format claiming its suffix, else the first (default)."""
    name = os.fspath(path).lower()
    for fmt in FORMATS:
        if any(name.endswith(s) for s in FORMATS.get(fmt).suffixes):
            return fmt
    return FORMATS.names()[0]


def export(model: nn.Module, path: PathLike, verbose: bool = False, example_inputs: Any = None,
           **onnx_options: Any) -> ExportInfo:
    """Write ``model`` (converted by :func:`saq.quantize`, steps initialised) to ``path`` in the format its suffix
    names (:data:`FORMATS`): a safetensors file of integers + steps by default, an ONNX QDQ graph for ``.onnx``
    (traced with ``example_inputs``; see :func:`torchsaq.export.onnx.export_onnx`, which takes ``onnx_options``).

    The file is written atomically; it replaces an earlier torchsaq export at ``path`` but never any other file
    (a checkpoint, say). Returns an :class:`ExportInfo` with the file size and the float32 model size;
    ``verbose`` also prints it.
    """
    return FORMATS.get(format_of(path)).load()(model, path, example_inputs=example_inputs, verbose=verbose,
                                               **onnx_options)


class _CallableModule(types.ModuleType):
    """``saq.export`` is this package once imported as a submodule; it stays callable as the function."""

    def __call__(self, model: nn.Module, path: PathLike, verbose: bool = False, example_inputs: Any = None,
                 **onnx_options: Any) -> ExportInfo:
        return export(model, path, verbose, example_inputs, **onnx_options)


sys.modules[__name__].__class__ = _CallableModule
