"""Why does every_k (LookSAM) lose accuracy? One MNIST-1D run with instruments on the stored g_v.

At every full step it records ||g|| (first pass), ||g_s|| (second pass), ||g_v|| split by parameter kind
(weights "w", norm/bias, quantizer steps), the cosine between this g_v and the previous full step's g_v (with
strategy_k=1: adjacent iterations, different batches) and the cosine between the previous g_v and this step's
plain gradient; it prints one JSON line with the accuracy and each quantity's mean over the first 10 and over
the second half of the full steps. Defaults: w2a2, case 3, every_k, rho 0.05, 10 epochs; the JSON argument
overrides any TrainConfig field.

    python benchmarks/every_k_probe.py --alpha 0.7 '{"w_bits":32,"a_bits":32,"first_last_bits":32,"sharpness":"sam"}'
    python benchmarks/every_k_probe.py --alpha auto '{"strategy_k":1}'     # w2a2 case 3, g_v every step

Results of the runs quoted in the README: benchmarks/results/every_k_probe.jsonl.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Optional, Sequence

import torch

import torchsaq.optim.saq
import torchsaq.optim.strategies
from torchsaq.train.config import TrainConfig
from torchsaq.quant.quantizer import Quantizer
from torchsaq.train.runner import train

STATS: list[dict[str, float]] = []


def _norm(ts: Sequence[Optional[torch.Tensor]]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in ts if t is not None)))


def _cos(a: Sequence[Optional[torch.Tensor]], b: Sequence[Optional[torch.Tensor]]) -> float:
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b) if x is not None and y is not None)
    return dot / (_norm(a) * _norm(b) + 1e-30)


class ProbedEveryK(torchsaq.optim.strategies.EveryK):
    """every_k that records its quantities at each full step (nothing else changes)."""

    kind_idx: dict[str, list[int]] = {}

    def update(self, params: list[torch.Tensor], g_first: list[Optional[torch.Tensor]]) -> None:
        gf = [None if g is None else g.clone() for g in g_first]
        gs = [None if p.grad is None else p.grad.clone() for p in params]
        old = None if self.gv is None else [None if t is None else t.clone() for t in self.gv]
        super().update(params, g_first)
        gv = self.gv or []
        rec = {"g": _norm(gf), "gs": _norm(gs), "gv": _norm(gv)}
        for kind, idx in self.kind_idx.items():
            rec["gv_" + kind] = _norm([gv[i] for i in idx])
            rec["g_" + kind] = _norm([gf[i] for i in idx])
        if old is not None:
            rec["cos_gv_prev"] = _cos(old, gv)
            rec["cos_g_oldgv"] = _cos(old, gf)  # is the stored g_v still orthogonal to the new plain gradient?
        STATS.append(rec)


class ProbedSAQ(torchsaq.optim.saq.SAQ):
    """torchsaq.SAQ whose every_k strategy records its quantities (nothing else changes)."""

    def __init__(self, model: torch.nn.Module, base: torch.optim.Optimizer, *args: Any, **kwargs: Any):
        if PROBE_ALPHA is not None:
            kwargs["alpha"] = PROBE_ALPHA
        super().__init__(model, base, *args, **kwargs)
        kind = {}
        for m in model.modules():
            for p in m.parameters(recurse=False):
                kind[id(p)] = "step" if isinstance(m, Quantizer) else ("w" if p.ndim > 1 else "norm_bias")
        kind_idx: dict[str, list[int]] = {}
        for i, p in enumerate(self._params()):
            kind_idx.setdefault(kind.get(id(p), "other"), []).append(i)
        if isinstance(self._strategy, torchsaq.optim.strategies.EveryK):
            self._strategy.__class__ = ProbedEveryK
            self._strategy.kind_idx = kind_idx  # type: ignore[attr-defined]


PROBE_ALPHA: Optional[float | str] = None


def main() -> None:
    global PROBE_ALPHA
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON object of TrainConfig fields")
    ap.add_argument("--alpha", default=None, help="every_k alpha: a number or 'auto' (default: the config's)")
    args = ap.parse_args()
    if args.alpha is not None:
        PROBE_ALPHA = "auto" if args.alpha == "auto" else float(args.alpha)
    torch.set_num_threads(1)
    torchsaq.optim.saq.SAQ = ProbedSAQ  # type: ignore[misc]  # what torchsaq.train builds
    over = json.loads(args.overrides)
    cfg = dict(dataset="mnist1d", model="cnn1d", epochs=10, batch_size=128, lr=0.05, weight_decay=5e-4, save=False,
               w_bits=2, a_bits=2, first_last_bits=8, sharpness="case3", strategy="every_k", rho=0.05)
    cfg.update(over)
    t0 = time.time()
    res = train(TrainConfig(**cfg), progress=False)
    summary = {}
    for key in sorted({k for s in STATS for k in s}):
        vals = [s[key] for s in STATS if key in s]
        summary[key] = [round(statistics.fmean(vals[:10]), 4), round(statistics.fmean(vals[len(vals) // 2:]), 4)]
    print(json.dumps({"over": over, "alpha": args.alpha or "default", "test_acc": res["test_acc"],
                      "t": round(time.time() - t0, 1), "stats(first10,secondhalf)": summary}))


if __name__ == "__main__":
    main()
