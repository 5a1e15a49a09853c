"""Fused per-(device, dtype) tensor-list helpers of the sharpness-aware steps, and bit-exact snapshots.

Nothing here reads a device value on the host: a step makes its decisions on the device (``torch.where``,
masks) and reads its finiteness flags once, at the end, so the CPU never waits for the GPU in the middle of a
step (a launch-bound CNN loses its queued work at every such wait).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype as _group_by_device_dtype

__all__ = ["foreach", "norm", "dot", "on", "zero_unless", "select_", "mul_owned", "clone", "Snapshot"]


def foreach(fn: Callable[..., Any], *lists: Sequence[Tensor]) -> list:
    """Apply a ``torch._foreach_*`` op to aligned tensor lists, one call per (device, dtype) bucket.

    Returns the op's per-tensor results (if any) in the original order.
    """
    n = len(lists[0])
    out: list = [None] * n
    if n == 0:
        return out
    # torch's C++ grouping (what its optimizers use), by the first list's tensors; the tensors at one index
    # share a device (a dtype mismatch there only sends that bucket down torch's per-tensor path)
    groups = _group_by_device_dtype([list(lst) for lst in lists], with_indices=True).values()
    for tensors, idx in groups:
        res = fn(*tensors)
        if res is not None:
            for i, r in zip(idx, res):
                out[i] = r
    return out


def norm(ts: Sequence[Tensor]) -> Tensor:
    """Global L2 norm (float32, on the first tensor's device) over all tensors of ``ts``."""
    if not ts:
        return torch.zeros(())
    dev = ts[0].device
    parts: list[Tensor] = []

    def bucket(group: list[Tensor]) -> None:
        acc = torch.float64 if group[0].dtype == torch.float64 else torch.float32  # no narrowing (torch refuses)
        norms = torch._foreach_norm(group, 2, dtype=acc)
        parts.append(torch.linalg.vector_norm(torch.stack(norms)).to(dev, torch.float32))

    foreach(bucket, ts)
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Global dot product a.b (float64 device scalar) by polarisation, (||a+b||^2 - ||a-b||^2) / 4."""
    s = foreach(torch._foreach_add, a, b)
    plus = norm(s).double() ** 2
    del s
    d = foreach(torch._foreach_sub, a, b)
    minus = norm(d).double() ** 2
    return (plus - minus) / 4.0


def on(x: Tensor, like: Tensor) -> Tensor:
    """The 0-dim ``x`` on ``like``'s device and in its dtype (what a fused foreach op takes as a tensor scalar)."""
    return x.to(device=like.device, dtype=like.dtype)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.view(_INT_OF_SIZE[t.element_size()]) for t in ts]


def zero_unless(ok: Tensor, ts: Sequence[Tensor]) -> None:
    """In place: ``ts`` unchanged where the device bool ``ok`` is true, else all zeros (NaN and inf too).

    A float multiply by 0 keeps NaN and inf, so the bit patterns are multiplied by 1 or 0 as integers.
    """
    if ts:
        foreach(lambda b: torch._foreach_mul_(b, on(ok, b[0])), _bits(ts))


def select_(ok: Tensor, ts: Sequence[Tensor], others: Sequence[Tensor]) -> None:
    """In place: ``ts`` where the device bool ``ok`` is true, else ``others`` (which are overwritten), bit-exact."""
    if ts:
        zero_unless(ok, ts)
        zero_unless(~ok, others)
        foreach(torch._foreach_add_, _bits(ts), _bits(others))  # x + 0 as integers: exactly x


def mul_owned(ts: Sequence[Tensor], owned: Sequence[bool], by: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """``ts * by``: in place where ``owned``, new tensors elsewhere. ``by``: a 0-dim device scalar or a list."""
    out = list(ts)
    for inplace in (True, False):
        sel = [i for i, o in enumerate(owned) if bool(o) is inplace]
        if not sel:
            continue
        op = torch._foreach_mul_ if inplace else torch._foreach_mul
        xs = [ts[i] for i in sel]
        if torch.is_tensor(by):
            res = foreach(lambda a: op(a, on(by, a[0])), xs)
        else:
            res = foreach(op, xs, [by[i] for i in sel])
        if not inplace:
            for i, x in zip(sel, res):
                out[i] = x
    return out


def clone(ts: Sequence[Tensor]) -> list[Tensor]:
    out = [torch.empty_like(t) for t in ts]
    if out:
        foreach(torch._foreach_copy_, out, ts)
    return out


class Snapshot:
    """Copies of a list of tensors, to put back bit-exactly; the copy buffers are allocated once and reused.

    ``take`` copies the tensors in (one fused copy per (device, dtype)), ``put_back`` copies them back once.
    """

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.copies: list[Tensor] = []
        self.active = False

    def take(self, tensors: list[Tensor]) -> None:
        c = self.copies
        if len(c) != len(tensors) or any(x.shape != t.shape or x.dtype != t.dtype or x.device != t.device
                                         for x, t in zip(c, tensors)):
            self.copies = [torch.empty_like(t) for t in tensors]
        self.tensors = tensors
        if tensors:
            foreach(torch._foreach_copy_, self.copies, tensors)
        self.active = True

    def put_back(self) -> None:
        if self.active and self.tensors:
            foreach(torch._foreach_copy_, self.tensors, self.copies)
        self.active = False
