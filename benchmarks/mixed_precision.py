"""Mixed precision from sharpness on Fashion-MNIST: does putting the bits where the loss is sharp beat uniform bits
at the same model size, fine-tuned with plain QAT and with SAQ?

Protocol (per seed, the over-fitting preset ``cpu_gap`` of benchmarks/fashion.py, its float models and QAT recipe):
the float model of that seed is quantized at uniform wBaB (first/last layer 8-bit) and calibrated; on it

* ``uniform``: every layer at B bits (the budget: that model's size as ``torchsaq summary`` counts it);
* ``sharpness``: :func:`torchsaq.analysis.allocate.allocate` -- mean Hessian trace of each layer's quantized
  weights x its quantization noise, solved exactly under that size (activations stay at B bits);
* ``noise only``: the same solver with sensitivity 1 (is the Hessian doing anything beyond the noise?);
* ``random``: an allocation drawn uniformly (seeded) among those of size within ``--band`` of the budget;
* ``official rule``: the official SAQ generator's selection step (c_engine.derive_arch) -- among candidate
  allocations within the band, the one whose model (quantized from the float model with those bits, calibrated)
  has the smallest one-step SAQ sharpness L(Q(w) + e) - L(Q(w)) on the measurement samples. Its candidates are drawn
  uniformly here, where the official code samples them from an LSTM controller trained by REINFORCE on a
  weight-sharing supernet (not reproduced: see docs/mixed_precision.md).

With 2..8-bit choices a 2-bit budget leaves the middle layers no freedom while the first/last layers stay 8-bit, so at
B=2 every allocation also allocates the first and last layers (``first_last=True``). Each allocation is then
fine-tuned from the float model with plain QAT and with SAQ (case 3, full two-pass steps, ``--rho``); the seeds are
paired (same float model, same data order), gains are paired differences to ``uniform`` with 95% t-intervals.
Allocations are cached in ``<out>/mixed_precision_alloc<tag>.json``, runs in ``<out>/mixed_precision_runs<tag>.jsonl``
(fashion.py's runner): an interrupted benchmark resumes.

    python benchmarks/mixed_precision.py --seeds 10 --bits 3 2              # the evidence (hours on 2 CPU cores)
    python benchmarks/mixed_precision.py --smoke --seeds 1 --bits 3          # the pipeline in a few minutes
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fashion  # noqa: E402  (the preset, its float models and QAT configurations, the cached runner)
from accuracy import Runner, t_interval  # noqa: E402

ALLOCS = ("uniform", "sharpness", "noise only", "random", "official rule")
TRAINING = {"QAT": "base (LSQ QAT)", "SAQ": "SAQ (case 3)"}  # fashion.METHODS entries
CHOICES = (2, 3, 4, 8)


def _args_for_fashion(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace fashion.float_config / qat_config read, for the cpu_gap preset."""
    return argparse.Namespace(preset=args.preset, data_dir=args.data_dir, val_split=args.val_split, smoke=args.smoke,
                              device="cpu", float_epochs=args.float_epochs, qat_epochs=args.qat_epochs,
                              float_dir=args.float_dir, out=args.out, tag=args.tag, eval_every=args.eval_every)


def _measure_batches(cfg: Any, num: int, seed: int) -> list:
    """``num`` images of the run's own training subset (evaluation transform), seeded, in batches of 256."""
    import torch

    from torchsaq.analysis.drivers import _eval_transform_view
    from torchsaq.train.data import build_datasets, subset_train

    bundle = subset_train(build_datasets(cfg.dataset, cfg.data_dir, img_size=cfg.img_size, val_split=cfg.val_split,
                                         seed=cfg.seed, augment=False), cfg.train_subset)
    ds = _eval_transform_view(bundle)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=256)
    return [(x, y) for x, y in loader]


def _quantized(cfg_dict: dict[str, Any], layer_bits: dict[str, Any], batches: list) -> Any:
    """The float model of the run quantized with ``layer_bits``, calibrated on the first batch, in eval mode."""
    import torchsaq as saq
    from torchsaq.train.config import TrainConfig
    from torchsaq.train.runner import build_model

    cfg = TrainConfig(**dict(cfg_dict, layer_bits=layer_bits))
    model = build_model(cfg, 10, 1)
    saq.calibrate(model, [batches[0][0]])
    return model.eval()


def _default_bits(role: Optional[str], bits: int) -> int:
    return 8 if role in ("first", "last") else bits  # fashion.qat_config: first/last layer 8-bit


