"""Training checkpoints: atomic save, safe load (``weights_only=True``: a checkpoint cannot run code),
rebuilding the quantized model from a checkpoint alone (no data set needed), and loading float
(pretrained) weights into a model before quantization.

A checkpoint is a plain dict of tensors and Python scalars/containers written with :func:`torch.save`::

    format: "saq-checkpoint", version: 1, config: TrainConfig.to_dict(),
    data: {dataset, num_classes, in_chans, input_shape},
    model, optimizer, scheduler, scaler (state dicts), rng: {torch, cuda, python},
    epoch (completed epochs), step_in_epoch (0 at an epoch boundary), global_step, history, metrics
"""
from __future__ import annotations

import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from .._io import atomic_write

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "load_model", "load_trained",
           "model_from_checkpoint", "load_state_dict_checked", "load_pretrained"]

FORMAT = "saq-checkpoint"
VERSION = 1

PathLike = Union[str, os.PathLike]


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then rename.

    A crash or a failing save at any point leaves the previous file at ``path`` intact. Adds the
    ``format``/``version`` keys that :func:`load_checkpoint` checks. Returns the path.
    """
    state = {"format": FORMAT, "version": VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises ``ValueError`` for a missing file, a corrupted file, or a file that is not a torchsaq checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "checkpoint.pt").is_file():
            path = path / "checkpoint.pt"
        else:
            raise ValueError(f"checkpoint not found: {path} is a folder without checkpoint.pt")
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False: that would run the file's code, and a torchsaq
        # checkpoint never needs it
        raise ValueError(f"{path} is not a torchsaq checkpoint: it holds Python objects other than tensors and plain "
                         "values, which a torchsaq checkpoint never does (not loaded: loading them could run code)"
                         ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"{path} is corrupted or not a PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a torchsaq checkpoint (no 'format: {FORMAT}' entry; a float state_dict "
                         "can be used with `torchsaq train --pretrained`)")
    if int(state.get("version", 0)) > VERSION:
        raise ValueError(f"{path} was written by a newer torchsaq (checkpoint version {state['version']})")
    for key in ("config", "model", "data"):
        if key not in state:
            raise ValueError(f"{path} is an incomplete torchsaq checkpoint (missing {key!r})")
    check_fields(state, str(path))
    return state


#: the most input elements per sample a checkpoint may declare (ImageNet at 224 px: 150528)
MAX_INPUT_ELEMENTS = 2**26


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def check_fields(state: dict[str, Any], where: str) -> None:
    """The one check of a checkpoint's fields by type and range, before anything acts on them: a ValueError
    naming ``where`` and the field (a wrong type, a missing entry, an input shape that cannot be this model's)."""
    def bad(field: str, why: str) -> None:
        raise ValueError(f"{where} is not a valid torchsaq checkpoint: {field} {why}")

    for key, kind in (("config", dict), ("model", dict), ("data", dict), ("optimizer", dict), ("scheduler", dict),
                      ("metrics", dict), ("history", list), ("rng", dict)):
        if key in state and not isinstance(state[key], kind) and not (key == "metrics" and state[key] is None):
            bad(repr(key), f"must be a {kind.__name__}, got {type(state[key]).__name__}")
    for key in ("epoch", "step_in_epoch", "global_step"):
        if key in state and not _is_int(state[key]):
            bad(repr(key), f"must be an integer >= 0, got {state[key]!r}")
    tensors = [k for k, v in state["model"].items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if tensors:
        bad(f"'model' entry {tensors[0]!r}", "is not a tensor")
    data = state["data"]
    for key in ("num_classes", "in_chans"):
        if not _is_int(data.get(key), 1):
            bad(f"data.{key}", f"must be an integer >= 1, got {data.get(key, 'nothing')!r}")
    shape = data.get("input_shape")
    if not (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 4 and all(_is_int(n, 1) for n in shape)):
        bad("data.input_shape", f"must be a list of 1 to 4 positive integers, got {shape!r}")
    if shape[0] != data["in_chans"]:
        bad("data.input_shape", f"{list(shape)} does not start with data.in_chans ({data['in_chans']})")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        bad("data.input_shape", f"{list(shape)} is absurd ({math.prod(shape)} values per sample, more than "
                                f"{MAX_INPUT_ELEMENTS})")
    if "dataset" in data and not isinstance(data["dataset"], str):
        bad("data.dataset", f"must be a name, got {data['dataset']!r}")
    # the classifier's outputs: some tensor of the model has num_classes rows (not a count that allocates TBs)
    n = data["num_classes"]
    if state["model"] and not any(t.dim() and t.shape[0] == n for t in state["model"].values()):
        bad("data.num_classes", f"{n} is not the output size of any of the model's tensors (its classifier's)")
    _check_resume_fields(state, bad)
    from .config import TrainConfig

    try:  # the stored options, checked as a recipe's are (a wrong type, an unknown model), naming this file
        TrainConfig.from_dict(dict(state["config"]))
    except ValueError as e:
        bad("'config'", f"holds a bad option: {e}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_resume_fields(state: dict[str, Any], bad: Any) -> None:
    """The entries only ``--resume`` reads (when present): the loop counters' partial sums, the metrics history,
    the elapsed time and the random number generator states."""
    if "time_s" in state and not (_is_number(state["time_s"]) and state["time_s"] >= 0):
        bad("'time_s'", f"must be a number of seconds >= 0, got {state['time_s']!r}")
    partial = state.get("partial")
    if partial is not None and not (isinstance(partial, (list, tuple)) and len(partial) == 3
                                    and all(_is_number(v) and v >= 0 for v in partial) and _is_int(partial[2])):
        bad("'partial'", f"must be [loss sum, correct, count] (finite, >= 0, count an integer), got {partial!r}")
    # (the record's keys are checked where --resume reads them: a record of an older version still evaluates)
    for i, record in enumerate(state.get("history") or []):
        if not (isinstance(record, dict) and all(isinstance(k, str) for k in record)
                and _is_int(record.get("epoch"), 1)
                and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                        for v in record.values())):
            bad(f"'history' entry {i}", f"must be a metrics record (epoch >= 1 and numbers), got {record!r}"[:200])
    rng = state.get("rng")
    if rng is not None:
        t, py = rng.get("torch"), rng.get("python")
        if not (torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1):
            bad("rng.torch", "must be a torch random number generator state (a 1-D uint8 tensor)")
        if not (isinstance(py, (list, tuple)) and len(py) == 3 and isinstance(py[1], (list, tuple))
                and all(_is_int(v) for v in py[1])):
            bad("rng.python", "must be a Python random state (version, internal state, gauss)")
        if not isinstance(rng.get("cuda", []), (list, tuple)):
            bad("rng.cuda", "must be a list of CUDA generator states")


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, Any], what: str) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a one-line ValueError naming the mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and torch.is_tensor(state_dict[k]) and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(unexpected[:3])}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) e.g. {'; '.join(shapes[:2])} (file vs model)")
        raise ValueError(f"{what} does not match the model architecture: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classification head (timm's get_classifier(), else the last nn.Linear)."""
    head = None
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # pragma: no cover - model-specific
            head = None
    if not isinstance(head, nn.Module):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names.get(id(head))
    if prefix is None:
        return set()
    return {f"{prefix}.{k}" if prefix else k for k in head.state_dict()}


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> list[str]:
    """Load a float checkpoint into a float ``model`` (before quantization), strictly.

    Accepts a safetensors file, a ``torch.save``-d state dict (also under a ``state_dict``/``model`` key,
    ``module.`` prefixes stripped) or a torchsaq checkpoint (its quantizer steps are dropped). A classifier head
    of another class count is left at its fresh initialisation (fine-tuning, as in the paper); any other
    mismatch is a ValueError. Returns the keys that were skipped.
    """
    path = Path(path)
    if path.is_dir():  # a run folder, as the other commands take it
        if not (path / "checkpoint.pt").is_file():
            raise ValueError(f"pretrained checkpoint: {path} is a folder without checkpoint.pt; give a state dict, "
                             "a safetensors file or a torchsaq run")
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"pretrained checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            sd: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read pretrained safetensors file {path}: {e}") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read is the same user error
            raise ValueError(f"cannot read pretrained checkpoint {path} with weights_only=True "
                             f"({type(e).__name__}); give a state dict or a safetensors file") from None
        if isinstance(sd, dict):
            for key in ("model", "state_dict", "model_state_dict", "model_ema"):
                if isinstance(sd.get(key), dict):
                    sd = sd[key]
                    break
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"pretrained checkpoint {path} does not hold a state dict of tensors")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if ".weight_quantizer." not in k and ".act_quantizer." not in k}
    own = model.state_dict()
    skipped = []
    for k in sorted(_classifier_keys(model)):
        if k in sd and k in own and sd[k].shape != own[k].shape:
            sd[k] = own[k]
            skipped.append(k)
    load_state_dict_checked(model, sd, f"pretrained checkpoint {path}")
    return skipped


