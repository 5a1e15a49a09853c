"""The training loop of ``torchsaq train``: build, calibrate, train (optionally sharpness-aware), evaluate, save.

One function runs a whole experiment, :func:`train`; the pieces it is made of are public too:
:func:`build_model`, :func:`build_optimizer`, :func:`wrap_sharpness`, :func:`build_scheduler`,
:func:`evaluate`.

Resuming. A checkpoint (``OUTPUT/checkpoint.pt``) is written atomically at the end of every epoch. It
holds the model, the optimizer (base and sharpness-aware), the scheduler, the AMP scaler, the torch and
Python RNG states, the metrics history and the config; the data order is a function of (seed, epoch)
(a seeded sampler and a seeded loader generator), so ``--resume`` from an epoch boundary ends with
exactly the weights of an uninterrupted run. Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after
the current step: it then saves a mid-epoch checkpoint (position in the epoch included) and raises
:class:`TrainingInterrupted`. Resuming from such a checkpoint is exact too when ``workers == 0`` (with
worker processes, random augmentations of the rest of that one epoch are drawn differently). A second
Ctrl-C aborts at once (the last complete checkpoint stays intact). Killed outright (SIGKILL), a run
resumes from its last epoch checkpoint.

Accuracies are percentages (0-100). Evaluation always runs in float32 (also with ``amp``), so the reported
numbers are the ones ``torchsaq eval`` and the integer export reproduce.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from ._io import atomic_write_text
from .checkpoint import load_checkpoint, load_pretrained, load_state_dict_checked, save_checkpoint
from .config import TrainConfig
from .convert import calibrate, eval_mode, quantize, trace
from .device import SMALL_BATCH_MACS, auto_threads, autocast, resolve_device  # noqa: F401 - re-exported
from .device import amp_dtype as _amp_dtype
from .quantizer import Quantizer
from .runlog import TensorBoard as _TensorBoard
from .runlog import plot_history
from .runlog import write_metrics as _write_metrics

__all__ = ["train", "evaluate", "build_model", "build_optimizer", "wrap_sharpness", "build_scheduler",
           "lr_lambda", "param_groups", "load_pretrained", "resolve_device", "format_result", "plot_history",
           "TrainingInterrupted", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
#: what a run writes into its output folder (what --overwrite deletes); LOCK_NAME is held while it runs
RUN_FILES = (CHECKPOINT_NAME, "config.yaml", "metrics.jsonl", "metrics.csv", "curves.png", "tb")
LOCK_NAME = ".saq.lock"
#: options that may differ between a run and the run it resumes (they do not change the numbers)
_RESUME_FREE = {"resume", "output", "device", "workers", "data_dir", "log_every", "save", "epochs",
                "limit_eval_batches", "pretrained", "overwrite", "threads"}
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after Ctrl-C/SIGTERM once the state is saved; resume with ``resume=True``."""

    def __init__(self, checkpoint: Optional[str], epoch: int, step_in_epoch: int):
        self.checkpoint, self.epoch, self.step_in_epoch = checkpoint, epoch, step_in_epoch
        where = f"epoch {epoch} step {step_in_epoch}" if step_in_epoch else f"the end of epoch {epoch}"
        saved = f"checkpoint saved at {where}: {checkpoint}" if checkpoint else "nothing saved (save=False)"
        super().__init__(f"training interrupted; {saved}")


