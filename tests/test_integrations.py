"""SAQ inside training loops that never pass a closure: accelerate (the README's example, run as written)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import saq


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 40, generator=g), torch.randint(0, 10, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _model_and_opt():
    torch.manual_seed(0)
    model = saq.create_model("cnn1d", 10)
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4))
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, saq.SAQ(model, base, rho=0.1, strategy="prev_grad")  # one pass: no closure needed


def test_accelerate_prepared_loop_is_real_saq():
    accelerate = pytest.importorskip("accelerate")

    # the README's accelerate example
    model, opt = _model_and_opt()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt, loader = accelerator.prepare(model, opt, _data())
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()

    # the same SAQ steps with a closure, and plain SGD: accelerate's run is the first, not the second
    ref, ref_opt = _model_and_opt()
    for x, y in _data():
        def closure():
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss
        ref_opt.step(closure)
        ref_opt.zero_grad()
    torch.manual_seed(0)
    plain = saq.quantize(saq.create_model("cnn1d", 10), saq.QuantConfig(w_bits=4, a_bits=4))
    sgd = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    for x, y in _data():
        F.cross_entropy(plain(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    got = accelerator.unwrap_model(model)
    for (k, p), (_, q) in zip(got.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), k
    assert any(not torch.equal(p, q) for p, q in zip(got.parameters(), plain.parameters()))
