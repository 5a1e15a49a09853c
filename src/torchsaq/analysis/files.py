"""Landscape files (.npz / .csv), landscape plots and the sharpness table of :mod:`saq.analysis`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .._io import atomic_write, atomic_write_text
from .measures import Landscape

__all__ = ["save_landscape", "load_landscape", "plot_landscapes", "format_sharpness_table", "is_landscape_output"]


def save_landscape(landscape: Landscape, path: Union[str, Path]) -> Path:
    """Write a landscape as ``.npz`` (arrays + JSON meta; :func:`load_landscape` reads it) or ``.csv``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        arrays: dict[str, Any] = {"alphas": landscape.alphas, "losses": landscape.losses,
                                  "accuracies": landscape.accuracies, "meta": np.array(json.dumps(landscape.meta))}
        if landscape.betas is not None:
            arrays["betas"] = landscape.betas
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)
    elif path.suffix == ".csv":
        lines = ["alpha,loss,accuracy" if landscape.dims == 1 else "alpha,beta,loss,accuracy"]
        for i, a in enumerate(landscape.alphas):
            if landscape.dims == 1:
                lines.append(f"{a:.6g},{landscape.losses[i]:.9g},{landscape.accuracies[i]:.6g}")
            else:
                assert landscape.betas is not None  # (a 2-D landscape)
                for j, b in enumerate(landscape.betas):
                    lines.append(f"{a:.6g},{b:.6g},{landscape.losses[i, j]:.9g},{landscape.accuracies[i, j]:.6g}")
        atomic_write_text(path, "\n".join(lines) + "\n")
    else:
        raise ValueError(f"landscape files are .npz or .csv, got {path.name!r}")
    return path


def is_landscape_output(path: Union[str, Path]) -> bool:
    """Whether ``path`` holds what :func:`save_landscape` or :func:`plot_landscapes` writes (an .npz with its
    arrays, a .csv with its header, a Matplotlib PNG): the only files ``torchsaq landscape`` may replace."""
    path = Path(path)
    try:
        if not path.is_file() or path.is_symlink():
            return False
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {"alphas", "losses", "accuracies", "meta"} <= set(z.files)
        with open(path, "rb") as f:
            head = f.read(512)
        if path.suffix == ".csv":
            return head.startswith((b"alpha,loss,accuracy\n", b"alpha,beta,loss,accuracy\n"))
        return head.startswith(b"\x89PNG") and b"Matplotlib" in head
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def load_landscape(path: Union[str, Path]) -> Landscape:
    """Read a landscape written by :func:`save_landscape` as ``.npz`` (no pickles)."""
    with np.load(Path(path), allow_pickle=False) as z:
        return Landscape(alphas=z["alphas"], losses=z["losses"], accuracies=z["accuracies"],
                         betas=z["betas"] if "betas" in z.files else None, meta=json.loads(str(z["meta"])))


def plot_landscapes(landscapes: dict[str, Landscape], path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Plot landscapes: 1-D curves overlaid (loss, and accuracy when known); 2-D loss contours side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless (Agg)

    if not landscapes:
        raise ValueError("no landscape to plot")
    dims = {ls.dims for ls in landscapes.values()}
    if len(dims) != 1:
        raise ValueError("cannot plot 1-D and 2-D landscapes together")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dims == {1}:
        with_acc = any(np.isfinite(ls.accuracies).any() for ls in landscapes.values())
        fig = Figure(figsize=(11 if with_acc else 6, 4.2), layout="constrained")
        axes = fig.subplots(1, 2 if with_acc else 1, squeeze=False)[0]
        for label, ls in landscapes.items():
            axes[0].plot(ls.alphas, ls.losses, marker=".", label=label)
            if with_acc:
                axes[1].plot(ls.alphas, ls.accuracies, marker=".", label=label)
        axes[0].set_ylabel("loss")
        if with_acc:
            axes[1].set_ylabel("accuracy (%)")
        for ax in axes:
            ax.set_xlabel("alpha (filter-normalised direction)")
            ax.grid(alpha=0.3)
            ax.legend()
    else:
        n = len(landscapes)
        fig = Figure(figsize=(4.6 * n + 1, 4.2), layout="constrained")
        axes = fig.subplots(1, n, squeeze=False)[0]
        finite = np.concatenate([ls.losses[np.isfinite(ls.losses)].ravel() for ls in landscapes.values()])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        levels = np.linspace(lo, hi if hi > lo else lo + 1.0, 21)
        cs = None
        for ax, (label, ls) in zip(axes, landscapes.items()):
            assert ls.betas is not None  # (2-D landscapes)
            a, b = np.meshgrid(ls.alphas, ls.betas, indexing="ij")
            cs = ax.contour(a, b, ls.losses, levels=levels, cmap="viridis")
            ax.clabel(cs, fontsize=7, fmt="%.3g")
            ax.plot([0], [0], "r+")
            ax.set_title(label)
            ax.set_xlabel("alpha")
            ax.set_ylabel("beta")
            ax.set_aspect("equal")
        if cs is not None:
            fig.colorbar(cs, ax=list(axes), label="loss")
    if title:
        fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:] or "png"))
    return path


def format_sharpness_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`run_sharpness` results (columns: every key, in first-seen order)."""
    if not rows:
        raise ValueError("no rows to format")
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