# -------------------------------------------------------------------------------------------------------
# building blocks
# -------------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """create_model -> optional float ``cfg.pretrained`` weights -> :func:`saq.quantize` (not yet traced)."""
    from .models import create_model

    model = create_model(cfg.model, num_classes, in_chans=in_chans, img_size=cfg.img_size,
                         **cfg.model_options(in_chans))
    if cfg.pretrained:
        skipped = load_pretrained(model, cfg.pretrained)
        if skipped:
            print(f"torchsaq: pretrained {cfg.pretrained}: classifier head re-initialised ({', '.join(skipped)})",
                  file=sys.stderr)
    return quantize(model, cfg.quant_config())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on weights; none on quantizer step sizes, biases, norm parameters, 1-D
    parameters and names the model lists in ``no_weight_decay()`` (timm's position embeddings, tokens)."""
    skip_names: set[str] = set()
    nwd = getattr(model, "no_weight_decay", None)
    if callable(nwd):
        skip_names = set(nwd())
    decay, no_decay, seen = [], [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if (isinstance(module, (Quantizer, *_NORM_TYPES)) or pname == "bias" or p.ndim <= 1
                    or full in skip_names or pname in skip_names):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The base optimizer: SGD (momentum, optional Nesterov) or AdamW over :func:`param_groups`."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def wrap_sharpness(model: nn.Module, base: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                   grad_scaler: Optional[torch.amp.GradScaler] = None) -> torch.optim.Optimizer:
    """``base`` itself for ``sharpness='none'``, else :class:`saq.SAQ` around it (mode = cfg.sharpness).

    ``model`` may be the DDP-wrapped model (the ascent backward then skips the gradient all-reduce).
    """
    if cfg.sharpness == "none":
        return base
    from .sam import SAQ, rho_warmup

    warm = int(round(cfg.rho_warmup_epochs * steps_per_epoch))
    schedule = rho_warmup(cfg.rho, warm) if warm > 0 else None
    return SAQ(model, base, rho=cfg.rho, mode=cfg.sharpness, adaptive=cfg.adaptive, strategy=cfg.strategy,
               k=cfg.strategy_k, alpha="auto" if cfg.strategy_alpha is None else cfg.strategy_alpha,
               rho_schedule=schedule, grad_scaler=grad_scaler,
               max_grad_norm=cfg.max_grad_norm)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-iteration LR factor: linear warm-up over ``warmup_epochs``, then cosine to 0 / step / constant."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    milestones = sorted(int(m) for m in cfg.step_milestones)

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        if cfg.lr_schedule == "cosine":
            t = min((it - warm) / max(total - warm, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if cfg.lr_schedule == "step":
            epoch = it // max(steps_per_epoch, 1)
            return cfg.step_gamma ** sum(epoch >= m for m in milestones)
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration :class:`LambdaLR` with :func:`lr_lambda` (attach it to the base optimizer)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))


@torch.no_grad()
def _eval_sums(model: nn.Module, loader: Any, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
               limit: int = 0) -> torch.Tensor:
    """[sum of losses, top-1 correct, top-5 correct, count] over the loader (float64, on ``device``)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with eval_mode(model):  # every module gets its own training flag back
        for i, (x, y) in enumerate(loader):
            if limit and i >= limit:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                out = model(x)
            out = out.float()
            k = min(5, out.shape[1])
            top = out.topk(k, dim=1).indices
            hit = top.eq(y.view(-1, 1))
            sums += torch.stack([nn.functional.cross_entropy(out, y, reduction="sum").double(),
                                 hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                                 torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
    return sums


def _metrics(sums: torch.Tensor) -> dict[str, float]:
    loss, c1, c5, n = sums.tolist()
    if n == 0:
        return {"acc": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    return {"acc": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "n": int(n)}


def evaluate(model: nn.Module, loader: Any, device: Union[str, torch.device] = "cpu",
             amp_dtype: Optional[torch.dtype] = None, limit: int = 0) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader`` (eval mode)."""
    return _metrics(_eval_sums(model, loader, torch.device(device), amp_dtype, limit))


# -------------------------------------------------------------------------------------------------------
# data order: a pure function of (seed, epoch), resumable mid-epoch
# -------------------------------------------------------------------------------------------------------
class _ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, this rank's shard) that can skip the first ``start``
    indices of the current epoch -- for resuming in the middle of one."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def _shard(ds: Dataset, rank: int, world: int) -> Dataset:
    return ds if world == 1 else Subset(ds, list(range(rank, len(ds), world)))


# -------------------------------------------------------------------------------------------------------
# stop requests (Ctrl-C / SIGTERM): finish the step, save, stop
# -------------------------------------------------------------------------------------------------------
class _StopRequest:
    def __init__(self, announce: bool):
        self.requested = False
        self._first: Optional[int] = None
        self.announce = announce
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if signum == signal.SIGINT and self._first == signal.SIGINT:  # a second Ctrl-C: abort now
                raise KeyboardInterrupt
            return  # e.g. torchrun's SIGTERM right after the terminal's SIGINT: already stopping
        self.requested, self._first = True, signum
        if self.announce:
            print("\nsaq: stopping after this step and saving a checkpoint (Ctrl-C again to abort now)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# -------------------------------------------------------------------------------------------------------
# output files
# -------------------------------------------------------------------------------------------------------
def _claim_output(out: Path, cfg: TrainConfig) -> Any:
    """Lock the run folder ``out`` for this run and apply the folder policy; returns the held lock.

    One run at a time: a second ``torchsaq train`` (or ``--resume``) into a folder in use is refused. A folder
    that already holds a run is never reused silently: ``resume`` continues it, ``overwrite`` deletes that
    run's files (:data:`RUN_FILES`) first, anything else is refused. Files of other names are left alone.
    """
    import shutil

    from filelock import FileLock, Timeout

    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out / LOCK_NAME), timeout=0)
        lock.acquire()
    except Timeout:
        raise ValueError(f"output folder {out} is in use by another torchsaq train (it holds the lock "
                         f"{out / LOCK_NAME}); wait for that run or choose another --output") from None
    except OSError as e:
        raise ValueError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    try:
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held and not cfg.resume:
            if not cfg.overwrite:
                raise ValueError(f"{out} already holds a run ({', '.join(held)}); continue it with --resume, "
                                 "replace it with --overwrite, or choose another --output")
            for name in held:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            print(f"torchsaq: --overwrite: deleted the previous run in {out} ({', '.join(held)})", file=sys.stderr)
    except BaseException:
        lock.release()
        raise
    return lock


#: an epoch whose mean training loss exceeds this many times ln(classes) (chance level) has diverged
DIVERGED_LOSS_FACTOR = 10.0


def _non_finite(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers (quantizer steps included) holding NaN/inf."""
    items = [(n, t) for n, t in model.state_dict().items() if torch.is_tensor(t) and t.is_floating_point()]
    if not items:
        return []
    ok = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()  # one device read
    return [n for (n, _), good in zip(items, ok) if not good]


def _dead_steps(model: nn.Module) -> list[tuple[str, float]]:
    """(name, smallest step) of every active quantizer with a step <= 0 (an optimizer pushed it there)."""
    qs = [(n, q) for n, q in model.named_modules() if isinstance(q, Quantizer) and q.enabled and q.is_initialized]
    if not qs:
        return []
    lows = torch.stack([q.step_size().min().float().cpu() for _, q in qs]).tolist()
    return [(n, low) for (n, _), low in zip(qs, lows) if low <= 0]


def _agree(message: Optional[str], distributed: bool) -> None:
    """Raise ``ValueError(message)`` on every rank when rank 0 has one (the others would wait for it forever)."""
    if distributed:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise ValueError(message)


# -------------------------------------------------------------------------------------------------------
# RNG state (torch CPU + CUDA + python `random`; no numpy arrays in checkpoints)
# -------------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def _config_diff(old: TrainConfig, new: TrainConfig) -> list[str]:
    a, b = old.to_dict(), new.to_dict()
    return [f"{k}={a[k]!r} (now {b[k]!r})" for k in a if k not in _RESUME_FREE and a.get(k) != b.get(k)]


# -------------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------------
def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def train(cfg: TrainConfig, progress: bool = True,
          step_callback: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Run one training experiment described by ``cfg`` and return its final metrics.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it runs DistributedDataParallel (NCCL on GPUs, gloo on CPU),
    logging and saving on rank 0 only. ``progress`` shows a tqdm bar per epoch (rank 0). With
    ``cfg.save`` False nothing is written. ``step_callback(global_step)`` is called after every
    optimizer step (custom logging, tests). Returns ``test_acc``, ``test_top5``, ``test_loss``
    (``val_*`` with a validation split), ``train_loss``, ``train_acc``, ``epochs``, ``time_s``,
    ``checkpoint``, ``metrics_path``, ``csv_path``, ``tb_dir``, ``plot_path``, ``size_bits``,
    ``float_bits``, ``bops``, ``history`` and more. Raises :class:`TrainingInterrupted` on Ctrl-C.
    Seeds the global torch / Python / NumPy generators from ``cfg.seed``.
    """
    cfg = TrainConfig.from_dict(cfg.to_dict())  # a validated private copy
    from .models import model_info

    model_info(cfg.model)  # an unknown model fails now (with suggestions), before any data is built
    from .data import DATASETS, build_datasets

    if cfg.dataset not in DATASETS:  # and so does an unknown data set (its error names the choices)
        build_datasets(cfg.dataset)
    if cfg.resume and not cfg.save:
        raise ValueError("resume needs save=True (the checkpoint lives in the output folder)")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world > 1
    device = resolve_device(cfg.device, local_rank)
    own_pg = False
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        own_pg = True
    main = rank == 0
    out = Path(cfg.output)
    ckpt_path = out / CHECKPOINT_NAME
    lock = None
    threads_before = torch.get_num_threads()  # train() picks its own count; the caller's comes back after
    try:
        refused = None
        if cfg.save and main:
            try:
                lock = _claim_output(out, cfg)
            except (ValueError, OSError) as e:  # every rank stops, not rank 0 alone
                refused = str(e)
        _agree(refused, distributed)
        return _train(cfg, progress and main, step_callback, device, rank, world, main, out, ckpt_path)
    finally:
        torch.set_num_threads(threads_before)
        if lock is not None:
            lock.release()
        if own_pg and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, progress: bool, step_callback: Optional[Callable[[int], None]],
           device: torch.device, rank: int, world: int, main: bool, out: Path, ckpt_path: Path) -> dict[str, Any]:
    from .data import DeviceLoader, build_datasets, subset_train

    distributed = world > 1
    save = cfg.save
    state: Optional[dict[str, Any]] = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise ValueError(f"nothing to resume: {ckpt_path} does not exist")
        state = load_checkpoint(ckpt_path)
        old = TrainConfig.from_dict(dict(state["config"]))
        diff = _config_diff(old, cfg)
        if diff:
            raise ValueError(f"{ckpt_path} was trained with other options: {', '.join(diff)}; resume with the "
                             "same options or choose a new --output")
        # --epochs on resume: a step or constant schedule continues exactly; a cosine one would be re-stretched
        if cfg.epochs < int(state["epoch"]):
            raise ValueError(f"{ckpt_path} has already completed {state['epoch']} epochs; --epochs {cfg.epochs} "
                             "is fewer")
        if cfg.epochs != old.epochs and cfg.lr_schedule == "cosine":
            raise ValueError(f"--epochs {cfg.epochs} would stretch this run's {old.epochs}-epoch cosine schedule: the "
                             "learning rate would jump back up instead of continuing; resume with --epochs "
                             f"{old.epochs}, or fine-tune its weights in a new run (--pretrained {ckpt_path} "
                             "--output NEW_FOLDER)")

    _seed_all(cfg.seed)
    bundle = build_datasets(cfg.dataset, data_dir=cfg.data_dir, img_size=cfg.img_size, val_split=cfg.val_split,
                            seed=cfg.seed, augment=cfg.augment)
    bundle = subset_train(bundle, cfg.train_subset)
    input_shape = tuple(int(s) for s in bundle.input_shape)
    data_info = {"dataset": cfg.dataset, "num_classes": int(bundle.num_classes), "in_chans": int(bundle.in_chans),
                 "input_shape": list(input_shape)}

    # -- data loaders: order = f(seed, epoch); the loader's generator keeps the global RNG untouched --------
    # tensor data sets (mnist1d, digits, fashion_mnist) stay whole on the device and are batched there by a
    # DeviceLoader: the same order as the sampler's, set_epoch/start alike, augmentation drawn per (seed, epoch)
    pin = device.type == "cuda"
    sampler: Any = _ResumableSampler(bundle.train, world, rank, cfg.seed)
    per_rank = sampler.num_samples
    loader_gen = torch.Generator()
    train_loader: Any
    if isinstance(bundle.train, TensorDataset):
        sampler = train_loader = DeviceLoader(bundle.train, cfg.batch_size, device, cfg.seed, shuffle=True,
                                              drop_last=per_rank >= cfg.batch_size, rank=rank, world=world)
    else:
        train_loader = DataLoader(bundle.train, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                  pin_memory=pin, drop_last=per_rank >= cfg.batch_size, generator=loader_gen)
    full_steps = (per_rank // cfg.batch_size) if per_rank >= cfg.batch_size else 1
    steps_per_epoch = min(full_steps, cfg.limit_train_batches) if cfg.limit_train_batches else full_steps

    def eval_loader(ds: Dataset) -> Any:
        if isinstance(ds, TensorDataset):
            return DeviceLoader(ds, cfg.batch_size, device, shuffle=False, rank=rank, world=world)
        return DataLoader(_shard(ds, rank, world), batch_size=cfg.batch_size, shuffle=False,
                          num_workers=cfg.workers, pin_memory=pin, generator=torch.Generator().manual_seed(0))

    val_loader = eval_loader(bundle.val) if bundle.val is not None else None
    test_loader = eval_loader(bundle.test)

    # -- model: build, then calibrate (fresh) or trace + load (resume), all BEFORE wrapping in DDP ------------
    torch.manual_seed(cfg.seed)
    build_cfg = cfg if state is None else dataclasses.replace(cfg, pretrained=None)  # resume: weights come later
    model = build_model(build_cfg, data_info["num_classes"], data_info["in_chans"]).to(device)
    threads = cfg.threads  # set before calibration: the thread count changes the last bits of the numbers
    if not threads:
        from .summary import summary as model_summary

        macs = model_summary(model, torch.zeros(1, *input_shape, device=device)).macs  # traces, as a forward would
        threads = auto_threads(None if macs is None else macs * cfg.batch_size, device,
                               int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    torch.set_num_threads(threads)
    if state is not None:
        with torch.no_grad():
            trace(model, torch.zeros(1, *input_shape, device=device))
        load_state_dict_checked(model, state["model"], f"checkpoint {ckpt_path}")
    elif cfg.calib_batches > 0:
        calib = DataLoader(bundle.train, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                           generator=torch.Generator().manual_seed(cfg.seed))
        calibrate(model, calib, num_batches=cfg.calib_batches, device=device)
    elif distributed:
        raise ValueError("distributed training needs calib_batches >= 1 (ranks must start from the same steps)")
    for q in model.modules():  # a 32-bit (disabled) quantizer's step never gets a gradient: freeze it (DDP)
        if isinstance(q, Quantizer) and not q.enabled:
            q.scale.requires_grad_(False)
    raw_model = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
        for q in raw_model.modules():  # python mirrors of the flags rank 0 just broadcast
            if isinstance(q, Quantizer):
                q._sync_flags()

    amp_dtype = _amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    base = build_optimizer(raw_model, cfg)
    optimizer = wrap_sharpness(model, base, cfg, steps_per_epoch, scaler)
    scheduler = build_scheduler(base, cfg, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history: list[dict[str, Any]] = []
    start_epoch, skip, global_step, time_before = 0, 0, 0, 0.0
    partial = [0.0, 0.0, 0]
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = list(state.get("history") or [])
        start_epoch, skip = int(state["epoch"]), int(state.get("step_in_epoch", 0))
        global_step, time_before = int(state.get("global_step", 0)), float(state.get("time_s", 0.0))
        partial = list(state.get("partial") or [0.0, 0.0, 0])
    else:
        torch.manual_seed(cfg.seed + rank)

    jsonl, csv_path, tb_dir, plot_path = (out / "metrics.jsonl", out / "metrics.csv", out / "tb",
                                          out / "curves.png")
    # purge_step: TensorBoard drops older events from this step on (those a resumed session will redo)
    tb = _TensorBoard(tb_dir if (save and main) else None, purge_step=global_step)
    # what the run is, not how it was started: reused as a recipe, config.yaml must not delete anything
    stored_config = {**cfg.to_dict(), "overwrite": False}
    if save and main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(out / "config.yaml", yaml.safe_dump(stored_config, sort_keys=False))

    saved_epoch = [int(state["epoch"]) if state is not None else None]  # of the last checkpoint on disk

    def kept() -> str:
        if not save:
            return "nothing is saved (save=False)"
        if saved_epoch[0] is None:
            return "nothing was saved"
        return f"the last good checkpoint ({ckpt_path}, epoch {saved_epoch[0]}) is kept"

    def check_finite(where: str) -> None:
        """Before anything is saved or evaluated: every weight and step must be finite (all ranks agree)."""
        bad = _non_finite(raw_model)
        if bad:
            raise FloatingPointError(
                f"non-finite values in {len(bad)} tensor(s) at {where} (e.g. {', '.join(bad[:3])}); "
                f"{kept()}; lower --lr, check --weight-decay, or set --max-grad-norm")

    def checkpoint(epoch: int, step_in_epoch: int, sums: list, metrics: Optional[dict] = None) -> Optional[str]:
        check_finite(f"epoch {epoch + 1 if step_in_epoch else epoch}"
                     + (f" step {step_in_epoch}" if step_in_epoch else " end"))
        if not (save and main):
            return str(ckpt_path) if save else None
        save_checkpoint(ckpt_path, {
            "config": stored_config, "data": data_info, "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": _rng_state(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "partial": [float(sums[0]), float(sums[1]), int(sums[2])],
            "time_s": time_before + time.time() - t0, "history": history, "metrics": metrics or {},
        })
        saved_epoch[0] = epoch
        return str(ckpt_path)

    if state is not None:
        _set_rng_state(state["rng"])  # last: everything above may have drawn random numbers

    from tqdm.auto import tqdm

    t0 = time.time()
    session_steps = 0
    total_steps = cfg.epochs * steps_per_epoch
    last: dict[str, Any] = history[-1] if history else {}
    with _StopRequest(announce=main) as stop, contextlib.closing(tb):
        warned_dead: set[str] = set()  # quantizers already reported with a step <= 0
        for epoch in range(start_epoch, cfg.epochs):
            begin = skip if epoch == start_epoch else 0
            sampler.set_epoch(epoch)
            sampler.start = begin * cfg.batch_size
            loader_gen.manual_seed(cfg.seed * 100_003 + epoch)
            loss_sum, correct, count = (partial if epoch == start_epoch else [0.0, 0.0, 0])
            model.train()
            bar = tqdm(total=steps_per_epoch, initial=begin, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not progress, dynamic_ncols=True, unit="step", leave=True, file=sys.stderr)
            step = begin
            it = iter(train_loader) if begin < steps_per_epoch else iter(())
            while step < steps_per_epoch:
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                except RuntimeError:
                    if not stop.requested:  # Ctrl-C also reaches loader workers: that is a stop, not a crash
                        raise
                    bar.close()
                    raise TrainingInterrupted(checkpoint(epoch, step, [loss_sum, correct, count]), epoch + 1, step)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits_box: list[torch.Tensor] = []

                def closure() -> torch.Tensor:
                    with autocast(device, amp_dtype):
                        logits = model(x)
                        loss = criterion(logits, y)
                    if not logits_box:
                        logits_box.append(logits.detach())
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    return loss

                optimizer.zero_grad(set_to_none=True)
                if cfg.sharpness == "none":
                    loss = closure()
                    if scaler is not None:
                        if cfg.max_grad_norm:
                            scaler.unscale_(base)
                            nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.max_grad_norm)
                        scaler.step(base)
                        scaler.update()
                    else:
                        if cfg.max_grad_norm:
                            nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.max_grad_norm)
                        base.step()
                else:
                    loss = optimizer.step(closure)
                with warnings.catch_warnings():  # a scaler-skipped first step makes LambdaLR complain
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
                hits = (logits_box[0].argmax(1) == y).sum()
                # one host-device read per step for both numbers (exact: float64 holds either one)
                loss_f, hits_f = torch.stack([loss.detach().double(), hits.double()]).tolist()
                if math.isfinite(loss_f):
                    n = y.numel()
                    loss_sum += loss_f * n
                    correct += hits_f
                    count += n
                elif scaler is None:  # with fp16 AMP the scaler skips such steps and lowers its scale
                    bar.close()
                    raise FloatingPointError(
                        f"the training loss became {loss_f} at epoch {epoch + 1}, step {step + 1}; {kept()}; "
                        "lower --lr (or --rho), or set --max-grad-norm")
                step += 1
                global_step += 1
                session_steps += 1
                if cfg.log_every and global_step % cfg.log_every == 0:
                    tb.scalars({"train_step_loss": loss_f, "lr": base.param_groups[0]["lr"]}, global_step)
                if progress:
                    left = (time.time() - t0) / session_steps * (total_steps - global_step)
                    bar.set_postfix_str(f"loss {loss_sum / max(count, 1):.4f} acc {100 * correct / max(count, 1):.1f}% "
                                        f"left {_fmt_time(left)}", refresh=False)
                    bar.update(1)
                if step_callback is not None:
                    step_callback(global_step)
                stop_now = stop.requested
                if distributed:
                    flag = torch.tensor([1.0 if stop_now else 0.0], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop_now = bool(flag.item() > 0)
                if stop_now and step < steps_per_epoch:
                    bar.close()
                    path = checkpoint(epoch, step, [loss_sum, correct, count])
                    raise TrainingInterrupted(path, epoch + 1, step)

            # -- end of epoch: reduce training sums, evaluate, log, save -----------------------------------
            sums = torch.tensor([loss_sum, correct, float(count)], dtype=torch.float64, device=device)
            if distributed:
                dist.all_reduce(sums)
                for b in raw_model.buffers():  # evaluate every shard with rank 0's BatchNorm statistics
                    dist.broadcast(b, 0)
            tl, tc, tn = sums.tolist()
            # -- nothing non-finite or diverged is evaluated, logged or saved; the last good checkpoint stays
            limit = DIVERGED_LOSS_FACTOR * math.log(max(data_info["num_classes"], 2))
            try:
                check_finite(f"the end of epoch {epoch + 1}")
                dead = _dead_steps(raw_model)
            except BaseException:
                bar.close()
                raise
            if tl / max(tn, 1) > limit:
                bar.close()
                why = [f"mean training loss {tl / max(tn, 1):.4g} > {limit:.3g} "
                       f"({DIVERGED_LOSS_FACTOR:g} x ln {data_info['num_classes']} classes)"]
                if dead:
                    why.append(f"{len(dead)} quantizer step size(s) <= 0 (e.g. {dead[0][0]}: {dead[0][1]:.4g})")
                raise FloatingPointError(f"training diverged in epoch {epoch + 1}: {'; '.join(why)}; {kept()}; "
                                         "lower --lr (or --rho), or set --max-grad-norm")
            new_dead = sorted({n for n, _ in dead} - warned_dead)
            if new_dead and main:
                # a step the optimizer pushed to <= 0 quantizes with the smallest step (STEP_EPS): its channel
                # outputs ~0, a dead channel, not a divergence (8-bit first layers see it at ordinary LRs)
                print(f"torchsaq: warning: {len(new_dead)} quantizer(s) have a step size <= 0 after epoch {epoch + 1} "
                      f"(e.g. {new_dead[0]}); their channels compute with the smallest step and output ~0",
                      file=sys.stderr)
            warned_dead.update(new_dead)
            record: dict[str, Any] = {"epoch": epoch + 1, "step": global_step,
                                      "lr": base.param_groups[0]["lr"],
                                      "train_loss": tl / max(tn, 1), "train_acc": 100 * tc / max(tn, 1)}
            for split, loader in (("val", val_loader), ("test", test_loader)):
                if loader is None:
                    continue
                # float32 (no autocast), the numbers `torchsaq eval` reproduces from the checkpoint
                es = _eval_sums(raw_model, loader, device, None, cfg.limit_eval_batches)
                if distributed:
                    dist.all_reduce(es)
                m = _metrics(es)
                record.update({f"{split}_loss": m["loss"], f"{split}_acc": m["acc"], f"{split}_top5": m["top5"]})
            record["time_s"] = round(time_before + time.time() - t0, 3)
            history.append(record)
            last = record
            if progress:
                shown = "val" if "val_acc" in record else "test"
                bar.set_postfix_str(f"loss {record['train_loss']:.4f} acc {record['train_acc']:.1f}% "
                                    f"{shown} {record[f'{shown}_acc']:.2f}%", refresh=True)
            bar.close()
            if save and main:
                _write_metrics(history, jsonl, csv_path)
                tb.scalars(record, global_step)
            checkpoint(epoch + 1, 0, [0.0, 0.0, 0], metrics=record)
            if stop.requested and epoch + 1 < cfg.epochs:
                raise TrainingInterrupted(str(ckpt_path) if save else None, epoch + 1, 0)

    # -- final report --------------------------------------------------------------------------------------
    from .summary import summary as model_summary

    s = model_summary(raw_model)
    plot = None
    if save and main and history:
        plot = str(plot_history(history, plot_path,
                                title=f"{cfg.model} on {cfg.dataset}, w{cfg.w_bits}a{cfg.a_bits}, {cfg.sharpness}"))
    result: dict[str, Any] = {k: v for k, v in last.items() if k not in ("step",)}
    result.update({
        "epochs": int(last.get("epoch", cfg.epochs)), "global_step": global_step,
        "time_s": time_before + time.time() - t0,
        "size_bits": s.size_bits, "float_bits": s.float_bits, "bops": s.bops, "macs": s.macs,
        "output": str(out) if save else None, "checkpoint": str(ckpt_path) if save else None,
        "metrics_path": str(jsonl) if save else None, "csv_path": str(csv_path) if save else None,
        "tb_dir": str(tb_dir) if save else None, "plot_path": plot,
        "model": cfg.model, "dataset": cfg.dataset, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
        "sharpness": cfg.sharpness, "strategy": cfg.strategy, "rank": rank, "world_size": world, "device": str(device),
        "threads": threads,
        "history": history,
    })
    return result


def format_result(r: dict[str, Any]) -> str:
    """The end-of-run summary `torchsaq train` prints: accuracy, size, BOPs and where the files are."""
    mib = 8 * 2**20
    lines = [f"torchsaq train: {r['model']} on {r['dataset']}, w{r['w_bits']}a{r['a_bits']}, "
             f"sharpness {r['sharpness']}"
             f"{' (' + r['strategy'] + ')' if r['sharpness'] != 'none' and r.get('strategy') else ''}, "
             f"{r['epochs']} epochs in {_fmt_time(r['time_s'])} ({r['device']}"
             f"{', %d thread%s' % (r['threads'], 's' * (r['threads'] > 1)) if r.get('threads') else ''}"
             f"{', %d processes' % r['world_size'] if r.get('world_size', 1) > 1 else ''})"]
    lines.append(f"  test      top-1 {r['test_acc']:.2f}%  top-5 {r['test_top5']:.2f}%  loss {r['test_loss']:.4f}")
    if "val_acc" in r:
        lines.append(f"  val       top-1 {r['val_acc']:.2f}%  top-5 {r['val_top5']:.2f}%  loss {r['val_loss']:.4f}")
    lines.append(f"  size      {r['size_bits'] / mib:.4f} MiB ({r['float_bits'] / r['size_bits']:.1f}x smaller "
                 f"than the float32 parameters, {r['float_bits'] / mib:.4f} MiB)")
    if r.get("bops") is not None:
        lines.append(f"  BOPs      {r['bops'] / 1e9:.4f} G per sample ({r['macs'] / 1e6:.3f} M MACs)")
    if r.get("checkpoint"):
        lines.append(f"  checkpoint {r['checkpoint']}")
        lines.append(f"  metrics   {r['metrics_path']}, {r['csv_path']}, TensorBoard {r['tb_dir']}")
        if r.get("plot_path"):
            lines.append(f"  plot      {r['plot_path']}")
    return "\n".join(lines)