def model_from_checkpoint(state: dict[str, Any], device: Union[str, torch.device] = "cpu",
                          what: str = "checkpoint") -> nn.Module:
    """Rebuild the quantized model described by a loaded checkpoint dict and load its weights strictly.

    The model is created from the stored config, quantized, traced on a dummy input of the stored input
    shape (so the first/last layers get their bits before the weights load), then loaded.
    """
    from .config import TrainConfig
    from ..quant.convert import quantize, trace
    from .models import create_model

    cfg = TrainConfig.from_dict(dict(state["config"]))
    data = state["data"]
    try:
        model = create_model(cfg.model_name, int(data["num_classes"]), in_chans=int(data["in_chans"]),
                             img_size=cfg.img_size, **cfg.model_options(int(data["in_chans"])))
    except ValueError as e:  # a model this installation lacks, options it refuses: name the checkpoint
        raise ValueError(f"{what}: {e}") from None
    quantize(model, cfg.quant_config())
    with torch.no_grad():
        trace(model, torch.zeros(1, *[int(s) for s in data["input_shape"]]))
    load_state_dict_checked(model, state["model"], what)
    return model.to(device).eval()


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu"):
    """Load a trained quantized model from a checkpoint: returns ``(model, TrainConfig, info)``.

    ``model`` is in eval mode on ``device``; ``info`` holds ``path``, ``epoch``, ``global_step``,
    ``dataset``, ``num_classes``, ``in_chans``, ``input_shape`` and the last ``metrics``.
    """
    from .config import TrainConfig

    state = load_checkpoint(path)
    cfg = TrainConfig.from_dict(dict(state["config"]))
    model = model_from_checkpoint(state, device, what=f"checkpoint {path}")
    data = state["data"]
    info = {
        "path": str(path),
        "epoch": int(state.get("epoch", 0)),
        "global_step": int(state.get("global_step", 0)),
        "dataset": data.get("dataset", cfg.dataset),
        "num_classes": int(data["num_classes"]),
        "in_chans": int(data["in_chans"]),
        "input_shape": tuple(int(s) for s in data["input_shape"]),
        "metrics": dict(state.get("metrics") or {}),
    }
    return model, cfg, info


def load_trained(path: PathLike, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The trained quantized model of a run: ``saq.load_trained("runs/exp")`` (the folder ``torchsaq train``
    wrote, or its ``checkpoint.pt``).

    The model is rebuilt from the checkpoint alone (architecture, quantization config, first/last layers, learned
    steps; no data set needed), in eval mode on ``device``, ready for ``model(x)``, :func:`saq.export` or
    ``torch.onnx``. Its data set, input shape and metrics are in ``model.saq_run`` (a dict); for the training
    config as well use :func:`load_model`, which returns ``(model, TrainConfig, info)``.
    """
    model, _, info = load_model(path, device)
    model.saq_run = info
    return model
