"""Mixed precision from sharpness (torchsaq.allocate): exact solver, budgets met, optimal by brute force, the CLI."""
from __future__ import annotations

import copy
import itertools
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

import torchsaq as saq
from torchsaq.analysis.allocate import allocate, layer_sensitivities, quantization_noise, solve
from torchsaq.analysis import hessian_trace
from torchsaq.cli import main
from torchsaq.train.models import create_model
from torchsaq.quant.summary import bops, model_size_bits

CHANNELS = [8, 12, 16, 16]  # cnn1d: first conv, three allocated convs of different sizes, last linear


def _model(w_bits: int = 3, layer_bits=None, seed: int = 0) -> tuple[nn.Module, list]:
    """A calibrated (steps initialised) cnn1d and one (x, y) batch; the same weights for a given seed."""
    torch.manual_seed(seed)
    m = create_model("cnn1d", 10, in_chans=1, channels=CHANNELS)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 40, generator=g), torch.randint(0, 10, (32,), generator=g)
    saq.quantize(m, saq.QuantConfig(w_bits=w_bits, a_bits=w_bits, layer_bits=layer_bits or {}))
    saq.calibrate(m, [x])
    return m.eval(), [(x, y)]


def _brute_force(costs, values, budget):
    best = None
    for ks in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[k] for c, k in zip(costs, ks)) <= budget:
            v = sum(val[k] for val, k in zip(values, ks))
            best = v if best is None else min(best, v)
    return best


def test_solve_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        n, k = rng.randint(1, 5), rng.randint(1, 4)
        costs = [[rng.randint(1, 40) for _ in range(k)] for _ in range(n)]
        values = [[rng.random() for _ in range(k)] for _ in range(n)]
        budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
        picks, value = solve(costs, values, budget)
        assert sum(c[p] for c, p in zip(costs, picks)) <= budget
        assert value == pytest.approx(sum(v[p] for v, p in zip(values, picks)))
        assert value == pytest.approx(_brute_force(costs, values, budget))
    with pytest.raises(ValueError, match="too small"):
        solve([[5, 6]], [[1.0, 0.0]], 4)


def test_noise_falls_with_bits_and_beats_the_lsq_initial_step():
    m, _ = _model()
    noise = quantization_noise(m, (2, 3, 4, 8, 32))
    for per_bits in noise.values():
        assert per_bits[2] > per_bits[3] > per_bits[4] > per_bits[8] > per_bits[32] == 0.0
    # the MSE-best step is no worse than LSQ's data-driven initial step at the same bits (an independent quantizer)
    layer = dict(saq.quant_layers(m))["features.3"]
    w = layer.weight.detach()
    _, qp = saq.qrange(3, True)
    step = (2 * w.abs().mean(dim=(1, 2), keepdim=True) / qp**0.5)
    lsq_noise = float((saq.lsq(w, step, 3, True) - w).pow(2).sum())
    assert noise["features.3"][3] <= lsq_noise


def test_layer_traces_add_up_to_the_analysis_hessian_trace():
    m, data = _model()
    per_layer = layer_sensitivities(m, data, samples=3, seed=5)
    layers = dict(saq.quant_layers(m))
    total = sum(s * layers[n].weight.numel() for n, s in per_layer.items())
    ref = hessian_trace(m, nn.CrossEntropyLoss(), data, samples=3, seed=5, include_float=False)
    assert total == pytest.approx(ref, rel=1e-6, abs=1e-9)


_FLOAT = create_model("cnn1d", 10, in_chans=1, channels=CHANNELS)


def _independent_cost(kind: str, layer_bits) -> float:
    """The budget an allocation spends, measured on a fresh model quantized with it (summary's own accounting)."""
    m = saq.quantize(copy.deepcopy(_FLOAT), saq.QuantConfig(w_bits=3, a_bits=3, layer_bits=layer_bits or {}),
                     example_inputs=torch.zeros(1, 1, 40))  # traced: roles and MACs known
    if kind == "size_bytes":
        return model_size_bits(m) / 8
    if kind == "bops":
        return bops(m)
    alloc = {n: layer for n, layer in saq.quant_layers(m) if layer.quant_role is None}
    return sum(la.w_bits * la.weight.numel() for la in alloc.values()) / sum(la.weight.numel() for la in alloc.values())


@pytest.mark.parametrize("kind,activations,choices,first_last", [
    ("avg_bits", "keep", (2, 3, 4, 8), False), ("size_bytes", "keep", (2, 3, 4, 8), False),
    ("bops", "same", (2, 3, 4, 8), False), ("size_bytes", "keep", (2, 8), True)])
