"""Where a training run computes: the device, the process group under ``torchrun``, AMP, CPU threads."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["resolve_device", "DistEnv", "init_distributed", "agree", "amp_dtype", "autocast", "auto_threads",
           "SMALL_BATCH_MACS", "check_threads", "check_workers", "usable_cores"]

#: below this many multiply-accumulates per training batch (forward), auto threads is 1 (see README)
SMALL_BATCH_MACS = 5e8


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's CUDA device if there is one, else CPU; 'cuda' under torchrun -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return device


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` job (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE); one
    process without torchrun."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_environ(cls) -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(world=world, rank=int(os.environ.get("RANK", "0")),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and saves."""
        return self.rank == 0


def init_distributed(env: DistEnv, device: torch.device) -> bool:
    """Start the process group (NCCL on GPUs, gloo on CPU) if this is a torchrun job without one yet;
    returns whether it was started here (and so is this caller's to destroy)."""
    if not env.distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def amp_dtype(amp: bool, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of training with ``amp``: float16 on CUDA (with a GradScaler), bfloat16 elsewhere."""
    if not amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype``, or nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def auto_threads(macs_per_batch: Optional[float], device: torch.device, local_world: int = 1) -> int:
    """The CPU thread count ``threads=0`` picks: 1 for a small model on the CPU, else this process's share
    of the cores it may use (never more than torch's own default, which OMP_NUM_THREADS sets).

    Small = under :data:`SMALL_BATCH_MACS` multiply-accumulates per batch: there a second thread gains
    little, and on a machine busy with other work it costs a lot (README: steps 20-80x slower, measured).
    A larger model gets at most the cores the 1-minute load average leaves idle: on a busy 2-core machine
    two threads ran Fashion-MNIST 3.5-5x slower than one (each step waits for the thread that shares a core).
    """
    cores = usable_cores()
    share = max(1, min(torch.get_num_threads(), cores // max(local_world, 1)))
    if device.type == "cpu" and macs_per_batch is not None and macs_per_batch < SMALL_BATCH_MACS:
        return 1
    try:  # cores that other work keeps busy (the 1-minute load average) would make every step wait for them
        idle = round(cores - os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover - no load average on this system
        idle = cores
    return max(1, min(share, idle // max(local_world, 1)))


def check_threads(threads: int) -> None:
    """A ValueError for an explicit thread count above this machine's usable CPU cores (0 = auto is fine)."""
    cores = usable_cores()
    if threads > cores:
        raise ValueError(f"--threads {threads} is more than the {cores} CPU core(s) this process may use; "
                         f"give at most {cores}, or 0 to choose automatically")


def check_workers(workers: int) -> None:
    """A ValueError for a data loader worker count no machine of this size can run: each worker is a process
    (with its own torch), and a thousand of them exhaust the memory before the first batch. Up to 4 per usable
    core, and at least 32, are allowed (recipes name 4 or 8)."""
    cores = usable_cores()
    limit = max(32, 4 * cores)
    if workers > limit:
        raise ValueError(f"--workers {workers} would start {workers} data loader processes on {cores} CPU core(s); "
                         f"give at most {limit} (a few per core; 0 loads in the main process)")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def agree(message: Optional[str], distributed: bool) -> None:
    """Raise ``ValueError(message)`` on every rank when rank 0 has one (the others would wait for it forever)."""
    if distributed:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise ValueError(message)
