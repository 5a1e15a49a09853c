"""Cost benchmark: time per training iteration and peak memory of plain QAT vs SAQ and its cheaper strategies.

Every method trains its own copy of the same quantized model on the same fixed batch; methods are
interleaved round by round (so machine noise hits them alike) and each figure is the median over rounds.
Ratios are to the base optimizer measured in the same run, printed next to the floor a method cannot beat
(two forward/backward passes for a full sharpness-aware step: 2.0; every-k: 1 + 1/k; previous-gradient: 1).
On the CPU, "outside passes" is each iteration's time not spent in a forward/backward pass: the optimizer's
own work (the base step, and SAQ's perturbation, restore, checks), where a method's cost above its floor is.

    python benchmarks/cost.py                       # CPU: MNIST-1D CNN, ResNet-20, tiny ViT
    python benchmarks/cost.py --device cuda         # adds ResNet-50 and ViT-B/16 at card-filling batches
    python benchmarks/cost.py --compile             # every method (float too) under torch.compile (inductor)
    python benchmarks/cost.py --device cuda --lsq-backend triton   # quantizers through the fused Triton op
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import torchsaq as saq
from torchsaq.train.models import create_model

HERE = Path(__file__).resolve().parent


@dataclass
class Bench:
    name: str
    build: Callable[[], torch.nn.Module]
    input_shape: tuple
    batch: int
    num_classes: int
    optimizer: str = "sgd"


def benches(device: str) -> list[Bench]:
    cpu = [
        Bench("cnn1d (MNIST-1D)", lambda: create_model("cnn1d", 10), (1, 40), 128, 10),
        # the Fashion-MNIST over-fitting study's CNN (benchmarks/fashion.py --preset cpu_gap)
        Bench("cnn_fmnist w16 (28x28 grey)", lambda: create_model("cnn_fmnist", 10, width=16), (1, 28, 28), 128, 10),
        Bench("resnet20 (32x32)", lambda: create_model("resnet20", 100), (3, 32, 32), 64, 100),
        Bench("vit tiny (deit_tiny, 32x32/4)",
              lambda: create_model("deit_tiny_patch16_224", 100, img_size=32, patch_size=4), (3, 32, 32), 32, 100,
              "adamw"),
    ]
    if device == "cpu":
        return cpu
    return [
        Bench("resnet20 (32x32)", lambda: create_model("resnet20", 100), (3, 32, 32), 256, 100),
        Bench("deit_tiny (224)", lambda: create_model("deit_tiny_patch16_224", 1000), (3, 224, 224), 128, 1000,
              "adamw"),
        Bench("resnet50 (224)", lambda: create_model("resnet50", 1000), (3, 224, 224), 128, 1000),
        Bench("vit_base_patch16_224", lambda: create_model("vit_base_patch16_224", 1000), (3, 224, 224), 64, 1000,
              "adamw"),
    ]


# the CPU clock: wall time (default), or with --clock thread the CPU time of this thread alone, which a loaded
# machine does not inflate by descheduling it (one thread only: torch's CPU forward and backward then run on the
# calling thread)
CLOCK: list[Callable[[], float]] = [time.perf_counter]

FLOAT = "float (not quantized)"
METHODS = {  # name -> (SAQ kwargs or None for the base optimizer, floor of the cost ratio to plain QAT)
    FLOAT: (None, None),
    "base (LSQ QAT)": (None, 1.0),
    "SAQ full step": (dict(strategy="full"), 2.0),
    "SAQ every_k (k=5)": (dict(strategy="every_k", k=5), 1.2),
    "SAQ every_k (k=2)": (dict(strategy="every_k", k=2), 1.5),
    "SAQ periodic (k=4)": (dict(strategy="every_k", k=4, alpha=0.0), 1.25),
    "SAQ sub_batch (f=0.25)": (dict(strategy="sub_batch", fraction=0.25), 1.25),
    "SAQ prev_grad": (dict(strategy="prev_grad"), 1.0),
    "SAQ momentum": (dict(strategy="momentum"), 1.0),
}


def make_trainer(bench: Bench, method: str, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                 amp: bool, compiled: bool = False) -> Callable[[], None]:
    """One training iteration of `method` on a fresh quantized copy of the bench model (its forward compiled
    with torch.compile if `compiled`: the warm-up compiles every variant the method runs)."""
    torch.manual_seed(0)
    model = bench.build().to(device)
    if method != FLOAT:
        saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4))
        saq.calibrate(model, [x[:8]])
    model.train()
    params = model.parameters()
    base = (torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4) if bench.optimizer == "sgd"
            else torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05))
    kwargs, _ = METHODS[method]
    opt = base if kwargs is None else saq.SAQ(model, base, rho=0.05, **kwargs)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    net = torch.compile(model) if compiled else model

    def closure():
        t0 = CLOCK[0]()
        xb, yb = opt.pass_batch(x, y) if isinstance(opt, saq.SAQ) else (x, y)
        with autocast:
            loss = F.cross_entropy(net(xb), yb)
        loss.backward()
        step.passes_s += CLOCK[0]() - t0  # type: ignore[attr-defined]
        return loss

    def step() -> None:
        opt.step(closure)
        opt.zero_grad(set_to_none=True)

    step.passes_s = 0.0  # type: ignore[attr-defined]  # host time inside forward/backward passes, summed
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per iteration over `iters` iterations (CUDA events on a GPU, a host clock on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters
    t0 = CLOCK[0]()
    for _ in range(iters):
        step()
    return (CLOCK[0]() - t0) / iters


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_peak_memory(bench_index: int, method: str, iters: int) -> float:
    """Peak resident-memory growth (MiB) of `iters` iterations, measured in a fresh process."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import cost; "
            f"print(cost._cpu_mem_child({bench_index}, {method!r}, {iters}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return float(out.stdout.strip().splitlines()[-1])