def _candidates(model: Any, first_last: bool, band: float, rng: random.Random,
                limit: int = 50_000) -> list[dict[str, list[int]]]:
    """Allocations of CHOICES (activations kept) whose size is within ``band`` below the budget (all fit): every one
    where there are at most ``limit`` assignments (the CNN), else up to 200 drawn at random (a ViT's many layers)."""
    from torchsaq import quant_layers
    from torchsaq.analysis.allocate import _layer_cost

    layers = [m for _, m in quant_layers(model) if first_last or m.quant_role not in ("first", "last")]
    names = [m._saq_name for m in layers]
    cost = [{b: _layer_cost("size_bytes", m, b, m.a_bits) for b in CHOICES} for m in layers]
    base = sum(c[m.w_bits] for c, m in zip(cost, layers))

    def fits(bits: tuple[int, ...]) -> bool:
        return (1 - band) * base <= sum(c[b] for c, b in zip(cost, bits)) <= base

    if len(CHOICES) ** len(layers) <= limit:
        found = [bits for bits in itertools.product(CHOICES, repeat=len(layers)) if fits(bits)]
    else:
        found = list({bits for bits in (_draw(cost, base, band, rng) for _ in range(2000)) if bits and fits(bits)})
        found = sorted(found)[:200]
    return [{n: [b, m.a_bits] for n, m, b in zip(names, layers, bits)} for bits in found]


def _draw(cost: list[dict[int, int]], base: int, band: float, rng: random.Random) -> tuple[int, ...]:
    """A random assignment moved into the band: lower random layers while over the budget, then raise random
    layers (staying within it) while under the band; () if it does not get there in a few hundred moves."""
    bits = [rng.choice(CHOICES) for _ in cost]
    for _ in range(20 * len(cost)):
        total = sum(c[b] for c, b in zip(cost, bits))
        if (1 - band) * base <= total <= base:
            return tuple(bits)
        i = rng.randrange(len(bits))
        k = CHOICES.index(bits[i])
        if total > base and k > 0:
            bits[i] = CHOICES[k - 1]
        elif total < (1 - band) * base and k + 1 < len(CHOICES) and total - cost[i][bits[i]] + \
                cost[i][CHOICES[k + 1]] <= base:
            bits[i] = CHOICES[k + 1]
    return ()


def allocations(seed: int, bits: int, args: argparse.Namespace, fargs: argparse.Namespace) -> dict[str, Any]:
    """{allocation name: {"layer_bits", "predicted", ...}} for one seed and bit-width (not cached here)."""
    import torch

    from torchsaq.analysis.allocate import allocate
    from torchsaq.analysis import sam_sharpness
    from torchsaq.train.config import TrainConfig
    from torchsaq.quant.summary import model_size_bits

    torch.set_num_threads(1)
    cfg_dict = fashion.qat_config(fashion.BASE, bits, seed, None, fargs)
    batches = _measure_batches(TrainConfig(**cfg_dict), args.measure_samples, seed)
    model = _quantized(cfg_dict, {}, batches)
    size = model_size_bits(model) / 8
    first_last = bits <= 2
    out: dict[str, Any] = {"uniform": {"layer_bits": {}, "note": f"the budget: {size:.0f} bytes"}}
    sens = None
    for name, measure in (("sharpness", "trace"), ("noise only", "none")):
        a = allocate(model, batches, size_bytes=size, choices=CHOICES, measure=measure, samples=args.hutchinson,
                     seed=seed, first_last=first_last)
        sens = sens or a
        out[name] = {"layer_bits": a.layer_bits, "used_bytes": a.used, "table": str(a)}
    assert sens is not None
    rng = random.Random(seed)
    cands = _candidates(model, first_last, args.band, rng)
    out["random"] = {"layer_bits": rng.choice(cands), "note": f"1 of {len(cands)} in the band"}
    official = cands if not first_last else _candidates(model, False, args.band, rng)  # never first/last
    pool = rng.sample(official, min(args.official_candidates, len(official)))
    crit = torch.nn.CrossEntropyLoss()
    scored = [sam_sharpness(_quantized(cfg_dict, lb, batches), crit, batches, rho=args.rho, steps=1, seed=seed)
              for lb in pool]
    out["official rule"] = {"layer_bits": pool[scored.index(min(scored))], "sharpness": scored,
                            "note": f"min one-step SAQ sharpness of {len(pool)} candidates"}
    for v in out.values():  # every allocation's predicted loss increase, from the same measured sensitivities
        v["predicted"] = sum(r.predicted[_bits_of(v["layer_bits"], r.name, _default_bits(r.role, bits))]
                             for r in sens.rows if r.allocated)
    out["_layers"] = [{"name": r.name, "role": r.role, "params": r.params, "mean_trace": r.sensitivity}
                      for r in sens.rows]
    return out


