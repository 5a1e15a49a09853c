"""ONNX export of a whole Hugging Face causal LM (Llama architecture and the like), optionally with a KV cache.

``torch.onnx.export`` (TorchScript) cannot trace ``LlamaForCausalLM`` itself under transformers 5: the mask code
(``masking_utils.find_packed_sequence_indices``) calls ``torch.diff``, which has no ONNX symbolic. The model is
traced through :class:`CausalLMForOnnx` instead, which gives it what the mask code would derive: an explicit
additive 4-D causal mask (``transformers`` returns a 4-D mask as it is) and the position ids, built from the
input shapes with ops every exporter knows, and the past keys/values as plain tensors::

    input_ids (batch, sequence) [, past_key_values.{i}.key / .value (batch, kv_heads, past, head_dim)]
        -> logits (batch, sequence, vocab) [, present.{i}.key / .value (batch, kv_heads, past + sequence, head_dim)]

Batch, sequence and past lengths are symbolic in the file. Attention runs in its ``eager`` form during the trace
(plain MatMul/Softmax; the model's own setting is restored afterwards). The quantized Linear layers are written
as by :func:`torchsaq.export.onnx.export_onnx` (group-wise weights as ``com.microsoft.MatMulNBits``).

Prompts are run with ``kv_cache=False`` files or, with ``kv_cache=True``, given a past of length >= 1 (a file
traced with a past has no branch for an empty one; onnxruntime runs zero-length pasts in most cases, but that
is not tested here).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from .common import ExportInfo, PathLike, checked_layers, unwrap
from .onnx import MIN_OPSET, OnnxIO, export_onnx

__all__ = ["CausalLMForOnnx", "export_causal_lm", "causal_lm_io"]


def _config(lm: nn.Module) -> Any:
    config = getattr(lm, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ValueError("export_causal_lm: expected a Hugging Face causal LM (a model with a .config that has "
                         "num_hidden_layers), such as LlamaForCausalLM")
    return config


class CausalLMForOnnx(nn.Module):
    """``input_ids [, past keys/values] -> logits [, present keys/values]`` of a Hugging Face causal LM, with an
    explicit causal mask and position ids (see the module docstring): the module that is traced."""

    def __init__(self, lm: nn.Module, kv_cache: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.kv_cache = kv_cache
        self.num_layers = int(_config(lm).num_hidden_layers)

    def forward(self, input_ids: Tensor, *past: Tensor) -> Any:
        if len(past) != (2 * self.num_layers if self.kv_cache else 0):
            raise ValueError(f"CausalLMForOnnx: expected {2 * self.num_layers if self.kv_cache else 0} past "
                             f"key/value tensors, got {len(past)}")
        batch, length = input_ids.shape[0], input_ids.shape[1]
        device = input_ids.device
        past_length = past[0].shape[2] if past else 0
        positions = torch.arange(length, device=device) + past_length  # (sequence,)
        keys = torch.arange(past_length + length, device=device)  # (past + sequence,)
        dtype = next(self.lm.parameters()).dtype
        allowed = keys.unsqueeze(0) <= positions.unsqueeze(1)  # (sequence, past + sequence)
        mask = torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        mask = mask.unsqueeze(0).unsqueeze(0).expand(batch, 1, length, past_length + length)
        position_ids = positions.unsqueeze(0).expand(batch, length)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
                                  "use_cache": self.kv_cache}
        if self.kv_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=_config(self.lm))
            for i in range(self.num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            kwargs["cache"] = cache
        out = self.lm(**kwargs)
        if not self.kv_cache:
            return out.logits
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        present: list[Tensor] = []
        for layer in cache.layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def causal_lm_io(num_layers: int, kv_cache: bool) -> OnnxIO:
    """The input/output names and symbolic axes of a :class:`CausalLMForOnnx` graph."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")] if kv_cache else []
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")] if kv_cache else []
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"},
                                       "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in present})
    return OnnxIO(inputs=("input_ids", *past), outputs=("logits", *present), dynamic_axes=axes, root="lm")


def past_shape(lm: nn.Module, batch: int, past_length: int) -> tuple[int, int, int, int]:
    """The shape of one past key (or value) tensor: (batch, kv_heads, past_length, head_dim)."""
    config = _config(lm)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return batch, kv_heads, past_length, head_dim


@contextlib.contextmanager
def _eager_attention(lm: nn.Module) -> Iterator[None]:
    """The model's attention in its eager form for the trace (plain MatMul/Softmax), restored afterwards."""
    config = _config(lm)
    before = getattr(config, "_attn_implementation", None)
    setter = getattr(lm, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter("eager")
        else:  # pragma: no cover - older transformers
            config._attn_implementation = "eager"
        yield
    finally:
        if before is not None and before != "eager":
            if setter is not None:
                setter(before)
            else:  # pragma: no cover
                config._attn_implementation = before


@torch.no_grad()
def export_causal_lm(model: nn.Module, path: PathLike, kv_cache: bool = False, batch: int = 2, length: int = 8,
                     past_length: int = 8, quantized: bool = True, onnx_mode: str = "compact",
                     opset: int = MIN_OPSET, verbose: bool = False, metadata: Optional[dict[str, str]] = None,
                     nbits_accuracy_level: int = 0) -> ExportInfo:
    """Write a Hugging Face causal LM (converted by :func:`saq.quantize`, steps initialised) as an ONNX graph
    ``input_ids [, past_key_values.{i}.key/.value] -> logits [, present.{i}.key/.value]`` that onnxruntime's
    default session runs (see the module docstring). Group-wise weight-only Linear layers become
    ``com.microsoft.MatMulNBits``; ``quantized=False`` writes the float32 model (the baseline).

    The trace uses random token ids of shape ``(batch, length)`` (and pasts of ``past_length`` with
    ``kv_cache``); every one of these lengths is symbolic in the file. ``nbits_accuracy_level=4``: MatMulNBits
    with int8 activations (faster on CPU, approximate: see :func:`~torchsaq.export.onnx.export_onnx`).
    Returns an :class:`ExportInfo`.
    """
    lm = unwrap(model)
    config = _config(lm)
    checked_layers(lm)  # a clear message before anything is traced
    if length < 1 or batch < 1 or (kv_cache and past_length < 1):
        raise ValueError("export_causal_lm: batch, length (and past_length with kv_cache) must be >= 1")
    wrapper = CausalLMForOnnx(lm, kv_cache=kv_cache)
    device = next(lm.parameters()).device
    dtype = next(lm.parameters()).dtype
    ids = torch.randint(0, int(config.vocab_size), (batch, length), generator=torch.Generator().manual_seed(0))
    args: tuple[Tensor, ...] = (ids.to(device),)
    if kv_cache:
        shape = past_shape(lm, batch, past_length)
        gen = torch.Generator().manual_seed(1)
        args += tuple(torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2 * wrapper.num_layers))
    meta = {**(metadata or {}), "saq_causal_lm": "kv_cache" if kv_cache else "logits"}
    with _eager_attention(lm):
        return export_onnx(wrapper, path, args, opset=opset, quantized=quantized, verbose=verbose,
                           onnx_mode=onnx_mode, metadata=meta, io=causal_lm_io(wrapper.num_layers, kv_cache),
                           nbits_accuracy_level=nbits_accuracy_level)
