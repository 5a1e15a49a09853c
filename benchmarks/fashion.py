"""Fashion-MNIST benchmark in the paper's regime: does SAQ beat plain QAT on real images, and why (not)?

Protocol (per seed): train a float model, then fine-tune it with quantization-aware training at w2a2, w3a3 and
w4a4 (first/last layer 8-bit) with every method below, from that same float model. rho is chosen per method
and bit-width by a sweep scored on a validation split carved from the training set (never the test set); the
final runs use paired seeds (same float model, same data order) so gains are paired differences with a 95%
t-interval. Every run is cached in ``<out>/fashion_runs<tag>.jsonl``: an interrupted benchmark resumes.

    python benchmarks/fashion.py                       # CPU preset: small CNN, training subset (see --help)
    python benchmarks/fashion.py --preset gpu --device cuda --workers 12   # ResNet-20 (1 channel), full set
    python benchmarks/fashion.py --diagnose            # + the ablations that explain the result (w2a2)

Needs the data: ``apt-get install dataset-fashion-mnist`` or ``--data-dir`` with the four IDX files.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import Runner, t_interval  # noqa: E402  (the cached process pool and the paired interval)

PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores: a 5-layer CNN (width 16: ~15 s per QAT epoch on one core) on a fixed 10k-image subset, rho
    # swept at w2a2 only (the full 60k x 3 bit-widths x 10 methods x full sweeps is ~10x the ~4 h budget)
    "cpu": dict(model="cnn_fmnist", model_kwargs={"width": 16}, train_subset=10000, float_epochs=15, qat_epochs=10,
                batch_size=128, lr=0.05, qat_lr=0.01, weight_decay=5e-4, sweep_bits=[2]),
    # the regime SAM is made for: the same CNN over-fitting a small training set (2,000 images, no augmentation:
    # ~98% train vs ~85% test accuracy in float) -- is the missing gain above the model under-fitting its data?
    "cpu_gap": dict(model="cnn_fmnist", model_kwargs={"width": 16}, train_subset=2000, augment=False,
                    float_epochs=30, qat_epochs=15, batch_size=128, lr=0.05, qat_lr=0.01, weight_decay=5e-4,
                    sweep_bits=[2], rhos=[0.05, 0.1, 0.2]),
    # is the over-fitting result robust? Another CNN shape (5 convolutions, strided instead of max-pooled, width 24)
    # on another fixed 2,000-image subset (issue 26, item 0)
    "cpu_gap2": dict(model="cnn_fmnist_strided", model_kwargs={"width": 24}, train_subset=2000, subset_seed=1,
                     augment=False, float_epochs=30, qat_epochs=15, batch_size=128, lr=0.05, qat_lr=0.01,
                     weight_decay=5e-4, sweep_bits=[2], rhos=[0.05, 0.1, 0.2]),
    # one GPU: the paper's CIFAR network (ResNet-20) with one input channel, on the full training set
    "gpu": dict(model="resnet20", model_kwargs={"in_chans": 1}, train_subset=0, float_epochs=15, qat_epochs=10,
                batch_size=256, lr=0.2, qat_lr=0.02, weight_decay=5e-4, sweep_bits=[2, 3, 4]),
    # the paper's Transformer regime (docs/vit.md): a small ViT (vit_fmnist) trained and fine-tuned with AdamW,
    # linear LR warm-up then cosine. "options" go to every run, "float_options"/"qat_options" to the float
    # training / the QAT fine-tunes (the methods' own settings win). 2 CPU cores, over-fitting regime:
    "vit_gap": dict(model="vit_fmnist", model_kwargs={}, train_subset=2000, augment=False, float_epochs=40,
                    qat_epochs=15, batch_size=128, lr=1e-3, qat_lr=2e-4, weight_decay=0.05, sweep_bits=[4, 2],
                    rhos=[0.01, 0.02, 0.05, 0.1, 0.2], options=dict(optimizer="adamw", eval_every=20),
                    float_options=dict(warmup_epochs=5), qat_options=dict(warmup_epochs=1)),
    # ... with more data (10k images, augmented)
    "vit_cpu": dict(model="vit_fmnist", model_kwargs={}, train_subset=10000, float_epochs=30, qat_epochs=10,
                    batch_size=128, lr=1e-3, qat_lr=2e-4, weight_decay=0.05, sweep_bits=[4, 2],
                    rhos=[0.01, 0.02, 0.05, 0.1, 0.2], options=dict(optimizer="adamw", eval_every=10),
                    float_options=dict(warmup_epochs=3), qat_options=dict(warmup_epochs=1)),
    # one GPU (not run yet): DeiT-Tiny's width and depth (192 x 12, 3 heads) with 4x4 patches (49 tokens), the
    # full training set, augmented; several runs at once (--workers 8 --device cuda)
    "vit_gpu": dict(model="vit_fmnist", model_kwargs={"patch_size": 4, "embed_dim": 192, "depth": 12,
                                                      "num_heads": 3, "mlp_ratio": 4.0, "drop_path_rate": 0.1},
                    train_subset=0, float_epochs=100, qat_epochs=30, batch_size=256, lr=1e-3, qat_lr=1e-4,
                    weight_decay=0.05, sweep_bits=[4, 2], rhos=[0.01, 0.02, 0.05, 0.1, 0.2],
                    options=dict(optimizer="adamw", label_smoothing=0.1, eval_every=5),
                    float_options=dict(warmup_epochs=10), qat_options=dict(warmup_epochs=2)),
}

# method -> (TrainConfig overrides, seed tier); tier "paired" gets --seeds seeds, "other" gets --other-seeds
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "base (LSQ QAT)": (dict(sharpness="none"), "paired"),
    "SAM": (dict(sharpness="sam", strategy="full"), "other"),
    "case 1": (dict(sharpness="case1", strategy="full"), "other"),
    "case 2": (dict(sharpness="case2", strategy="full"), "other"),
    "SAQ (case 3)": (dict(sharpness="case3", strategy="full"), "paired"),
    "SAQ prev_grad": (dict(sharpness="case3", strategy="prev_grad"), "paired"),
    # ASAM (Kwon et al. 2021): the perturbation scaled by each weight's size (its radius is on another scale: give it
    # its own grid with --method-rhos)
    "SAQ ASAM": (dict(sharpness="case3", strategy="full", adaptive=True), "paired"),
    # MSAM: one pass at the point perturbed against the momentum (closure-free, no captured gradient)
    "SAQ momentum": (dict(sharpness="case3", strategy="momentum"), "paired"),
    "SAQ every_k a=0.7": (dict(sharpness="case3", strategy="every_k", strategy_k=5, strategy_alpha=0.7), "other"),
    "SAQ every_k a=auto": (dict(sharpness="case3", strategy="every_k", strategy_k=5, strategy_alpha=None), "other"),
    # the efficient strategies against the full step (issue 26): cost 1 + fraction, 1 + 1/k
    "SAQ sub_batch f=0.25": (dict(sharpness="case3", strategy="sub_batch", strategy_fraction=0.25), "paired"),
    "SAQ periodic k=4": (dict(sharpness="case3", strategy="every_k", strategy_k=4, strategy_alpha=0.0), "paired"),
    "SAQ every_k k=2": (dict(sharpness="case3", strategy="every_k", strategy_k=2, strategy_alpha=None), "paired"),
    "SAQ every_k k=5": (dict(sharpness="case3", strategy="every_k", strategy_k=5, strategy_alpha=None), "paired"),
    # plain QAT steps for the first 3/4 of the fine-tune, full SAQ steps in the last 1/4: cost 1 + 1/4
    "SAQ late 1/4": (dict(sharpness="case3", strategy="full", _rho_start_frac=0.75), "paired"),
    "base (LIQ_wn)": (dict(sharpness="none", quantizer="liq"), "paired"),
    "SAQ (LIQ_wn)": (dict(sharpness="case3", strategy="full", quantizer="liq"), "paired"),
    # diagnosis: SAQ perturbing only the quantized weights (not norm affine / biases / float layers)
    "SAQ, quantized weights only": (dict(sharpness="case3", strategy="full", perturb_unquantized=False), "other"),
    # the float control (run with --bits 32): the same fine-tune without quantization, SGD vs SAM. If SAM does not
    # help the float model either, the missing SAQ gain is about this regime, not about quantization.
    "float fine-tune (SGD)": (dict(sharpness="none", first_last_bits=32), "paired"),
    "float fine-tune (SAM)": (dict(sharpness="sam", strategy="full", first_last_bits=32), "paired"),
}
BASE = "base (LSQ QAT)"
# a method's own baseline when it is not BASE
PAIRS = {"SAQ (LIQ_wn)": "base (LIQ_wn)", "float fine-tune (SAM)": "float fine-tune (SGD)"}

# the diagnosis: what could make SAQ fail to help here (w2a2 only, base vs SAQ under each change)
DIAGNOSES: dict[str, dict[str, Any]] = {
    "2x QAT epochs": dict(_epochs_factor=2),
    "4x QAT epochs": dict(_epochs_factor=4),
    "8x QAT epochs": dict(_epochs_factor=8),
    "no perturbation of norm/bias": dict(perturb_unquantized=False),
    "LSQ act. step grad over the batch": dict(act_grad_scale="batch"),
    "rho warm-up (2 epochs)": dict(rho_warmup_epochs=2),
    # BatchNorm normalising with the float model's running statistics, frozen (base and SAQ alike). At the preset's
    # lr 0.01 this diverges even for the float model in plain PyTorch (the BN-trained weights have small norms):
    # the frozen runs use lr 0.001
    "frozen BatchNorm statistics": dict(freeze_bn=True),
    "frozen BatchNorm statistics, lr 0.001": dict(freeze_bn=True, lr=0.001),
    "lr 0.001": dict(lr=0.001),
    "frozen BatchNorm statistics, lr 0.001, rho 0.01": dict(freeze_bn=True, lr=0.001, _rho=0.01),
    # the same training; then BatchNorm's running statistics recomputed with the final, unperturbed weights (one
    # pass over the training set in training mode, cumulative average) before the test: prev_grad's statistics
    # were gathered at perturbed weights (its only pass is the perturbed one), the two-pass step's at unperturbed
    # ones. The run reports the test accuracy after recomputing (test_acc) and as trained (test_acc_as_trained).
    "BatchNorm statistics recomputed at the end": dict(_bn_recompute=True),
}
# ViT-only diagnoses (docs/vit.md: which tensors SAQ perturbs; rho against AdamW's per-parameter scaling): not in
# the default --diagnoses (their parameter names exist in timm ViTs only)
VIT_DIAGNOSES: dict[str, dict[str, Any]] = {
    "no perturbation of pos_embed/cls_token": dict(perturb_exclude=["pos_embed", "cls_token"]),
    "no perturbation of LayerNorm": dict(perturb_exclude=["*norm*"]),
    "ASAM (adaptive), rho 0.5": dict(adaptive=True, _rho=0.5),
}
DIAGNOSES.update(VIT_DIAGNOSES)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration in a worker process (one thread) and return its metrics and curve."""
    import torch

    torch.set_num_threads(1)
    from torchsaq.train.config import TrainConfig
    from torchsaq.train.runner import train

    from torchsaq.train.checkpoint import load_checkpoint

    pretrained = job["config"].get("pretrained")
    origin = None
    if pretrained:  # read once: finished (never fine-tune a float run that was cut off), and which float model
        state = load_checkpoint(Path(pretrained)) if Path(pretrained).exists() else None
        if state is None or not _has_all_epochs(state):
            raise RuntimeError(f"{pretrained} is not a finished float run (fewer epochs than its config's)")
        origin = weights_sha256(state["model"])  # the report checks that a seed's runs share one
    t0 = time.perf_counter()
    config = dict(job["config"])
    recompute = config.pop("bn_recompute", False)
    with tempfile.TemporaryDirectory() if recompute else contextlib.nullcontext() as tmp:
        if recompute:  # the trained model is needed after the run: save it (to a folder removed afterwards)
            config.update(save=True, output=tmp)
        res = train(TrainConfig(**config), progress=False)
        if recompute:
            res["test_acc_as_trained"] = res["test_acc"]
            res["test_acc"] = bn_recomputed_test_acc(Path(tmp), res["test_acc"])
    res["float_sha256"] = origin
    keep = ("test_acc", "test_loss", "val_acc", "val_loss", "train_loss", "train_acc", "size_bits", "device",
            "test_acc_as_trained", "float_sha256")
    curve = [{k: r.get(k) for k in ("epoch", "train_loss", "train_acc", "val_acc", "test_acc")}
             for r in res.get("history", [])]
    return {"job": job, "result": {k: res.get(k) for k in keep}, "curve": curve,
            "time_s": time.perf_counter() - t0}


