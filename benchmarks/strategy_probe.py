"""Why does the one-pass ``prev_grad`` strategy lose what the full SAQ step gains? Measured along a real run.

Trains one configuration of the Fashion-MNIST over-fitting study (``fashion.py --preset cpu_gap``, w2a2, from the
float model of a seed) with the chosen strategy, and before every optimizer step measures, on that step's batch
and at the point the run is at (extra passes whose effects are undone: BatchNorm statistics, gradients and the
Q(w) captures are put back, so the run itself is exactly the benchmark's):

* ``d``: the full step's ascent direction (SAQ case 3: dL/dQ(w) for the quantized weights, dL/dp for the other
  perturbed parameters), on the whole batch at the unperturbed point;
* ``cos(d, d_prev)``: against the previous step's ``d`` (another batch, one step earlier): how stale the
  direction prev_grad perturbs along is (prev_grad's own comes from the previous batch at its perturbed point);
* ``cos(d, d_sub)``: against the direction from the first quarter of the same batch (the ``sub_batch`` strategy);
* ``cos(d_prev, v)``: the previous direction against the optimizer's momentum buffer ``v`` (SGD moves the weights
  along ``-v``): positive means prev_grad perturbs the weights back along the way the run came, a direction the
  momentum already averages over, rather than this batch's own ascent direction;
* the loss increase on this batch from a perturbation of radius rho along ``d`` (what the full step's second pass
  sees), along ``d_prev`` and along ``d_sub``: the share of the sharpness each strategy's perturbation realises.

    python benchmarks/strategy_probe.py --strategy prev_grad --epochs 60   # needs fashion.py's float model
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion  # noqa: E402  (the study's configurations)

from torchsaq.train import engine  # noqa: E402
from torchsaq.train.config import TrainConfig  # noqa: E402
from torchsaq.optim.perturb import Mode, Targets  # noqa: E402
from torchsaq.train.runner import train  # noqa: E402


class Probe:
    """Directions and loss increases at each step of a run (see the module docstring)."""

    def __init__(self, rho: float, sub: float = 0.25):
        self.rho, self.sub = rho, sub
        self.targets: Optional[Targets] = None
        self.d_prev: Optional[Tensor] = None
        self.rows: list[dict[str, float]] = []

    def _targets(self, model: torch.nn.Module) -> Targets:
        if self.targets is None:
            cands = [p for p in model.parameters() if p.requires_grad]
            self.targets = Targets.select(model, Mode.parse("case3"), cands, unquantized=True, steps=False)
        return self.targets

    def direction(self, model: torch.nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(d flattened over every target, the clean loss) for batch (x, y) at the current point."""
        t = self._targets(model)
        model.zero_grad(set_to_none=True)
        for layer in t.layers:
            layer.zero_qweight_grad()
            layer.capture_qweight = True
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        parts = [layer.qweight_grad.flatten() for layer in t.layers]  # type: ignore[union-attr]
        parts += [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in t.params]
        return torch.cat(parts).double(), loss.detach()

    @torch.no_grad()
    def loss_at(self, model: torch.nn.Module, x: Tensor, y: Tensor, d: Tensor) -> float:
        """The loss on (x, y) at Q(w) + rho d / ||d|| (quantized weights) and p + rho d / ||d|| (the others)."""
        t = self._targets(model)
        e = (self.rho * d / d.norm()).float()
        chunks = iter(torch.split(e, [layer.weight.numel() for layer in t.layers] + [p.numel() for p in t.params]))
        for layer in t.layers:
            layer.perturb_post = next(chunks).view_as(layer.weight)
        saved = [p.detach().clone() for p in t.params]
        for p in t.params:
            p.add_(next(chunks).view_as(p))
        try:
            return float(F.cross_entropy(model(x), y))
        finally:
            for layer in t.layers:
                layer.perturb_post = None
            for p, s in zip(t.params, saved):
                p.copy_(s)

    def measure(self, run: Any, x: Tensor, y: Tensor) -> None:
        model = run.raw_model
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
        bn = [b.clone() for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
        captures = [layer.capture_qweight for layer in self._targets(model).layers]
        with torch.enable_grad():
            d, loss0 = self.direction(model, x, y)
            d_sub, _ = self.direction(model, x[:max(1, int(self.sub * len(x)))], y[:max(1, int(self.sub * len(x)))])
        row = {"step": len(self.rows), "loss": float(loss0), "up_fresh": self.loss_at(model, x, y, d) - float(loss0),
               "up_sub": self.loss_at(model, x, y, d_sub) - float(loss0), "cos_sub": _cos(d, d_sub)}
        if self.d_prev is not None:
            row.update(cos_prev=_cos(d, self.d_prev), up_prev=self.loss_at(model, x, y, self.d_prev) - float(loss0))
            v = self._momentum(run)
            if v is not None:
                row["cos_prev_momentum"] = _cos(self.d_prev, v)
        self.d_prev = d
        self.rows.append(row)
        # put everything back: the run continues exactly as without the probe
        with torch.no_grad():
            for b, s in zip([b for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)], bn):
                b.copy_(s)
        model.zero_grad(set_to_none=True)
        for layer, c in zip(self._targets(model).layers, captures):
            layer.zero_qweight_grad()
            layer.capture_qweight = c

    def _momentum(self, run: Any) -> Optional[Tensor]:
        """The base optimizer's momentum buffers in the order of d (quantized layers' latent weights' for Q(w))."""
        t = self.targets
        assert t is not None
        state = run.base.state
        parts = []
        for p in [layer.weight for layer in t.layers] + list(t.params):
            buf = state.get(p, {}).get("momentum_buffer")
            if buf is None:
                return None
            parts.append(buf.flatten())
        return torch.cat(parts).double()


