"""A training run's folder and its checkpoint: the lock, the folder policy (resume / overwrite), the resume
state, atomic saves of the last state, and what is kept when a run fails.

The file format is :mod:`saq.checkpoint`'s; this module decides when and what a run writes. One checkpoint
per run folder, ``checkpoint.pt``: the last state, saved at the end of every epoch and on Ctrl-C (no
separate best checkpoint; the metrics history says which epoch scored best).
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .._io import atomic_write_text
from .checkpoint import FORMAT, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .device import agree

__all__ = ["Checkpointer", "claim_output", "CHECKPOINT_NAME", "RUN_FILES", "LOCK_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
#: what a run writes into its output folder (what --overwrite deletes); LOCK_NAME is held while it runs
RUN_FILES = (CHECKPOINT_NAME, "config.yaml", "metrics.jsonl", "metrics.csv", "curves.png", "tb")
LOCK_NAME = ".saq.lock"
#: options that may differ between a run and the run it resumes (they do not change the numbers)
_RESUME_FREE = {"resume", "output", "device", "workers", "data_dir", "log_every", "save", "epochs",
                "eval_every", "limit_eval_batches", "pretrained", "overwrite", "threads"}


def claim_output(out: Path, cfg: TrainConfig) -> Any:
    """Lock the run folder ``out`` for this run and apply the folder policy; returns the held lock.

    One run at a time: a second ``torchsaq train`` (or ``--resume``) into a folder in use is refused. A folder
    that already holds a run is never reused silently: ``resume`` continues it, ``overwrite`` deletes that
    run's files (:data:`RUN_FILES`) first, anything else is refused. Files of other names are left alone.
    """
    from filelock import FileLock, Timeout

    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; give a folder for the run (checkpoint.pt, metrics, tb/ go there)")
    made = [d for d in (out, *out.parents) if not d.exists()]  # the folders this claim creates
    lock_path = out / LOCK_NAME
    had_lock = lock_path.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), timeout=0)
        lock.acquire()
    except Timeout:
        raise ValueError(f"output folder {out} is in use by another torchsaq train (it holds the lock "
                         f"{out / LOCK_NAME}); wait for that run or choose another --output") from None
    except OSError as e:
        raise ValueError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    try:
        held = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
        ours = {name: _written_by_us(out / name) for name in held}
        # a folder holds a run only with a checkpoint or metrics of one, or the config.yaml a run wrote for this
        # folder (a run stopped before its first save): a tb/ and a config.yaml copied from another run (a
        # recipe) may be the user's own, and are never deleted on their own
        is_run = ours.get(CHECKPOINT_NAME, False) or (ours.get("metrics.jsonl", False)
                                                      and (out / "metrics.jsonl").stat().st_size > 0) \
            or (ours.get("config.yaml", False) and _config_names(out))
        foreign = [name for name in held if not ours[name]]
        if held and not cfg.resume and (foreign or not is_run):
            if foreign:
                why = f"{', '.join(foreign)} not written by torchsaq"
            else:
                why = (f"{', '.join(held)} but no checkpoint.pt or metrics.jsonl of a torchsaq run, nor the "
                       "config.yaml a run wrote for this folder (so they are not recognisably a run's)")
            raise ValueError(f"{out} holds {why}, which a run would replace; move them away or choose another "
                             "--output (nothing was changed)")
        if held and not cfg.resume:
            if not cfg.overwrite:
                raise ValueError(f"{out} already holds a run ({', '.join(held)}); continue it with --resume, "
                                 "replace it with --overwrite, or choose another --output")
            if cfg.pretrained:  # the weights to start from must not be what --overwrite deletes
                pre = Path(cfg.pretrained).resolve()
                gone = [out.resolve() / name for name in held]
                if pre == out.resolve() or any(pre == g or g in pre.parents for g in gone):
                    raise ValueError(f"--pretrained {cfg.pretrained} is the run in {out} that --overwrite would "
                                     "delete; copy it elsewhere first or choose another --output (nothing was changed)")
            for name in held:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            kept = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
            print(f"torchsaq: --overwrite: deleted the previous run in {out} ({', '.join(held)})"
                  + (f"; kept what it did not write: {', '.join(kept)}" if kept else ""), file=sys.stderr)
    except BaseException:
        lock.release()
        _undo_claim(lock_path, had_lock, made)
        raise
    return lock


def _undo_claim(lock_path: Path, had_lock: bool, made: list[Path]) -> None:
    """A refused claim leaves the disk as it found it: no lock file it created, no empty folder it made."""
    if not had_lock:
        lock_path.unlink(missing_ok=True)
    for d in made:  # innermost first
        try:
            d.rmdir()  # only if empty
        except OSError:
            break


#: options every stored config.yaml holds (recognises a run's own config.yaml across versions that add options)
_STORED_KEYS = {"dataset", "model", "output", "seed", "resume", "overwrite", "save"}
#: the keys every metrics record starts with, in this order (engine.EpochRecord.to_dict)
_RECORD_KEYS = ("epoch", "step", "lr", "train_loss", "train_acc")


def _written_by_us(path: Path) -> bool:
    """Whether ``path`` (one of :data:`RUN_FILES`) is recognisably what a torchsaq run writes there: only such a
    file is ever replaced or deleted (a user's own ``config.yaml`` or ``tb/`` in an --output folder is not)."""
    name = path.name
    try:
        if path.is_symlink():
            return False
        if name == "tb":
            files = [p for p in path.rglob("*") if not p.is_dir()]
            return path.is_dir() and all(p.name.startswith("events.out.tfevents.") for p in files)
        if not path.is_file():
            return False
        if name == CHECKPOINT_NAME:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return isinstance(state, dict) and state.get("format") == FORMAT
        if name == "curves.png":
            with open(path, "rb") as f:
                head = f.read(512)
            return head.startswith(b"\x89PNG") and b"Matplotlib" in head
        text = path.read_text()
        if name == "metrics.csv":  # the columns every record starts with (engine.EpochRecord.to_dict)
            return text.startswith(",".join(_RECORD_KEYS) + ",") or not text
        if name == "metrics.jsonl":
            rows = [json.loads(line) for line in text.splitlines()]
            return all(isinstance(r, dict) and list(r)[:len(_RECORD_KEYS)] == list(_RECORD_KEYS) for r in rows)
        if name == "config.yaml":
            import yaml

            data = yaml.safe_load(text)
            # a run writes every option (a hand-written recipe rarely names resume, overwrite and save at once)
            return isinstance(data, dict) and _STORED_KEYS <= set(data)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return False


def _config_names(out: Path) -> bool:
    """Whether ``out/config.yaml`` (a run's, by :func:`_written_by_us`) was written by a run into ``out``: its
    ``output`` names this folder (absolute: the same folder; relative: the last parts of its path). A copy of
    another run's config.yaml (a recipe) names that run's folder."""
    try:
        import yaml

        stored = yaml.safe_load((out / "config.yaml").read_text()).get("output")
        if not isinstance(stored, str) or not stored:
            return False
        path = Path(stored)
        if path.is_absolute():
            return path.resolve() == out.resolve()
        parts = [p for p in path.parts if p not in ("", ".")]
        return bool(parts) and ".." not in parts and list(out.resolve().parts[-len(parts):]) == parts
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def _config_diff(old: TrainConfig, new: TrainConfig) -> list[str]:
    a, b = old.to_dict(), new.to_dict()
    return [f"{k}={a[k]!r} (now {b[k]!r})" for k in a if k not in _RESUME_FREE and a.get(k) != b.get(k)]


def non_finite(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers (quantizer steps included) holding NaN/inf."""
    items = [(n, t) for n, t in model.state_dict().items() if torch.is_tensor(t) and t.is_floating_point()]
    if not items:
        return []
    ok = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()  # one device read
    return [n for (n, _), good in zip(items, ok) if not good]


# RNG state (torch CPU + CUDA + python `random`; no numpy arrays in checkpoints)
def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


class Checkpointer:
    """The run folder ``out`` of one run of ``cfg``: lock, resume, atomic saves of ``checkpoint.pt``.

    Every rank holds one; only rank 0 (``main``) locks the folder and writes, every rank checks its weights
    before a save. With ``cfg.save`` False nothing is locked, read or written. Use: :meth:`claim` (lock and
    folder policy, all ranks agree), :meth:`resume_state`, :meth:`attach` the training objects,
    :meth:`write_config`, then :meth:`save` as often as needed; :meth:`release` at the end.
    """

    def __init__(self, out: Path, cfg: TrainConfig, main: bool = True):
        self.out, self.cfg = Path(out), cfg
        self.path = self.out / CHECKPOINT_NAME
        self.enabled = cfg.save                 # the run saves (some rank writes)
        self.writes = cfg.save and main         # this rank writes
        # what the run is, not how it was started: reused as a recipe, it must not delete anything
        self.stored_config = {**cfg.to_dict(), "overwrite": False}
        self.saved_epoch: Optional[int] = None  # of the last checkpoint on disk
        self._lock: Any = None
        self._parts: dict[str, Any] = {}

    # -- the folder --------------------------------------------------------------------------------------
    def claim(self, distributed: bool = False) -> None:
        """Lock the folder and apply the folder policy (rank 0); a refusal is a ValueError on every rank."""
        refused = None
        if self.writes:
            try:
                self._lock = claim_output(self.out, self.cfg)
            except (ValueError, OSError) as e:  # every rank stops, not rank 0 alone
                refused = str(e)
        agree(refused, distributed)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def write_config(self) -> None:
        """``config.yaml``: the run's options, as a recipe."""
        if self.writes:
            import yaml

            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.stored_config, sort_keys=False))

    # -- resume ------------------------------------------------------------------------------------------
    def resume_state(self) -> Optional[dict[str, Any]]:
        """The checkpoint to continue (``cfg.resume``), checked against ``cfg``; None for a fresh run."""
        cfg, path = self.cfg, self.path
        if not cfg.resume:
            return None
        if not path.is_file():
            raise ValueError(f"nothing to resume: {path} does not exist")
        state = load_checkpoint(path)
        old = TrainConfig.from_dict(dict(state["config"]))
        diff = _config_diff(old, cfg)
        if diff:
            raise ValueError(f"{path} was trained with other options: {', '.join(diff)}; resume with the "
                             "same options or choose a new --output")
        # --epochs on resume: a step or constant schedule continues exactly; a cosine one would be re-stretched
        if cfg.epochs < int(state["epoch"]):
            raise ValueError(f"{path} has already completed {state['epoch']} epochs; --epochs {cfg.epochs} "
                             "is fewer")
        if cfg.epochs != old.epochs and cfg.lr_schedule == "cosine":
            raise ValueError(f"--epochs {cfg.epochs} would stretch this run's {old.epochs}-epoch cosine schedule: the "
                             "learning rate would jump back up instead of continuing; resume with --epochs "
                             f"{old.epochs}, or fine-tune its weights in a new run (--pretrained {path} "
                             "--output NEW_FOLDER)")
        self.saved_epoch = int(state["epoch"])
        return state

    # -- saving ------------------------------------------------------------------------------------------
    def attach(self, *, data: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, scaler: Optional[torch.amp.GradScaler]) -> None:
        """What :meth:`save` stores: the data description and the (unwrapped) model, optimizer, scheduler, scaler."""
        self._parts = dict(data=data, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    def kept(self) -> str:
        """What is on disk after a failure now (for error messages)."""
        if not self.enabled:
            return "nothing is saved (save=False)"
        if self.saved_epoch is None:
            return "nothing was saved"
        return f"the last good checkpoint ({self.path}, epoch {self.saved_epoch}) is kept"

    def check_finite(self, where: str) -> None:
        """Before anything is saved or evaluated: every weight and step must be finite (all ranks agree)."""
        bad = non_finite(self._parts["model"])
        if bad:
            raise FloatingPointError(
                f"non-finite values in {len(bad)} tensor(s) at {where} (e.g. {', '.join(bad[:3])}); "
                f"{self.kept()}; lower --lr, check --weight-decay, or set --max-grad-norm")

    def save(self, epoch: int, step_in_epoch: int, *, global_step: int, partial: list, time_s: float,
             history: list[dict[str, Any]], metrics: Optional[dict[str, Any]] = None) -> Optional[str]:
        """Check the weights, then write the state after ``epoch`` completed epochs and ``step_in_epoch`` more
        steps (``partial``: that epoch's [loss sum, correct, count] so far) atomically; returns the path
        (None when nothing is saved). A non-finite weight raises FloatingPointError and writes nothing."""
        self.check_finite(f"epoch {epoch + 1 if step_in_epoch else epoch}"
                          + (f" step {step_in_epoch}" if step_in_epoch else " end"))
        if not self.writes:
            return str(self.path) if self.enabled else None
        p = self._parts
        save_checkpoint(self.path, {
            "config": self.stored_config, "data": p["data"], "model": p["model"].state_dict(),
            "optimizer": p["optimizer"].state_dict(), "scheduler": p["scheduler"].state_dict(),
            "scaler": p["scaler"].state_dict() if p["scaler"] is not None else None, "rng": rng_state(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "partial": [float(partial[0]), float(partial[1]), int(partial[2])],
            "time_s": time_s, "history": history, "metrics": metrics or {},
        })
        self.saved_epoch = epoch
        return str(self.path)