def float_sha256(checkpoint: Path) -> str:
    """:func:`weights_sha256` of a float checkpoint's model weights."""
    from torchsaq.train.checkpoint import load_checkpoint

    return weights_sha256(load_checkpoint(checkpoint)["model"])


def weights_sha256(model_state: dict[str, Any]) -> str:
    """The first 16 hex digits of the sha256 of a state dict (names, dtypes, shapes, bytes): the same float model on
    every machine that trained it bit-identically, another one where a CPU's arithmetic differs (a float model
    trained again on an AVX512 machine is not the AVX2 machine's)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model_state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def bn_recomputed_test_acc(run: Path, as_trained: float) -> float:
    """Test accuracy (%) of the run saved in ``run`` after recomputing every BatchNorm's running statistics with its
    final weights: one pass over the training set in training mode, no gradient, the cumulative average
    (``momentum=None``) of the batches' statistics. Checks first that the reloaded model reproduces the run's own
    test accuracy ``as_trained`` (the comparison is then the statistics alone)."""
    import torch

    from torchsaq.train.checkpoint import load_model
    from torchsaq.train.engine import evaluate
    from torchsaq.train.runner import build_data

    model, cfg, _ = load_model(run / "checkpoint.pt")
    data, _ = build_data(cfg, torch.device("cpu"))

    def test_acc() -> float:  # as the run evaluated it (its batch limit too)
        return evaluate(model, data.test_loader, limit=cfg.limit_eval_batches)["acc"]

    if abs(test_acc() - as_trained) > 1e-9:
        raise RuntimeError(f"the reloaded model of {run} does not reproduce its test accuracy {as_trained}")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        data.sampler.set_epoch(0)
        for x, _ in itertools.islice(data.train_loader, cfg.limit_train_batches or None):
            model(x)
    return test_acc()


def checkpoint_complete(path: Path) -> bool:
    """The checkpoint exists and holds every epoch its run was configured for (a run cut off leaves an earlier
    epoch's checkpoint behind, which must not pass for the finished float model)."""
    from torchsaq.train.checkpoint import load_checkpoint

    if not path.exists():
        return False
    return _has_all_epochs(load_checkpoint(path))


def _has_all_epochs(state: dict[str, Any]) -> bool:
    return int(state.get("epoch", 0)) >= int(state["config"]["epochs"])


def float_done(config: dict[str, Any]) -> bool:
    """The float run of ``config`` finished: its checkpoint has all its epochs."""
    return checkpoint_complete(Path(config["output"], "checkpoint.pt"))


def _ensure_floats(runner: Runner, args: argparse.Namespace, seeds: list[int]) -> None:
    """Train (or finish) the float models of ``seeds`` that are not on disk complete. A float run cut off (its
    checkpoint has fewer epochs) continues from its last epoch; one whose checkpoint is gone (a fresh clone: the
    checkpoints are not committed) is trained again from its seed."""
    if args.report_only or not seeds:
        return
    floats = [float_config(s, args) for s in seeds]
    unfinished = [c for c in floats if Path(c["output"], "checkpoint.pt").exists() and not float_done(c)]
    runner.run([dict(c, resume=True) for c in unfinished], "float models (resumed)")
    for c in floats:
        if not float_done(c):
            runner.done.pop(runner.key(c), None)
    runner.run(floats, "float models")
    for c in floats:
        slim_float(Path(c["output"], "checkpoint.pt"))


#: what a finished float checkpoint keeps: the QAT runs read its weights (``--pretrained``) and
#: :func:`checkpoint_complete` its epochs; the optimizer, scheduler and RNG states only serve a resume
_FLOAT_KEEP = ("format", "version", "config", "data", "model", "epoch", "step_in_epoch", "global_step", "metrics",
               "history", "time_s")


def slim_float(path: Path) -> None:
    """Drop a finished float checkpoint's resume-only state (about half its size), so the float models can be
    committed beside the run cache (``.gitignore`` keeps ``fashion_float*/seed*/checkpoint.pt``): a later session
    or a clone pairs its new QAT runs with the very float models of the cached ones, instead of retraining them."""
    import torch

    from torchsaq._io import atomic_write
    from torchsaq.train.checkpoint import load_checkpoint

    if not path.exists():
        return
    state = load_checkpoint(path)  # read once (checkpoint_complete would read it again)
    if not _has_all_epochs(state) or set(state) <= set(_FLOAT_KEEP):
        return
    slim = {k: state[k] for k in _FLOAT_KEEP if k in state}
    atomic_write(path, lambda tmp: torch.save(slim, tmp))


_FLOAT_PATH = re.compile(r"^.*/(seed\d+)(/checkpoint\.pt)?$")


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration as the cache knows it: a float model's folder or checkpoint (``output`` of a float run,
    ``pretrained`` of a QAT run) by its seed, not its absolute path, so a cache resumes in any clone. (The float
    protocol itself is the preset's: one cache file per preset.) A float run resumed after an interruption is the
    run itself (a resumed run continues bit for bit), so ``resume`` is no part of it."""
    out = {k: v for k, v in config.items() if k != "resume"}
    for k in ("output", "pretrained"):
        m = _FLOAT_PATH.match(str(out.get(k) or ""))
        if m and (k == "pretrained" or out.get("w_bits") == 32 and out.get("save")):
            out[k] = "<float>/" + m.group(1) + (m.group(2) or "")
    return out


def _float_dir(seed: int, args: argparse.Namespace) -> Path:
    return (Path(args.float_dir or Path(args.out) / f"fashion_float{args.tag}") / f"seed{seed}").resolve()


def _common(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    p = PRESETS[args.preset]
    cfg = dict(dataset="fashion_mnist", data_dir=args.data_dir, model=p["model"], model_kwargs=dict(p["model_kwargs"]),
               seed=seed, val_split=args.val_split, train_subset=p["train_subset"], batch_size=p["batch_size"],
               weight_decay=p["weight_decay"], device=args.device)
    if not p.get("augment", True):
        cfg["augment"] = False
    if p.get("subset_seed"):
        cfg["train_subset_seed"] = p["subset_seed"]
    cfg.update(p.get("options", {}))  # e.g. the ViT presets' optimizer
    if args.smoke:  # a few batches per epoch: checks the whole pipeline in seconds
        cfg.update(limit_train_batches=2, limit_eval_batches=2)
    return cfg


def float_config(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    p = PRESETS[args.preset]
    return dict(_common(args, seed), sharpness="none", w_bits=32, a_bits=32, first_last_bits=32,
                epochs=args.float_epochs or p["float_epochs"], lr=p["lr"], save=True,
                output=str(_float_dir(seed, args)), **p.get("float_options", {}))


def qat_config(method: str, bits: int, seed: int, rho: Optional[float], args: argparse.Namespace,
               extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    p = PRESETS[args.preset]
    over = dict(METHODS[method][0])
    over.update(extra or {})
    epochs = (args.qat_epochs or p["qat_epochs"]) * over.pop("_epochs_factor", 1)
    rho = over.pop("_rho", rho)  # a diagnosis that sets rho itself
    start = over.pop("_rho_start_frac", None)  # SAQ's steps begin after this share of the epochs
    if over.pop("_bn_recompute", False):
        over["bn_recompute"] = True  # (read by _run, not a TrainConfig field)
    if start is not None:
        over["rho_start_epochs"] = start * epochs
    cfg = dict(_common(args, seed), w_bits=bits, a_bits=bits, first_last_bits=8, epochs=epochs, lr=p["qat_lr"],
               pretrained=str(_float_dir(seed, args) / "checkpoint.pt"), save=False)
    cfg.update(p.get("qat_options", {}))
    cfg.update(over)
    if args.eval_every > 1:  # changes no number (a test says so), only which epochs have a test point
        cfg["eval_every"] = args.eval_every
    if rho is not None and cfg["sharpness"] != "none":
        cfg["rho"] = rho
    if cfg["sharpness"] == "none":  # what only a sharpness-aware step reads (TrainConfig's fields of the SAQ step):
        from torchsaq.train.config import SharpnessConfig  # plain QAT is the same run without them, so a perturbation

        for k in set(SharpnessConfig.FIELDS) - {"sharpness"}:  # diagnosis's baseline is the main baseline's run
            cfg.pop(k, None)
    return cfg


def _mean_sd(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    return f"{statistics.fmean(vals):.2f} +- {statistics.stdev(vals) if len(vals) > 1 else 0.0:.2f}"


def _gain(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    common = sorted(set(a) & set(b))
    m, hw = t_interval([a[s] - b[s] for s in common])
    return m, hw, len(common)


def _method_rhos(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, list[float]]:
    """``--method-rhos 'METHOD=R1,R2'`` -> {method: [rhos]}; a one-line parser error for anything else."""
    grids: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.rpartition("=")
        if not sep or name not in METHODS:
            ap.error(f"--method-rhos {item!r}: expected METHOD=R1,R2,... with METHOD one of --methods' choices")
        try:
            grids[name] = [float(v) for v in values.split(",")]
        except ValueError:
            ap.error(f"--method-rhos {item!r}: the rhos must be numbers separated by commas")
        if not grids[name] or not all(math.isfinite(r) and r > 0 for r in grids[name]):
            ap.error(f"--method-rhos {item!r}: every rho must be a finite number > 0")
    return grids


def _all_rhos(args: argparse.Namespace) -> list[float]:
    """The columns of the sweep table: --rhos, then the methods' own grids."""
    return sorted(set(args.rhos).union(*[set(g) for g in args.method_rhos.values()]))


def _grids_note(args: argparse.Namespace) -> str:
    """Where each method's rho came from: its grid swept on the validation split (one seed), or fixed."""
    def one(grid: list[float]) -> str:
        return f"fixed at {grid[0]} (no sweep)" if len(grid) == 1 else f"from {grid} on the validation split (one seed)"
    return f"rho {one(args.rhos)}" + "".join(f"; {m}: {one(g)}" for m, g in args.method_rhos.items())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, default=5, help="paired seeds of base, SAQ and the LIQ_wn pair")
    ap.add_argument("--other-seeds", type=int, default=3, help="seeds of the other methods")
    ap.add_argument("--rhos", nargs="+", type=float, default=None, help="default: the preset's, else 0.02 0.05 0.1")
    ap.add_argument("--method-rhos", nargs="+", default=[], metavar="METHOD=R1,R2,...",
                    help="a method's own rho grid instead of --rhos, e.g. 'SAQ momentum=0.1,0.3,1,3' (MSAM's radius "
                         "is on another scale than SAM's)")
    ap.add_argument("--sweep-bits", nargs="+", type=int, default=None,
                    help="bit-widths swept (default: the preset's); others take the rho of the nearest swept one")
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--float-epochs", type=int, default=0)
    ap.add_argument("--qat-epochs", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1,
                    help="QAT runs evaluate every N epochs (and the last); cached runs answer for any N")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--diagnose", action="store_true", help="run the w2a2 ablations (base vs SAQ under each change)")
    ap.add_argument("--diagnoses", nargs="+", default=[d for d in DIAGNOSES if d not in VIT_DIAGNOSES],
                    choices=list(DIAGNOSES), help="which ablations --diagnose runs (default: all but the ViT ones)")
    ap.add_argument("--diagnose-methods", nargs="+", default=[BASE, "SAQ (case 3)"], choices=list(METHODS),
                    help="the methods each ablation runs (the first is the ablation's baseline in the report)")
    ap.add_argument("--diagnose-bits", type=int, default=2, help="the bit-width the ablations run at")
    ap.add_argument("--stage", choices=["float", "sweep", "final", "all"], default="all",
                    help="stop after this stage (the cache keeps what is done)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--float-dir", default=None, help="where the float checkpoints go (default: under --out)")
    ap.add_argument("--smoke", action="store_true", help="2 batches per epoch: check the pipeline, not results")
    ap.add_argument("--report", default=None, help="report file name under --out (default fashion<_preset>)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: tables from the cached runs")
    args = ap.parse_args(argv)
    args.rhos = args.rhos or PRESETS[args.preset].get("rhos", [0.02, 0.05, 0.1])
    args.method_rhos = _method_rhos(ap, args.method_rhos)
    args.tag = ("" if args.preset == "cpu" else f"_{args.preset}") + ("_smoke" if args.smoke else "")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    runner = Runner(out / f"fashion_runs{args.tag}.jsonl", args.workers, job=_run, normalize=_portable)
    if args.report_only:  # tables from the cached runs only (e.g. a GPU run cut off by its time limit)
        runner.run = lambda configs, label: [runner.done.get(runner.key(c)) for c in configs]  # type: ignore
    t_start = time.perf_counter()
    n_paired, n_other = args.seeds, min(args.other_seeds, args.seeds)
    seeds = {"paired": list(range(n_paired)), "other": list(range(n_other))}
    sweep_seed = 1000

    # 0. float models (the final seeds and the sweep seed), trained when a QAT run still needs one: a float
    # checkpoint is not committed, so a clone whose cache holds every QAT run of a seed trains nothing again
    grids = {m: args.method_rhos.get(m, args.rhos) for m in args.methods}
    all_float_seeds = ([sweep_seed] if any(len(g) > 1 for g in grids.values()) else []) + seeds["paired"]
    if args.stage == "float":
        _ensure_floats(runner, args, all_float_seeds)
        return 0

    # 1. rho sweep on the validation split, one seed (disjoint from the final seeds)
    sweep_bits = [b for b in (args.sweep_bits or PRESETS[args.preset]["sweep_bits"]) if b in args.bits] or args.bits
    swept = [m for m in args.methods if METHODS[m][0]["sharpness"] != "none"]
    sweep_cfgs, sweep_index = [], []
    for b in sweep_bits:
        for m in swept:
            for rho in grids[m] if len(grids[m]) > 1 else []:  # a fixed rho: nothing to sweep
                sweep_cfgs.append(qat_config(m, b, sweep_seed, rho, args))
                sweep_index.append((b, m, rho))
    if any(runner.key(c) not in runner.done for c in sweep_cfgs):
        _ensure_floats(runner, args, [sweep_seed])
    sweep = runner.run(sweep_cfgs, "rho sweep (validation split)")
    val: dict[tuple[int, str], dict[float, float]] = {}
    for (b, m, rho), rec in zip(sweep_index, sweep):
        if rec is not None:
            val.setdefault((b, m), {})[rho] = rec["result"]["val_acc"]
    chosen = {k: max(v, key=lambda r: (v[r], -r)) for k, v in val.items()}
    chosen.update({(b, m): grids[m][0] for b in sweep_bits for m in swept if len(grids[m]) == 1})
    for b in args.bits:  # bit-widths not swept take the rho of the nearest swept one
        for m in swept:
            if (b, m) not in chosen:
                nb = min(sweep_bits, key=lambda x: abs(x - b))
                if (nb, m) not in chosen:
                    raise SystemExit(f"fashion.py: no rho sweep of {m} at w{nb}a{nb} in {runner.cache} "
                                     "(--report-only reports cached runs only: run without it first)")
                chosen[(b, m)] = chosen[(nb, m)]
    if args.stage == "sweep":
        return 0

    # 2. final runs on the test set
    final_cfgs, index = [], []
    for s in seeds["paired"]:  # seed-major: runs cut off by a time limit leave whole seeds behind
        for b in args.bits:
            for m in args.methods:
                if s in seeds[METHODS[m][1]]:
                    final_cfgs.append(qat_config(m, b, s, chosen.get((b, m)), args))
                    index.append((b, m, s))
    if args.diagnose:
        db = args.diagnose_bits
        for name, extra in ((n, DIAGNOSES[n]) for n in args.diagnoses):
            for m in args.diagnose_methods:
                for s in seeds["paired"]:
                    cfg = qat_config(m, db, s, chosen.get((db, m)), args, extra)
                    if db in args.bits and m in args.methods and cfg == qat_config(m, db, s, chosen.get((db, m)), args):
                        continue  # the method's own run (e.g. plain QAT under a perturbation change): its row
                    final_cfgs.append(cfg)
                    index.append((db, f"{m} | {name}", s))
    _ensure_floats(runner, args, sorted({s for (_, _, s), c in zip(index, final_cfgs)
                                         if runner.key(c) not in runner.done}))
    final = runner.run(final_cfgs, "final runs (test set)")
    acc: dict[tuple[int, str], dict[int, float]] = {}
    secs: dict[tuple[int, str], list[float]] = {}
    train_acc: dict[tuple[int, str], list[float]] = {}
    curves: dict[tuple[int, str], list[dict[str, Any]]] = {}
    origins: dict[int, set[str]] = {}
    for (b, m, s), rec in zip(index, final):
        if rec is None:
            continue
        acc.setdefault((b, m), {})[s] = rec["result"]["test_acc"]
        origins.setdefault(s, set()).add(rec["result"].get("float_sha256") or "not recorded")
        secs.setdefault((b, m), []).append(rec["time_s"])
        if rec["result"].get("train_acc") is not None:
            train_acc.setdefault((b, m), []).append(rec["result"]["train_acc"])
        if s == 0:
            curves[(b, m)] = rec.get("curve", [])
    floats = [float_config(s, args) for s in all_float_seeds]
    frec = [runner.done.get(runner.key(c)) for c in floats]
    fp = {c["seed"]: r["result"]["test_acc"] for c, r in zip(floats, frec) if r is not None and c["seed"] != sweep_seed}
    frec = [r for r in frec if r is not None]
    args.mixed_floats = {s: sorted(o) for s, o in origins.items() if len(o - {"not recorded"}) > 1}
    report(args, argv, acc, secs, curves, chosen, val, fp, frec, t_start, train_acc)
    return 0


