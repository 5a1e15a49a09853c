"""What a training run writes besides its checkpoint: ``metrics.jsonl`` / ``metrics.csv`` (one record per
epoch), TensorBoard scalars and the ``curves.png`` plot."""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from .._io import atomic_write, atomic_write_text

__all__ = ["write_metrics", "plot_history", "TensorBoard"]


def _json_value(v: Any) -> Any:
    """NaN/inf have no JSON form: they are written as null (the CSV keeps 'nan')."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_metrics(history: list[dict[str, Any]], jsonl: Path, csv_path: Path) -> None:
    """The whole history, rewritten atomically: one JSON object per line, and a CSV with every column seen."""
    atomic_write_text(jsonl, "".join(json.dumps({k: _json_value(v) for k, v in r.items()}, allow_nan=False) + "\n"
                                     for r in history))
    cols: list[str] = []
    for r in history:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(csv_path, buf.getvalue())


def plot_history(history: list[dict[str, Any]], path: Union[str, Path], title: str = "") -> Path:
    """PNG with the loss curves (left) and the accuracy curves (right) of a metrics history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
        for ax, what in ((ax_l, "loss"), (ax_a, "acc")):
            pts = [(r["epoch"], r[f"{split}_{what}"]) for r in history if r.get(f"{split}_{what}") is not None]
            if pts:  # evaluated splits appear only every --eval-every epochs
                ax.plot(*zip(*pts), style, marker="." if len(pts) < len(history) else None, label=split)
    ax_l.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_a.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


class TensorBoard:
    """A SummaryWriter that degrades to a no-op (with one warning) if tensorboard cannot be imported."""

    def __init__(self, log_dir: Optional[Path], purge_step: Optional[int]):
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"TensorBoard logging disabled ({e})")
            return
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch",):
                self.writer.add_scalar(k.replace("_", "/", 1), v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