def _cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="prev_grad", choices=["prev_grad", "full", "sub_batch", "none"])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "strategy_probe.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ns = argparse.Namespace(preset="cpu_gap", data_dir=None, val_split=0.1, device="cpu", smoke=False,
                            qat_epochs=args.epochs, eval_every=10, float_dir=None, out=str(HERE / "results"),
                            tag="_cpu_gap")
    method = {"prev_grad": "SAQ prev_grad", "full": "SAQ (case 3)", "sub_batch": "SAQ sub_batch f=0.25",
              "none": "base (LSQ QAT)"}[args.strategy]
    cfg = fashion.qat_config(method, args.bits, args.seed, args.rho, ns)
    if not Path(cfg["pretrained"]).exists():
        raise SystemExit(f"strategy_probe: no float model at {cfg['pretrained']}: run benchmarks/fashion.py "
                         "--preset cpu_gap --stage float first")
    probe = Probe(args.rho)
    original = engine.train_step

    def probed(run: Any, batches: Any) -> Any:
        x, y = batches[0]
        probe.measure(run, x.to(run.device), y.to(run.device))
        return original(run, batches)

    engine.train_step = probed  # type: ignore[assignment]
    try:
        res = train(TrainConfig(**cfg), progress=False)
    finally:
        engine.train_step = original  # type: ignore[assignment]
    summary = summarize(probe.rows, len(probe.rows) // args.epochs)
    rec = {"strategy": args.strategy, "epochs": args.epochs, "seed": args.seed, "rho": args.rho, "bits": args.bits,
           "test_acc": res["test_acc"], "summary": summary}
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec, indent=1))
    return 0


def summarize(rows: list[dict[str, float]], per_epoch: int) -> dict[str, Any]:
    """Medians of each measure over the first, middle and last thirds of the run."""
    out: dict[str, Any] = {"steps_per_epoch": per_epoch}
    n = len(rows)
    for name, part in (("first third", rows[: n // 3]), ("middle third", rows[n // 3: 2 * n // 3]),
                       ("last third", rows[2 * n // 3:])):
        out[name] = {k: statistics.median([r[k] for r in part if k in r])
                     for k in ("cos_prev", "cos_sub", "cos_prev_momentum", "up_fresh", "up_prev", "up_sub", "loss")
                     if any(k in r for r in part)}
    return out


if __name__ == "__main__":
    sys.exit(main())
