"""Bit-identity check of a refactor: sha256 of what a fixed set of small runs and exports produce.

Each configuration trains 1-2 short epochs on an embedded data set (mnist1d, digits) and records the sha256 of
its final state (model, optimizer, scheduler, RNG state, history and metrics of the checkpoint, times and paths
left out) and of its export files (safetensors; ONNX compact and fast, graph doc strings cleared: they hold
source lines). A change that keeps the behaviour keeps every hash; ``tests/test_golden.py`` checks them
against ``benchmarks/results/golden.json``.

    python benchmarks/golden.py            # print the hashes and compare them with golden.json
    python benchmarks/golden.py --record   # (re)write this environment's hashes (only when a behaviour change is
                                           # intended, or to add an environment at the commit to compare against)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

GOLDEN = Path(__file__).resolve().parent / "results" / "golden.json"

#: tiny runs: 4 steps of 32 samples per epoch, evaluation on 4 batches, one thread (bit-stable)
FAST: dict[str, Any] = dict(batch_size=32, limit_train_batches=4, limit_eval_batches=4, calib_batches=1, threads=1,
                            epochs=2, rho=0.05)

#: name -> TrainConfig fields (every field that may change default on main is given explicitly)
CONFIGS: dict[str, dict[str, Any]] = {
    "lsq_none": dict(quantizer="lsq", sharpness="none", strategy="full"),
    "lsq_case3_full": dict(quantizer="lsq", sharpness="case3", strategy="full"),
    "lsq_case3_prev_grad": dict(quantizer="lsq", sharpness="case3", strategy="prev_grad"),
    "lsq_case3_every_k": dict(quantizer="lsq", sharpness="case3", strategy="every_k", strategy_k=2),
    "lsq_case3_sub_batch": dict(quantizer="lsq", sharpness="case3", strategy="sub_batch", strategy_fraction=0.5),
    "lsq_case1_adaptive": dict(quantizer="lsq", sharpness="case1", strategy="full", adaptive=True),
    "lsq_case2_ws": dict(quantizer="lsq", sharpness="case2", strategy="full", weight_standardize=True),
    "lsq_sam_adamw": dict(quantizer="lsq", sharpness="sam", strategy="full", optimizer="adamw", lr=0.003,
                          rho_warmup_epochs=1.0),
    "liq_none": dict(quantizer="liq", sharpness="none", strategy="full", dataset="digits", epochs=1),
    "liq_case3_full": dict(quantizer="liq", sharpness="case3", strategy="full", dataset="digits"),
    "liq_case3_prev_grad": dict(quantizer="liq", sharpness="case3", strategy="prev_grad", w_bits=2, a_bits=2),
}
#: the runs whose models are exported (safetensors and both ONNX flavours)
EXPORTED = ("lsq_case3_full", "liq_case3_full")
_SKIP = {"time_s", "first_step_s", "output", "checkpoint", "metrics_path", "csv_path", "tb_dir", "plot_path",
         "threads"}


def _feed(h: Any, value: Any) -> None:
    """Hash ``value`` (nested dicts, lists, tensors, numbers, strings) canonically into ``h``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=str):
            if k in _SKIP:
                continue
            h.update(repr(k).encode())
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(value).encode())


def digest(value: Any) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _onnx_digest(path: Path) -> str:
    import onnx

    proto = onnx.load(str(path))
    proto.graph.doc_string = ""
    for node in proto.graph.node:
        node.doc_string = ""
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def _safetensors_digest(path: Path) -> str:
    """The tensors and metadata of a safetensors file (its header's key order is not stable between writes)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return digest({"metadata": f.metadata(), "tensors": {k: f.get_tensor(k) for k in f.keys()}})


def compute(names: Any = None) -> dict[str, str]:
    """Run the configurations (all, or ``names``) and return ``{"<config>/<what>": sha256}``."""
    from torchsaq.train.checkpoint import load_checkpoint, load_model
    from torchsaq.train.config import TrainConfig
    from torchsaq.export import export
    from torchsaq.train.runner import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the export's reductions (LIQ's mean/std) too
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or CONFIGS:
            run = Path(tmp) / name
            cfg = TrainConfig(**{**FAST, **CONFIGS[name], "output": str(run)})
            result = train(cfg, progress=False)
            state = load_checkpoint(result["checkpoint"])
            for part in ("model", "optimizer", "scheduler", "rng", "history", "metrics"):
                out[f"{name}/{part}"] = digest(state[part])
            out[f"{name}/result"] = digest({k: v for k, v in result.items() if k != "history"})
            if name in EXPORTED:
                model, _, info = load_model(result["checkpoint"])
                x = torch.randn(2, *info["input_shape"], generator=torch.Generator().manual_seed(0))
                st = run / "model.safetensors"
                export(model, st)
                out[f"{name}/safetensors"] = _safetensors_digest(st)
                for mode in ("compact", "fast"):
                    path = run / f"model_{mode}.onnx"
                    export(model, path, example_inputs=(x,), onnx_mode=mode)
                    out[f"{name}/onnx_{mode}"] = _onnx_digest(path)
    torch.set_num_threads(threads)
    return out


def environment() -> str:
    """What the hashes depend on beside torchsaq: float results differ between torch builds and CPUs (the kernels
    torch picks for the CPU's vector instructions, AVX2 or AVX512, sum in other orders)."""
    import platform

    return (f"torch {torch.__version__}, {platform.machine()}, {platform.processor() or platform.system()}, "
            f"cpu {torch.backends.cpu.get_cpu_capability()}")


def recorded() -> dict[str, dict[str, str]]:
    """golden.json: environment -> {name: sha256}, one entry per environment it was recorded in."""
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", action="store_true", help=f"write {GOLDEN.name} instead of comparing")
    args = p.parse_args(argv)
    env, table = environment(), recorded()
    if not args.record and env not in table:
        print(f"no hashes recorded for this environment ({env}); recorded: {', '.join(table) or 'none'}. Record "
              "them with --record at the commit to compare against.")
        return 2
    got = compute()
    if args.record:
        table[env] = got
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(got)} hashes for {env} to {GOLDEN}")
        return 0
    want = table[env]
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    for k in bad:
        print(f"DIFFERS {k}: golden {want.get(k)} now {got.get(k)}")
    print(f"{len(got) - len(bad)}/{len(got)} hashes identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
