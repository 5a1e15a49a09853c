"""A plain QAT training step with torchsaq's LSQ backward against its earlier bool-mask backward, in one process.

The earlier backward kept the clip mask as a bool tensor (``grad * mask``, ``masked_fill``); ops on bool tensors
are not vectorised on the CPU. Both variants train their own copy of the same quantized model (cost.py's
trainers, w4a4, fixed batch) with a float model beside them; rounds are interleaved and medians reported, so
the ratios are measured in the same run.

    python benchmarks/lsq_backward_ab.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost  # noqa: E402
import lsq_speed  # noqa: E402

from torchsaq.quant import quantizer  # noqa: E402


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--only", nargs="*", default=["cnn1d", "resnet20"], help="substrings of cost.py CPU model names")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    ours, before = quantizer._LSQFunction.backward, lsq_speed._BoolMaskLSQ.backward
    print(f"QAT step (w4a4) with the LSQ backward of now vs the bool-mask one; {args.threads} threads, median of "
          f"{args.rounds} interleaved rounds\n")
    print("| model | float ms | QAT ms (bool-mask backward) | QAT ms (now) | x float before | x float now |")
    print("|---|---:|---:|---:|---:|---:|")
    for bench in [b for b in cost.benches("cpu") if any(s in b.name for s in args.only)]:
        x, y = cost._batch(bench, dev)
        variants = {"float": (cost.make_trainer(bench, cost.FLOAT, dev, x, y, amp=False), ours),
                    "before": (cost.make_trainer(bench, "base (LSQ QAT)", dev, x, y, amp=False), before),
                    "now": (cost.make_trainer(bench, "base (LSQ QAT)", dev, x, y, amp=False), ours)}
        iters = max(1, round(0.3 / max(cost.time_block(variants["float"][0], 2, dev), 1e-3)))
        times: dict[str, list[float]] = {k: [] for k in variants}
        try:
            for _ in range(args.rounds + 1):  # the first round warms up
                for k, (step, backward) in variants.items():
                    quantizer._LSQFunction.backward = staticmethod(backward)  # type: ignore[method-assign]
                    times[k].append(cost.time_block(step, iters, dev) * 1e3)
        finally:
            quantizer._LSQFunction.backward = staticmethod(ours)  # type: ignore[method-assign]
        m = {k: statistics.median(v[1:]) for k, v in times.items()}
        print(f"| {bench.name} | {m['float']:.2f} | {m['before']:.2f} | {m['now']:.2f} | "
              f"{m['before'] / m['float']:.2f} | {m['now'] / m['float']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