def _cpu_mem_child(bench_index: int, method: str, iters: int) -> float:
    bench = benches("cpu")[bench_index]
    device = torch.device("cpu")
    x, y = _batch(bench, device)
    step = make_trainer(bench, method, device, x, y, amp=False)
    before = _rss_mib()
    for _ in range(iters):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(peak - before, 0.0)


def _batch(bench: Bench, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bench.batch, *bench.input_shape, generator=g).to(device)
    y = torch.randint(0, bench.num_classes, (bench.batch,), generator=g).to(device)
    return x, y


def run(device_name: str, rounds: int, iters: int, warmup: int, only: Optional[list[str]], amp: bool,
        memory: bool, compiled: bool = False) -> list[dict]:
    device = torch.device(device_name)
    rows = []
    for bi, bench in enumerate(benches(device.type)):
        if only and not any(o in bench.name for o in only):
            continue
        try:
            rows += _run_bench(bi, bench, device, rounds, iters, warmup, amp, memory, compiled)
        except Exception as exc:  # one model failing (e.g. out of memory) must not lose the others
            print(f"  {bench.name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _run_bench(bi: int, bench: Bench, device: torch.device, rounds: int, iters: int, warmup: int, amp: bool,
               memory: bool, compiled: bool = False) -> list[dict]:
    rows = []
    x, y = _batch(bench, device)
    steps = {m: make_trainer(bench, m, device, x, y, amp, compiled) for m in METHODS}
    for m, step in steps.items():  # warm-up: allocator, kernels, every_k's first full step
        for _ in range(warmup):
            step()
    _sync(device)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    outside: dict[str, list[float]] = {m: [] for m in METHODS}  # per iteration, host time not in the passes
    order = list(METHODS)
    for r in range(rounds):
        for m in (order if r % 2 == 0 else order[::-1]):  # alternate the order: no method always first
            before = steps[m].passes_s  # type: ignore[attr-defined]
            t = time_block(steps[m], iters, device)
            times[m].append(t)
            outside[m].append(t - (steps[m].passes_s - before) / iters)  # type: ignore[attr-defined]
    mem: dict[str, float] = {}
    if memory:
        for m, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base_alloc = torch.cuda.memory_allocated(device)
                step()
                torch.cuda.synchronize(device)
                mem[m] = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
            else:
                mem[m] = cpu_peak_memory(bi, m, max(iters, 2))
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base_t = statistics.median(times["base (LSQ QAT)"])
    float_t = statistics.median(times[FLOAT])
    for m, (_, floor) in METHODS.items():
        t = statistics.median(times[m])
        spread = (max(times[m]) - min(times[m])) / t if len(times[m]) > 1 else 0.0
        rows.append(dict(model=bench.name, batch=bench.batch, method=m, ms=t * 1e3, ratio=t / base_t,
                         x_float=t / float_t, floor=floor,
                         # CPU only: on a GPU the host runs ahead of the device, so host time says nothing
                         outside_ms=statistics.median(outside[m]) * 1e3 if device.type == "cpu" else None,
                         over_floor=None if floor is None else t / base_t - floor, spread=spread,
                         mem_mib=mem.get(m), mem_ratio=(mem[m] / mem["base (LSQ QAT)"]
                                                       if m in mem and mem["base (LSQ QAT)"] > 0 else None)))
        print(f"  {bench.name:32s} {m:22s} {t*1e3:9.2f} ms  x{t/base_t:5.2f} of QAT (floor {floor or '-'}), "
              f"x{t/float_t:5.2f} of float", flush=True)
    return rows


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | batch | method | ms / iter | x float | x QAT | floor | over floor | outside passes ms "
             "| peak MiB | mem x QAT |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['mem_mib']:.0f}" if r["mem_mib"] is not None else "-"
        memr = f"{r['mem_ratio']:.2f}" if r["mem_ratio"] is not None else "-"
        floor = "-" if r["floor"] is None else f"{r['floor']:.2f}"
        over = "-" if r["over_floor"] is None else f"{r['over_floor']:+.2f}"
        out = "-" if r.get("outside_ms") is None else f"{r['outside_ms']:.2f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['ms']:.2f} | {r['x_float']:.2f} | "
                     f"{r['ratio']:.2f} | {floor} | {over} | {out} | {mem} | {memr} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    p.add_argument("--iters", type=int, default=20, help="iterations per timed block (a multiple of k=2, 4, 5)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--only", nargs="*", help="substrings of model names to run")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (torch.set_num_threads; 0: torch's default). torchsaq train runs small models "
                        "such as cnn1d on one thread")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="CPU: wall time, or this thread's CPU time (needs --threads 1; robust to other jobs)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every method's forward (float too); no memory column (compilation's own)")
    p.add_argument("--lsq-backend", default="autograd", choices=saq.vocab.LSQ_BACKENDS,
                   help="LSQ implementation of the quantized models (saq.set_lsq_backend)")
    p.add_argument("--no-lsq", action="store_true", help="skip the LSQ fake-quantizer micro-benchmark")
    p.add_argument("--out", default=None, help="Markdown output (default benchmarks/results/cost_<device>.md)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    torch.backends.cudnn.benchmark = True
    saq.set_lsq_backend(args.lsq_backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if args.threads != 1 or args.device != "cpu":
            p.error("--clock thread measures one thread's CPU time: it needs --threads 1 on the CPU")
        CLOCK[0] = time.thread_time
    cmd = " ".join(["python benchmarks/cost.py"] + (argv if argv is not None else sys.argv[1:]))
    header = (f"Cost per training iteration, w4a4, {machine(args.device)}"
              f"{', CPU time of the training thread' if args.clock == 'thread' else ''}"
              f"{', every forward under torch.compile (inductor)' if args.compile else ', eager'}"
              f"{', LSQ through the Triton op' if args.lsq_backend == 'triton' else ''}; median of "
              f"{args.rounds} interleaved rounds of {args.iters} iterations; `{cmd}`")
    print(header, flush=True)
    rows = run(args.device, args.rounds, args.iters, args.warmup, args.only, args.amp,
               not (args.no_memory or args.compile), args.compile)
    md = to_markdown(rows, "### Training-step cost\n\n" + header)
    if not (args.no_lsq or args.compile):
        sys.path.insert(0, str(HERE))
        import lsq_speed  # noqa: E402  (benchmarks/lsq_speed.py)
        md += "\n### LSQ fake-quantizer, forward + backward\n\n" + lsq_speed.markdown(lsq_speed.run(args.device))
    tag = "_compiled" * args.compile + "_triton" * (args.lsq_backend == "triton")
    out = Path(args.out or HERE / "results" / f"cost_{args.device.split(':')[0]}{tag}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print()
    print(md)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
