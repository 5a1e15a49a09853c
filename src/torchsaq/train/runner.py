"""``torchsaq train``: set up a run (data, model, optimizer, scheduler, resumed state), train it, report.

One function runs a whole experiment, :func:`train`. The parts, like timm's train.py split:

- setup, here: :func:`build_data`, :func:`build_model` (float weights from ``cfg.pretrained`` via
  :func:`saq.checkpoint.load_pretrained`), :func:`build_optimizer` over :func:`param_groups`,
  :func:`wrap_sharpness`, :func:`build_scheduler` (:func:`lr_lambda`);
- the loop, :mod:`saq.engine`: :func:`~saq.engine.train_one_epoch`, :func:`~saq.engine.evaluate`,
  :func:`~saq.engine.fit`, typed records (:class:`~saq.engine.EpochRecord`, :class:`~saq.engine.TrainResult`);
- the run folder, :class:`saq.checkpointer.Checkpointer`: lock, resume, atomic saves;
- the device, :mod:`saq.device`; metrics files, TensorBoard and the plot, :mod:`saq.runlog`.

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
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from .checkpoint import load_pretrained, load_state_dict_checked
from .checkpointer import CHECKPOINT_NAME, LOCK_NAME, RUN_FILES, Checkpointer, set_rng_state  # noqa: F401
from .config import TrainConfig, bits_label
from ..quant.convert import calibrate, quantize, trace
from .device import SMALL_BATCH_MACS, DistEnv, amp_dtype, auto_threads, init_distributed, resolve_device  # noqa: F401
from .engine import (DIVERGED_LOSS_FACTOR, LoopState, Run, TrainData, TrainingInterrupted,  # noqa: F401
                     TrainResult, evaluate, fit, fmt_time)
from ..quant.kernels import get_lsq_backend, set_lsq_backend
from ..quant.quantizer import Quantizer
from .runlog import TensorBoard, plot_history
from .runlog import write_metrics as _write_metrics  # noqa: F401 - the old name

__all__ = ["train", "evaluate", "build_model", "build_optimizer", "wrap_sharpness", "build_scheduler",
           "lr_lambda", "param_groups", "build_data", "load_pretrained", "resolve_device", "format_result",
           "plot_history", "TrainingInterrupted", "CHECKPOINT_NAME"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                            nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)


# -------------------------------------------------------------------------------------------------------
# building blocks
# -------------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """create_model -> optional float ``cfg.pretrained`` weights -> :func:`saq.quantize` (not yet traced)."""
    from .models import create_model

    model = create_model(cfg.model_name, num_classes, in_chans=in_chans, img_size=cfg.img_size,
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
    # not timm's param_groups_weight_decay: it puts the no-decay group first (checkpointed optimizer states and
    # param_groups[0] would change) and decays quantizer steps / norm weights of more than one dimension
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
    from .optimizers import OPTIMIZERS

    return OPTIMIZERS.get(cfg.optimizer)(param_groups(model, cfg.weight_decay), cfg)


def wrap_sharpness(model: nn.Module, base: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                   grad_scaler: Optional[torch.amp.GradScaler] = None) -> torch.optim.Optimizer:
    """``base`` itself for ``sharpness='none'``, else :class:`saq.SAQ` around it (mode = cfg.sharpness).

    ``model`` may be the DDP-wrapped model (the ascent backward then skips the gradient all-reduce).
    """
    if cfg.sharpness == "none":
        return base
    from ..optim.saq import SAQ

    return SAQ(model, base, grad_scaler=grad_scaler, **cfg.saq_kwargs(steps_per_epoch))


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-iteration LR factor: linear warm-up over ``warmup_epochs``, then cosine to 0 / step / constant.

    ``steps_per_epoch`` counts optimizer steps (:attr:`saq.engine.TrainData.updates_per_epoch`)."""
    # not timm's CosineLRScheduler: its warm-up starts at warmup_lr_init (ours at lr / warm-up steps), and its
    # state_dict differs from LambdaLR's (checkpoints)
    total = max(cfg.epochs * steps_per_epoch, 1)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    from .optimizers import SCHEDULES

    schedule = SCHEDULES.get(cfg.lr_schedule)

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        return schedule(it, warm, total, steps_per_epoch, cfg)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration :class:`LambdaLR` with :func:`lr_lambda` (attach it to the base optimizer)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))


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
    # (map-style data sets have __len__; torch's Dataset stub does not declare it)
    return ds if world == 1 else Subset(ds, list(range(rank, len(ds), world)))  # type: ignore[arg-type]


