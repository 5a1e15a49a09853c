"""Accuracy benchmark: does SAQ beat plain LSQ QAT on the embedded data sets, and by how much?

For each data set (MNIST-1D with the 1-D CNN, scikit-learn digits with the small 2-D CNN) and bit-width
(w2a2, w3a3, w4a4; first and last layer at 8 bits) it trains, from the same seeds:
the full-precision model, the base optimizer (plain LSQ QAT), SAM on the full-precision weights of the
quantized model, SAQ cases 1, 2 and 3, and case 3 with each efficient strategy.

rho is chosen per method, data set and bit-width by a sweep scored on a validation split carved from the
training set (``--val-split``); the test set is only used for the final runs. Every run's result is cached
in ``<out>/accuracy_runs.jsonl`` so an interrupted benchmark resumes where it stopped.

    python benchmarks/accuracy.py                 # defaults: 5 seeds, < 1 hour on 2 cores
    python benchmarks/accuracy.py --seeds 2 --epochs 5 --bits 4 --datasets mnist1d   # a quick look
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

HERE = Path(__file__).resolve().parent

DATASETS = {  # data set -> (model, training options)
    "mnist1d": ("cnn1d", dict(epochs=10, batch_size=128, lr=0.05, weight_decay=5e-4)),
    "digits": ("cnn_digits", dict(epochs=15, batch_size=64, lr=0.05, weight_decay=5e-4)),
}

METHODS = {  # method -> TrainConfig overrides (rho is added by the sweep); strategies explicit, never defaults
    "full precision": dict(sharpness="none", w_bits=32, a_bits=32, first_last_bits=32),
    "base (LSQ QAT)": dict(sharpness="none"),
    "SAM": dict(sharpness="sam", strategy="full"),
    "case 1": dict(sharpness="case1", strategy="full"),
    "case 2": dict(sharpness="case2", strategy="full"),
    "SAQ (case 3)": dict(sharpness="case3", strategy="full"),
    "SAQ every_k": dict(sharpness="case3", strategy="every_k", strategy_k=5, strategy_alpha=0.7),  # LookSAM's alpha
    "SAQ every_k a=auto": dict(sharpness="case3", strategy="every_k", strategy_k=5, strategy_alpha=None),
    "SAQ prev_grad": dict(sharpness="case3", strategy="prev_grad"),
    # LSQ's activation step gradient scaled over the whole batch (saq 0.1.0) instead of one sample (LSQ paper)
    "base, act. grad over batch": dict(sharpness="none", act_grad_scale="batch"),
    "SAQ (case 3), act. grad over batch": dict(sharpness="case3", strategy="full", act_grad_scale="batch"),
}
SWEPT = [m for m, o in METHODS.items() if o["sharpness"] != "none"]  # each method gets its own rho
BASE = "base (LSQ QAT)"


# options that change no number of a run (how often it evaluates): a cached run answers for every value of them
_NUMBER_FREE = {"eval_every"}


def _key(d: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in d.items() if k not in _NUMBER_FREE}, sort_keys=True)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration (in a worker process, one thread) and return its metrics."""
    import torch

    torch.set_num_threads(1)
    from torchsaq.train.config import TrainConfig
    from torchsaq.train.runner import train

    cfg = TrainConfig(**job["config"])
    t0 = time.perf_counter()
    res = train(cfg, progress=False)
    keep = ("test_acc", "test_loss", "val_acc", "val_loss", "train_loss", "size_bits", "bops", "checkpoint")
    return {"job": job, "result": {k: res.get(k) for k in keep}, "time_s": time.perf_counter() - t0}


def _config(dataset: str, method: str, bits: int, seed: int, rho: Optional[float], args: argparse.Namespace,
            test: bool) -> dict[str, Any]:
    model, opts = DATASETS[dataset]
    cfg: dict[str, Any] = dict(dataset=dataset, model=model, seed=seed, val_split=args.val_split, w_bits=bits,
                               a_bits=bits, first_last_bits=8, save=False, **opts)
    if args.epochs:
        cfg["epochs"] = args.epochs
    cfg.update(METHODS[method])
    if args.finetune and method != "full precision":
        # the paper's regime: QAT starts from the float model trained with the same seed
        cfg["pretrained"] = str(_float_checkpoint(dataset, seed, args))
        cfg["lr"] = cfg["lr"] * args.finetune_lr_factor
    if rho is not None:
        cfg["rho"] = rho
    if test and args.keep_checkpoints and seed == args.seed0 and method in (BASE, "SAQ (case 3)"):
        cfg["save"] = True
        cfg["output"] = str(Path(args.out) / f"checkpoints{args.tag}" /
                            f"{dataset}_w{bits}a{bits}_{method.split()[0].lower()}")
    return cfg


def _float_checkpoint(dataset: str, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.out) / "pretrained" / f"{dataset}_seed{seed}" / "checkpoint.pt"


