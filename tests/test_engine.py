"""The training engine's seams, tested alone: evaluate, the checkpointer, the typed records, the plain update."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchsaq.checkpoint import load_checkpoint
from torchsaq.checkpointer import Checkpointer
from torchsaq.config import TrainConfig
from torchsaq._update import base_step
from torchsaq.engine import EpochRecord, EpochSums, LoopState, evaluate


class _Fixed(nn.Module):
    """Logits = x (the input row is the score vector), with a dropout whose flag must come back."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return x if not self.training else self.drop(x)


def test_evaluate_matches_hand_computed_top1_top5_and_loss():
    # 6 classes; three samples: top-1 right; only in the top-5; outside the top-5
    x = torch.tensor([[5.0, 1, 0, 0, 0, 0],
                      [0.0, 1, 2, 3, 4, 5],
                      [0.0, 1, 2, 3, 4, 5]])
    y = torch.tensor([0, 1, 0])
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    model = _Fixed().train()
    m = evaluate(model, batches, "cpu")
    assert model.training and model.drop.training  # the training flags come back
    assert m["n"] == 3
    assert m["acc"] == pytest.approx(100 / 3)   # sample 0 only
    assert m["top5"] == pytest.approx(200 / 3)  # samples 0 and 1 (class 1 is 5th of 6 in row 1; class 0 is 6th)
    by_hand = [-(x[i, y[i]] - torch.logsumexp(x[i], 0)).item() for i in range(3)]
    assert m["loss"] == pytest.approx(sum(by_hand) / 3, rel=1e-12)
    # limit: the first batch only
    m1 = evaluate(model, batches, "cpu", limit=1)
    assert (m1["n"], m1["acc"], m1["top5"]) == (2, 50.0, 100.0)
    # nothing to evaluate: NaN, not a division by zero
    empty = evaluate(model, [], "cpu")
    assert empty["n"] == 0 and math.isnan(empty["acc"]) and math.isnan(empty["loss"])


def _checkpointer(tmp_path, **kw) -> tuple[Checkpointer, nn.Module]:
    cfg = TrainConfig(output=str(tmp_path / "run"), **kw)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    ckpt = Checkpointer(tmp_path / "run", cfg)
    ckpt.attach(data={"dataset": "x", "num_classes": 2, "in_chans": 3, "input_shape": [3]}, model=model,
                optimizer=opt, scheduler=sched, scaler=None)
    return ckpt, model


def test_checkpointer_saves_atomically_and_keeps_the_last_good_file(tmp_path, monkeypatch):
    ckpt, model = _checkpointer(tmp_path)
    ckpt.claim()
    try:
        assert ckpt.kept() == "nothing was saved"
        path = ckpt.save(1, 0, global_step=4, partial=[0.0, 0.0, 0], time_s=1.5, history=[{"epoch": 1}],
                         metrics={"epoch": 1})
        good = load_checkpoint(path)
        assert (good["epoch"], good["global_step"], good["metrics"]) == (1, 4, {"epoch": 1})
        assert "epoch 1) is kept" in ckpt.kept()

        # a save that fails half-way (after writing some bytes): the previous file stays, no temporary is left
        def broken_save(obj, f, *a, **k):
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(28, "No space left on device")

        with torch.no_grad():
            model.weight.add_(1.0)
        monkeypatch.setattr(torch, "save", broken_save)
        with pytest.raises(OSError, match="No space left"):
            ckpt.save(2, 0, global_step=8, partial=[0.0, 0.0, 0], time_s=3.0, history=[])
        monkeypatch.undo()
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".saq.lock", "checkpoint.pt"]
        assert load_checkpoint(path)["epoch"] == 1 and ckpt.saved_epoch == 1

        # a non-finite weight: refused before anything is written
        with torch.no_grad():
            model.weight[0, 0] = math.nan
        with pytest.raises(FloatingPointError, match=r"non-finite .* epoch 2 step 3 .*epoch 1\) is kept"):
            ckpt.save(1, 3, global_step=7, partial=[1.0, 1.0, 2], time_s=2.0, history=[])
        assert load_checkpoint(path)["global_step"] == 4
    finally:
        ckpt.release()


def test_checkpointer_locks_the_run_folder(tmp_path):
    a, _ = _checkpointer(tmp_path)
    b, _ = _checkpointer(tmp_path)
    a.claim()
    try:
        with pytest.raises(ValueError, match="in use by another torchsaq train"):
            b.claim()
    finally:
        a.release()
    b.claim()  # free again
    b.release()
    # save=False: no lock, nothing written, save() reports no path
    c, _ = _checkpointer(tmp_path / "nosave", save=False)
    c.claim()
    assert c.save(1, 0, global_step=1, partial=[0.0, 0.0, 0], time_s=0.0, history=[]) is None
    assert not (tmp_path / "nosave").exists() and c.kept() == "nothing is saved (save=False)"


def test_epoch_records_keep_the_metrics_file_layout():
    r = EpochRecord(epoch=2, step=8, lr=0.1, train_loss=1.0, train_acc=50.0, test_loss=2.0, test_acc=40.0,
                    test_top5=90.0, time_s=1.25)
    d = r.to_dict()
    assert list(d) == ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_top5",
                       "time_s"]  # no val_* without a validation split
    assert EpochRecord.from_dict(d) == r
    r.set_split("val", {"acc": 1.0, "top5": 2.0, "loss": 3.0, "n": 5})
    assert list(r.to_dict())[5:8] == ["val_loss", "val_acc", "val_top5"]
    with pytest.raises(ValueError, match="unknown"):
        EpochRecord.from_dict({**d, "extra": 1})
    st = LoopState.from_checkpoint({"epoch": 1, "step_in_epoch": 2, "partial": [3.0, 1.0, 4], "global_step": 6,
                                    "time_s": 9.0, "history": [d]})
    assert (st.start_epoch, st.skip, st.partial, st.history) == (1, 2, EpochSums(3.0, 1.0, 4), [EpochRecord(**d)])


def test_plain_qat_update_clips_then_steps():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    for m in (a, b):
        (m(x) ** 2).sum().mul(100).backward()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    base_step(opt_a, a.parameters(), grad_scaler=None, max_grad_norm=0.5)  # engine.train_step's plain-QAT update
    nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters()])) <= 0.5 + 1e-6