def build_data(cfg: TrainConfig, device: torch.device, env: DistEnv = DistEnv()) -> tuple[TrainData, Any]:
    """The run's loaders (this rank's shard) and the data bundle (its ``train`` split calibrates).

    The training order is a function of (seed, epoch); the loader's own generator keeps the global RNG
    untouched. Tensor data sets (mnist1d, digits, fashion_mnist) stay whole on the device and are batched
    there by a DeviceLoader: the same order as the sampler's, set_epoch/start alike, augmentation drawn per
    (seed, epoch).
    """
    from .data import DeviceLoader, build_datasets, check_data_dir_read, subset_train

    if not cfg.resume:  # a run that stored one earlier still resumes
        check_data_dir_read(cfg.dataset, cfg.data_dir)
    rank, world = env.rank, env.world
    bundle = build_datasets(cfg.dataset, data_dir=cfg.data_dir, img_size=cfg.img_size, val_split=cfg.val_split,
                            seed=cfg.seed, augment=cfg.augment)
    bundle = subset_train(bundle, cfg.train_subset, cfg.train_subset_seed)
    info = {"dataset": cfg.dataset, "num_classes": int(bundle.num_classes), "in_chans": int(bundle.in_chans),
            "input_shape": [int(s) for s in bundle.input_shape]}
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
    data = TrainData(train_loader=train_loader, sampler=sampler, generator=loader_gen, val_loader=val_loader,
                     test_loader=eval_loader(bundle.test), steps_per_epoch=steps_per_epoch,
                     batch_size=cfg.batch_size, seed=cfg.seed, info=info, accum_steps=cfg.accum_steps)
    return data, bundle


# -------------------------------------------------------------------------------------------------------
# setup
# -------------------------------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def _pick_threads(cfg: TrainConfig, model: nn.Module, input_shape: list[int], device: torch.device,
                  env: DistEnv) -> int:
    """``cfg.threads``, or for 0 :func:`saq.device.auto_threads` from the model's MACs per batch."""
    if cfg.threads:
        return cfg.threads
    from ..quant.summary import summary as model_summary

    macs = model_summary(model, torch.zeros(1, *input_shape, device=device)).macs  # traces, as a forward would
    return auto_threads(None if macs is None else macs * cfg.batch_size, device, env.local_world)


def _setup_model(cfg: TrainConfig, data: TrainData, train_set: Dataset, state: Optional[dict[str, Any]],
                 device: torch.device, env: DistEnv, ckpt_path: Path) -> tuple[nn.Module, nn.Module, int]:
    """Build the model, then calibrate it (fresh) or trace it and load the checkpoint's weights (resume), all
    before wrapping it in DDP; sets the thread count. Returns (model to run, raw model, threads)."""
    info = data.info
    torch.manual_seed(cfg.seed)
    build_cfg = cfg if state is None else dataclasses.replace(cfg, pretrained=None)  # resume: weights come later
    model = build_model(build_cfg, info["num_classes"], info["in_chans"]).to(device)
    threads = _pick_threads(cfg, model, info["input_shape"], device, env)
    torch.set_num_threads(threads)  # set before calibration: the thread count changes the last bits
    if state is not None:
        with torch.no_grad():
            trace(model, torch.zeros(1, *info["input_shape"], device=device))
        load_state_dict_checked(model, state["model"], f"checkpoint {ckpt_path}")
    elif cfg.calib_batches > 0:
        calib = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                           generator=torch.Generator().manual_seed(cfg.seed))
        calibrate(model, calib, num_batches=cfg.calib_batches, device=device)
    elif env.distributed:
        raise ValueError("distributed training needs calib_batches >= 1 (ranks must start from the same steps)")
    for q in model.modules():  # a 32-bit (disabled) quantizer's step never gets a gradient: freeze it (DDP)
        if isinstance(q, Quantizer) and not q.enabled:
            q.scale.requires_grad_(False)
    wrapped: nn.Module = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        for q in model.modules():  # python mirrors of the flags rank 0 just broadcast
            if isinstance(q, Quantizer):
                q._sync_flags()
    if cfg.compile:  # SAQ finds the layers through the wrapper; one graph per forward variant (tests)
        wrapped = cast(nn.Module, torch.compile(wrapped))  # an OptimizedModule
    return wrapped, model, threads


