"""Are SAQ's minima flatter here? Sharpness measures and loss landscapes of the accuracy benchmark's checkpoints.

Reads the base (plain LSQ QAT) and SAQ checkpoints that ``benchmarks/accuracy.py --keep-checkpoints`` saved
(first seed, each data set and bit-width), measures each on the same fixed training subset with
``saq.analysis.run_sharpness`` (Hessian top eigenvalue and trace w.r.t. the quantized weights, SAM sharpness
at radius rho), and draws base-vs-SAQ 1-D landscapes along the same filter-normalised direction.

    python benchmarks/sharpness.py                    # after benchmarks/accuracy.py --keep-checkpoints
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from torchsaq.analysis import run_landscape, run_sharpness

HERE = Path(__file__).resolve().parent


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown table of the measures."""
    lines = [f"Sharpness of the accuracy benchmark's first-seed checkpoints, on {args.num_samples} fixed training "
             f"samples, w.r.t. the quantized weights and float parameters; SAM sharpness = max loss increase "
             f"within an L2 ball of radius {args.rho}. Command: `python benchmarks/sharpness.py`", "",
             "| data set | bits | method | train loss | train acc | Hessian top eigenvalue | Hessian trace (+- s.e.) "
             "| SAM sharpness |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['bits']} | {r['method']} | {r['train_loss']:.4f} | {r['train_acc']:.1f} "
                     f"| {r['lambda_max']:.3g} | {r['trace']:.3g} +- {r['trace_se']:.2g} | {r['sam_sharpness']:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=str(HERE / "results" / "checkpoints"))
    p.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"])
    p.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--samples", type=int, default=32, help="Hutchinson probe vectors")
    p.add_argument("--landscape", default="mnist1d", help="data set whose landscapes are drawn")
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--span", type=float, default=1.0)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--table-only", action="store_true", help="rebuild sharpness.md from sharpness.json")
    args = p.parse_args(argv)
    root, out = Path(args.checkpoints), Path(args.out)
    if args.table_only:
        (out / "sharpness.md").write_text(format_table(json.loads((out / "sharpness.json").read_text()), args))
        return 0
    rows = []
    for ds in args.datasets:
        for b in args.bits:
            for method in ("base", "saq"):
                ckpt = root / f"{ds}_w{b}a{b}_{method}" / "checkpoint.pt"
                if not ckpt.exists():
                    p.error(f"missing {ckpt}: run `python benchmarks/accuracy.py --keep-checkpoints` first")
                r = run_sharpness(str(ckpt), num_samples=args.num_samples, rho=args.rho, iters=args.iters,
                                  samples=args.samples)
                rows.append(dict(dataset=ds, bits=f"w{b}a{b}", method="SAQ (case 3)" if method == "saq" else "base",
                                 train_loss=r["loss"], train_acc=r["accuracy"], lambda_max=r["hessian_top_eigenvalue"],
                                 trace=r["hessian_trace"], trace_se=r["hessian_trace_stderr"],
                                 sam_sharpness=r["sam_sharpness"]))
                print(rows[-1], flush=True)
    table = format_table(rows, args)
    (out / "sharpness.md").write_text(table)
    (out / "sharpness.json").write_text(json.dumps(rows, indent=1))
    print(table)

    # one figure: base vs SAQ along the same direction, at each bit-width of the chosen data set
    for b in args.bits:
        ckpts = [str(root / f"{args.landscape}_w{b}a{b}_{m}" / "checkpoint.pt") for m in ("base", "saq")]
        paths = run_landscape(ckpts, str(out / f"landscape_w{b}"), dims=1, steps=args.steps, span=args.span,
                              num_samples=args.num_samples, progress=False)
        shutil.copy(paths["plot"], out / f"landscape_{args.landscape}_w{b}a{b}.png")
        print(f"written {out / f'landscape_{args.landscape}_w{b}a{b}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