def report(args: argparse.Namespace, argv: Optional[list[str]], acc: dict, secs: dict, curves: dict, chosen: dict,
           val: dict, fp: dict[int, float], frec: list[dict[str, Any]], t_start: float,
           train_acc: Optional[dict] = None) -> None:
    """Markdown table (mean +- sd, paired gain with 95% interval, share of the quantization gap closed), JSON, plot."""
    p = PRESETS[args.preset]
    fp_vals = [fp[s] for s in sorted(fp)]
    lines = [f"Fashion-MNIST, {p['model']} {p['model_kwargs'] or ''}, training subset "
             f"{p['train_subset'] or 'all'} images of the {100 - 100 * args.val_split:.0f}% left after a "
             f"{args.val_split:.0%} validation split; float model "
             f"{args.float_epochs or p['float_epochs']} epochs, then QAT fine-tuning "
             f"{args.qat_epochs or p['qat_epochs']} "
             f"epochs from it at lr {p['qat_lr']} ({p.get('options', {}).get('optimizer', 'sgd')}, cosine), "
             f"first/last layer 8-bit. Device: {args.device}. "
             f"Test accuracy (%) mean +- sd over seeds; gain = paired difference (same seed = same float model and "
             f"data order) to the method's baseline, mean [95% t-interval]; gap closed = gain / (float - baseline). "
             f"{_grids_note(args)}. "
             "train acc: the last epoch's accuracy on "
             f"the training batches as trained (training mode{', augmented' if p.get('augment', True) else ''}).",
             "", f"Full precision: {_mean_sd(fp_vals)} ({len(fp_vals)} seeds); train acc "
             f"{_mean_sd([r['result']['train_acc'] for r in frec if r['result'].get('train_acc') is not None])}",
             "", "| bits | method | rho | seeds | test acc | train acc | gain vs baseline | gap closed | s/run |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    mixed = getattr(args, "mixed_floats", {})
    if mixed:  # the pairing is broken there: say so above the table, never silently
        lines[1:1] = ["", "**Warning: unpaired seeds.** Their runs started from different float models (sha256 of "
                      "the weights), e.g. a float model trained again on another CPU: " + "; ".join(
                          f"seed {s}: {', '.join(o)}" for s, o in sorted(mixed.items())) + "."]
    train_acc = train_acc or {}
    rows = []
    fp_mean = statistics.fmean(fp_vals) if fp_vals else float("nan")
    for (b, m), a in sorted(acc.items(), key=lambda kv: (kv[0][0], list(acc).index(kv[0]))):
        basename = m.split(" | ")[0]
        ref = PAIRS.get(basename, BASE)
        if " | " in m and (b, f"{BASE} | {m.split(' | ')[1]}") in acc:  # else the diagnosis left plain QAT as it was
            ref = f"{BASE} | {m.split(' | ')[1]}"
        vals = [a[s] for s in sorted(a)]
        gain_txt = gap_txt = "-"
        gain = None
        if (b, ref) in acc and ref != m:
            g, hw, n = _gain(a, acc[(b, ref)])
            gain = (g, hw, n)
            gain_txt = f"{g:+.2f} [{g - hw:+.2f}, {g + hw:+.2f}]"
            gap = fp_mean - statistics.fmean(acc[(b, ref)].values())
            gap_txt = f"{100 * g / gap:+.0f}%" if gap > 0.05 and b < 32 else "-"  # False for NaN too; no gap in float
        rho = chosen.get((b, basename))
        if " | " in m and rho is not None:  # a diagnosis may set its own rho
            rho = DIAGNOSES.get(m.split(" | ")[1], {}).get("_rho", rho)
        cell = m.replace("|", "\\|")  # a diagnosis row's name holds " | "
        lines.append(f"| w{b}a{b} | {cell} | {rho if rho is not None else '-'} | {len(vals)} | {_mean_sd(vals)} | "
                     f"{_mean_sd(train_acc.get((b, m), []))} | {gain_txt} | {gap_txt} | "
                     f"{statistics.fmean(secs[(b, m)]):.0f} |")
        rows.append(dict(bits=b, method=m, rho=rho, accs=vals, gain=gain, time_s=statistics.fmean(secs[(b, m)])))
    sweep_lines = ["", "rho sweep (validation accuracy, sweep seed):", "",
                   "| bits | method | " + " | ".join(str(r) for r in _all_rhos(args)) + " |",
                   "|---|---|" + "---:|" * len(_all_rhos(args))]
    for (b, m), v in sorted(val.items()):
        cells = " | ".join(f"{v[r]:.2f}" if r in v else "-" for r in _all_rhos(args))
        sweep_lines.append(f"| w{b}a{b} | {m} | {cells} |")
    if not val:  # every rho fixed: no sweep to show
        sweep_lines = []
    cmd = "python benchmarks/fashion.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    text = f"Command: `{cmd.strip()}`\n\n" + "\n".join(lines + sweep_lines) + "\n"
    name = args.report or f"fashion{args.tag}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(dict(
        rows=rows, float=fp_vals, chosen_rho={f"w{b}/{m}": r for (b, m), r in chosen.items()},
        curves={f"w{b}/{m}": c for (b, m), c in curves.items()},
        float_curves=[r.get("curve", []) for r in frec]), indent=1))
    plot_curves(curves, args, out / f"{name}_curves.png")
    print(text)
    print(f"written {out / f'{name}.md'} (.json, _curves.png) in {time.perf_counter() - t_start:.0f}s")


