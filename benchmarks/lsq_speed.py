"""Speed of the fused LSQ fake-quantizer (forward + backward) against the usual alternatives.

Variants, all computing the same function and the same gradients (checked before timing):

* ``fused``   -- ``saq.lsq``: one autograd Function, saves only x and the step.
* ``unfused`` -- the common LSQ implementation from plain torch ops: ``grad_scale`` and ``round_pass``
  via the detach trick (as in the LSQ reference implementations), autograd keeps the temporaries.
* ``boolmask``-- ``fused`` with the backward torchsaq had before: the clip mask as a bool tensor
  (``grad * mask``, ``masked_fill``), which the CPU runs 10-30x slower than a float pass; kept to show why.
* ``torch``   -- ``torch._fake_quantize_learnable_per_tensor_affine`` / ``..._per_channel_affine`` with
  zero point 0 and ``grad_factor = g`` (PyTorch's learnable fake-quant kernels).
* ``triton``  -- ``torch.ops.torchsaq.lsq`` with its Triton kernels (CUDA only; ``saq.set_lsq_backend("triton")``).

Tensors have ResNet-50 layer sizes: weights with per-channel steps (signed), activations after ReLU with
a per-tensor step (unsigned). Each timed run is forward + backward w.r.t. x and the step; the variants are
interleaved in shuffled order and the median is reported. CPU timings use ``time.perf_counter``; CUDA
timings use CUDA events.

    python benchmarks/lsq_speed.py                     # CPU, batch 4 for activations
    python benchmarks/lsq_speed.py --device cuda --batch 32
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

import torchsaq as saq

VARIANTS = ("fused", "boolmask", "unfused", "torch")

#: (name, shape, kind); activation shapes take the batch size as their first dim
WEIGHTS = [("layer1 conv2 weight", (64, 64, 3, 3)),
           ("layer3 conv2 weight", (256, 256, 3, 3)),
           ("layer4 conv2 weight", (512, 512, 3, 3)),
           ("layer4 conv3 weight", (2048, 512, 1, 1))]
ACTIVATIONS = [("layer1 input act", (64, 56, 56)),
               ("layer1 out act", (256, 56, 56)),
               ("layer3 out act", (1024, 14, 14)),
               ("layer4 out act", (2048, 7, 7))]


# -- the unfused reference (as in common LSQ code) ------------------------------------------------------
def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity forward, gradient multiplied by ``scale``."""
    y_grad = x * scale
    return (x - y_grad).detach() + y_grad


def round_pass(x: Tensor) -> Tensor:
    """round() forward, identity gradient (straight-through)."""
    return (x.round() - x).detach() + x


def lsq_unfused(x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:
    s = grad_scale(step, g)
    return round_pass(torch.clamp(x / s, qn, qp)) * s


class _BoolMaskLSQ(torch.autograd.Function):
    """saq's LSQ with its earlier backward, which kept the clip mask as a bool tensor."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:
        ctx.save_for_backward(x, step)
        ctx.args = (qn, qp, g)
        return saq.quant.kernels.lsq_forward(x, step, qn, qp)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, step = ctx.saved_tensors
        qn, qp, g = ctx.args
        s = step.clamp_min(saq.quant.kernels.STEP_EPS)
        v = torch.div(x, s)
        r = v.clamp(qn, qp)
        inside = r == v
        grad_x = grad * inside
        r.round_().sub_(v.masked_fill_(inside.logical_not_(), 0.0)).mul_(grad)
        return grad_x, r.sum_to_size(step.shape).mul_(g), None, None, None


def lsq_torch(x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:
    if step.numel() == 1:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, step.reshape(1), torch.zeros(1, device=x.device), qn, qp, g)
    return torch._fake_quantize_learnable_per_channel_affine(
        x, step.reshape(-1), torch.zeros(step.numel(), device=x.device), 0, qn, qp, g)


def _variant(name: str, bits: int, signed: bool) -> Callable[[Tensor, Tensor, float], Tensor]:
    qn, qp = saq.qrange(bits, signed)
    if name == "fused":
        return lambda x, s, g: saq.lsq(x, s, bits, signed, grad_scale=g)
    if name == "unfused":
        return lambda x, s, g: lsq_unfused(x, s, qn, qp, g)
    if name == "boolmask":
        return lambda x, s, g: _BoolMaskLSQ.apply(x, s, qn, qp, g)
    if name == "triton":
        return lambda x, s, g: torch.ops.torchsaq.lsq(x, s, qn, qp, g)
    return lambda x, s, g: lsq_torch(x, s, qn, qp, g)


# -- data ------------------------------------------------------------------------------------------------
def make_case(shape: Sequence[int], per_channel: bool, signed: bool, bits: int, device: torch.device):
    """x, step and upstream gradient, on which all variants must agree: x avoids the half-step bands at
    the clipping bounds where torch's kernel (mask on round(x/s)) and LSQ (mask on x/s) differ, and values
    exactly on a bound, where ``torch.clamp`` passes no gradient but LSQ (Qn <= x/s <= Qp) does."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    if not signed:
        x = x.abs()  # non-negative like a ReLU output, without exact zeros
    qn, qp = saq.qrange(bits, signed)
    if per_channel:
        step = 2 * x.abs().mean(dim=tuple(range(1, x.dim())), keepdim=True) / math.sqrt(qp)
    else:
        step = (2 * x.abs().mean() / math.sqrt(qp)).reshape(())
    v = x / step
    x = torch.where((v >= qp) & (v < qp + 0.5), (qp + 0.75) * step, x)
    x = torch.where((v > qn - 0.5) & (v < qn), (qn - 0.75) * step, x)
    up = torch.randn(*shape, generator=gen)
    g = 1.0 / math.sqrt(x.numel() // step.numel() * qp)
    return x.to(device), step.to(device), up.to(device), g


def _fwd_bwd(fn, x, s, up, g):
    x.grad = None
    s.grad = None
    y = fn(x, s, g)
    y.backward(up)
    return y


def check_same(fns: dict, x: Tensor, s: Tensor, up: Tensor, g: float) -> None:
    """Assert every variant gives the fused output and gradients (float tolerance)."""
    ref = None
    for name, fn in fns.items():
        xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
        y = _fwd_bwd(fn, xr, sr, up, g)
        got = (y.detach(), xr.grad, sr.grad.reshape(-1))
        if ref is None:
            ref = got
            continue
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} forward: {m}")
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} grad x: {m}")
        scale = ref[2].abs().max().item() + 1e-12
        torch.testing.assert_close(got[2], ref[2], rtol=1e-3, atol=1e-4 * scale, msg=lambda m: f"{name} grad s: {m}")


