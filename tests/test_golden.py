"""Bit-identity: fixed small runs and exports hash as recorded in benchmarks/results/golden.json (benchmarks/golden.py).

A refactor must keep every hash. The hashes hold for the torch build and machine that recorded them
(``golden.environment()``: torch build, machine, CPU capability), one entry per environment recorded; elsewhere
the test is skipped (re-record there with ``python benchmarks/golden.py --record``
at the commit to compare against).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("mnist1d")
pytest.importorskip("sklearn")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "golden.py"


def _golden():
    spec = importlib.util.spec_from_file_location("_saq_golden", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_runs_and_exports_are_bit_identical_to_the_recorded_hashes():
    """Run in a fresh interpreter: what earlier tests left in the global state (caches, generators) must not count."""
    golden = _golden()
    if golden.environment() not in golden.recorded():
        pytest.skip(f"golden.json holds no hashes for {golden.environment()} (another torch build or CPU)")
    out = subprocess.run([sys.executable, str(_PATH)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"not bit-identical:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
