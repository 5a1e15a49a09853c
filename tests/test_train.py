"""The training loop: learning, exact resume, atomic safe checkpoints, metrics files, AMP, DDP."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchsaq as saq
from torchsaq.train.checkpoint import load_checkpoint, load_model, save_checkpoint
from torchsaq.train.config import TrainConfig
from torchsaq.train.runner import (TrainingInterrupted, build_model, build_optimizer, load_pretrained, lr_lambda,
                       param_groups, train)

# tiny, fast runs: 4 steps of 32 samples per epoch, evaluation on 4 batches
FAST = dict(batch_size=32, limit_train_batches=4, limit_eval_batches=4, calib_batches=1)


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    opts = dict(FAST, epochs=2, output=str(tmp_path / "run"))
    opts.update(kw)
    return TrainConfig(**opts)


def _mnist1d_test():
    from torchsaq.train.data import build_datasets

    b = build_datasets("mnist1d")
    x = torch.stack([b.test[i][0] for i in range(len(b.test))])
    y = torch.tensor([int(b.test[i][1]) for i in range(len(b.test))])
    return x, y


# -- a real (short) run learns ---------------------------------------------------------------------------
@pytest.mark.slow
def test_short_run_learns_and_reports_what_the_checkpoint_scores(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=32, limit_train_batches=40, output=str(tmp_path / "run"),
                      sharpness="case3", rho=0.05)
    r = train(cfg, progress=False)
    assert r["epochs"] == 2 and len(r["history"]) == 2
    assert r["test_acc"] > 40.0  # chance is 10%; ~64% after these 80 steps
    assert r["history"][1]["train_loss"] < r["history"][0]["train_loss"] < math.log(10) + 0.1
    # independent check of the reported numbers: reload the checkpoint and score the test set by hand
    model, loaded_cfg, info = load_model(r["checkpoint"])
    assert loaded_cfg == cfg and info["epoch"] == 2 and info["input_shape"] == (1, 40)
    x, y = _mnist1d_test()
    with torch.no_grad():
        logits = model(x).double()
    acc = 100.0 * (logits.argmax(1) == y).double().mean().item()
    loss = nn.functional.cross_entropy(logits, y).item()
    top5 = 100.0 * (logits.topk(5, 1).indices == y[:, None]).any(1).double().mean().item()
    assert r["test_acc"] == pytest.approx(acc, abs=1e-9)
    assert r["test_top5"] == pytest.approx(top5, abs=1e-9)
    assert r["test_loss"] == pytest.approx(loss, rel=1e-4)
    # the size report: 4-bit middle layers, 8-bit first/last layers, everything else float32
    bits = {n: m.w_bits for n, m in saq.quant_layers(model)}
    assert bits["features.0"] == 8 and bits["fc"] == 8 and bits["features.3"] == 4
    expected = sum(m.weight.numel() * m.w_bits for _, m in saq.quant_layers(model))
    weights = {id(m.weight) for _, m in saq.quant_layers(model)}
    expected += 32 * sum(p.numel() for n, p in model.named_parameters()
                         if id(p) not in weights and not (n.endswith(".step") and "quantizer" in n))
    expected += 32 * sum(q.step.numel() for q in model.modules()
                         if isinstance(q, saq.LSQQuantizer) and q.bits != 32)
    assert r["size_bits"] == expected
    assert r["float_bits"] == 32 * sum(p.numel() for n, p in model.named_parameters() if "quantizer" not in n)


# -- exact resume ------------------------------------------------------------------------------------------
def _all_tensors_equal(a, b, where="") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _all_tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _all_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


def _interrupt_at(*steps: int):
    """A step callback that delivers a real SIGINT (as Ctrl-C does) after the given global steps."""
    def cb(step: int) -> None:
        if step in steps:
            signal.raise_signal(signal.SIGINT)
    return cb


@pytest.mark.slow
def test_resume_after_interruptions_is_bit_for_bit(tmp_path):
    common = dict(epochs=3, sharpness="case3", rho=0.05, rho_warmup_epochs=1.0, momentum=0.9, nesterov=True)
    handler_before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / `cmd &`
    ref = train(_cfg(tmp_path, output=str(tmp_path / "ref"), **common), progress=False)

    cfg = _cfg(tmp_path, output=str(tmp_path / "cut"), **common)
    # Ctrl-C during the last step of epoch 1: the run finishes the epoch, saves, stops at the boundary
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, progress=False, step_callback=_interrupt_at(4))
    assert (e.value.epoch, e.value.step_in_epoch) == (1, 0)
    assert load_checkpoint(e.value.checkpoint)["epoch"] == 1
    # resumed, then Ctrl-C in the middle of epoch 3: a mid-epoch checkpoint
    resumed = TrainConfig(**{**cfg.to_dict(), "resume": True})
    with pytest.raises(TrainingInterrupted) as e:
        train(resumed, progress=False, step_callback=_interrupt_at(10))
    state = load_checkpoint(e.value.checkpoint)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 2, 10)
    # a SIGINT handler must not outlive train()
    assert signal.getsignal(signal.SIGINT) is handler_before
    out = train(resumed, progress=False)

    a, b = load_checkpoint(ref["checkpoint"]), load_checkpoint(out["checkpoint"])
    for key in ("model", "optimizer", "scheduler", "rng", "global_step", "epoch"):
        _all_tensors_equal(a[key], b[key], key)
    untimed = [[{k: v for k, v in row.items() if k != "time_s"} for row in s["history"]] for s in (a, b)]
    _all_tensors_equal(untimed[0], untimed[1], "history")  # every metric, bit for bit
    assert out["test_acc"] == ref["test_acc"] and out["epochs"] == 3


def test_resume_refuses_a_run_with_other_options_or_nothing_to_resume(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, sharpness="none")
    with pytest.raises(ValueError, match="nothing to resume"):
        train(TrainConfig(**{**cfg.to_dict(), "resume": True}), progress=False)
    train(cfg, progress=False)
    other = TrainConfig(**{**cfg.to_dict(), "resume": True, "lr": 0.1})
    with pytest.raises(ValueError, match="lr=0.05 \\(now 0.1\\)"):
        train(other, progress=False)


# -- checkpoints: atomic, safe ----------------------------------------------------------------------------
def test_failing_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    data = {"num_classes": 3, "in_chans": 1, "input_shape": [1, 3]}  # a description load_checkpoint accepts
    save_checkpoint(path, {"config": {}, "model": {"w": torch.arange(3.0)}, "data": data})

    def broken_save(obj, f, *a, **k):  # writes half a file, then fails
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}, "data": data})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # no temporary file left behind


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def test_loading_never_runs_code_and_rejects_bad_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "saq-checkpoint", "config": {}, "model": _Evil(), "data": {}}, evil)
    with pytest.raises(ValueError, match="not a torchsaq checkpoint"):
        load_checkpoint(evil)
    assert not (tmp_path / "EVIL_RAN").exists()
    with pytest.raises(ValueError, match="not a torchsaq checkpoint"):
        load_checkpoint(_save(tmp_path / "plain.pt", {"weight": torch.ones(2)}))
    good = save_checkpoint(tmp_path / "good.pt", {"config": {}, "model": {}, "data": {}})
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_load_model_restores_roles_bits_and_outputs(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, sharpness="none", w_bits=3, a_bits=4, first_last_bits=8)
    r = train(cfg, progress=False)
    model, _, info = load_model(r["checkpoint"])
    roles = {n: (m.quant_role, m.w_bits, m.a_bits) for n, m in saq.quant_layers(model)}
    assert roles["features.0"] == ("first", 8, 8) and roles["fc"] == ("last", 8, 8)
    assert roles["features.6"] == (None, 3, 4)
    # the same numbers as a model quantized and loaded by hand from the raw state dict
    ref = saq.create_model("cnn1d", 10)
    saq.quantize(ref, saq.QuantConfig(w_bits=3, a_bits=4, first_last_bits=8), example_inputs=torch.zeros(1, 1, 40))
    ref.load_state_dict(load_checkpoint(r["checkpoint"])["model"])
    ref.eval()
    x = torch.randn(8, 1, 40)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    # a checkpoint whose weights do not fit its stated architecture -> one clear error
    state = load_checkpoint(r["checkpoint"])
    state["config"]["model_kwargs"] = {"channels": [16, 32]}
    bad = save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    with pytest.raises(ValueError, match="does not match the model architecture"):
        load_model(bad)


# -- output files -----------------------------------------------------------------------------------------
def test_metrics_tensorboard_plot_and_config_are_written(tmp_path):
    cfg = _cfg(tmp_path, epochs=2, sharpness="none", val_split=0.1)
    r = train(cfg, progress=False)
    out = Path(r["output"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert {"train_loss", "train_acc", "val_acc", "val_loss", "test_acc", "test_top5", "lr", "time_s"} <= set(rows[0])
    assert rows[1]["test_acc"] == r["test_acc"] and rows[1]["val_acc"] == r["val_acc"]
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "test_acc" in csv_lines[0].split(",")
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert Path(r["plot_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import yaml

    assert TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())) == cfg


def test_eval_every_skips_evaluations_but_not_the_last_and_changes_no_number(tmp_path):
    # evaluate every 2 epochs of 5: epochs 2, 4 and the last (5); the training itself is the same run
    every = train(_cfg(tmp_path / "a", epochs=5, sharpness="case3", val_split=0.1, eval_every=2), progress=False)
    each = train(_cfg(tmp_path / "b", epochs=5, sharpness="case3", val_split=0.1), progress=False)
    assert [r["epoch"] for r in every["history"] if "test_acc" in r] == [2, 4, 5]
    assert all("val_acc" in r for r in every["history"] if "test_acc" in r)
    assert all("test_acc" in r for r in each["history"])
    for k in ("test_acc", "test_loss", "val_acc", "train_loss"):
        assert every[k] == each[k]  # evaluation consumes no randomness and changes no weight
    a, b = load_checkpoint(every["checkpoint"])["model"], load_checkpoint(each["checkpoint"])["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    out = Path(every["output"])
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    header = csv_lines[0].split(",")
    assert len(csv_lines) == 6 and csv_lines[1].split(",")[header.index("test_acc")] == ""  # epoch 1: blank
    assert Path(every["plot_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=0)


def test_save_false_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, sharpness="none", save=False)
    r = train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    assert r["checkpoint"] is None and r["plot_path"] is None and r["test_acc"] >= 0


# -- building blocks --------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine_and_step():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, lr_schedule="cosine")
    f = lr_lambda(cfg, steps_per_epoch=5)  # 50 iterations, 10 of warm-up
    assert [f(i) for i in range(3)] == [0.1, 0.2, 0.3] and f(9) == 1.0
    assert f(10) == 1.0 and f(30) == pytest.approx(0.5) and f(50) == pytest.approx(0.0, abs=1e-12)
    assert f(20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 40)))
    g = lr_lambda(TrainConfig(epochs=10, lr_schedule="step", step_milestones=[3, 6], step_gamma=0.1), 5)
    assert [g(14), g(15), g(29), g(30)] == [1.0, pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.01)]


def test_no_weight_decay_on_steps_biases_and_norms():
    cfg = TrainConfig(weight_decay=1e-3, optimizer="adamw")
    model = build_model(cfg, num_classes=10, in_chans=1)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {id(p) for n, p in named.items() if n.endswith(".weight") and p.dim() > 1}  # conv/linear
    assert decay == expected
    assert all(id(named[n]) not in decay for n in named if n.endswith(".step") or n.endswith(".bias"))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    assert [g["weight_decay"] for g in param_groups(model, 1e-3)] == [1e-3, 0.0]


def test_pretrained_float_weights_load_strictly(tmp_path):
    src = saq.create_model("cnn1d", 10)
    torch.save(src.state_dict(), tmp_path / "float.pt")
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "float.safetensors"))
    for name in ("float.pt", "float.safetensors"):
        model = build_model(TrainConfig(pretrained=str(tmp_path / name)), 10, 1)
        for n, p in src.state_dict().items():
            assert torch.equal(model.state_dict()[n], p), n
    # another class count: only the head is left fresh (fine-tuning)
    assert load_pretrained(saq.create_model("cnn1d", 5), tmp_path / "float.pt") == ["fc.bias", "fc.weight"]
    # another architecture: a clear error
    with pytest.raises(ValueError, match="does not match the model architecture"):
        load_pretrained(saq.create_model("cnn1d", 10, channels=(16, 16)), tmp_path / "float.pt")
    with pytest.raises(ValueError, match="not found"):
        load_pretrained(src, tmp_path / "nope.pt")


# -- AMP on CPU --------------------------------------------------------------------------------------------
def test_amp_on_cpu_runs_in_bfloat16(tmp_path, monkeypatch):
    import torchsaq.train.runner as T

    seen = set()
    real = T.build_model

    def spy(*a, **k):
        m = real(*a, **k)
        m.features[3].register_forward_hook(lambda mod, i, o: seen.add(o.dtype))
        return m

    monkeypatch.setattr(T, "build_model", spy)
    r = train(_cfg(tmp_path, epochs=1, amp=True, sharpness="case3", save=False), progress=False)
    assert torch.bfloat16 in seen and math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"])


# -- DistributedDataParallel: 2 CPU processes (gloo) -----------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "torchsaq",
           "train", "--epochs", "1", "--batch-size", "32", "--limit-train-batches", "3", "--limit-eval-batches", "2",
           "--device", "cpu", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("torchsaq train: cnn1d on mnist1d") == 1, p.stdout  # rank 0 reports, once
    assert "2 processes" in p.stdout
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["global_step"] == 3 and len(state["history"]) == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_freeze_bn_keeps_the_running_statistics_and_trains_the_affine_weights(tmp_path):
    fl = train(_cfg(tmp_path / "f", epochs=1, sharpness="none", w_bits=32, a_bits=32, first_last_bits=32),
               progress=False)
    before = load_checkpoint(fl["checkpoint"])["model"]
    r = train(_cfg(tmp_path / "q", epochs=2, sharpness="case3", strategy="full", freeze_bn=True,
                   pretrained=fl["checkpoint"]), progress=False)
    after = load_checkpoint(r["checkpoint"])["model"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    affine = [k.replace("running_mean", "weight") for k in stats if k.endswith("running_mean")]
    assert stats and affine
    for k in stats:  # SAQ's two passes and plain training alike: nothing updates them
        assert torch.equal(after[k], before[k]), k
    assert any(not torch.equal(after[k], before[k]) for k in affine)
    moved = train(_cfg(tmp_path / "m", epochs=1, sharpness="none", pretrained=fl["checkpoint"]), progress=False)
    assert not torch.equal(load_checkpoint(moved["checkpoint"])["model"][stats[0]], before[stats[0]])
