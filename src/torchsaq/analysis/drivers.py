"""Checkpoint drivers of :mod:`saq.analysis`, used by ``torchsaq landscape`` / ``torchsaq sharpness``."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .files import is_landscape_output, plot_landscapes, save_landscape
from .measures import Batch, Landscape, _generator, evaluate, hessian_top_eigenvalue, hessian_trace, loss_landscape
from .measures import DEFAULT_RHO, sam_sharpness

__all__ = ["run_landscape", "run_sharpness"]


def _eval_transform_view(bundle: Any) -> Any:
    """The training set with the evaluation transform (no augmentation), where the dataset allows it.

    Uses the test set's ``transform`` on a shallow copy of the training set (or of the dataset under a
    ``Subset``); datasets without a ``transform`` attribute (e.g. tensor datasets) are used as they are.
    """
    train = bundle.train
    eval_tf = getattr(getattr(bundle, "test", None), "transform", None)
    inner = train.dataset if isinstance(train, torch.utils.data.Subset) else train
    if eval_tf is None or not hasattr(inner, "transform"):
        return train
    view = copy.copy(inner)
    view.transform = eval_tf
    if isinstance(train, torch.utils.data.Subset):
        return torch.utils.data.Subset(view, train.indices)
    return view


def _fixed_batches(cfg: Any, num_samples: int, batch_size: int, seed: int, device: str) -> list[Batch]:
    """The first ``num_samples`` of a ``seed``-ed permutation of the training set, in batches on ``device``."""
    from ..train.data import build_datasets

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    bundle = build_datasets(cfg.dataset, cfg.data_dir, img_size=cfg.img_size, val_split=cfg.val_split, seed=cfg.seed,
                            augment=False)
    ds = _eval_transform_view(bundle)
    idx = torch.randperm(len(ds), generator=_generator(seed))[:num_samples].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size, shuffle=False)
    return [(x.to(device), y.to(device)) for x, y in loader]


def _labels(paths: Sequence[str]) -> list[str]:
    """Shortest path suffixes that tell the checkpoints apart (e.g. 'sgd/best.pt', 'saq/best.pt')."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def run_landscape(checkpoints: Sequence[str], output_dir: Union[str, Path], dims: int = 1, steps: int = 21,
                  span: float = 1.0, num_samples: int = 512, batch_size: int = 256, seed: int = 0,
                  where: str = "quantized", device: str = "cpu", progress: bool = True) -> dict[str, str]:
    """Landscapes of several checkpoints on one fixed training subset, same seed: one plot, .npz/.csv each.

    Returns the written paths: ``"plot"`` and ``"npz:<label>"`` / ``"csv:<label>"`` per checkpoint.
    The loss is plain cross-entropy (no label smoothing) on the training subset of the first checkpoint's
    data set, with evaluation transforms.
    """
    from ..train.checkpoint import load_model

    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    out = Path(output_dir)
    criterion = nn.CrossEntropyLoss()
    labels = _labels(checkpoints)
    results: dict[str, Landscape] = {}
    written: dict[str, str] = {}
    batches = None

    def target(label: str, ext: str) -> Path:
        stem = label.replace("/", "_").replace("\\", "_")
        return out / f"landscape_{dims}d_{where}_{stem}.{ext}"

    plot_path = out / f"landscape_{dims}d_{where}.png"
    if out.exists() and not out.is_dir():
        raise ValueError(f"landscape: --output {out} is a file; give a folder (the plot and data files go there)")
    foreign = [p for p in [plot_path] + [target(label, ext) for label in labels for ext in ("npz", "csv")]
               if (p.exists() or p.is_symlink()) and not is_landscape_output(p)]
    if foreign:  # checked before anything is measured or written
        raise ValueError(f"landscape: {', '.join(map(str, foreign))} exist(s) and was not written by torchsaq "
                         "landscape; refusing to replace it: give another --output folder")
    loaded = [load_model(ckpt, device) for ckpt in checkpoints]  # all of them first: one data set or none
    kind = [(cfg.dataset, tuple(info.get("input_shape") or ()), info.get("num_classes")) for _, cfg, info in loaded]
    if len(set(kind)) > 1:
        seen = "; ".join(f"{label}: {ds} {shape}, {classes} classes"
                         for label, (ds, shape, classes) in zip(labels, kind))
        raise ValueError(f"landscape: the checkpoints are of different data sets ({seen}); "
                         "compare checkpoints of one data set")
    out.mkdir(parents=True, exist_ok=True)
    for label, ckpt, (model, cfg, _) in zip(labels, checkpoints, loaded):
        if batches is None:
            batches = _fixed_batches(cfg, num_samples, batch_size, seed, device)
        ls = loss_landscape(model, criterion, batches, dims=dims, steps=steps, span=span, seed=seed,
                            where=where, progress=progress)
        ls.meta.update(checkpoint=str(ckpt), label=label, num_samples=sum(len(x) for x, _ in batches))
        results[label] = ls
        for ext in ("npz", "csv"):
            written[f"{ext}:{label}"] = str(save_landscape(ls, target(label, ext)))
    plot = plot_landscapes(results, plot_path,
                           title=f"{dims}-D loss landscape ({where} weights, seed {seed})")
    written["plot"] = str(plot)
    return written


def run_sharpness(checkpoint: str, num_samples: int = 512, batch_size: int = 256, rho: float = DEFAULT_RHO,
                  m: Optional[int] = None, iters: int = 20, samples: int = 64, steps: int = 5, seed: int = 0,
                  wrt: str = "quantized", device: str = "cpu") -> dict[str, Any]:
    """All sharpness measures of one checkpoint on a fixed training subset (cross-entropy, eval mode).

    The subset is the first ``num_samples`` of a ``seed``-ed permutation of the training set, read with
    the evaluation transform (no augmentation). Returns one row for :func:`format_sharpness_table`.
    """
    from ..train.checkpoint import load_model

    model, cfg, _ = load_model(checkpoint, device)
    batches = _fixed_batches(cfg, num_samples, batch_size, seed, device)
    criterion = nn.CrossEntropyLoss()
    loss, acc = evaluate(model, criterion, batches)
    trace, trace_se = hessian_trace(model, criterion, batches, samples=samples, wrt=wrt, seed=seed,
                                    return_stderr=True)  # type: ignore[misc]
    return {
        "checkpoint": str(checkpoint), "wrt": wrt, "num_samples": sum(len(x) for x, _ in batches),
        "loss": loss, "accuracy": acc,
        "hessian_top_eigenvalue": hessian_top_eigenvalue(model, criterion, batches, iters=iters, wrt=wrt, seed=seed),
        "hessian_trace": trace, "hessian_trace_stderr": trace_se,
        "sam_sharpness": sam_sharpness(model, criterion, batches, rho=rho, m=m, steps=steps, wrt=wrt, seed=seed),
        "rho": rho, "m": m,
    }