def plot_curves(curves: dict, args: argparse.Namespace, path: Path) -> None:
    """Per QAT epoch (seed 0) of base and SAQ at each bit-width, test accuracy (solid, at the evaluated epochs)
    and training accuracy (dotted): has plain QAT converged? Diagnosis runs appear beside their bit-width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.bits), figsize=(4 * len(args.bits), 3.2), squeeze=False)
    for ax, b in zip(axes[0], args.bits):
        shown = (BASE, "SAQ (case 3)", "SAQ prev_grad", "base (LIQ_wn)", "SAQ (LIQ_wn)")
        for m in [m for m in shown if (b, m) in curves] + [m for (bb, m) in curves if bb == b and " | " in m]:
            c = curves[(b, m)]
            pts = [(r["epoch"], r["test_acc"]) for r in c if r.get("test_acc") is not None]
            if pts:
                line, = ax.plot(*zip(*pts), marker="." if len(pts) < len(c) else None, label=m)
                ax.plot([r["epoch"] for r in c], [r["train_acc"] for r in c], ":", color=line.get_color())
        ax.set_title(f"w{b}a{b} (seed 0)", fontsize=9)
        ax.set_xlabel("QAT epoch", fontsize=8)
        ax.set_ylabel("accuracy (%): test, train dotted", fontsize=8)
        if ax.get_legend_handles_labels()[0]:  # no curve recorded (e.g. tables rebuilt from another seed's runs)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
