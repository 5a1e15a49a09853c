"""Where a training step's time goes: torch.profiler over plain QAT, the full SAQ step and prev_grad.

Same trainers as benchmarks/cost.py (w4a4, fixed batch). Prints each method's profiled time per step, its ratio
to plain QAT, and the operators with the most self time (the optimizer's own Python work shows as the
self time of ``Optimizer.step#...``). On CUDA it also splits each step's wall time into the time some kernel
ran and the gaps between kernels (launch-bound host work: the cost issue's "where the extra 0.2x goes").

    python benchmarks/profile_step.py --model cnn1d --threads 1
    python benchmarks/profile_step.py --device cuda --model resnet50 --amp [--lsq-backend triton]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost  # noqa: E402  (the trainers of the cost table)

import torchsaq as saq  # noqa: E402


#: profiler events whose inclusive time is the LSQ fake-quantizer's (autograd Function or custom op, both ways)
LSQ_EVENTS = ("_LSQFunction", "_LSQFunctionBackward", "torchsaq::lsq", "torchsaq::lsq_backward")


def _busy_ms(events: Any) -> float:
    """Union of the CUDA kernel/memcpy intervals of a profile, in ms (overlapping kernels count once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy / 1e3


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default="cnn1d", help="substring of a cost.py model name (of that device's list)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--lsq-backend", default="autograd", choices=saq.vocab.LSQ_BACKENDS)
    p.add_argument("--methods", nargs="+", default=["base (LSQ QAT)", "SAQ full step", "SAQ prev_grad"],
                   choices=list(cost.METHODS))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    saq.set_lsq_backend(args.lsq_backend)
    bench = next(b for b in cost.benches(device.type) if args.model in b.name)
    x, y = cost._batch(bench, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    totals: dict[str, tuple[float, float]] = {}
    lsq: dict[str, float] = {}
    for m in args.methods:
        step = cost.make_trainer(bench, m, device, x, y, amp=args.amp)
        for _ in range(5):
            step()
        cost._sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            cost._sync(device)
            wall = (time.perf_counter() - t0) * 1e3 / args.steps
        events = prof.key_averages()
        busy = _busy_ms(prof.events()) / args.steps if cuda else sum(e.self_cpu_time_total for e in events) / \
            args.steps / 1e3
        totals[m] = (wall, busy)
        lsq[m] = sum(e.cpu_time_total for e in events if e.key in LSQ_EVENTS) / args.steps / 1e3
        print(f"===== {m}: {wall:.2f} ms / step wall (profiled), " +
              (f"{busy:.2f} ms GPU busy, {wall - busy:.2f} ms in gaps" if cuda else f"{busy:.2f} ms CPU self time"))
        print(events.table(sort_by=sort, row_limit=args.rows))
    base = totals.get("base (LSQ QAT)")
    print(f"{bench.name}, batch {bench.batch}, {args.device}, amp {args.amp}, LSQ {args.lsq_backend}, "
          f"{args.steps} profiled steps")
    what = "GPU busy" if cuda else "CPU self"
    for m, (wall, busy) in totals.items():
        line = f"  {m:22s} wall {wall:8.2f} ms  {what} {busy:8.2f} ms  LSQ (host, inclusive) {lsq[m]:7.2f} ms"
        if base:
            line += f"  x{wall / base[0]:.2f} / x{busy / base[1]:.2f} of QAT"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
