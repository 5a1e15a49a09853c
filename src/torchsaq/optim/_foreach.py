"""Fused per-(device, dtype) tensor-list helpers of the sharpness-aware steps, and bit-exact snapshots.

Nothing here reads a device value on the host: a step makes its decisions on the device (``torch.where``,
masks) and reads its finiteness flags once, at the end, so the CPU never waits for the GPU in the middle of a
step (a launch-bound CNN loses its queued work at every such wait).

DTensors (FSDP2's sharded parameters and gradients) may be mixed with plain tensors in a list: :func:`foreach`
never puts both kinds in one fused call, :func:`norm` reduces the DTensors' squared norms over their shards.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype as _group_by_device_dtype

from .._dtensor import is_dtensor, local, shard_key, sum_over_shards

__all__ = ["foreach", "norm", "dot", "on", "zero_unless", "select_", "mul_owned", "clone", "copy_", "Snapshot"]


def foreach(fn: Callable[..., Any], *lists: Sequence[Tensor]) -> list:
    """Apply a ``torch._foreach_*`` op to aligned tensor lists, one call per (device, dtype) bucket.

    Returns the op's per-tensor results (if any) in the original order.
    """
    n = len(lists[0])
    out: list = [None] * n
    if n == 0:
        return out
    kinds = [is_dtensor(t) for t in lists[0]]
    if any(kinds) and not all(kinds):  # DTensors (FSDP2) beside plain tensors: a fused call of each kind
        for kind in (False, True):
            sel = [i for i, k in enumerate(kinds) if k is kind]
            for i, r in zip(sel, foreach(fn, *[[lst[i] for i in sel] for lst in lists])):
                out[i] = r
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
    if any(is_dtensor(t) for t in ts):
        return _sharded_norm(ts)
    dev = ts[0].device
    parts: list[Tensor] = []

    def bucket(group: list[Tensor]) -> None:
        acc = torch.float64 if group[0].dtype == torch.float64 else torch.float32  # no narrowing (torch refuses)
        norms = torch._foreach_norm(group, 2, dtype=acc)
        parts.append(torch.linalg.vector_norm(torch.stack(norms)).to(dev, torch.float32))

    foreach(bucket, ts)
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))


def _sharded_norm(ts: Sequence[Tensor]) -> Tensor:
    """:func:`norm` of a list holding DTensors: each DTensor counted once over its shards (a plain float32 scalar,
    the same on every rank; one collective per kind of sharding). The plain tensors are taken as they are."""
    plain = [t for t in ts if not is_dtensor(t)]
    shards: dict = {}  # shard_key -> (local shards, a DTensor of that key); insertion order is the same on all ranks
    for t in ts:
        if is_dtensor(t):
            shards.setdefault(shard_key(t), ([], t))[0].append(local(t))
    parts = [norm(plain).double() ** 2] if plain else []
    for locals_, like in shards.values():
        parts.append(sum_over_shards(norm(locals_).double() ** 2, like))
    dev = ts[0].device
    return torch.stack([p.to(dev) for p in parts]).sum().sqrt().float()


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
    return [local(t).view(_INT_OF_SIZE[t.element_size()]) for t in ts]  # a DTensor's elements: its local shard


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
        copy_(out, ts)
    return out


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """In place: ``dst[i] <- src[i]`` (a DTensor shard by shard: DTensor has no fused copy; like-sharded pairs)."""
    foreach(torch._foreach_copy_, [local(t) for t in dst], [local(t) for t in src])


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
            copy_(self.copies, tensors)
        self.active = True

    def put_back(self) -> None:
        if self.active and self.tensors:
            copy_(self.tensors, self.copies)
        self.active = False
