"""DTensors (FSDP2's sharded parameters and gradients) for the code that must treat them apart.

Under ``torch.distributed.fsdp.fully_shard`` (FSDP2) a parameter and its ``.grad`` are DTensors outside the
forward / backward (each rank holds a shard, on dim 0), and plain unsharded tensors inside the forward. The
sharpness-aware step needs: global norms over shards (:func:`sum_over_shards`), a gradient captured in the
forward (w.r.t. Q(w), plain, of this rank's batch only) averaged over the ranks (:func:`mean_over_mesh`), and
the unsharded value of a sharded tensor (:func:`unsharded`). Elementwise maths works on DTensors (or on their
local shards) as on tensors.

Nothing here imports ``torch.distributed``: no tensor is a DTensor unless ``torch.distributed.tensor`` has been
imported (by the caller's FSDP2 set-up), so :func:`is_dtensor` only looks it up in ``sys.modules``.
"""
from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

__all__ = ["is_dtensor", "local", "unsharded", "sum_over_shards", "mean_over_mesh", "shard_key"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False without importing torch.distributed)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place ops on it change the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def unsharded(t: Tensor) -> Tensor:
    """The whole (plain) value of a DTensor, the same on every rank (a collective); else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def shard_key(t: Tensor) -> tuple[Any, tuple[bool, ...]]:
    """DTensors with equal keys reduce a per-rank sum the same way: (mesh, which mesh dims shard them)."""
    placements = t.placements  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        raise NotImplementedError("saq.SAQ: a gradient or parameter with a Partial placement (a pending "
                                  "reduction) is not supported; FSDP2 gives Shard placements")
    return t.device_mesh, tuple(p.is_shard() for p in placements)  # type: ignore[attr-defined]


def sum_over_shards(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (a per-rank sum over the local shards of DTensors like ``like``) summed over the mesh dims that
    shard them (the replicated dims, e.g. HSDP's, counted once): a plain tensor, the same on every rank."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh, sharded = shard_key(like)
    placements = [Partial() if s else Replicate() for s in sharded]
    return DTensor.from_local(value, mesh, placements).full_tensor()


def mean_over_mesh(t: Tensor, like: Tensor) -> Tensor:
    """In place: the plain ``t`` (this rank's value) averaged over every rank of the mesh of the DTensor ``like``
    (FSDP2 / HSDP average gradients over all of them); returns ``t``."""
    import torch.distributed as dist

    mesh = like.device_mesh  # type: ignore[attr-defined]
    for dim in range(mesh.ndim):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
    return t.div_(mesh.size())
