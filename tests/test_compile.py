"""torch.compile: every sharpness mode and strategy compiles the training forward without graph breaks, compiles
a bounded number of variants (no recompilation per step), and steps exactly like the eager model.

Dynamo is checked with its "eager" backend (the captured graphs run with the same kernels, so the numbers are
comparable bit for bit and no C++ compiler is needed); the inductor path is the benchmark's business."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq.optim.saq import SAQ

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                      nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x, _ = _batch(-1)
    saq.quantize(m, saq.QuantConfig(w_bits=2, a_bits=2, first_last_bits=4), example_inputs=x)
    saq.calibrate(m, [x])
    return m.train()


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model: nn.Module, sharpness: str, strategy: str, adaptive: bool, counter=None, steps: int = 4,
           hand_compiled: bool = False) -> None:
    """``steps`` SAQ steps; ``counter``: compile the forward with it; ``hand_compiled``: SAQ gets the wrapper."""
    net = torch.compile(model, backend=counter) if counter is not None else model
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = base if sharpness == "none" else SAQ(net if hand_compiled else model, base, rho=0.05, mode=sharpness,
                                               strategy=strategy, adaptive=adaptive)
    for i in range(steps):
        x, y = _batch(i)
        if strategy == "prev_grad":  # closure-free: the real one-pass loop
            F.cross_entropy(net(x), y).backward()
            opt.step()
        else:
            def closure():
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss
            if sharpness == "none":
                closure()
                opt.step()
            else:
                opt.step(closure)
        opt.zero_grad()


CASES = [("none", "full", False), ("sam", "full", False), ("case1", "full", False), ("case1", "full", True),
         ("case2", "full", False), ("case3", "full", False), ("case3", "full", True), ("case3", "every_k", False),
         ("case3", "prev_grad", False), ("sam", "prev_grad", False)]


@pytest.mark.parametrize("sharpness,strategy,adaptive", CASES)
def test_training_forward_compiles_without_graph_breaks_and_matches_eager(sharpness, strategy, adaptive):
    dynamo.reset()
    counters.clear()
    eager, comp = _model(), _model()
    counter = CompileCounterWithBackend("eager")
    _train(eager, sharpness, strategy, adaptive)
    _train(comp, sharpness, strategy, adaptive, counter)
    breaks = {reason.splitlines()[0]: n for reason, n in counters["graph_break"].items()}
    assert not breaks, f"graph breaks: {breaks}"
    # one graph per forward variant (plain / capturing / perturbed), not one per step or per layer
    assert 1 <= counter.frame_count <= 3, counter.frame_count
    for (name, a), b in zip(eager.state_dict().items(), comp.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("sharpness,strategy", [("none", "full"), ("case3", "prev_grad"), ("case3", "full")])
def test_train_compile_flag_compiles_the_forward_and_changes_no_number(tmp_path, monkeypatch, sharpness, strategy):
    # the wiring of --compile (the inductor backend itself is PyTorch's): same run, eager vs dynamo-captured
    from torchsaq.train.config import TrainConfig
    from torchsaq.train.runner import format_result, train

    dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("eager")
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=counter))
    fast = dict(batch_size=32, limit_train_batches=3, limit_eval_batches=2, calib_batches=1, epochs=2,
                sharpness=sharpness, strategy=strategy)
    comp = train(TrainConfig(output=str(tmp_path / "c"), compile=True, **fast), progress=False)
    eager = train(TrainConfig(output=str(tmp_path / "e"), **fast), progress=False)
    assert 1 <= counter.frame_count <= 3 and not counters["graph_break"]
    assert comp["compiled"] and comp["first_step_s"] > 0 and "compile   first step" in format_result(comp)
    for k in ("train_loss", "test_acc", "test_loss"):
        assert comp[k] == pytest.approx(eager[k], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("strategy", ["full", "prev_grad"])
def test_saq_may_be_given_the_compiled_wrapper(strategy):
    dynamo.reset()
    counters.clear()
    eager, comp = _model(), _model()
    counter = CompileCounterWithBackend("eager")
    _train(eager, "case3", strategy, False)
    _train(comp, "case3", strategy, False, counter, hand_compiled=True)
    assert not counters["graph_break"] and 1 <= counter.frame_count <= 3
    for (name, a), b in zip(eager.state_dict().items(), comp.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
