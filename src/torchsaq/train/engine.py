"""The training engine: one optimisation step (:func:`train_step`), one epoch (:func:`train_one_epoch`), one
evaluation (:func:`evaluate`), the loop over epochs (:func:`fit`), and the typed records they produce
(:class:`EpochRecord` per epoch, :class:`TrainResult` at the end).

:func:`saq.train.train` builds a :class:`Run` (model, data, optimizer, scheduler, resumed state) and hands
it to :func:`fit`. The epoch reads top to bottom in :func:`train_one_epoch`; what happens between epochs
(reduce, health checks, evaluation, metrics files, checkpoint) in :func:`fit` and :func:`finish_epoch`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from ..optim._update import base_step
from .checkpointer import Checkpointer
from .config import TrainConfig
from ..quant.convert import eval_mode
from .device import DistEnv, autocast
from ..quant.quantizer import Quantizer
from .runlog import TensorBoard, write_metrics

__all__ = ["EpochRecord", "EpochSums", "TrainResult", "TrainData", "LoopState", "Run", "TrainingInterrupted",
           "evaluate", "train_step", "train_one_epoch", "finish_epoch", "fit", "DIVERGED_LOSS_FACTOR"]

#: an epoch whose mean training loss exceeds this many times ln(classes) (chance level) has diverged
DIVERGED_LOSS_FACTOR = 10.0


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after Ctrl-C/SIGTERM once the state is saved; resume with ``resume=True``."""

    def __init__(self, checkpoint: Optional[str], epoch: int, step_in_epoch: int):
        self.checkpoint, self.epoch, self.step_in_epoch = checkpoint, epoch, step_in_epoch
        where = f"epoch {epoch} step {step_in_epoch}" if step_in_epoch else f"the end of epoch {epoch}"
        saved = f"checkpoint saved at {where}: {checkpoint}" if checkpoint else "nothing saved (save=False)"
        super().__init__(f"training interrupted; {saved}")


# -------------------------------------------------------------------------------------------------------
# records
# -------------------------------------------------------------------------------------------------------
@dataclass
class EpochSums:
    """One rank's running training sums over an epoch: summed loss, top-1 hits, samples (finite steps only)."""

    loss: float = 0.0
    correct: float = 0.0
    count: int = 0

    def add(self, loss: float, hits: float, n: int) -> None:
        self.loss += loss * n
        self.correct += hits
        self.count += n

    def as_list(self) -> list:
        """The checkpoint's ``partial`` entry."""
        return [self.loss, self.correct, self.count]


_SPLITS = ("val", "test")


@dataclass
class EpochRecord:
    """One line of ``metrics.jsonl``: the state after ``epoch`` (1-based) epochs and ``step`` optimizer steps.
    Accuracies in percent; a split the run does not evaluate is None (and absent from :meth:`to_dict`)."""

    epoch: int
    step: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: Optional[float] = None
    val_acc: Optional[float] = None
    val_top5: Optional[float] = None
    test_loss: Optional[float] = None
    test_acc: Optional[float] = None
    test_top5: Optional[float] = None
    time_s: float = 0.0

    def set_split(self, split: str, metrics: dict[str, float]) -> None:
        """Store :func:`evaluate`'s numbers for ``split`` ("val" or "test")."""
        for key, name in (("loss", "loss"), ("acc", "acc"), ("top5", "top5")):
            setattr(self, f"{split}_{name}", metrics[key])

    def to_dict(self) -> dict[str, Any]:
        """The record as the metrics files, the checkpoint history and TensorBoard store it (same key order)."""
        d: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "lr": self.lr,
                             "train_loss": self.train_loss, "train_acc": self.train_acc}
        for split in _SPLITS:
            if getattr(self, f"{split}_acc") is not None:
                d.update({f"{split}_{k}": getattr(self, f"{split}_{k}") for k in ("loss", "acc", "top5")})
        d["time_s"] = self.time_s
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochRecord":
        """A record of a checkpoint's history (the inverse of :meth:`to_dict`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown metrics record key(s) {', '.join(unknown)}")
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`saq.train.train` reports; :meth:`to_dict` is the dict it returns (``res["test_acc"]``)."""

    history: list[EpochRecord]
    epochs: int
    global_step: int
    time_s: float
    size_bits: int
    float_bits: int
    bops: Optional[float]
    macs: Optional[float]
    output: Optional[str]
    checkpoint: Optional[str]
    metrics_path: Optional[str]
    csv_path: Optional[str]
    tb_dir: Optional[str]
    plot_path: Optional[str]
    model: Optional[str]
    dataset: str
    w_bits: int
    a_bits: Optional[int]  # None: weight-only
    sharpness: str
    strategy: str
    rank: int
    world_size: int
    device: str
    threads: int
    first_step_s: Optional[float] = None  # this session's first step, compilation included (``compiled``)
    compiled: bool = False

    @property
    def last(self) -> Optional[EpochRecord]:
        return self.history[-1] if self.history else None

    def to_dict(self) -> dict[str, Any]:
        """The last epoch's metrics (``test_acc``, ``val_acc``, ``train_loss``, ...), then the run's summary
        (every field but ``history``), then ``history`` as a list of record dicts."""
        d = {k: v for k, v in (self.last.to_dict() if self.last else {}).items() if k != "step"}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "history"})
        d["history"] = [r.to_dict() for r in self.history]
        return d