def test_allocation_meets_the_budget_and_is_optimal_by_brute_force(kind, activations, choices, first_last):
    m, data = _model()
    names = [n for n, la in saq.quant_layers(m) if first_last or la.quant_role is None]
    sens = {n: s for n, s in zip(names, (3.0, 0.2, 1.0, 0.5, 2.0))}
    uniform3 = _independent_cost(kind, None)
    limit = uniform3 * (1.0 if kind == "avg_bits" else 0.97)  # an avg budget met exactly, the others just below
    a = allocate(m, data, **{kind: limit}, choices=choices, measure=sens, activations=activations,
                 first_last=first_last)
    assert set(a.layer_bits) == set(names)
    assert a.used == pytest.approx(_independent_cost(kind, a.layer_bits), rel=1e-12) and a.used <= limit
    # brute force: every assignment, its cost measured on a fresh model, its predicted loss from the noise table
    rows = {r.name: r for r in a.rows}
    best = None
    for bits in itertools.product(choices, repeat=len(names)):
        lb = {n: (b if activations == "same" else [b, 3 if rows[n].role is None else 8]) for n, b in zip(names, bits)}
        if _independent_cost(kind, lb) <= limit:
            v = sum(rows[n].predicted[b] for n, b in zip(names, bits))
            best = v if best is None else min(best, v)
    assert a.predicted == pytest.approx(best, rel=1e-12)
    assert a.predicted == pytest.approx(sum(rows[n].predicted[rows[n].w_bits] for n in names))


def test_first_last_keep_their_bits_and_the_result_feeds_quantconfig():
    m, data = _model()
    bits = saq.allocate_bits(m, data, avg_bits=3, measure="none")
    roles = {n: la.quant_role for n, la in saq.quant_layers(m)}
    assert all(roles[n] is None for n in bits)
    fresh, _ = _model(layer_bits=bits)
    got = {n: [la.w_bits, la.a_bits] for n, la in saq.quant_layers(fresh)}
    assert all(got[n] == v for n, v in bits.items())
    assert got["features.0"] == [8, 8] and got["fc"] == [8, 8]


def test_allocate_leaves_the_model_unchanged():
    m, data = _model()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    allocate(m, data, bops=1e9, samples=2)
    assert m.training and all(mod.training for mod in m.modules())
    after = m.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_one_budget_and_clear_errors():
    m, data = _model()
    with pytest.raises(ValueError, match="exactly one budget"):
        allocate(m, data, measure="none")
    with pytest.raises(ValueError, match="exactly one budget.*avg_bits, bops"):
        allocate(m, data, avg_bits=3, bops=1e6, measure="none")
    with pytest.raises(ValueError, match="below the smallest allocation"):
        allocate(m, data, avg_bits=1.5, measure="none")
    with pytest.raises(ValueError, match="choices"):
        allocate(m, data, avg_bits=3, choices=(1, 3), measure="none")
    with pytest.raises(ValueError, match="unknown measure"):
        allocate(m, data, avg_bits=3, measure="eigen")
    with pytest.raises(ValueError, match="positive"):
        allocate(m, data, size_bytes=-1, measure="none")


# -- the command line ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("alloc") / "run"
    assert main(["train", "--epochs", "1", "--limit-train-batches", "3", "--limit-eval-batches", "2", "--batch-size",
                 "32", "--w-bits", "3", "--a-bits", "3", "--sharpness", "none", "--output", str(out)]) == 0
    return out / "checkpoint.pt"


@pytest.mark.slow
def test_cli_allocate_writes_a_fragment_that_train_reads(checkpoint, tmp_path, capsys):
    frag = tmp_path / "mp.yaml"
    cmd = [sys.executable, "-m", "torchsaq", "allocate", str(checkpoint), "--avg-bits", "3", "--samples", "2",
           "--num-samples", "64", "--output", str(frag)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "mean tr(H)" in done.stdout and "predicted loss increase" in done.stdout and f"written {frag}" in done.stdout
    text = frag.read_text()
    assert text.startswith("# torchsaq allocate:") and "layer_bits:" in text
    import yaml

    layer_bits = yaml.safe_load(text)["layer_bits"]
    assert set(layer_bits) == {"features.3", "features.6", "features.9"}
    # round trip: train with the fragment, then summary shows its bits
    run = tmp_path / "mixed"
    assert main(["train", "--config", str(frag), "--epochs", "1", "--limit-train-batches", "2",
                 "--limit-eval-batches", "2", "--batch-size", "32", "--sharpness", "none", "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["summary", str(run)]) == 0
    table = capsys.readouterr().out
    for name, (w, a) in layer_bits.items():
        assert any(line.split()[:1] == [name] and line.split()[4:6] == [str(w), str(a)] for line in table.splitlines())


@pytest.mark.slow
def test_cli_allocate_never_replaces_a_foreign_file(checkpoint, tmp_path, capsys):
    foreign = tmp_path / "notes.yaml"
    foreign.write_text("epochs: 3\n")
    code = main(["allocate", str(checkpoint), "--bops", "1", "--samples", "1", "--num-samples", "32",
                 "--output", str(foreign)])
    err = capsys.readouterr().err
    assert code == 1 and "not written by torchsaq allocate" in err and foreign.read_text() == "epochs: 3\n"
    assert main(["allocate", str(checkpoint), "--size-mib", "1", "--samples", "1", "--num-samples", "32",
                 "--output", str(checkpoint)]) == 1
    mine = tmp_path / "mine.yaml"
    for _ in range(2):  # a fragment it wrote is replaced
        assert main(["allocate", str(checkpoint), "--size-mib", "1", "--measure", "none", "--first-last",
                     "--output", str(mine)]) == 0
    import yaml

    assert mine.read_text().startswith("# torchsaq allocate:")
    assert set(yaml.safe_load(mine.read_text())["layer_bits"]) == {"features.0", "features.3", "features.6",
                                                                    "features.9", "fc"}
