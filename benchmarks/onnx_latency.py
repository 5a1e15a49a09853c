"""onnxruntime on this CPU: file size, memory and latency of a float32 ONNX model against its w4a4 QDQ export.

The model is torchvision's ResNet-18 (1000 classes, 224x224), converted by ``saq.quantize`` (w4a4, first and
last layer at 8 bits) and calibrated on random data: size, memory and speed do not depend on the trained
values. Variants, each a file written by ``saq.export(model, "x.onnx", example_inputs=...)``:

* ``float32``       -- ``export_onnx(..., quantized=False)``: the float model (BatchNorm folded by the exporter);
* ``w4a4 LSQ``      -- the QDQ graph: INT4 weights through DequantizeLinear, UINT4 activations, ORT defaults;
* ``w4a4 LSQ, DQ folded`` -- the same file with the session option ``session.disable_quant_qdq=1``, under
  which onnxruntime constant-folds the weight DequantizeLinear nodes at load (float weights in memory);
* ``w4a4 LIQ``      -- the official quantizer's export (UINT4 codes, zero point 7, a half-step Add).

Latency: one thread (``intra_op_num_threads=1``), the variants interleaved in shuffled order, each timed run
one ``session.run``; the median is reported. Memory: a fresh child process per variant, resident memory
after creating the session and its peak after one run at the largest batch (both minus the process before).

    python benchmarks/onnx_latency.py                      # writes benchmarks/results/onnx_cpu.md
    python benchmarks/onnx_latency.py --repeats 3 --batches 1 --out /tmp/onnx.md
"""
from __future__ import annotations

import argparse
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

VARIANTS = ("float32", "w4a4 LSQ", "w4a4 LSQ, DQ folded", "w4a4 LIQ")
FILES = {"float32": "float.onnx", "w4a4 LSQ": "lsq.onnx", "w4a4 LSQ, DQ folded": "lsq.onnx", "w4a4 LIQ": "liq.onnx"}


def session(path: str, fold: bool, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads (``fold``: DequantizeLinear folded at load)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if fold:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _status_mb(key: str) -> float:
    """A memory line of /proc/self/status in MB (VmRSS: resident now; VmHWM: peak, reset by exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(path: str, fold: bool, threads: int, batch: int, img: int) -> None:
    """(child process) Print resident MB added by loading the session and the peak after one run, as JSON."""
    import numpy as np

    base = _status_mb("VmRSS")
    sess = session(path, fold, threads)
    loaded = _status_mb("VmRSS")
    sess.run(None, {"input": np.random.randn(batch, 3, img, img).astype(np.float32)})
    peak = _status_mb("VmHWM")  # not getrusage: its maxrss survives exec (the forked parent's pages)
    print(json.dumps({"load_mb": loaded - base, "peak_mb": peak - base}))


def export_models(folder: Path, img: int) -> None:
    """Write float.onnx, lsq.onnx and liq.onnx for ResNet-18 into ``folder``."""
    import torch
    import torchvision

    import torchsaq as saq
    from torchsaq.export_onnx import export_onnx

    x = torch.randn(1, 3, img, img)
    for kind in ("lsq", "liq"):
        torch.manual_seed(0)
        model = saq.quantize(torchvision.models.resnet18(), saq.QuantConfig(w_bits=4, a_bits=4, quantizer=kind))
        saq.calibrate(model, [torch.randn(2, 3, img, img)])
        saq.export(model.eval(), folder / f"{kind}.onnx", example_inputs=(x,))
        if kind == "lsq":
            export_onnx(model, folder / "float.onnx", (x,), quantized=False)


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
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7, help="timed runs per variant and batch (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/onnx_cpu.md")
    p.add_argument("--memory-child", nargs=3, metavar=("PATH", "FOLD", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        path, fold, batch = args.memory_child
        memory_child(path, fold == "1", args.threads, int(batch), args.img)
        return

    import numpy as np
    import onnxruntime as ort

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        export_models(folder, args.img)
        paths = {v: str(folder / FILES[v]) for v in VARIANTS}
        sizes = {v: os.path.getsize(paths[v]) / 1e6 for v in VARIANTS}
        memory = {}
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--img", str(args.img),
                                  "--memory-child", paths[v], "1" if "folded" in v else "0", str(max(args.batches))],
                                 check=True, capture_output=True, text=True).stdout
            memory[v] = json.loads(out.strip().splitlines()[-1])
        sessions = {v: session(paths[v], "folded" in v, args.threads) for v in VARIANTS}
        rng = np.random.default_rng(0)
        inputs = {b: rng.standard_normal((b, 3, args.img, args.img), dtype=np.float32) for b in args.batches}
        outs = {v: [sessions[v].run(None, {"input": inputs[b]})[0] for b in args.batches] for v in VARIANTS}  # warm-up
        folded_diff = max(float(np.abs(a - b).max()) for a, b in zip(outs["w4a4 LSQ"], outs["w4a4 LSQ, DQ folded"]))
        times: dict[tuple[str, int], list[float]] = {(v, b): [] for v in VARIANTS for b in args.batches}
        order = list(VARIANTS)
        for r in range(args.repeats):
            for b in args.batches:
                random.Random(r * 100 + b).shuffle(order)
                for v in order:
                    t = time.perf_counter()
                    sessions[v].run(None, {"input": inputs[b]})
                    times[v, b].append(1000 * (time.perf_counter() - t))
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    med = {k: statistics.median(t) for k, t in times.items()}
    head = ["variant", "file MB", "size vs float", "RSS after load MB", f"peak RSS b{max(args.batches)} MB"]
    head += [f"ms b{b}" for b in args.batches] + [f"b{b} vs float" for b in args.batches]
    rows = []
    for v in VARIANTS:
        row = [v, f"{sizes[v]:.2f}", f"{sizes['float32'] / sizes[v]:.2f}x smaller" if v != "float32" else "1x",
               f"{memory[v]['load_mb']:.0f}", f"{memory[v]['peak_mb']:.0f}"]
        row += [f"{med[v, b]:.1f}" for b in args.batches]
        row += [f"{med[v, b] / med['float32', b]:.2f}x" for b in args.batches]
        rows.append(row)
    table = "| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|\n"
    table += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    spread = {f"{v} b{b}": f"{min(times[v, b]):.1f}-{max(times[v, b]):.1f}" for v in VARIANTS for b in args.batches}
    import torchsaq as saq

    header = (f"ResNet-18 (1000 classes, {args.img}x{args.img}), onnxruntime {ort.__version__} CPUExecutionProvider, "
              f"{args.threads} thread(s), {args.repeats} interleaved runs per cell (median); {cpu_name()}, "
              f"{os.cpu_count()} cores; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
              f"(other jobs were running); saq {saq.__version__}, python {platform.python_version()}\n\n"
              f"    {' '.join(['python benchmarks/onnx_latency.py', *sys.argv[1:]])}\n\n")
    text = header + table + (f"\nmin-max ms per cell: {json.dumps(spread)}\n\nlargest output difference between "
                             f"'w4a4 LSQ' and its DQ-folded session: {folded_diff:.2g}\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
