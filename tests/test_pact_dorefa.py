"""The official SAQ code's other quantizers, PACT and DoReFa (QuantConfig(quantizer="pact" | "dorefa")), against
float64 references written from docs/method.md / SPEC (quan_models/pact.py, quan_models/dorefa.py); exported and
trained with every SAQ mode and strategy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq.quant.dorefa import DoReFaActQuantizer, DoReFaWeightQuantizer
from torchsaq.quant.pact import PACTActQuantizer, PACTWeightQuantizer

f64 = torch.float64


# -- references -----------------------------------------------------------------------------------------------
def ste_round(u):
    return u + (torch.round(u) - u).detach()


def ref_dorefa_weight(w, k):
    """tanh, / max|tanh| (whole tensor, in the graph) * 0.5 + 0.5, round to 2^k - 1 steps, 2q - 1."""
    n = 2**k - 1
    t = torch.tanh(w)
    u = t / t.abs().max() * 0.5 + 0.5
    return 2 * (ste_round(u * n) / n) - 1


def ref_dorefa_act(a, k):
    n = 2**k - 1
    return ste_round(torch.clamp(a, 0, 1) * n) / n


def ref_pact_act(a, alpha, k):
    """PACT: y = clamp(a, 0, alpha) (d/dalpha = 1 where a > alpha), quantized with 2^k - 1 steps over [0, alpha],
    the rounding passed straight through as a whole (no rounding-error gradient to alpha)."""
    n = 2**k - 1
    y = torch.minimum(torch.relu(a), alpha)
    return y + (torch.round(y * n / alpha) * alpha / n - y).detach()


def away_from_ties(u, n):
    """Inputs whose u * n lands within 1e-4 of a .5 moved off the tie (the two roundings may differ there)."""
    frac = u * n - torch.floor(u * n)
    return torch.where((frac - 0.5).abs() < 1e-4, u + 1e-3 / n, u)


# -- DoReFa -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DoReFaWeightQuantizer, PACTWeightQuantizer])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (7, 9)])
def test_weight_forward_and_grads_float64(cls, bits, shape):
    w = (torch.randn(shape, dtype=f64) * 0.3).requires_grad_()
    q = cls(bits).double().train()
    up = torch.randn(shape, dtype=f64)
    q(w).backward(up)
    w_ref = w.detach().clone().requires_grad_()
    y_ref = ref_dorefa_weight(w_ref, bits)
    y_ref.backward(up)
    torch.testing.assert_close(q(w.detach()), y_ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    assert q.clip.grad is None and not q.clip.requires_grad  # nothing learned
    levels = torch.unique(q(w.detach()))
    assert levels.numel() <= 2**bits and float(levels.abs().max()) <= 1.0 + 1e-12
    codes = q.integer(w.detach())
    assert torch.equal(q.dequantize(codes), q(w.detach())) and q.code_range() == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dorefa_act_forward_and_grads_float64(bits):
    n = 2**bits - 1
    a = away_from_ties(torch.linspace(-0.5, 1.5, 401, dtype=f64) + 0.00123, n).requires_grad_()  # (not on 0, 1)
    q = DoReFaActQuantizer(bits).double().train()
    q(a.detach().abs())  # init: unsigned data, the clip stays 1.0
    assert float(q.clip) == 1.0 and not q.clip.requires_grad
    up = torch.randn_like(a)
    y = q(a)
    y.backward(up)
    a_ref = a.detach().clone().requires_grad_()
    ref_dorefa_act(a_ref, bits).backward(up)
    torch.testing.assert_close(y, ref_dorefa_act(a.detach(), bits), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.grad, a_ref.grad)
    assert torch.equal(q.dequantize(q.integer(a.detach())), y.detach())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("alpha", [0.6, 2.5, -1.5])  # the clip is used as |alpha|
def test_pact_act_forward_and_grads_float64(bits, alpha):
    n = 2**bits - 1
    a = away_from_ties((torch.linspace(-1.0, 3.0, 801, dtype=f64) + 0.00123) / abs(alpha), n) * abs(alpha)
    a = a.requires_grad_()
    q = PACTActQuantizer(bits).double().train()
    q(a.detach().abs())
    with torch.no_grad():
        q.clip.fill_(alpha)
    up = torch.randn_like(a)
    y = q(a)
    y.backward(up)
    a_ref = a.detach().clone().requires_grad_()
    c = torch.tensor(abs(alpha), dtype=f64, requires_grad=True)
    ref_pact_act(a_ref, c, bits).backward(up)
    torch.testing.assert_close(y, ref_pact_act(a.detach(), torch.tensor(abs(alpha), dtype=f64), bits),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(a.grad, a_ref.grad)
    sign = 1.0 if alpha > 0 else -1.0
    torch.testing.assert_close(q.clip.grad, c.grad.reshape(1) * sign, rtol=1e-10, atol=1e-12)
    # PACT's alpha gradient: the upstream gradient summed where a >= alpha, nothing from inside the range
    torch.testing.assert_close(q.clip.grad, (up * (a.detach() > abs(alpha))).sum().reshape(1) * sign)
    assert torch.equal(q.dequantize(q.integer(a.detach())), y.detach())


def test_signed_inputs_get_the_symmetric_range():
    x = torch.linspace(-2, 2, 101)
    for q in (PACTActQuantizer(3), DoReFaActQuantizer(3)):
        q.train()
        q(x)
        assert q.signed and q.code_range() == (-3, 3)
        assert float(q(x).detach().min()) < 0


# -- in a model: conversion, every SAQ case, export ----------------------------------------------------------
def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 5))


def _trained(kind, mode="case3", strategy="full", steps=2):
    torch.manual_seed(0)
    m = saq.quantize(_model(), saq.QuantConfig(quantizer=kind, w_bits=3, a_bits=3))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    saq.calibrate(m, [x])
    opt = saq.SAQ(m, torch.optim.SGD(m.parameters(), lr=0.05), rho=0.1, mode=mode, strategy=strategy)
    for _ in range(steps):
        def closure():
            xb, yb = opt.pass_batch(x, y)
            loss = F.cross_entropy(m(xb), yb)
            loss.backward()
            return loss
        opt.step(closure)
        opt.zero_grad()
    return m.eval(), x


@pytest.mark.parametrize("kind", ["pact", "dorefa"])
@pytest.mark.parametrize("mode", ["sam", "case1", "case2", "case3"])
@pytest.mark.parametrize("strategy", ["full", "every_k", "prev_grad", "sub_batch"])
def test_every_saq_case_trains(kind, mode, strategy):
    m, x = _trained(kind, mode, strategy)
    assert all(layer.weight_quantizer.kind == kind for _, layer in saq.quant_layers(m))
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()


def test_pact_alpha_trains_and_dorefa_learns_no_scale():
    pact, _ = _trained("pact", steps=3)
    assert any(float(layer.act_quantizer.clip.detach()) != 1.0 for _, layer in saq.quant_layers(pact))
    dorefa, _ = _trained("dorefa", steps=3)
    assert all(float(q.clip) == 1.0 for _, layer in saq.quant_layers(dorefa)[1:]
               for q in (layer.weight_quantizer, layer.act_quantizer))


@pytest.mark.parametrize("kind", ["pact", "dorefa"])
def test_export_safetensors_round_trip_is_exact(tmp_path, kind):
    m, x = _trained(kind)
    with torch.no_grad():
        expected = m(x)
    saq.export(m, tmp_path / "m.safetensors")
    fresh = saq.quantize(_model(), saq.QuantConfig(quantizer="lsq"))
    saq.load_exported(tmp_path / "m.safetensors", fresh).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        for _, layer in saq.quant_layers(fresh):
            assert layer.weight_quantizer.kind == kind
            assert torch.equal(layer.quantized_weight(), layer.weight)  # on the grid: Q(w) = w


@pytest.mark.parametrize("kind", ["pact", "dorefa"])
@pytest.mark.parametrize("onnx_mode", ["compact", "fast"])
def test_export_onnx_runs_in_onnxruntime(tmp_path, kind, onnx_mode):
    pytest.importorskip("onnxruntime")
    from torchsaq.export.onnx import OnnxModel

    m, x = _trained(kind)
    with torch.no_grad():
        expected = m(x)
    saq.export(m, tmp_path / "m.onnx", example_inputs=(x,), onnx_mode=onnx_mode)
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx")(x), expected, rtol=1e-4, atol=1e-5)


def test_config_and_cli_accept_the_new_quantizers():
    from torchsaq.cli import build_parser, config_from_args

    for kind in ("pact", "dorefa"):
        args = build_parser().parse_args(["train", "--quantizer", kind])
        assert config_from_args(args).quant_config().quantizer == kind
        with pytest.raises(ValueError, match="weight_standardize"):
            saq.QuantConfig(quantizer=kind, weight_standardize=True)
