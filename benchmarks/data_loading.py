"""Share of a training run spent fetching batches: per-item DataLoader (before) vs DeviceLoader (torchsaq train now).

    python benchmarks/data_loading.py                                 # CPU, mnist1d and fashion_mnist
    python benchmarks/data_loading.py --device cuda --out results.json

Each case runs :func:`saq.train.train` twice in this process: "device" is what ``torchsaq train`` does for the
tensor data sets (a :class:`saq.data.DeviceLoader`: the split on the device, batches shuffled and augmented
there); "dataloader" is the path it used before (``DataLoader`` + sampler, items read and augmented one by
one), forced by hiding the TensorDataset type from ``saq.train``. Every batch fetch of the training and
evaluation loaders is timed (with CUDA synchronisation around it) and reported as a share of the run's
wall time (training + evaluation, without model building and calibration). A short warm-up run comes first.
``--synthetic`` replaces both data sets by random data of the same sizes (4,000 / 1,000 MNIST-1D
sequences; 60,000 / 10,000 Fashion-MNIST images), for machines without them: fetch times do not depend
on the values, accuracies are then meaningless.
"""
from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import torchsaq as saq  # noqa: E402
import torchsaq.train.data  # noqa: E402,F401  (binds saq.data)
import torchsaq.train.runner  # noqa: E402,F401  (binds saq.train)
from torchsaq.train.config import TrainConfig  # noqa: E402

FETCH = {"s": 0.0, "n": 0}


def _timed(batches: Iterable[Any], sync: Callable[[], None]) -> Iterator[Any]:
    """Yield from ``batches``, adding the time of each fetch (synchronised) to FETCH."""
    it = iter(batches)
    while True:
        sync()
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            return
        sync()
        FETCH["s"] += time.perf_counter() - t
        FETCH["n"] += 1
        yield b


def _instrument(sync: Callable[[], None]) -> None:
    """Time every iteration of saq.train's DataLoaders and of saq.data.DeviceLoader."""
    class TimedDataLoader(torch.utils.data.DataLoader):
        def __iter__(self):  # type: ignore[override]
            return _timed(super().__iter__(), sync)

    class TimedDeviceLoader(saq.data.DeviceLoader):
        def __iter__(self):  # type: ignore[override]
            return _timed(super().__iter__(), sync)

    saq.train.DataLoader = TimedDataLoader  # type: ignore[misc]
    saq.data.DeviceLoader = TimedDeviceLoader  # type: ignore[misc]


def _synthetic_data() -> str:
    """Random stand-ins of the real sizes: MNIST-1D arrays in saq.data, Fashion-MNIST IDX files (returns their dir)."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = (rng.standard_normal((4000, 1, 40)).astype(np.float32), rng.integers(0, 10, 4000),
              rng.standard_normal((1000, 1, 40)).astype(np.float32), rng.integers(0, 10, 1000))
    saq.data._mnist1d_arrays = lambda: arrays  # type: ignore[assignment]
    folder = Path(tempfile.mkdtemp(prefix="synthetic-fashion-mnist-"))
    for split, n in (("train", 60000), ("t10k", 10000)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">4I", 0x0803, n, 28, 28) + images.tobytes(), compresslevel=1))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">2I", 0x0801, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
    return str(folder)


def run(cfg: TrainConfig, path: str) -> dict[str, Any]:
    """One training run through ``path`` ("device" or "dataloader"); fetch time and wall time."""
    real = torch.utils.data.TensorDataset
    saq.train.TensorDataset = real if path == "device" else type("NotATensorDataset", (), {})  # type: ignore
    FETCH.update(s=0.0, n=0)
    try:
        r = saq.train.train(cfg, progress=False)
    finally:
        saq.train.TensorDataset = real  # type: ignore[misc]
    steps = r["global_step"]
    return {"path": path, "wall_s": round(r["time_s"], 3), "fetch_s": round(FETCH["s"], 3), "fetches": FETCH["n"],
            "fetch_share": round(FETCH["s"] / r["time_s"], 4), "steps": steps,
            "ms_per_step": round(1000 * r["time_s"] / steps, 2), "test_acc": round(r["test_acc"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fashion-dir", default=None, help="Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--limit-train-batches", type=int, default=0, help="per epoch, for a quick CPU measurement")
    p.add_argument("--limit-eval-batches", type=int, default=0)
    p.add_argument("--cases", nargs="*", default=["mnist1d", "fashion_mnist"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's; 1 on a shared CPU)")
    p.add_argument("--synthetic", action="store_true", help="random data of the real sizes (see above)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.synthetic:
        a.fashion_dir = _synthetic_data()
    cuda = torch.device(a.device).type == "cuda"
    _instrument(torch.cuda.synchronize if cuda else (lambda: None))
    common = dict(device=a.device, epochs=a.epochs, save=False, limit_train_batches=a.limit_train_batches,
                  limit_eval_batches=a.limit_eval_batches)
    cases = {"mnist1d": TrainConfig(**common),  # the default `torchsaq train`: cnn1d, w4a4, SAQ prev_grad
             "fashion_mnist": TrainConfig(dataset="fashion_mnist", data_dir=a.fashion_dir, **common)}
    saq.train.train(TrainConfig(device=a.device, epochs=1, save=False, limit_train_batches=5, limit_eval_batches=2),
                    progress=False)  # warm-up (CUDA context, kernels)
    device_name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    rows = []
    print("| case | data path | fetch s | wall s | fetch share | ms/step | test acc | "
          f"({device_name}, {a.epochs} epochs"
          f"{', synthetic data' if a.synthetic else ''}) |\n|---|---|---|---|---|---|---|---|", flush=True)
    for name in a.cases:
        for path in ("dataloader", "device"):
            row = {"case": name, "model": cases[name].model, "device": device_name, "synthetic": a.synthetic,
                   **run(cases[name], path)}
            rows.append(row)
            print(f"| {name} ({row['model']}) | {path} | {row['fetch_s']:.3f} | {row['wall_s']:.2f} | "
                  f"{100 * row['fetch_share']:.1f}% | {row['ms_per_step']:.2f} | {row['test_acc']:.2f} |", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