def _bits_of(layer_bits: dict[str, Any], name: str, default: int) -> int:
    v = layer_bits.get(name, default)
    return int(v[0] if isinstance(v, list) else v)


def _canonical(alloc: dict[str, Any], name: str, bits: int) -> dict[str, Any]:
    """``layer_bits`` of allocation ``name`` without the entries that repeat the uniform model's bits, so that an
    allocation equal to uniform is the uniform run (one cached run, not a second identical one)."""
    roles = {r["name"]: r["role"] for r in alloc["_layers"]}
    out = {}
    for n, v in alloc[name]["layer_bits"].items():
        default = [_default_bits(roles.get(n), bits)] * 2
        if (list(v) if isinstance(v, list) else [v, v]) != default:
            out[n] = v
    return out


def _load_allocs(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_allocs(path: Path, allocs: dict[str, Any]) -> None:
    from torchsaq._io import atomic_write_text

    atomic_write_text(path, json.dumps(allocs, indent=1) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(fashion.PRESETS), default="cpu_gap")
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 2], help="budgets: the size of uniform wBaB")
    ap.add_argument("--seeds", type=int, default=10, help="paired seeds (float model, data order)")
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--allocs", nargs="+", choices=ALLOCS, default=list(ALLOCS))
    ap.add_argument("--training", nargs="+", choices=list(TRAINING), default=list(TRAINING))
    ap.add_argument("--rho", type=float, default=0.1, help="SAQ's rho (cpu_gap's choice at w3a3), also the "
                                                           "official rule's sharpness radius")
    ap.add_argument("--band", type=float, default=0.05, help="random / official candidates: size within this "
                                                             "fraction below the budget")
    ap.add_argument("--official-candidates", type=int, default=8, help="candidates the official rule scores "
                                                                       "(it derives 20 in the official code)")
    ap.add_argument("--measure-samples", type=int, default=512, help="training images the sensitivities use")
    ap.add_argument("--hutchinson", type=int, default=32, help="Hutchinson vectors per Hessian trace")
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--float-epochs", type=int, default=0)
    ap.add_argument("--qat-epochs", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--float-dir", default=None, help="float checkpoints <dir>/seedN/checkpoint.pt (default: "
                                                      "fashion.py's, under --out); missing ones are trained")
    ap.add_argument("--smoke", action="store_true", help="2 batches per epoch: the pipeline, not results")
    ap.add_argument("--report", default=None, help="report name under --out (default mixed_precision<tag>)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: the report from the cached runs")
    args = ap.parse_args(argv)
    args.tag = f"_{args.preset}" + ("_smoke" if args.smoke else "")
    args.out = str(Path(args.out).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    fargs = _args_for_fashion(args)
    runner = Runner(Path(args.out) / f"mixed_precision_runs{args.tag}.jsonl", args.workers, job=fashion._run,
                    normalize=fashion._portable)
    if args.report_only:  # the cached runs only (e.g. a benchmark still running, or cut off)
        runner.run = lambda configs, label: [runner.done.get(runner.key(c)) for c in configs]  # type: ignore
    t0 = time.perf_counter()
    seeds = list(range(args.seed0, args.seed0 + args.seeds))
    floats = [fashion.float_config(s, fargs) for s in seeds]
    # an interrupted float run continues from its last epoch (a new run would be refused in its folder)
    unfinished = [c for c in floats if not fashion.float_done(c)]
    runner.run([dict(c, resume=Path(c["output"], "checkpoint.pt").exists()) for c in unfinished], "float models")
    alloc_path = Path(args.out) / f"mixed_precision_alloc{args.tag}.json"
    allocs = _load_allocs(alloc_path)
    if args.report_only:
        seeds = [s for s in seeds if all(f"{s}/w{b}" in allocs for b in args.bits)] or seeds[:0]
    for s in seeds:
        for b in args.bits:
            if f"{s}/w{b}" not in allocs:
                print(f"[allocations] seed {s} w{b}a{b}", flush=True)
                allocs[f"{s}/w{b}"] = allocations(s, b, args, fargs)
                _save_allocs(alloc_path, allocs)
    index, cfgs = [], []
    for s in seeds:  # seed-major: a run cut off leaves whole seeds behind
        for b in args.bits:
            for al in args.allocs:
                for t in args.training:
                    lb = _canonical(allocs[f"{s}/w{b}"], al, b)
                    cfgs.append(fashion.qat_config(TRAINING[t], b, s, args.rho, fargs, {"layer_bits": lb}))
                    index.append((b, al, t, s))
    recs = runner.run(cfgs, "fine-tuning (test set)")
    acc: dict[tuple[int, str, str], dict[int, float]] = {}
    for key, rec in zip(index, recs):
        if rec is not None:
            acc.setdefault(key[:3], {})[key[3]] = rec["result"]["test_acc"]
    if not seeds:
        raise SystemExit("mixed_precision.py: no seed has its allocations cached yet: nothing to report")
    report(args, argv, acc, allocs, seeds, t0)
    return 0


def _cell(a: dict[int, float], ref: Optional[dict[int, float]]) -> str:
    if ref is None or a is ref:
        return "-"
    common = sorted(set(a) & set(ref))
    if not common:
        return "-"
    m, hw = t_interval([a[s] - ref[s] for s in common])
    return f"{m:+.2f} [{m - hw:+.2f}, {m + hw:+.2f}] (n={len(common)})"


def _mean_sd(vals: list[float]) -> str:
    return "n/a" if not vals else (f"{statistics.fmean(vals):.2f} +- "
                                   f"{statistics.stdev(vals) if len(vals) > 1 else 0.0:.2f}")


def report(args: argparse.Namespace, argv: Optional[list[str]], acc: dict, allocs: dict[str, Any], seeds: list[int],
           t0: float) -> None:
    """Markdown (mean +- sd, paired gains vs uniform and SAQ vs QAT with 95% intervals, the bits chosen) and JSON."""
    p = fashion.PRESETS[args.preset]
    cmd = "python benchmarks/mixed_precision.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{cmd.strip()}`", "",
             f"Fashion-MNIST, preset {args.preset} ({p['model']} {p['model_kwargs']}, {p['train_subset']} training "
             f"images, float {args.float_epochs or p['float_epochs']} epochs, QAT fine-tuning "
             f"{args.qat_epochs or p['qat_epochs']} epochs at lr {p['qat_lr']}); budget = the size of uniform wBaB "
             f"(first/last 8-bit), activations at B bits; choices {CHOICES}; SAQ = case 3, full steps, rho "
             f"{args.rho}. Test accuracy (%) mean +- sd over seeds; gains are paired differences (same seed = same "
             "float model and data order), mean [95% t-interval]."]
    for b in args.bits:
        first = allocs.get(f"{seeds[0]}/w{b}", {})
        names = [r["name"] for r in first.get("_layers", [])]
        lines += ["", f"### budget: size of uniform w{b}a{b}" + (" (first/last layers allocated too)" if b <= 2
                                                                  else ""),
                  "", f"bits per layer ({', '.join(names)}), seed {seeds[0]}; predicted loss increase (mean trace x "
                  "noise) median over seeds", "",
                  "| allocation | bits (seed 0) | predicted | training | seeds | test acc | vs uniform | SAQ vs QAT |",
                  "|---|---|---:|---|---:|---:|---:|---:|"]
        for al in args.allocs:
            preds = [allocs[f"{s}/w{b}"][al]["predicted"] for s in seeds if f"{s}/w{b}" in allocs]
            bits_txt = "/".join(str(_bits_of(first[al]["layer_bits"], r["name"], _default_bits(r["role"], b)))
                                for r in first.get("_layers", [])) if al in first else "-"
            for t in args.training:
                a = acc.get((b, al, t), {})
                lines.append(f"| {al} | {bits_txt} | {statistics.median(preds) if preds else float('nan'):.3g} | {t} "
                             f"| {len(a)} | {_mean_sd([a[s] for s in sorted(a)])} | "
                             f"{_cell(a, acc.get((b, 'uniform', t)))} | "
                             f"{_cell(a, acc.get((b, al, 'QAT'))) if t == 'SAQ' else '-'} |")
        if "sharpness" in first:
            lines += ["", f"`torchsaq.allocate` on seed {seeds[0]} (the sharpness allocation):", "", "```",
                      first["sharpness"]["table"], "```"]
    text = "\n".join(lines) + "\n"
    name = args.report or f"mixed_precision{args.tag}"
    out = Path(args.out)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"acc": {f"w{b}/{al}/{t}": v for (b, al, t), v in acc.items()},
                                                  "allocations": allocs}, indent=1))
    print(text)
    print(f"written {out / (name + '.md')} (.json) in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
