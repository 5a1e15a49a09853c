"""benchmarks/fashion.py's float-model identity: a seed's runs are paired only if they start from one float model."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
FLOAT = BENCH / "results" / "fashion_float_cpu_gap2" / "seed0" / "checkpoint.pt"  # a committed float model


def test_float_sha256_tells_float_models_apart_by_their_weights_alone(tmp_path):
    sys.path.insert(0, str(BENCH))
    import fashion

    copy = tmp_path / "copy.pt"
    shutil.copy(FLOAT, copy)
    assert fashion.float_sha256(copy) == fashion.float_sha256(FLOAT)
    state = torch.load(FLOAT, map_location="cpu", weights_only=True)
    name = next(k for k in sorted(state["model"]) if state["model"][k].is_floating_point())
    w = state["model"][name]
    state["model"][name] = torch.nextafter(w, torch.full_like(w, float("inf")))  # one ulp up: another float model
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    assert fashion.float_sha256(changed) != fashion.float_sha256(FLOAT)
    state["model"][name] = w
    state["epoch"] = int(state["epoch"]) + 7  # what is not a weight does not count
    same = tmp_path / "same.pt"
    torch.save(state, same)
    assert fashion.float_sha256(same) == fashion.float_sha256(FLOAT)


def test_a_perturbation_diagnosis_reuses_the_plain_qat_run(tmp_path):
    """Plain QAT under "no perturbation of LayerNorm" or ASAM is the plain QAT run itself: one cache key, no rerun;
    SAQ's config keeps the setting."""
    sys.path.insert(0, str(BENCH))
    import fashion

    args = argparse.Namespace(preset="vit_gap", qat_epochs=None, eval_every=20, val_split=0.1, device="cpu",
                              data_dir=None, smoke=False, out=str(tmp_path), tag="_vit_gap", float_dir=None)
    for name in ("no perturbation of LayerNorm", "ASAM (adaptive), rho 0.5", "no perturbation of norm/bias"):
        extra = fashion.DIAGNOSES[name]
        assert fashion.qat_config(fashion.BASE, 4, 0, None, args, extra) == fashion.qat_config(fashion.BASE, 4, 0,
                                                                                              None, args)
        saq = fashion.qat_config("SAQ (case 3)", 4, 0, 0.05, args, extra)
        assert saq != fashion.qat_config("SAQ (case 3)", 4, 0, 0.05, args)
    # a diagnosis that changes the training itself still gets its own baseline run
    longer = fashion.qat_config(fashion.BASE, 4, 0, None, args, fashion.DIAGNOSES["4x QAT epochs"])
    assert longer["epochs"] == 4 * fashion.qat_config(fashion.BASE, 4, 0, None, args)["epochs"]


def test_report_a_diagnosis_that_left_plain_qat_unchanged(tmp_path):
    """The ablation's SAQ row is compared with plain QAT's own run (paired by seed), its name's " | " is escaped so
    the markdown table keeps its columns, and a fixed rho is called fixed, not swept."""
    sys.path.insert(0, str(BENCH))
    import fashion

    args = argparse.Namespace(preset="vit_gap", qat_epochs=None, float_epochs=None, val_split=0.1, device="cpu",
                              rhos=[0.05], method_rhos={}, bits=[4], out=str(tmp_path), report="r", tag="_vit_gap")
    saq, diag = "SAQ (case 3)", "SAQ (case 3) | no perturbation of LayerNorm"
    acc = {(4, fashion.BASE): {0: 77.0, 1: 78.0, 2: 76.0}, (4, saq): {0: 78.0, 1: 78.5, 2: 77.0},
           (4, diag): {0: 77.5, 1: 78.25, 2: 77.0}}  # paired differences to plain QAT: 0.5, 0.25, 1.0
    secs = {k: [1.0] for k in acc}
    fashion.report(args, ["--preset", "vit_gap"], acc, secs, {}, {(4, saq): 0.05}, {}, {0: 78.0, 1: 78.0, 2: 78.0},
                   [], 0.0)
    text = (tmp_path / "r.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| w4a4")]
    assert len(rows) == 3 and all(ln.replace("\\|", "").count("|") == 10 for ln in rows)
    row = next(ln for ln in rows if "LayerNorm" in ln)
    assert "SAQ (case 3) \\| no perturbation of LayerNorm" in row and "| +0.58 [" in row  # mean of 0.5, 0.25, 1.0
    assert "rho fixed at 0.05 (no sweep)" in text and "rho sweep" not in text


def test_a_resumed_float_run_is_the_float_run_in_the_cache():
    """A float model cut off and resumed is found in the cache under its plain configuration (it was trained again,
    and refused by its own folder, when the key held ``resume``)."""
    sys.path.insert(0, str(BENCH))
    import fashion

    cfg = dict(model="vit_fmnist", seed=3, w_bits=32, save=True, output="/somewhere/fashion_float_vit_cpu/seed3")
    assert fashion._portable(dict(cfg, resume=True)) == fashion._portable(cfg)
    assert fashion._portable(cfg)["output"] == "<float>/seed3"