# -------------------------------------------------------------------------------------------------------
# what the loop runs on
# -------------------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    """The loaders of a run. The training order is a function of (seed, epoch) and can start mid-epoch:
    ``sampler`` has ``set_epoch`` and ``start`` (a sample index), ``generator`` seeds the loader's workers.
    ``steps_per_epoch`` counts the loader's batches; with gradient accumulation ``accum_steps`` of them make
    one optimizer step (:attr:`updates_per_epoch` steps per epoch)."""

    train_loader: Any
    sampler: Any
    generator: torch.Generator
    val_loader: Any
    test_loader: Any
    steps_per_epoch: int
    batch_size: int
    seed: int
    info: dict[str, Any]  # dataset, num_classes, in_chans, input_shape (stored in the checkpoint)
    accum_steps: int = 1  # batches (micro-batches) per optimizer step

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer steps per epoch: ``ceil(steps_per_epoch / accum_steps)`` (a partial last group steps too)."""
        return -(-self.steps_per_epoch // self.accum_steps)

    def start_epoch(self, epoch: int, begin: int) -> None:
        """Set the order of ``epoch`` (0-based), skipping its first ``begin`` batches."""
        self.sampler.set_epoch(epoch)
        self.sampler.start = begin * self.batch_size
        self.generator.manual_seed(self.seed * 100_003 + epoch)


@dataclass
class LoopState:
    """Where the run is: what a checkpoint stores besides the weights, plus this session's clock."""

    start_epoch: int = 0        # the epoch (0-based) this session starts in
    skip: int = 0               # batches of start_epoch already done (a whole number of accumulation groups)
    partial: EpochSums = field(default_factory=EpochSums)  # their sums
    global_step: int = 0        # optimizer steps
    time_before: float = 0.0    # seconds spent by earlier sessions of the run
    history: list[EpochRecord] = field(default_factory=list)
    t0: float = 0.0             # this session's start (time.time())
    session_steps: int = 0      # optimizer steps of this session
    first_step_s: Optional[float] = None  # wall time of this session's first step (torch.compile compiles there)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> "LoopState":
        return cls(start_epoch=int(state["epoch"]), skip=int(state.get("step_in_epoch", 0)),
                   partial=EpochSums(*(state.get("partial") or [0.0, 0.0, 0])),
                   global_step=int(state.get("global_step", 0)), time_before=float(state.get("time_s", 0.0)),
                   history=[EpochRecord.from_dict(r) for r in state.get("history") or []])

    def elapsed(self) -> float:
        """Seconds of training over every session of the run."""
        return self.time_before + time.time() - self.t0


@dataclass
class Run:
    """Everything the loop needs, built by :func:`saq.train.train`."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    model: nn.Module                    # what the forward runs (DDP-wrapped under torchrun)
    raw_model: nn.Module                # the model itself
    optimizer: torch.optim.Optimizer    # saq.SAQ around ``base``, or ``base`` for sharpness='none'
    base: torch.optim.Optimizer
    scheduler: Any                      # per-iteration LambdaLR on ``base``
    scaler: Optional[torch.amp.GradScaler]
    criterion: nn.Module
    data: TrainData
    checkpointer: Checkpointer
    tb: TensorBoard
    state: LoopState
    progress: bool = False
    step_callback: Optional[Callable[[int], None]] = None

    def save(self, epoch: int, step_in_epoch: int, sums: EpochSums,
             record: Optional[EpochRecord] = None) -> Optional[str]:
        """Checkpoint after ``epoch`` epochs and ``step_in_epoch`` steps (see :meth:`Checkpointer.save`)."""
        st = self.state
        return self.checkpointer.save(epoch, step_in_epoch, global_step=st.global_step, partial=sums.as_list(),
                                      time_s=st.elapsed(), history=[r.to_dict() for r in st.history],
                                      metrics=record.to_dict() if record is not None else None)


# -------------------------------------------------------------------------------------------------------
# stop requests (Ctrl-C / SIGTERM): finish the step, save, stop
# -------------------------------------------------------------------------------------------------------
class StopRequest:
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
            print("\ntorchsaq: stopping after this step and saving a checkpoint (Ctrl-C again to abort now)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, distributed: bool, device: torch.device) -> bool:
        """Whether any rank was asked to stop (one all-reduce under torchrun)."""
        if not distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


# -------------------------------------------------------------------------------------------------------
# evaluation
# -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: Union[str, torch.device] = "cpu",
             amp_dtype: Optional[torch.dtype] = None, limit: int = 0, reduce: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent), mean cross-entropy and sample count ``n`` of ``model`` over ``loader``
    (at most ``limit`` batches if > 0) in eval mode; every module gets its own training flag back.

    ``reduce``: sum over the ranks of a torchrun job (each rank evaluating its shard) before averaging.
    A sample whose outputs are not finite (NaN in the inputs) is a FloatingPointError: no accuracy is reported.
    """
    device = torch.device(device)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count, non-finite
    with eval_mode(model):
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
                                 torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
                                 (~torch.isfinite(out).all(dim=1)).sum().double()])
    if reduce:
        dist.all_reduce(sums)
    loss, c1, c5, n, bad = sums.tolist()
    if bad:
        raise FloatingPointError(f"evaluation: {int(bad)} of {int(n)} samples give non-finite outputs (NaN or inf "
                                 "in the inputs or the model); no accuracy is reported")
    if n == 0:
        return {"acc": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    return {"acc": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "n": int(n)}


# -------------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------------
def _no_sync(run: Run, last: bool) -> contextlib.AbstractContextManager:
    """The backward of an accumulation group's micro-batch: DDP all-reduces only at the group's last one."""
    no_sync = getattr(run.model, "no_sync", None)
    return no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()


def train_step(run: Run, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on the micro-batches ``batches`` (one batch without gradient accumulation), then
    one LR-schedule step. Returns the group's loss (the mean over its samples) and its top-1 hits, both of the
    first forward. Sharpness-aware: ``saq.SAQ.step(closure)`` runs the passes.

    Gradient accumulation: the closure runs forward + backward over every micro-batch, each loss weighted by
    its share of the group's samples (1/N for N equal micro-batches), so the accumulated gradient is that of
    one batch holding them all. A partial group (the end of an epoch: m < N micro-batches) is weighted the
    same way, by 1/m: its gradient is the mean over the samples it has, at the scale of a full group's. The
    two-pass strategies call the closure twice, so the perturbation comes from the accumulated gradient and
    the gradient at the perturbed point is accumulated over the same micro-batches (docs: ``saq.SAQ``).
    """
    batches = [(x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)) for x, y in batches]
    total = sum(y.shape[0] for _, y in batches)
    hits_box: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        losses = []
        for i, (x, y) in enumerate(batches):
            n = y.shape[0]
            if run.cfg.sharpness != "none":  # sub_batch: its ascent pass sees a part of the batch
                x, y = run.optimizer.pass_batch(x, y)  # type: ignore[attr-defined]
            with _no_sync(run, last=i == len(batches) - 1):
                with autocast(run.device, run.amp_dtype):
                    logits = run.model(x)
                    loss = run.criterion(logits, y) * (y.shape[0] / total)
                if len(hits_box) < len(batches) and y.shape[0] == n:  # the first pass over the whole batch
                    hits_box.append((logits.detach().argmax(1) == y).sum())
                (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
            losses.append(loss.detach())
        return torch.stack(losses).sum()

    run.optimizer.zero_grad(set_to_none=True)
    if run.cfg.sharpness == "none":
        loss = closure()
        base_step(run.base, run.raw_model.parameters(), grad_scaler=run.scaler, max_grad_norm=run.cfg.max_grad_norm)
    else:
        loss = run.optimizer.step(closure)  # type: ignore[assignment, arg-type]  # torch stub: a float closure
    keep_steps_positive(run.raw_model)
    with warnings.catch_warnings():  # a scaler-skipped first step makes LambdaLR complain
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    return loss, torch.stack(hits_box).sum()


def train_one_epoch(run: Run, epoch: int, begin: int, sums: EpochSums, stop: StopRequest, bar: Any) -> EpochSums:
    """Train epoch ``epoch`` (0-based) from batch ``begin`` on, adding to ``sums`` (this rank's); returns them.

    Each optimizer step takes ``cfg.accum_steps`` batches (:func:`train_step`); the last group of an epoch
    may be shorter. A non-finite loss stops the run (FloatingPointError; with fp16 AMP the scaler skips the
    step instead). A stop request (Ctrl-C, SIGTERM) ends the step, saves a mid-epoch checkpoint (at the end
    of an accumulation group: ``step_in_epoch`` counts batches) and raises :class:`TrainingInterrupted`.
    """
    st, steps, accum = run.state, run.data.steps_per_epoch, run.cfg.accum_steps
    run.data.start_epoch(epoch, begin)
    run.model.train()
    if run.cfg.freeze_bn:  # normalise with the running statistics, leave them as they are
        for m in run.raw_model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    it = iter(run.data.train_loader) if begin < steps else iter(())
    step = begin  # batches of this epoch done
    while step < steps:
        group: list[Any] = []
        try:
            while len(group) < min(accum, steps - step):
                group.append(next(it))
        except StopIteration:
            if not group:
                break
        except RuntimeError:
            if not stop.requested:  # Ctrl-C also reaches loader workers: that is a stop, not a crash
                raise
            raise TrainingInterrupted(run.save(epoch, step, sums), epoch + 1, step)
        t_step = time.perf_counter()
        try:
            loss, hits = train_step(run, group)
        except FloatingPointError as e:  # saq.SAQ refused a non-finite step: say what the CLI user can do
            raise FloatingPointError(
                f"training diverged at epoch {epoch + 1}, batch {step + len(group)}: "
                f"{str(e).partition('; ')[0].removeprefix('saq.SAQ: ')} (the step was not taken); "
                f"{run.checkpointer.kept()}; lower --lr (or --rho), or set --max-grad-norm") from e
        count = sum(int(y.numel()) for _, y in group)
        step += len(group)
        # one host-device read per step for both numbers (exact: float64 holds either one)
        loss_f, hits_f = torch.stack([loss.detach().double(), hits.double()]).tolist()
        if st.first_step_s is None:
            st.first_step_s = time.perf_counter() - t_step
        if math.isfinite(loss_f):
            sums.add(loss_f, hits_f, count)
        elif run.scaler is None:  # with fp16 AMP the scaler skips such steps and lowers its scale
            raise FloatingPointError(
                f"the training loss became {loss_f} at epoch {epoch + 1}, batch {step}; "
                f"{run.checkpointer.kept()}; lower --lr (or --rho), or set --max-grad-norm")
        st.global_step += 1
        st.session_steps += 1
        _after_step(run, loss_f, sums, bar, len(group))
        if stop.agreed(run.env.distributed, run.device) and step < steps:
            raise TrainingInterrupted(run.save(epoch, step, sums), epoch + 1, step)
    return sums


def _after_step(run: Run, loss: float, sums: EpochSums, bar: Any, batches: int = 1) -> None:
    """Per-step logging: TensorBoard every ``log_every`` steps, the progress bar (``batches`` more), the step
    callback."""
    st, cfg = run.state, run.cfg
    if cfg.log_every and st.global_step % cfg.log_every == 0:
        run.tb.scalars({"train_step_loss": loss, "lr": run.base.param_groups[0]["lr"]}, st.global_step)
    if run.progress:
        left = (time.time() - st.t0) / st.session_steps * (cfg.epochs * run.data.updates_per_epoch - st.global_step)
        bar.set_postfix_str(f"loss {sums.loss / max(sums.count, 1):.4f} "
                            f"acc {100 * sums.correct / max(sums.count, 1):.1f}% left {fmt_time(left)}",
                            refresh=False)
        bar.update(batches)
    if run.step_callback is not None:
        run.step_callback(st.global_step)


@torch.no_grad()
def keep_steps_positive(model: nn.Module) -> None:
    """Project every LSQ step back to at least :data:`~torchsaq.kernels.STEP_EPS` after an optimizer step.

    Why a step goes negative: at 8 bits LSQ's initial step puts the range (Qp * s = 2 sqrt(Qp) mean|w|, about
    22 mean|w|) far beyond the weights, so no weight is clipped and the step's gradient is only the rounding
    term round(w/s) - w/s, zero-mean noise with no restoring force; scaled by 1/sqrt(N Qp) with few weights
    per channel (N = 5 in cnn1d's first layer) it is a random walk at the weights' learning rate, which can
    cross zero (the default run's smallest first-layer step falls to a third of its start while the median
    holds). The forward already computes with max(s, STEP_EPS); projecting s there keeps it positive, so the
    clipped weights' gradient pushes it back up at once instead of first climbing back from below zero. A
    step that never goes that low is untouched (the results are unchanged bit for bit)."""
    from ..quant.kernels import STEP_EPS

    steps: list[torch.Tensor] = [q.scale for q in model.modules()
                                 if isinstance(q, Quantizer) and q.kind == "lsq" and q.enabled]
    if steps:
        torch._foreach_clamp_min_(steps, STEP_EPS)


def _dead_steps(model: nn.Module) -> list[tuple[str, float]]:
    """(name, smallest step) of every active quantizer with a step <= 0 (an optimizer pushed it there)."""
    qs = [(n, q) for n, q in model.named_modules() if isinstance(q, Quantizer) and q.enabled and q.is_initialized]
    if not qs:
        return []
    lows = torch.stack([q.step_size().min().float().cpu() for _, q in qs]).tolist()
    return [(n, low) for (n, _), low in zip(qs, lows) if low <= 0]


def _check_epoch(run: Run, epoch: int, train_loss: float, warned_dead: set[str]) -> None:
    """Nothing non-finite or diverged is evaluated, logged or saved (the last good checkpoint stays); a
    quantizer step pushed to <= 0 is a warning, once per quantizer."""
    ckpt, classes = run.checkpointer, run.data.info["num_classes"]
    limit = DIVERGED_LOSS_FACTOR * math.log(max(classes, 2))
    ckpt.check_finite(f"the end of epoch {epoch + 1}")
    dead = _dead_steps(run.raw_model)
    if train_loss > limit:
        why = [f"mean training loss {train_loss:.4g} > {limit:.3g} ({DIVERGED_LOSS_FACTOR:g} x ln {classes} classes)"]
        if dead:
            why.append(f"{len(dead)} quantizer step size(s) <= 0 (e.g. {dead[0][0]}: {dead[0][1]:.4g})")
        raise FloatingPointError(f"training diverged in epoch {epoch + 1}: {'; '.join(why)}; {ckpt.kept()}; "
                                 "lower --lr (or --rho), or set --max-grad-norm")
    new_dead = sorted({n for n, _ in dead} - warned_dead)
    if new_dead and run.env.main:
        # a step the optimizer pushed to <= 0 quantizes with the smallest step (STEP_EPS): its channel
        # outputs ~0, a dead channel, not a divergence (8-bit first layers see it at ordinary LRs)
        print(f"torchsaq: warning: {len(new_dead)} quantizer(s) have a step size <= 0 after epoch {epoch + 1} "
              f"(e.g. {new_dead[0]}); their channels compute with the smallest step and output ~0",
              file=sys.stderr)
    warned_dead.update(new_dead)


def finish_epoch(run: Run, epoch: int, sums: EpochSums, warned_dead: set[str]) -> EpochRecord:
    """After the steps of ``epoch``: reduce the training sums over the ranks, check the weights, evaluate
    (float32, no autocast: the numbers ``torchsaq eval`` reproduces from the checkpoint) every
    ``cfg.eval_every`` epochs and after the last one; the epochs between record training metrics only."""
    distributed = run.env.distributed
    total = torch.tensor([sums.loss, sums.correct, float(sums.count)], dtype=torch.float64, device=run.device)
    if distributed:
        dist.all_reduce(total)
        for b in run.raw_model.buffers():  # evaluate every shard with rank 0's BatchNorm statistics
            dist.broadcast(b, 0)
    tl, tc, tn = total.tolist()
    _check_epoch(run, epoch, tl / max(tn, 1), warned_dead)
    record = EpochRecord(epoch=epoch + 1, step=run.state.global_step, lr=run.base.param_groups[0]["lr"],
                         train_loss=tl / max(tn, 1), train_acc=100 * tc / max(tn, 1))
    cfg = run.cfg
    evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
    for split, loader in zip(_SPLITS, (run.data.val_loader, run.data.test_loader)):
        if loader is not None and evaluated:
            record.set_split(split, evaluate(run.raw_model, loader, run.device, None, cfg.limit_eval_batches,
                                             reduce=distributed))
    record.time_s = round(run.state.elapsed(), 3)
    return record


#: tqdm's bar without its own time left for the epoch: the postfix's "left" is the whole run's (one ETA)
_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def fit(run: Run) -> None:
    """Train from ``run.state`` to ``cfg.epochs``: per epoch, :func:`train_one_epoch`, :func:`finish_epoch`,
    the metrics files (rank 0) and a checkpoint. Ctrl-C/SIGTERM: :class:`TrainingInterrupted` after a save."""
    from tqdm.auto import tqdm

    st, cfg, ckpt = run.state, run.cfg, run.checkpointer
    st.t0 = time.time()
    out = ckpt.out
    warned_dead: set[str] = set()  # quantizers already reported with a step <= 0
    with StopRequest(announce=run.env.main) as stop, contextlib.closing(run.tb):
        for epoch in range(st.start_epoch, cfg.epochs):
            resumed = epoch == st.start_epoch
            begin = st.skip if resumed else 0
            with tqdm(total=run.data.steps_per_epoch, initial=begin, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                      disable=not run.progress, dynamic_ncols=True, unit="step", leave=True, file=sys.stderr,
                      bar_format=_BAR) as bar:
                sums = train_one_epoch(run, epoch, begin, st.partial if resumed else EpochSums(), stop, bar)
                record = finish_epoch(run, epoch, sums, warned_dead)
                st.history.append(record)
                if run.progress:
                    shown = "val" if record.val_acc is not None else "test"
                    score = getattr(record, f"{shown}_acc")
                    bar.set_postfix_str(f"loss {record.train_loss:.4f} acc {record.train_acc:.1f}%"
                                        + (f" {shown} {score:.2f}%" if score is not None else ""), refresh=True)
            if ckpt.writes:
                write_metrics([r.to_dict() for r in st.history], out / "metrics.jsonl", out / "metrics.csv")
                run.tb.scalars(record.to_dict(), st.global_step)
            run.save(epoch + 1, 0, EpochSums(), record)
            if stop.requested and epoch + 1 < cfg.epochs:
                raise TrainingInterrupted(str(ckpt.path) if ckpt.enabled else None, epoch + 1, 0)


def fmt_time(s: float) -> str:
    """Seconds as M:SS or H:MM:SS."""
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
