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