def _setup_run(cfg: TrainConfig, env: DistEnv, device: torch.device, data: TrainData, model: nn.Module,
               raw_model: nn.Module, ckpt: Checkpointer, state: Optional[dict[str, Any]], progress: bool,
               step_callback: Optional[Callable[[int], None]]) -> Run:
    """Optimizer, scheduler, AMP scaler, loss, and the loop state: fresh, or restored from ``state``."""
    amp = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    base = build_optimizer(raw_model, cfg)
    # the LR schedule and rho's warm-up count optimizer steps (with gradient accumulation, fewer than batches)
    optimizer = wrap_sharpness(model, base, cfg, data.updates_per_epoch, scaler)
    scheduler = build_scheduler(base, cfg, data.updates_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loop = LoopState()
    if state is not None:
        from ..optim.saq import SAQ, _check_state_shapes

        with _restoring(ckpt.path, "optimizer, scheduler and loop state"):
            if not isinstance(optimizer, SAQ):  # SAQ.load_state_dict checks its own (and its base's) shapes
                _check_state_shapes(state["optimizer"], [p for g in optimizer.param_groups for p in g["params"]],
                                    [], {})
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            loop = LoopState.from_checkpoint(state)
        if loop.skip >= data.steps_per_epoch:
            raise ValueError(f"cannot resume {ckpt.path}: its step_in_epoch ({loop.skip}) is not within an epoch of "
                             f"this run ({data.steps_per_epoch} batches): it is corrupted or of another data set")
    else:
        torch.manual_seed(cfg.seed + env.rank)
    # purge_step: TensorBoard drops older events from this step on (those a resumed session will redo)
    ckpt.write_config()  # first: a folder with this run's config.yaml is recognisably its run (checkpointer)
    tb = TensorBoard(ckpt.out / "tb" if ckpt.writes else None, purge_step=loop.global_step)
    ckpt.attach(data=data.info, model=raw_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    return Run(cfg=cfg, env=env, device=device, amp_dtype=amp, model=model, raw_model=raw_model,
               optimizer=optimizer, base=base, scheduler=scheduler, scaler=scaler, criterion=criterion, data=data,
               checkpointer=ckpt, tb=tb, state=loop, progress=progress, step_callback=step_callback)


# -------------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, progress: bool = True,
          step_callback: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Run one training experiment described by ``cfg`` and return its final metrics.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it runs DistributedDataParallel (NCCL on GPUs, gloo on CPU),
    logging and saving on rank 0 only. ``progress`` shows a tqdm bar per epoch (rank 0). With
    ``cfg.save`` False nothing is written. ``step_callback(global_step)`` is called after every
    optimizer step (custom logging, tests). Returns ``test_acc``, ``test_top5``, ``test_loss``
    (``val_*`` with a validation split), ``train_loss``, ``train_acc``, ``epochs``, ``time_s``,
    ``checkpoint``, ``metrics_path``, ``csv_path``, ``tb_dir``, ``plot_path``, ``size_bits``,
    ``float_bits``, ``bops``, ``history`` and more (:meth:`saq.engine.TrainResult.to_dict`). Raises
    :class:`TrainingInterrupted` on Ctrl-C. Seeds the global torch / Python / NumPy generators from ``cfg.seed``.
    """
    cfg = TrainConfig.from_dict(cfg.to_dict())  # a validated private copy
    from .models import model_info

    model_info(cfg.model_name)  # an unknown model fails now (with suggestions), before any data is built
    from .models._registry import check_model_options

    check_model_options(cfg.model_name, {k: v for k, v in cfg.model_kwargs.items() if k != "in_chans"})
    from .data import DATASETS, build_datasets

    if cfg.dataset not in DATASETS:  # and so does an unknown data set (its error names the choices)
        build_datasets(cfg.dataset)
    if cfg.resume and not cfg.save:
        raise ValueError("resume needs save=True (the checkpoint lives in the output folder)")

    from .device import check_threads, check_workers

    check_threads(cfg.threads)
    check_workers(cfg.workers)
    env = DistEnv.from_environ()
    device = resolve_device(cfg.device, env.local_rank)
    if cfg.lsq_backend == "triton" and device.type != "cuda":
        raise ValueError(f"lsq_backend 'triton' runs Triton kernels on CUDA devices only, and this run's device "
                         f"is {device}: use lsq_backend 'autograd'")
    own_pg = init_distributed(env, device)
    ckpt = Checkpointer(Path(cfg.output), cfg, main=env.main)
    threads_before = torch.get_num_threads()  # train() picks its own count; the caller's comes back after
    backend_before = get_lsq_backend()  # and so does the LSQ backend
    try:
        set_lsq_backend(cfg.lsq_backend)  # an ImportError here names the missing Triton
        ckpt.claim(env.distributed)
        return _train(cfg, progress and env.main, step_callback, device, env, ckpt).to_dict()
    finally:
        torch.set_num_threads(threads_before)
        set_lsq_backend(backend_before)
        ckpt.release()
        if own_pg and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, progress: bool, step_callback: Optional[Callable[[int], None]],
           device: torch.device, env: DistEnv, ckpt: Checkpointer) -> TrainResult:
    """Set up (in this order: the RNG draws of each part are part of the results), :func:`~saq.engine.fit`,
    report."""
    state = ckpt.resume_state()  # None for a fresh run
    _seed_all(cfg.seed)
    data, bundle = build_data(cfg, device, env)
    _check_input_rank(cfg, data.info["input_shape"])
    model, raw_model, threads = _setup_model(cfg, data, bundle.train, state, device, env, ckpt.path)
    run = _setup_run(cfg, env, device, data, model, raw_model, ckpt, state, progress, step_callback)
    if state is not None:
        with _restoring(ckpt.path, "random number generator state"):
            set_rng_state(state["rng"])  # last: everything above may have drawn random numbers
    fit(run)
    return _result(run, threads)


@contextlib.contextmanager
def _restoring(path: Path, what: str) -> Iterator[None]:
    """A resumed checkpoint whose ``what`` cannot be restored (a missing entry, a wrong type or shape) is one
    ValueError naming the file, not a traceback from deep inside torch."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        detail = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:200]
        raise ValueError(f"cannot resume {path}: its {what} cannot be restored ({detail}); it is corrupted or "
                         "was written for another model") from None


def _check_input_rank(cfg: TrainConfig, input_shape: list[int]) -> None:
    """A model made for images on a 1-D data set (or the reverse) is a one-line error naming both."""
    from .data import dataset_info
    from .models import model_info

    expected = model_info(cfg.model_name).input_shape
    if expected and len(expected) != len(input_shape):
        shape = "x".join(map(str, input_shape))
        raise ValueError(f"model {cfg.model} takes {len(expected) - 1}-D inputs ({'x'.join(map(str, expected))}) "
                         f"but {cfg.dataset}'s are {len(input_shape) - 1}-D ({shape}): choose a model for this "
                         f"data set (its default: {dataset_info(cfg.dataset).default_model})")


def _result(run: Run, threads: int) -> TrainResult:
    from ..quant.summary import summary as model_summary

    cfg, ckpt, st = run.cfg, run.checkpointer, run.state
    s = model_summary(run.raw_model)
    saved = ckpt.enabled
    plot = None
    if ckpt.writes and st.history:
        title = f"{cfg.model} on {cfg.dataset}, {bits_label(cfg.w_bits, cfg.a_bits)}, {cfg.sharpness}"
        plot = str(plot_history([r.to_dict() for r in st.history], ckpt.out / "curves.png", title=title))
    return TrainResult(
        history=st.history, epochs=st.history[-1].epoch if st.history else cfg.epochs,
        global_step=st.global_step, time_s=st.elapsed(),
        size_bits=s.size_bits, float_bits=s.float_bits, bops=s.bops, macs=s.macs,
        output=str(ckpt.out) if saved else None, checkpoint=str(ckpt.path) if saved else None,
        metrics_path=str(ckpt.out / "metrics.jsonl") if saved else None,
        csv_path=str(ckpt.out / "metrics.csv") if saved else None,
        tb_dir=str(ckpt.out / "tb") if saved else None, plot_path=plot,
        model=cfg.model, dataset=cfg.dataset, w_bits=cfg.w_bits, a_bits=cfg.a_bits, sharpness=cfg.sharpness,
        strategy=cfg.strategy, rank=run.env.rank, world_size=run.env.world, device=str(run.device),
        threads=threads, first_step_s=st.first_step_s, compiled=cfg.compile)


def format_result(r: dict[str, Any]) -> str:
    """The end-of-run summary `torchsaq train` prints: accuracy, size, BOPs and where the files are."""
    mib = 8 * 2**20
    lines = [f"torchsaq train: {r['model']} on {r['dataset']}, {bits_label(r['w_bits'], r['a_bits'])}, "
             f"sharpness {r['sharpness']}"
             f"{' (' + r['strategy'] + ')' if r['sharpness'] != 'none' and r.get('strategy') else ''}, "
             f"{r['epochs']} epoch{'s' * (r['epochs'] != 1)} in {fmt_time(r['time_s'])} ({r['device']}"
             f"{', %d thread%s' % (r['threads'], 's' * (r['threads'] > 1)) if r.get('threads') else ''}"
             f"{', %d processes' % r['world_size'] if r.get('world_size', 1) > 1 else ''})"]
    if r.get("compiled") and r.get("first_step_s") is not None:
        lines.append(f"  compile   first step {r['first_step_s']:.1f} s (torch.compile builds the graphs there)")
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
