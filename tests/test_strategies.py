"""The strategies stand alone: each is driven by a torchsaq.optim.passes.Passes, without the SAQ optimizer class,
and takes exactly the step SAQ takes with it (SAQ is the Optimizer front over the same objects)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq.optim.passes import Passes
from torchsaq.optim.perturb import Mode, Targets
from torchsaq.optim.strategies import STRATEGIES, make_strategy


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    saq.quantize(m, saq.QuantConfig(w_bits=4, a_bits=4))
    x = torch.randn(16, 6)
    saq.calibrate(m, [x])
    return m


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _closure(model, x, y, pass_batch):
    def closure():
        xb, yb = pass_batch(x, y)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("name", STRATEGIES.names())
@pytest.mark.parametrize("mode", ["case3", "case1"])
def test_a_strategy_driven_by_passes_alone_takes_saqs_step(name, mode):
    rho, k = 0.1, 2
    # SAQ
    ref = _model()
    ref_opt = saq.SAQ(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), rho=rho, mode=mode,
                      strategy=name, k=k, fraction=0.5)
    # the same strategy over a Passes, no optimizer class
    model = copy.deepcopy(ref)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kind = Mode.parse(mode)
    trainable = [p for g in base.param_groups for p in g["params"]]
    targets = Targets.select(model, kind, trainable, unquantized=True, steps=False)
    passes = Passes(model, base, targets, rho=rho, need_capture=kind.needs_capture(False))
    strategy = make_strategy(name, model, targets, k, "auto", 0.5)
    passes.on_nonfinite = strategy.on_nonfinite
    torch.manual_seed(5)
    for x, y in _batches():
        ref_opt.step(_closure(ref, x, y, ref_opt.pass_batch))
        ref_opt.zero_grad()
    torch.manual_seed(5)
    for x, y in _batches():
        closure = _closure(model, x, y, lambda *t: strategy.pass_batch(t))
        strategy.step(passes, closure, passes.rho_at(passes.step_count), passes.scaler())
        passes.zero_grad()
    assert passes.step_count == ref_opt.step_count == 4
    assert passes.passes_last_step == ref_opt.passes_last_step
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n


def test_passes_restore_is_bit_exact_and_rolls_back_batchnorm():
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    targets = Targets.select(model, Mode.CASE3, list(model.parameters()))
    passes = Passes(model, base, targets, rho=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert bool(passes.ascent(0.5))
    assert any(m.perturb_post is not None for _, m in saq.quant_layers(model))
    F.cross_entropy(model(x), y).backward()  # the second pass moves the BatchNorm statistics again
    passes.restore()
    assert all(m.perturb_post is None for _, m in saq.quant_layers(model))
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k  # put back to their first-pass values
        elif "num_batches" not in k:
            assert torch.equal(v, before[k]), k  # weights bit-exact