def _timer(device: torch.device):
    if device.type == "cuda":
        def timed(f):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)
    else:
        def timed(f):
            t = time.perf_counter()
            f()
            return (time.perf_counter() - t) * 1e3
    return timed


def run(device: str = "cpu", batch: Optional[int] = None, bits: int = 4, reps: int = 15, warmup: int = 3,
        quick: bool = False) -> list[dict]:
    """Time every variant on every tensor; returns rows ``{tensor, shape, step, <variant>_ms, <variant>_x}``."""
    dev = torch.device(device)
    batch = batch or (32 if dev.type == "cuda" else 4)
    cases = [(n, s, True, True) for n, s in WEIGHTS] + [(n, (batch, *s), False, False) for n, s in ACTIVATIONS]
    if quick:
        cases = cases[:1] + cases[len(WEIGHTS):len(WEIGHTS) + 1]
    timed = _timer(dev)
    variants = VARIANTS + (("triton",) if dev.type == "cuda" and saq.quant.kernels.triton_available() else ())
    rng = random.Random(0)
    rows = []
    for name, shape, per_channel, signed in cases:
        x, s, up, g = make_case(shape, per_channel, signed, bits, dev)
        fns = {v: _variant(v, bits, signed) for v in variants}
        check_same(fns, x, s, up, g)
        xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(warmup + reps):
            order = list(variants)
            rng.shuffle(order)
            for v in order:
                ms = timed(lambda: _fwd_bwd(fns[v], xr, sr, up, g))
                if i >= warmup:
                    times[v].append(ms)
        row = {"tensor": name, "shape": "x".join(map(str, shape)),
               "step": "per-channel" if per_channel else "per-tensor"}
        fused = statistics.median(times["fused"])
        for v in variants:
            med = statistics.median(times[v])
            row[f"{v}_ms"] = med
            row[f"{v}_x"] = med / fused
        if "triton_ms" in row:
            row["torch_over_triton"] = row["torch_ms"] / row["triton_ms"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (ms and ratio to fused; with Triton rows, torch learnable / triton too:
    the cost issue's target is >= 1 on every tensor)."""
    tri = bool(rows) and "triton_ms" in rows[0]
    lines = ["| tensor | shape | step | fused ms | bool-mask ms | unfused ms | torch learnable ms |"
             + (" triton ms |" if tri else "") + " bool-mask / fused | unfused / fused | torch / fused |"
             + (" torch / triton |" if tri else ""),
             "|---|---|---|---:|---:|---:|---:|" + ("---:|" if tri else "") + "---:|---:|---:|"
             + ("---:|" if tri else "")]
    for r in rows:
        lines.append(f"| {r['tensor']} | {r['shape']} | {r['step']} | {r['fused_ms']:.3f} | {r['boolmask_ms']:.3f} | "
                     f"{r['unfused_ms']:.3f} | {r['torch_ms']:.3f} |" + (f" {r['triton_ms']:.3f} |" if tri else "")
                     + f" {r['boolmask_x']:.2f} | {r['unfused_x']:.2f} | {r['torch_x']:.2f} |"
                     + (f" {r['torch_over_triton']:.2f} |" if tri else ""))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=None, help="activation batch size (default 4 on CPU, 32 on CUDA)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--quick", action="store_true", help="two small tensors only (smoke test)")
    p.add_argument("--out", default=None, help="also write the table (Markdown, with its header) here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.device, args.batch, args.bits, args.reps, args.warmup, args.quick)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    cmd = " ".join(["python benchmarks/lsq_speed.py"] + (list(argv) if argv is not None else sys.argv[1:]))
    text = (f"LSQ fake-quant forward+backward, {args.bits} bits, median of {args.reps} interleaved runs ({dev}, "
            f"torch {torch.__version__}); `{cmd}`\n\n{markdown(rows)}\n")
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return rows


if __name__ == "__main__":
    main()
