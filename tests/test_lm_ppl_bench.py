"""benchmarks/lm_ppl.py --smoke on a small synthetic Python corpus: the whole pipeline (tokenizer, float pretraining,
PTQ, QAT, SAQ, rho sweep, report) runs, perplexities are finite, 2-bit PTQ is worse than float, and a re-run is
served from the cache."""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _corpus(root: Path, files: int = 60) -> None:
    """Python-like files under fixed names (the hash split puts one in validation and one in test)."""
    rng = random.Random(0)
    words = ["value", "item", "count", "name", "data", "result", "index", "total", "key", "node"]
    for i in range(files):
        lines = []
        for f in range(12):
            a, b = rng.sample(words, 2)
            lines += [f"def {a}_{b}_{f}({a}, {b}=None):", f"    if {b} is None:", f"        {b} = []",
                      f"    for {a}_i in range({a}):", f"        {b}.append({a}_i * {rng.randint(1, 9)})",
                      f"    return {b}", ""]
        path = root / "pkg" / f"mod_{i:03d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines))
    (root / "pkg" / "tests").mkdir()
    (root / "pkg" / "tests" / "test_x.py").write_text("excluded = True\n")


@pytest.mark.slow
def test_lm_ppl_smoke(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import lm_ppl
    finally:
        sys.path.remove(str(BENCH))
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    _corpus(corpus)
    argv = ["--smoke", "--corpus-dir", str(corpus), "--out", str(out), "--workers", "0", "--seeds", "1"]
    assert lm_ppl.main(argv) == 0
    rep = json.loads((out / "lm_ppl_smoke.json").read_text())
    assert (out / "lm_ppl_smoke.md").exists() and rep["command"].startswith("python benchmarks/lm_ppl.py --smoke")
    assert rep["corpus"]["files"] == {"train": 58, "validation": 1, "test": 1}  # the tests/ folder is left out
    assert rep["corpus"]["tokenizer_deterministic"]
    fl = rep["float"]["test_ppl"]["0"]
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == set(lm_ppl.METHODS)
    for r in rows.values():
        assert all(math.isfinite(v) for v in r["test_ppl"] + r["validation_ppl"]), r
    assert rows["PTQ (RTN)"]["test_ppl"][0] > fl  # 2-bit round-to-nearest hurts the float model
    assert rows["SAQ full"]["rho"] in lm_ppl.SMOKE["rhos"]
    assert math.isfinite(rep["float_finetuned"]["0"]["test_ppl"]) and rep["rho_probe"]["w2"]["loss_rise"]
    lines = (out / "lm_ppl_runs_smoke.jsonl").read_text().splitlines()
    assert lm_ppl.main(argv) == 0  # everything cached: nothing runs again
    assert (out / "lm_ppl_runs_smoke.jsonl").read_text().splitlines() == lines


@pytest.mark.slow
def test_lm_ppl_pretraining_cut_off_resumes_to_the_same_model(tmp_path, monkeypatch):
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        import lm_ppl
    finally:
        sys.path.remove(str(BENCH))
    _corpus(tmp_path / "corpus", files=20)
    meta = lm_ppl.prepare_data(tmp_path / "corpus", tmp_path / "data", 300)
    cfg = dict(seed=0, data=meta["token_sha256"][:16], data_dir=str(tmp_path / "data"), vocab=meta["vocab_actual"],
               model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2), context=16, batch=4, weight_decay=0.1, pretrain_steps=12,
               pretrain_lr=3e-3, pretrain_warmup=2, eval_windows=4, checkpoint=str(tmp_path / "a" / "float.pt"),
               kind="float", log_every=100, save_every=5)
    want = lm_ppl.pretrain(cfg)
    model_a = torch.load(cfg["checkpoint"], weights_only=True)["model"]

    cut = dict(cfg, checkpoint=str(tmp_path / "b" / "float.pt"))
    save = lm_ppl._atomic_save

    def save_then_stop(obj, path):
        save(obj, path)
        if obj.get("step") == 10 and path.name == "partial.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(lm_ppl, "_atomic_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lm_ppl.pretrain(cut)
    assert not lm_ppl.float_complete(cut) and (tmp_path / "b" / "partial.pt").exists()
    monkeypatch.setattr(lm_ppl, "_atomic_save", save)
    got = lm_ppl.pretrain(cut)
    assert got["trained_steps"] == 2 and lm_ppl.float_complete(cut) and not (tmp_path / "b" / "partial.pt").exists()
    model_b = torch.load(cut["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert got["test_ppl"] == want["test_ppl"]


def test_finetune_subset_cycles_a_fixed_pool_of_windows_once_per_epoch():
    """The over-fitting regime: every epoch visits each of the N pooled windows exactly once, in a new order; the
    pool is the seed's (the same for every method); without the option the batches are train_batch's stream 1."""
    import numpy as np

    sys.path.insert(0, str(BENCH))
    import lm_ppl

    tokens = np.arange(10_000, dtype=np.int32)  # window start = its first token: windows are identified by it
    cfg = dict(seed=3, context=8, batch=4, finetune_subset=12)
    epochs = [[int(w[0]) for step in range(e * 3, e * 3 + 3) for w in lm_ppl.finetune_batch(tokens, cfg, step)]
              for e in range(3)]
    assert all(len(set(ep)) == 12 for ep in epochs)          # each pooled window once per epoch
    assert set(epochs[0]) == set(epochs[1]) == set(epochs[2])  # the same pool every epoch
    assert epochs[0] != epochs[1]                              # in a new order
    other = [int(w[0]) for w in lm_ppl.finetune_batch(tokens, dict(cfg, seed=4), 0)]
    assert not set(other) <= set(epochs[0])                    # another seed, another pool
    plain = dict(cfg, finetune_subset=0)
    assert lm_ppl.finetune_batch(tokens, plain, 5).equal(lm_ppl.train_batch(tokens, plain, 1, 5))
