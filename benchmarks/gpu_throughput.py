"""How many training runs should share one GPU? Iterations per second of N concurrent `torchsaq train` processes.

Each process trains ResNet-20 (1 input channel) on Fashion-MNIST for a fixed number of batches with plain QAT
(w2a2, the data on the card); the table gives the aggregate throughput at each N, so a benchmark can size its
worker count and epochs to a time budget.

    python benchmarks/gpu_throughput.py --data-dir .data/fashion-mnist --procs 1 4 8 14
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def _one(args: tuple[str, str, int, int, str]) -> float:
    data_dir, device, batches, batch_size, sharpness = args
    import torch

    torch.set_num_threads(1)
    from torchsaq.train.config import TrainConfig
    from torchsaq.train.runner import train

    cfg = TrainConfig(dataset="fashion_mnist", data_dir=data_dir, model="resnet20", model_kwargs={"in_chans": 1},
                      epochs=1, batch_size=batch_size, save=False, limit_train_batches=batches, limit_eval_batches=1,
                      w_bits=2, a_bits=2, sharpness=sharpness, strategy="full", device=device)
    train(cfg, progress=False)  # warm-up: CUDA context, data on the card, kernels
    t0 = time.perf_counter()
    train(cfg, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--procs", nargs="+", type=int, default=[1, 4, 8, 14])
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--sharpness", default="none")
    a = ap.parse_args()
    print("| processes | s per run (max) | iterations/s, all processes | x one process |")
    print("|---:|---:|---:|---:|")
    base = None
    ctx = mp.get_context("spawn")
    for n in a.procs:
        with ctx.Pool(n) as pool:
            times = pool.map(_one, [(a.data_dir, a.device, a.batches, a.batch_size, a.sharpness)] * n)
        rate = n * a.batches / max(times)
        base = base or rate / n
        print(f"| {n} | {max(times):.1f} | {rate:.1f} | {rate / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
