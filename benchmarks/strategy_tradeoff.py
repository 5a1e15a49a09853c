"""SAQ's efficient strategies: accuracy gain over plain QAT against cost, one table and one plot.

Reads what two other benchmarks wrote (nothing is trained or timed here):

* the gain: a ``benchmarks/fashion.py`` report (its JSON), e.g. the w2a2 60-epoch cell of the over-fitting study
  ``python benchmarks/fashion.py --preset cpu_gap --bits 2 --qat-epochs 60 --eval-every 10 --rhos 0.1 --seeds 10
  --methods "base (LSQ QAT)" "SAQ (case 3)" "SAQ prev_grad" "SAQ sub_batch f=0.25" "SAQ periodic k=4"
  --report fashion_cpu_gap_strategies60``;
* the cost: a ``benchmarks/cost.py`` table of the same network (time per step relative to plain QAT, every method
  interleaved in one run), e.g. ``python benchmarks/cost.py --only cnn_fmnist --threads 1 --clock thread
  --no-memory --no-lsq --out benchmarks/results/cost_cpu_strategies.md``.

    python benchmarks/strategy_tradeoff.py      # -> benchmarks/results/strategy_tradeoff.md / .png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from accuracy import t_interval  # noqa: E402  (the paired 95% interval of the other benchmarks)

# fashion.py method -> cost.py method
COST_NAME = {
    "base (LSQ QAT)": "base (LSQ QAT)",
    "SAQ (case 3)": "SAQ full step",
    "SAQ prev_grad": "SAQ prev_grad",
    "SAQ momentum": "SAQ momentum",
    "SAQ sub_batch f=0.25": "SAQ sub_batch (f=0.25)",
    "SAQ periodic k=4": "SAQ periodic (k=4)",
    "SAQ every_k k=2": "SAQ every_k (k=2)",
    "SAQ every_k k=5": "SAQ every_k (k=5)",
}
FULL = "SAQ (case 3)"
# fashion.py method -> (share of steps that are full steps, the rest plain): cost = that mix of the measured steps
LATE = {"SAQ late 1/4": 0.25}


def load(gain_json: Path, cost_json: Path, cost_model: str) -> list[dict[str, Any]]:
    """One row per method and bit-width: its gain [95% CI] over plain QAT, seeds, the share of the full step's gain
    it keeps, its paired difference to the full step, and its cost relative to plain QAT measured in one run."""
    return [row for bits in sorted({r["bits"] for r in json.loads(gain_json.read_text())["rows"]})
            for row in _load_bits(gain_json, cost_json, cost_model, bits)]


def _vs_full(accs: list[float], full_accs: list[float]) -> Optional[tuple[float, float, int]]:
    """Paired difference to the full step over the seeds both ran (paired seeds are 0, 1, ... in order)."""
    n = min(len(accs), len(full_accs))
    if n < 2:
        return None
    mean, half = t_interval([a - b for a, b in zip(accs[:n], full_accs[:n])])
    return mean, half, n


def _load_bits(gain_json: Path, cost_json: Path, cost_model: str, bits: int) -> list[dict[str, Any]]:
    gains = [r for r in json.loads(gain_json.read_text())["rows"] if r["bits"] == bits]
    costs = {r["method"]: r for r in json.loads(cost_json.read_text()) if cost_model in r["model"]}
    full = next((r for r in gains if r["method"] == FULL and r["gain"]), None)
    rows = []
    for r in gains:
        c = costs.get(COST_NAME.get(r["method"], ""))
        if r["method"] in LATE and COST_NAME[FULL] in costs:  # plain steps, then full ones: the measured mix
            share, full_cost = LATE[r["method"]], costs[COST_NAME[FULL]]
            c = dict(ratio=1 - share + share * full_cost["ratio"], floor=1 - share + share * full_cost["floor"])
        g = r["gain"] or (0.0, 0.0, len(r["accs"]))
        keep = g[0] / full["gain"][0] if full is not None and full["gain"][0] > 0 else None
        vs_full = None if full is None or r["method"] in (FULL, gains[0]["method"]) or r["gain"] is None \
            else _vs_full(r["accs"], full["accs"])
        rows.append(dict(method=r["method"], bits=r["bits"], seeds=len(r["accs"]), acc=sum(r["accs"]) / len(r["accs"]),
                         gain=g[0], half=g[1], base=r["gain"] is None, keep=keep, vs_full=vs_full,
                         cost=None if c is None else c["ratio"], floor=None if c is None else c["floor"]))
    return rows


def markdown(rows: list[dict[str, Any]], gain_json: Path, cost_json: Path) -> str:
    lines = [f"Gain: [{gain_json.name}]({gain_json.name}); cost: [{cost_json.name}]({cost_json.name}) (time per "
             "step relative to plain QAT, every method interleaved in one run). Kept = gain / the full step's gain.",
             "", "| bits | method | seeds | test acc | gain vs QAT [95% CI] | kept of full | vs full (paired) [95% CI] "
             "| cost x QAT | floor |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gain = "-" if r["base"] else f"{r['gain']:+.2f} [{r['gain'] - r['half']:+.2f}, {r['gain'] + r['half']:+.2f}]"
        keep = "-" if r["keep"] is None or r["base"] else f"{100 * r['keep']:.0f}%"
        vf = r["vs_full"]
        vs_full = "-" if vf is None else f"{vf[0]:+.2f} [{vf[0] - vf[1]:+.2f}, {vf[0] + vf[1]:+.2f}] (n={vf[2]})"
        cost = "-" if r["cost"] is None else f"{r['cost']:.2f}"
        floor = "-" if r["floor"] is None else f"{r['floor']:.2f}"
        lines.append(f"| w{r['bits']}a{r['bits']} | {r['method']} | {r['seeds']} | {r['acc']:.2f} | {gain} | {keep} | "
                     f"{vs_full} | {cost} | {floor} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in rows:
        if r["cost"] is None:
            continue
        ax.errorbar(r["cost"], r["gain"], yerr=0 if r["base"] else r["half"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["cost"], r["gain"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(1.3, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("cost per step (x plain QAT)")
    ax.set_ylabel("test accuracy gain over plain QAT (points, 95% CI)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gain", default=str(RESULTS / "fashion_cpu_gap_strategies60.json"))
    ap.add_argument("--cost", default=str(RESULTS / "cost_cpu_strategies.json"))
    ap.add_argument("--cost-model", default="cnn_fmnist", help="the cost table's model (a substring of its name)")
    ap.add_argument("--out", default=str(RESULTS / "strategy_tradeoff"))
    ap.add_argument("--title", default="Fashion-MNIST over-fitting, w2a2, 60 QAT epochs")
    args = ap.parse_args(argv)
    gain_json, cost_json = Path(args.gain), Path(args.cost)
    for p in (gain_json, cost_json):
        if not p.exists():
            raise SystemExit(f"strategy_tradeoff: {p} does not exist (run the benchmark that writes it first)")
    rows = load(gain_json, cost_json, args.cost_model)
    text = markdown(rows, gain_json, cost_json)
    Path(args.out).with_suffix(".md").write_text(text)
    plot(rows, Path(args.out).with_suffix(".png"), args.title)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