def _float_config(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The full-precision run whose checkpoint --finetune starts QAT from (same seed and split)."""
    model, opts = DATASETS[dataset]
    cfg: dict[str, Any] = dict(dataset=dataset, model=model, seed=seed, val_split=args.val_split, **opts,
                               **METHODS["full precision"], save=True,
                               output=str(_float_checkpoint(dataset, seed, args).parent))
    if args.epochs:
        cfg["epochs"] = args.epochs
    return cfg


class Runner:
    """Runs jobs in a process pool, caching each result by its configuration."""

    def __init__(self, cache: Path, workers: int, job: Callable[[dict[str, Any]], dict[str, Any]] = _run,
                 normalize: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None):
        """``normalize`` maps a configuration to what identifies it in the cache (e.g. paths made relative);
        ``workers`` processes run the jobs, 0 runs them in this one."""
        if workers < 0:
            raise SystemExit(f"--workers must be >= 0 (0 runs in this process), got {workers}")
        self.cache = cache
        self.workers = workers
        self.job = job
        self.normalize = normalize or (lambda c: c)
        self.done: dict[str, dict[str, Any]] = {}
        if cache.exists():
            for line in cache.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.done[self.key(rec["job"]["config"])] = rec

    def key(self, config: dict[str, Any]) -> str:
        return _key(self.normalize(config))

    def run(self, configs: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
        """Each configuration's cached result, running the missing ones (``workers`` processes; 0: in this one,
        as tests do, without a pool's start-up)."""
        todo = list({self.key(c): c for c in configs if self.key(c) not in self.done}.values())
        if not todo:
            return [self.done[self.key(c)] for c in configs]
        where = f"{self.workers} processes" if self.workers else "in this process"
        print(f"[{label}] {len(todo)} runs ({len(configs) - len(todo)} cached), {where}", flush=True)
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            jobs = [{"config": c} for c in todo]
            if self.workers:
                pool = stack.enter_context(mp.get_context("spawn").Pool(self.workers))
                results: Iterable[dict[str, Any]] = pool.imap_unordered(self.job, jobs)
            else:
                results = map(self.job, jobs)
            f = stack.enter_context(self.cache.open("a"))
            for i, rec in enumerate(results, 1):
                self.done[self.key(rec["job"]["config"])] = rec
                f.write(json.dumps(rec) + "\n")
                f.flush()
                el = time.perf_counter() - t0
                print(f"  {i}/{len(todo)}  {el:6.0f}s elapsed, ~{el / i * (len(todo) - i):5.0f}s left", flush=True)
        return [self.done[self.key(c)] for c in configs]


def t_interval(diffs: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (Student t) of paired differences."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, float("nan")
    from scipy.stats import t

    return mean, t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, default=5, help="seeds of the final runs (paired across methods)")
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0, help="override every data set's epochs")
    p.add_argument("--rhos", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.2])
    p.add_argument("--sweep-seeds", type=int, default=1, help="seeds per rho in the validation sweep")
    p.add_argument("--val-split", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="save base and SAQ checkpoints of the first seed (for `torchsaq sharpness` / `landscape`)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--finetune", action="store_true",
                   help="the paper's regime: QAT (every method) starts from the float model of the same seed, "
                        "trained first, at --finetune-lr-factor x the learning rate")
    p.add_argument("--finetune-lr-factor", type=float, default=0.2)
    args = p.parse_args(argv)
    args.tag = "_finetune" if args.finetune else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out / "accuracy_runs.jsonl", args.workers)
    t_start = time.perf_counter()

    # 0. --finetune: the float models QAT starts from, one per data set and seed
    if args.finetune:
        seeds = [1000 + s for s in range(args.sweep_seeds)] + list(range(args.seed0, args.seed0 + args.seeds))
        floats = [_float_config(ds, s, args) for ds in args.datasets for s in seeds]
        for c in floats:  # a cached run whose checkpoint was deleted is trained again
            if not Path(c["output"], "checkpoint.pt").exists():
                runner.done.pop(runner.key(c), None)
        runner.run(floats, "float models to fine-tune from")

    # 1. rho sweep on the validation split (seeds disjoint from the final ones)
    chosen: dict[tuple[str, int, str], float] = {}
    sweep_cfgs, sweep_index = [], []
    for ds in args.datasets:
        for b in args.bits:
            for m in (m for m in SWEPT if m in args.methods):
                for rho in args.rhos:
                    for s in range(args.sweep_seeds):
                        sweep_cfgs.append(_config(ds, m, b, 1000 + s, rho, args, test=False))
                        sweep_index.append((ds, b, m, rho))
    sweep = runner.run(sweep_cfgs, "rho sweep on validation split")
    scores: dict[tuple[str, int, str, float], list[float]] = {}
    for key, rec in zip(sweep_index, sweep):
        scores.setdefault(key, []).append(rec["result"]["val_acc"])
    for (ds, b, m, rho), accs in scores.items():
        best = chosen.get((ds, b, m))
        if best is None or statistics.fmean(accs) > statistics.fmean(scores[(ds, b, m, best)]):
            chosen[(ds, b, m)] = rho

    # 2. final runs on the test set with the chosen rho
    final_cfgs, index = [], []
    for ds in args.datasets:
        for b in args.bits:
            for m in args.methods:
                rho = chosen.get((ds, b, m))
                for s in range(args.seed0, args.seed0 + args.seeds):
                    final_cfgs.append(_config(ds, m, b, s, rho, args, test=True))
                    index.append((ds, b, m, s))
    final = runner.run(final_cfgs, "final runs on the test set")
    acc: dict[tuple[str, int, str], dict[int, float]] = {}
    secs: dict[tuple[str, int, str], list[float]] = {}
    for (ds, b, m, s), rec in zip(index, final):
        acc.setdefault((ds, b, m), {})[s] = rec["result"]["test_acc"]  # percent
        secs.setdefault((ds, b, m), []).append(rec["time_s"])

    # 3. table, JSON, chart
    ep = {ds: args.epochs or DATASETS[ds][1]["epochs"] for ds in args.datasets}
    lines = [f"Test accuracy (%), mean +- std over {args.seeds} seeds; gain = paired difference to the base optimizer "
             f"(same seeds), mean and 95% t-interval; rho chosen on a {args.val_split:.0%} validation split of the "
             f"training set from {args.rhos} ({args.sweep_seeds} seed each). Epochs: "
             + ", ".join(f"{ds} {e}" for ds, e in ep.items()) + ". First/last layer 8-bit."
             + (f" Every QAT run starts from the float model of its seed (the full-precision row) at "
                f"{args.finetune_lr_factor}x the learning rate." if args.finetune else " Trained from scratch."),
             "", "| data set | bits | method | rho | test acc | gain vs base | train s/run |",
             "|---|---|---|---:|---:|---:|---:|"]
    summary = []
    for ds in args.datasets:
        for b in args.bits:
            for m in args.methods:
                a = acc[(ds, b, m)]
                vals = [a[s] for s in sorted(a)]
                mean, std = statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
                gain_txt, gain = "", None
                if m != BASE and (ds, b, BASE) in acc:
                    base = acc[(ds, b, BASE)]
                    g, hw = t_interval([a[s] - base[s] for s in sorted(a) if s in base])
                    gain = (g, hw)
                    gain_txt = f"{g:+.2f} [{g - hw:+.2f}, {g + hw:+.2f}]"
                rho = chosen.get((ds, b, m))
                bits_txt = "fp32" if m == "full precision" else f"w{b}a{b}"
                lines.append(f"| {ds} | {bits_txt} | {m} | {rho if rho is not None else '-'} | {mean:.2f} +- {std:.2f} "
                             f"| {gain_txt or '-'} | {statistics.fmean(secs[(ds, b, m)]):.1f} |")
                summary.append(dict(dataset=ds, bits=b, method=m, rho=rho, mean=mean, std=std, accs=vals,
                                    gain=gain, time_s=statistics.fmean(secs[(ds, b, m)])))
    table = "\n".join(lines) + "\n"
    cmd = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"accuracy{args.tag}.md").write_text(f"Command: `{cmd.strip()}`\n\n" + table)
    rhos = {f"{k[0]}/w{k[1]}/{k[2]}": v for k, v in chosen.items()}
    (out / f"accuracy{args.tag}.json").write_text(json.dumps(dict(chosen_rho=rhos,
                                                       rows=summary), indent=1))
    plot(summary, args, out / f"accuracy{args.tag}.png")
    print(table)
    print(f"written {out / f'accuracy{args.tag}.md'} (.json, .png) in {time.perf_counter() - t_start:.0f}s")
    return 0


def plot(summary: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ds, b) for ds in args.datasets for b in args.bits]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (ds, b) in zip(axes[0], panels):
        rows = [r for r in summary if r["dataset"] == ds and r["bits"] == b and r["method"] != "full precision"]
        fp = [r for r in summary if r["dataset"] == ds and r["bits"] == b and r["method"] == "full precision"]
        xs = range(len(rows))
        ax.bar(xs, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=3,
               color=["0.6" if r["method"] == BASE else "C0" if "SAQ" in r["method"] else "C1" for r in rows])
        if fp:
            ax.axhline(fp[0]["mean"], color="k", ls="--", lw=1, label="full precision")
            ax.legend(fontsize=7, loc="lower right")
        lo = min(r["mean"] - r["std"] for r in rows + fp)
        hi = max(r["mean"] + r["std"] for r in rows + fp)
        ax.set_ylim(max(0, lo - 0.3 * (hi - lo) - 1), min(100, hi + 0.15 * (hi - lo) + 0.5))
        ax.set_xticks(list(xs), [r["method"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{ds} w{b}a{b}", fontsize=9)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
