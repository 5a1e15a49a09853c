"""Where a training step's time goes: torch.profiler over plain QAT, the full SAQ step and prev_grad.

Same trainers as benchmarks/cost.py (w4a4, fixed batch). Prints each method's profiled time per step, its ratio
to plain QAT, and the operators with the most self time (the optimizer's own Python work shows as the
self time of ``Optimizer.step#...``).

    python benchmarks/profile_step.py --model cnn1d --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost  # noqa: E402  (the trainers of the cost table)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn1d", help="substring of a cost.py CPU model name")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["base (LSQ QAT)", "SAQ full step", "SAQ prev_grad"],
                   choices=list(cost.METHODS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = next(b for b in cost.benches("cpu") if args.model in b.name)
    device = torch.device("cpu")
    x, y = cost._batch(bench, device)
    totals: dict[str, float] = {}
    for m in args.methods:
        step = cost.make_trainer(bench, m, device, x, y, amp=False)
        for _ in range(5):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = prof.key_averages()
        totals[m] = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
        print(f"===== {m}: {totals[m]:.2f} ms / step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    base = totals.get("base (LSQ QAT)")
    print(f"{bench.name}, batch {bench.batch}, {args.threads} thread(s), {args.steps} profiled steps")
    for m, t in totals.items():
        print(f"  {m:22s} {t:8.2f} ms / step" + (f"  x{t / base:.2f} of QAT" if base else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
