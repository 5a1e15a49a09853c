"""Gradient accumulation (``accum_steps``): N micro-batches make one optimizer step, equal to one step over the
concatenated batch, for plain QAT and for every SAQ strategy; the CLI flag and the schedule in optimizer steps."""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq.train.checkpoint import load_checkpoint
from torchsaq.cli import main
from torchsaq.train.config import TrainConfig
from torchsaq.train.engine import train_step
from torchsaq.optim.saq import SAQ
from torchsaq.train.runner import TrainingInterrupted, train

HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def _data(i: int, n: int):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _model() -> nn.Module:
    """Linear(q) ReLU Linear(q) ReLU Linear(q) at 3 bits, float64, no BatchNorm (statistics would see micro-batches)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    x0, _ = _data(-1, 32)
    saq.quantize(m, saq.QuantConfig(w_bits=3, a_bits=3, first_last_bits=3), example_inputs=x0)
    m.double()  # the quantizers' steps too
    saq.calibrate(m, [x0])
    return m


def _split(x, y, sizes):
    out, i = [], 0
    for n in sizes:
        out.append((x[i:i + n], y[i:i + n]))
        i += n
    return out


def _run(model: nn.Module, opt: torch.optim.Optimizer, sharpness: str):
    """What :func:`torchsaq.train.engine.train_step` reads of a Run."""
    base = opt.base_optimizer if isinstance(opt, SAQ) else opt
    return types.SimpleNamespace(
        device=torch.device("cpu"), model=model, raw_model=model, amp_dtype=None, scaler=None,
        criterion=nn.CrossEntropyLoss(), optimizer=opt, base=base,
        scheduler=torch.optim.lr_scheduler.LambdaLR(base, lambda it: 1.0),
        cfg=types.SimpleNamespace(sharpness=sharpness, max_grad_norm=None))


def _assert_close(a: nn.Module, b: nn.Module, what: str, tol: float = 1e-12) -> None:
    for (k, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, rtol=tol, atol=tol), (what, k, (p - q).abs().max().item())


# (micro-batch sizes of each group): equal micro-batches, then a partial last group (2 of 3), and unequal sizes
GROUPS = [[8, 8, 8], [8, 8], [6, 10]]


def test_plain_qat_accumulation_equals_one_step_over_the_concatenated_batch():
    model = _model()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), **HP)
    run = _run(model, opt, "none")
    ref_opt = torch.optim.SGD(ref.parameters(), **HP)
    for i, sizes in enumerate(GROUPS):
        x, y = _data(i, sum(sizes))
        loss, hits = train_step(run, _split(x, y, sizes))  # type: ignore[arg-type]
        # the reference: plain torch, one forward/backward over the whole batch
        ref_opt.zero_grad()
        logits = ref(x)
        ref_loss = F.cross_entropy(logits, y)
        ref_loss.backward()
        ref_opt.step()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        assert hits.item() == (logits.argmax(1) == y).sum().item()
    _assert_close(model, ref, "qat")
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), _model().parameters()))


@pytest.mark.parametrize("strategy", ["full", "every_k", "prev_grad"])
@pytest.mark.parametrize("mode", ["case3", "sam"])
def test_saq_accumulation_equals_the_concatenated_batch(strategy, mode):
    """full: both passes run over every micro-batch, e from the accumulated gradient; every_k: its full steps
    likewise, g_v from accumulated gradients, the one-pass steps add it to the accumulated gradient; prev_grad:
    one pass over the micro-batches at the point e_prev gives, the next e from the accumulated gradient."""
    kw = dict(rho=0.3, mode=mode, strategy=strategy, k=2)
    model = _model()
    ref = copy.deepcopy(model)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), **kw)
    ref_opt = SAQ(ref, torch.optim.SGD(ref.parameters(), **HP), **kw)
    run = _run(model, opt, mode)
    for i, sizes in enumerate(GROUPS + GROUPS):
        x, y = _data(i, sum(sizes))
        train_step(run, _split(x, y, sizes))  # type: ignore[arg-type]

        def closure():
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss
        ref_opt.zero_grad()
        ref_opt.step(closure)
        assert opt.passes_last_step == ref_opt.passes_last_step
    assert opt.step_count == ref_opt.step_count == 6
    _assert_close(model, ref, f"{mode} {strategy}", tol=1e-11)
    plain = _model()
    sgd = torch.optim.SGD(plain.parameters(), **HP)
    run_plain = _run(plain, sgd, "none")
    for i, sizes in enumerate(GROUPS + GROUPS):
        x, y = _data(i, sum(sizes))
        train_step(run_plain, _split(x, y, sizes))  # type: ignore[arg-type]
    assert any(not torch.allclose(p, q) for p, q in zip(model.parameters(), plain.parameters()))


def test_engine_sub_batch_step_cuts_each_micro_batch_for_the_ascent_pass():
    """The engine's closure takes its batches through ``opt.pass_batch``: the ascent pass sees the first quarter of
    each micro-batch, the update pass all of it; equal to a hand-written closure doing the same; the step's hits
    are counted over the whole batch."""
    kw = dict(rho=0.3, strategy="sub_batch", fraction=0.25)
    model = _model()
    ref = copy.deepcopy(model)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), **kw)
    ref_opt = SAQ(ref, torch.optim.SGD(ref.parameters(), **HP), **kw)
    run = _run(model, opt, "case3")
    for i, sizes in enumerate([[16], [8, 8], [12]]):
        x, y = _data(i, sum(sizes))
        micro = _split(x, y, sizes)
        _, hits = train_step(run, micro)  # type: ignore[arg-type]
        seen = []

        def closure():
            total = 0.0
            for xm, ym in micro:
                xb, yb = ref_opt.pass_batch(xm, ym)
                seen.append(len(yb))
                loss = F.cross_entropy(ref(xb), yb, reduction="sum") / sum(sizes)
                loss.backward()
                total += float(loss.detach())
            return total
        ref_opt.zero_grad()
        ref_opt.step(closure)
        assert seen == [max(1, -(-n // 4)) for n in sizes] + sizes
        assert 0 <= hits.item() <= sum(sizes) and opt.passes_last_step == 2
    _assert_close(model, ref, "sub_batch", tol=1e-11)


@pytest.mark.parametrize("mode", ["case3", "case1", "sam"])
def test_closure_free_prev_grad_accumulation_keeps_the_perturbation_and_equals_the_closure_form(mode):
    """``for micro: loss.backward()`` then ``opt.step()``: e_prev is applied at the first micro-batch's forward and
    stays, the same tensors, for every micro-batch; the next e comes from the accumulated gradient."""
    n_micro = 3
    model = _model()
    ref = copy.deepcopy(model)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.3, mode=mode, strategy="prev_grad")
    ref_opt = SAQ(ref, torch.optim.SGD(ref.parameters(), **HP), rho=0.3, mode=mode, strategy="prev_grad")
    strategy = opt._strategy
    seen: list[list] = []  # per forward: what each target is perturbed with (layer sites, then data copies)
    layers = [m for _, m in saq.quant_layers(model)]

    def record(mod, args):
        site = [layer.perturb_post if mode != "sam" else None for layer in layers]
        data = [p.detach().clone() for p in model.parameters()]
        seen.append([site, data, strategy.pending])
    model.register_forward_hook(lambda m, a, o: record(m, a))  # after SAQ's pre-hook applied e_prev
    for it in range(4):
        x, y = _data(it, 8 * n_micro)
        seen.clear()
        for xb, yb in _split(x, y, [8] * n_micro):
            (F.cross_entropy(model(xb), yb) / n_micro).backward()
        if it > 0:  # (the first step is unperturbed)
            assert all(s[2] for s in seen)  # applied during every micro-batch ...
            for s in seen[1:]:              # ... once: the same perturbation, not re-applied nor removed
                assert all(a is b for a, b in zip(s[0], seen[0][0]))
                assert all(torch.equal(a, b) for a, b in zip(s[1], seen[0][1]))
            if mode != "sam":
                assert all(e is not None for e in seen[0][0])
        opt.step()
        opt.zero_grad()
        assert not strategy.pending

        def closure():
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss
        ref_opt.step(closure)
        ref_opt.zero_grad()
    _assert_close(model, ref, f"closure-free {mode}", tol=1e-11)


# -- the trainer and the CLI --------------------------------------------------------------------------------
FAST = dict(batch_size=16, limit_train_batches=5, limit_eval_batches=2, calib_batches=1, threads=1)


@pytest.mark.slow
def test_trainer_counts_optimizer_steps_and_resume_is_exact(tmp_path):
    common = dict(FAST, epochs=2, accum_steps=2, sharpness="case3", strategy="full", rho_warmup_epochs=1.0,
                  warmup_epochs=0.5)
    lrs: list[float] = []
    ref = train(TrainConfig(**common, output=str(tmp_path / "ref")), progress=False,
                step_callback=lambda s: lrs.append(s))
    # 5 batches per epoch in groups of 2, 2, 1: 3 optimizer steps per epoch; the cosine schedule ends at 0
    assert ref["global_step"] == 6 and lrs == [1, 2, 3, 4, 5, 6]
    state = load_checkpoint(ref["checkpoint"])
    assert state["scheduler"]["last_epoch"] == 6 and state["optimizer"]["saq"]["step"] == 6
    assert ref["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)

    cfg = TrainConfig(**common, output=str(tmp_path / "cut"))

    def stop_at(n):
        def cb(step):
            if step == n:
                import os
                import signal
                os.kill(os.getpid(), signal.SIGINT)
        return cb
    with pytest.raises(TrainingInterrupted) as e:  # after the 2nd group of epoch 2: batch 4 of 5
        train(cfg, progress=False, step_callback=stop_at(5))
    st = load_checkpoint(e.value.checkpoint)
    assert (st["epoch"], st["step_in_epoch"], st["global_step"]) == (1, 4, 5)
    out = train(TrainConfig(**{**cfg.to_dict(), "resume": True}), progress=False)
    a, b = load_checkpoint(ref["checkpoint"]), load_checkpoint(out["checkpoint"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["global_step"] == b["global_step"] == 6
    assert out["test_acc"] == ref["test_acc"]
    # another accum_steps cannot resume the run
    with pytest.raises(ValueError, match="accum_steps"):
        train(TrainConfig(**{**cfg.to_dict(), "resume": True, "accum_steps": 3, "epochs": 3}), progress=False)


@pytest.mark.slow
def test_cli_accum_steps_runs_and_rejects_zero(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--accum-steps", "2", "--epochs", "1", "--batch-size", "16", "--limit-train-batches", "3",
                 "--limit-eval-batches", "2", "--threads", "1", "--output", str(out)]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"]["accum_steps"] == 2 and state["global_step"] == 2  # groups of 2 and 1 batches
    capsys.readouterr()
    assert main(["train", "--accum-steps", "0", "--output", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchsaq: error: ") and "accum_steps must be >= 1" in err and "\n" not in err
    with pytest.raises(ValueError, match="accum_steps"):
        TrainConfig(accum_steps=0)
