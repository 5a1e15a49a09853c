"""onnxruntime on this CPU: file size, memory and latency of float32 ONNX models against their w4a4 exports.

Models: torchvision's ResNet-18 and MobileNetV2 (1000 classes), converted by ``saq.quantize`` (w4a4, first and
last layer at 8 bits, LSQ), calibrated on random data and given BatchNorm statistics by two training-mode
passes: size, memory and speed do not depend on the trained values. Variants, each a file written by
``saq.export(model, "x.onnx", example_inputs=...)``:

* ``float32`` -- ``export_onnx(..., quantized=False)``: the float model (BatchNorm folded by the exporter);
* ``compact`` -- the default ``onnx_mode="compact"``: INT4 weights through DequantizeLinear, float kernels;
* ``fast``    -- ``onnx_mode="fast"``: uint8 activation codes and 8-bit weight codes into ConvInteger /
  MatMulInteger, int32 sums rescaled in float (the same numbers as the w4a4 model).

Every session is ``InferenceSession(path, so)`` with default options but ``intra_op_num_threads`` (1 or 2).
What onnxruntime runs is read from the optimized model it saves (``SessionOptions.optimized_model_filepath``):
the table counts the float and integer convolution/matmul kernels. Parity: each quantized file's outputs against
the PyTorch model on the batch-32 input (median and largest per-sample relative error, argmax agreement).
Latency: the variants interleaved in shuffled order, one ``session.run`` per timed run, the median reported.
Memory: a fresh child process per variant, resident memory after creating the session and its peak after one
run at the largest batch (both minus the process before).

    python benchmarks/onnx_latency.py                      # writes benchmarks/results/onnx_cpu.md
    python benchmarks/onnx_latency.py --repeats 3 --batches 1 --models resnet18 --out /tmp/onnx.md
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("float32", "compact", "fast")
MODELS = ("resnet18", "mobilenet_v2")
KERNELS = ("Conv", "FusedConv", "NchwcConv", "ConvInteger", "QLinearConv", "MatMul", "Gemm", "FusedGemm",
           "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "MatMulNBits")


def session(path: str, threads: int, optimized: str = ""):
    """An onnxruntime CPU session, default options but ``threads`` intra-op threads (``optimized``: save the
    graph onnxruntime runs there)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _status_mb(key: str) -> float:
    """A memory line of /proc/self/status in MB (VmRSS: resident now; VmHWM: peak, reset by exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(path: str, threads: int, batch: int, img: int) -> None:
    """(child process) Print resident MB added by loading the session and the peak after one run, as JSON."""
    import numpy as np

    base = _status_mb("VmRSS")
    sess = session(path, threads)
    loaded = _status_mb("VmRSS")
    sess.run(None, {"input": np.random.randn(batch, 3, img, img).astype(np.float32)})
    peak = _status_mb("VmHWM")  # not getrusage: its maxrss survives exec (the forked parent's pages)
    print(json.dumps({"load_mb": loaded - base, "peak_mb": peak - base}))


def export_models(folder: Path, name: str, img: int, batch: int):
    """Write float32.onnx, compact.onnx and fast.onnx for ``name`` into ``folder``; returns (input, PyTorch output)."""
    import torch
    import torchvision

    import torchsaq as saq
    from torchsaq.export.onnx import export_onnx

    torch.manual_seed(0)
    model = saq.quantize(getattr(torchvision.models, name)(), saq.QuantConfig(w_bits=4, a_bits=4))
    saq.calibrate(model, [torch.randn(2, 3, img, img)])
    with torch.no_grad():  # BatchNorm statistics of the quantized model (else untrained MobileNetV2 outputs zeros)
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, img, img))
    model.eval()
    x = torch.randn(1, 3, img, img)
    export_onnx(model, folder / "float32.onnx", (x,), quantized=False)
    for mode in ("compact", "fast"):
        saq.export(model, folder / f"{mode}.onnx", example_inputs=(x,), onnx_mode=mode)
    xb = torch.randn(batch, 3, img, img)
    with torch.no_grad():
        return xb.numpy(), model(xb).numpy()


def kernels(path: str, folder: Path) -> str:
    """The convolution/matmul kernels onnxruntime runs for ``path`` (from the optimized model it saves)."""
    import onnx

    out = str(folder / "optimized.onnx")
    session(path, 1, optimized=out)
    count = collections.Counter(n.op_type for n in onnx.load(out).graph.node if n.op_type in KERNELS)
    return ", ".join(f"{k} {v}" for k, v in sorted(count.items()))


def parity(out, ref) -> str:
    import numpy as np

    rel = np.abs(out - ref).max(axis=1) / np.maximum(np.abs(ref).max(axis=1), 1e-30)
    return (f"median {np.median(rel):.1e}, max {rel.max():.1e}, "
            f"argmax {100 * (out.argmax(1) == ref.argmax(1)).mean():.0f}%")


def time_variants(paths: dict[str, str], args, threads: int) -> dict[tuple[str, int], float]:
    """Median ms of one run per (variant, batch), the variants interleaved in a shuffled order each repetition."""
    import numpy as np

    sessions = {v: session(paths[v], threads) for v in VARIANTS}
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, args.img, args.img), dtype=np.float32) for b in args.batches}
    for v in VARIANTS:  # warm-up
        for b in args.batches:
            sessions[v].run(None, {"input": inputs[b]})
    times: dict[tuple[str, int], list[float]] = {(v, b): [] for v in VARIANTS for b in args.batches}
    order = list(VARIANTS)
    for r in range(args.repeats):
        for b in args.batches:
            random.Random(r * 100 + b + threads).shuffle(order)
            for v in order:
                t = time.perf_counter()
                sessions[v].run(None, {"input": inputs[b]})
                times[v, b].append(1000 * (time.perf_counter() - t))
        print(f"  {threads} thread(s): repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    return {k: statistics.median(t) for k, t in times.items()}


def bench_model(name: str, args) -> str:
    """The markdown table of one model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        x, ref = export_models(folder, name, args.img, max(args.batches))
        paths = {v: str(folder / f"{v}.onnx") for v in VARIANTS}
        sizes = {v: os.path.getsize(paths[v]) / 1e6 for v in VARIANTS}
        ops = {v: kernels(paths[v], folder) for v in VARIANTS}
        checks = {v: parity(session(paths[v], 1).run(None, {"input": x})[0], ref) for v in VARIANTS if v != "float32"}
        memory = {}
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--img", str(args.img), "--memory-child", paths[v],
                                  str(max(args.batches))], check=True, capture_output=True, text=True).stdout
            memory[v] = json.loads(out.strip().splitlines()[-1])
        med = {t: time_variants(paths, args, t) for t in args.threads}
    head = ["variant", "file MB", "RSS after load MB", f"peak RSS b{max(args.batches)} MB"]
    head += [f"ms b{b} {t}t" for t in args.threads for b in args.batches]
    head += [f"float / variant b{b} {t}t" for t in args.threads for b in args.batches]
    rows = []
    for v in VARIANTS:
        row = [v, f"{sizes[v]:.2f}", f"{memory[v]['load_mb']:.0f}", f"{memory[v]['peak_mb']:.0f}"]
        row += [f"{med[t][v, b]:.1f}" for t in args.threads for b in args.batches]
        row += [f"{med[t]['float32', b] / med[t][v, b]:.2f}x" for t in args.threads for b in args.batches]
        rows.append(row)
    table = "| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|\n"
    table += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    notes = "".join(f"- {v}: kernels run: {ops[v]}" + (f"; vs PyTorch (b{max(args.batches)}): {checks[v]}"
                                                       if v in checks else "") + "\n" for v in VARIANTS)
    return f"### {name} w4a4 (LSQ), {args.img}x{args.img}\n\n{table}\n{notes}\n"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant, batch and thread count (median)")
    p.add_argument("--out", default="benchmarks/results/onnx_cpu.md")
    p.add_argument("--memory-child", nargs=2, metavar=("PATH", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], 1, int(args.memory_child[1]), args.img)
        return

    import onnxruntime as ort

    import torchsaq as saq

    load_before = os.getloadavg()[0]
    tables = [bench_model(name, args) for name in args.models]
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx", "amx"))}
                   if os.path.exists("/proc/cpuinfo") else [])
    header = (f"onnxruntime {ort.__version__} CPUExecutionProvider, default session options but the intra-op "
              f"thread count; {args.repeats} interleaved runs per cell (median); {cpu_name()} ({' '.join(flags)}), "
              f"{os.cpu_count()} cores; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
              f"(other jobs were running); saq {saq.__version__}, python {platform.python_version()}\n\n"
              f"    {' '.join(['python benchmarks/onnx_latency.py', *sys.argv[1:]])}\n\n")
    text = header + "\n".join(tables)
    print(text)
    from torchsaq._io import atomic_write_text

    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
