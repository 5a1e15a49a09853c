"""Weight-only (``a_bits=None``) and group-wise LSQ (``group_size``): a float64 reference written out here, integer
codes, per-channel as one group per row, every SAQ mode and strategy on group-quantized weights, export and
checkpoint round trips."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq.export.safetensors import load_exported
from torchsaq.optim.saq import SAQ
from torchsaq.quant.convert import QuantConfig
from torchsaq.quant.quantizer import LSQQuantizer


def ref_group_lsq(w, s, group, bits, upstream):
    """Group-wise LSQ in float64: w [out, in], s [out, in/G]; returns (forward, dL/dw, dL/ds).

    v = w/s per group; forward round(clamp(v, Qn, Qp)) * s; dL/dw = upstream where Qn <= v <= Qp (straight
    through), else 0; dL/ds = sum over the group of upstream * (round(v) - v inside, Qn / Qp where clipped),
    times 1/sqrt(G * Qp)."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out, n = w.shape
    wg = w.reshape(out, n // group, group)
    ug = upstream.reshape(out, n // group, group)
    sg = s.unsqueeze(-1)
    v = wg / sg
    inside = (v >= qn) & (v <= qp)
    y = torch.round(torch.clamp(v, qn, qp)) * sg
    gw = torch.where(inside, ug, torch.zeros_like(ug))
    term = torch.where(inside, torch.round(v) - v, torch.clamp(v, qn, qp))
    gs = (ug * term).sum(-1) / math.sqrt(group * qp)
    return y.reshape(out, n), gw.reshape(out, n), gs


def _grouped_quantizer(out, n, group, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = LSQQuantizer(bits, signed=True, channel_dim=0, num_channels=out, group_size=group).double()
    q.bind(torch.Size([out, n]), "layer")
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    q.train()
    q(w)  # initialises the steps from w
    with torch.no_grad():
        q.step.mul_(0.6 + 0.8 * torch.rand(q.step.shape, generator=g, dtype=torch.float64))  # some clipping
    return q, w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [4, 8, 24])
def test_group_lsq_forward_and_grads_match_float64_reference(bits, group):
    q, w = _grouped_quantizer(6, 48, group, bits)
    assert q.step.shape == (6, 48 // group)
    up = torch.randn(6, 48, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    wr = w.clone().requires_grad_()
    y = q(wr)
    y.backward(up)
    ry, rgw, rgs = ref_group_lsq(w, q.step.detach(), group, bits, up)
    torch.testing.assert_close(y.detach(), ry, rtol=0, atol=1e-12)
    torch.testing.assert_close(wr.grad, rgw, rtol=0, atol=0)
    torch.testing.assert_close(q.step.grad, rgs, rtol=1e-10, atol=1e-12)


def test_group_step_init_is_lsq_rule_per_group():
    q = LSQQuantizer(4, signed=True, channel_dim=0, num_channels=3, group_size=5)
    q.bind(torch.Size([3, 10]), "layer")
    w = torch.randn(3, 10)
    q.train()
    q(w)
    want = 2 * w.reshape(3, 2, 5).abs().mean(-1) / math.sqrt(7)
    torch.testing.assert_close(q.step.detach(), want)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_integer_codes_are_bit_exact(bits):
    q, w = _grouped_quantizer(5, 32, 8, bits)
    q = q.float()
    w = w.float()
    q.eval()
    codes = q.integer(w)
    lo, hi = q.code_range()
    assert torch.equal(codes, codes.round()) and int(codes.min()) >= lo and int(codes.max()) <= hi
    assert torch.equal(q.dequantize(codes), q(w))
    (form,) = q.affine(codes)
    assert form.block_size == 8 and form.axis == 0 and form.scale.shape == (5, 4)
    deq = (form.ints.reshape(5, 4, 8) - form.zero_point) * form.scale.unsqueeze(-1)
    assert torch.equal(deq.reshape(5, 32), q(w))


def _mlp(group_size=None, per_channel=True, a_bits=None, seed=0, first_last_bits=8, a_mode="static"):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))
    cfg = QuantConfig(w_bits=3, a_bits=a_bits, group_size=group_size, per_channel=per_channel,
                      first_last_bits=first_last_bits, a_mode=a_mode)
    return saq.quantize(m, cfg, example_inputs=torch.randn(2, 16))


def test_per_channel_equals_group_size_in_features():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for group in (None, "row"):
        m = _mlp(seed=3, first_last_bits=3)
        if group == "row":  # group = each layer's in_features, set per layer
            for _, layer in saq.quant_layers(m):
                layer.weight_quantizer.group_size = layer.in_features
                layer.weight_quantizer.bind(layer.weight.shape, "layer")
        m.train()
        y = m(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([(q.weight.grad.clone(), q.weight_quantizer.step.grad.reshape(-1).clone())
                      for _, q in saq.quant_layers(m)])
    assert torch.equal(outs[0], outs[1])
    for (gw0, gs0), (gw1, gs1) in zip(*grads):
        assert torch.equal(gw0, gw1) and torch.equal(gs0, gs1)


def test_per_channel_equals_group_size_through_quant_config():
    m0 = nn.Sequential(nn.Linear(16, 4))
    torch.manual_seed(0)
    nn.init.normal_(m0[0].weight)
    m1 = nn.Sequential(nn.Linear(16, 4))
    m1.load_state_dict(m0.state_dict())
    x = torch.randn(3, 16)
    saq.quantize(m0, QuantConfig(w_bits=4, a_bits=None, first_last_bits=4))
    saq.quantize(m1, QuantConfig(w_bits=4, a_bits=None, first_last_bits=4, group_size=16))
    y0, y1 = m0(x), m1(x)
    assert torch.equal(y0, y1)
    y0.sum().backward()
    y1.sum().backward()
    assert torch.equal(m0[0].weight_quantizer.step.grad, m1[0].weight_quantizer.step.grad.reshape(-1))


def test_indivisible_row_is_refused_naming_the_layer():
    m = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 12), nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"group_size 8 does not divide the 12 input elements per output of layer 2"):
        saq.quantize(m, QuantConfig(group_size=8))
    assert type(m[0]) is nn.Linear  # all or nothing
    saq.quantize(m, QuantConfig(group_size=8, exclude=("2",)))


def test_config_checks():
    with pytest.raises(ValueError, match="LSQ option"):
        QuantConfig(quantizer="liq", group_size=8)
    with pytest.raises(ValueError, match="per_channel"):
        QuantConfig(per_channel=False, group_size=8)
    with pytest.raises(ValueError, match="positive int"):
        QuantConfig(group_size=0)
    with pytest.raises(ValueError):
        QuantConfig(a_bits=1)


def test_conv_groups_over_flattened_in_kh_kw():
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))  # rows of 18 and 36 elements
    saq.quantize(conv, QuantConfig(group_size=9, a_bits=None))
    assert conv[0].weight_quantizer.step.shape == (4, 2) and conv[2].weight_quantizer.step.shape == (4, 4)
    conv(torch.randn(2, 2, 8, 8)).sum().backward()
    assert conv[2].weight_quantizer.step.grad.shape == (4, 4)


def test_weight_only_layers_keep_float_inputs_and_report_it():
    m = _mlp(group_size=8)
    m.train()
    m(torch.randn(4, 16))
    rows = saq.summary(m).rows
    assert [r.a_bits for r in rows] == [32, 32, 32]
    assert [r.w_bits for r in rows] == [8, 3, 8]
    assert all(r.group_size == 8 for r in rows)
    assert "g8" in str(saq.summary(m))
    for _, layer in saq.quant_layers(m):
        assert not layer.act_quantizer.enabled and not layer.act_quantizer.is_initialized
    assert QuantConfig.from_dict(QuantConfig(a_bits=None, group_size=8).to_dict()) == QuantConfig(a_bits=None,
                                                                                                  group_size=8)


# ------------------------------------------------------------------------- SAQ on group-quantized weights
def _clean(model):
    """Q(w) of every quantized layer at its current (unperturbed) latent weights."""
    with torch.no_grad():
        return {name: layer.weight_quantizer(layer.weight).clone() for name, layer in saq.quant_layers(model)}


def _closure(model, x, y, opt, record, clean, sub_batch=False):
    """Records, per pass, (the weight each grouped layer computes with, Q(w) before the step, perturb_post)."""
    def closure():
        xb, yb = opt.pass_batch(x, y) if sub_batch else (x, y)
        rec = {}
        for name, layer in saq.quant_layers(model):
            with torch.no_grad():
                rec[name] = (layer.quantized_weight().clone(), clean[name],
                             None if layer.perturb_post is None else layer.perturb_post.clone())
        record.append(rec)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss.detach()
    return closure


@pytest.mark.parametrize("acts", ["weight_only", "8da4w"])  # 8da4w: int8 per-token dynamic inputs (test_8da4w.py)
@pytest.mark.parametrize("strategy,kw", [("full", {}), ("every_k", {"k": 2}), ("prev_grad", {}),
                                         ("sub_batch", {"fraction": 0.5})])
@pytest.mark.parametrize("mode", ["sam", "case1", "case2", "case3"])
def test_every_mode_and_strategy_perturbs_group_quantized_weights(mode, strategy, kw, acts):
    model = _mlp(group_size=8) if acts == "weight_only" else _mlp(group_size=8, a_bits=8, a_mode="dynamic_token")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    model.train()
    model(x)  # initialise the steps
    opt = SAQ(model, torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.5, mode=mode, strategy=strategy, **kw)
    record: list = []
    losses = []
    for _ in range(4):
        closure = _closure(model, x, y, opt, record, _clean(model), sub_batch=strategy == "sub_batch")
        losses.append(float(opt.step(closure)))
        opt.zero_grad()
    assert all(math.isfinite(v) for v in losses)
    # some pass computed with group-quantized weights other than Q(w) at the step's latent weights: the
    # perturbation (of the quantized weights, or of the latent weights before their group-wise rounding) reached
    # every grouped layer
    for name in record[0]:
        assert any(not torch.equal(rec[name][0], rec[name][1]) for rec in record), name
    if mode in ("case1", "case3"):
        posts = [p for rec in record for _, _, p in rec.values() if p is not None]
        assert posts and any(float(p.abs().sum()) > 0 for p in posts)


def test_case3_perturbation_follows_the_grouped_weights_gradient():
    """case 3: e = rho * dL/dQ(w) / ||g|| on each layer, dL/dQ(w) of the group-quantized weight computed here by
    hand."""
    mode = "case3"
    rho = 0.2
    model = _mlp(group_size=8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    model.train()
    model(x)
    layers = [layer for _, layer in saq.quant_layers(model)]
    # by hand: dL/dQ(w) and dL/dw at the unperturbed point
    qws = [layer.weight_quantizer(layer.weight).detach().requires_grad_() for layer in layers]
    h = x
    for i, (layer, qw) in enumerate(zip(layers, qws)):
        h = F.linear(h, qw, layer.bias)
        if i < 2:
            h = F.relu(h)
    F.cross_entropy(h, y).backward()
    opt = SAQ(model, torch.optim.SGD(model.parameters(), lr=0.0), rho=rho, mode=mode)
    record: list = []
    opt.step(_closure(model, x, y, opt, record, _clean(model)))
    second = record[1]
    for (name, layer), qw in zip(saq.quant_layers(model), qws):
        e = second[name][2]
        assert e is not None
        cos = F.cosine_similarity(e.reshape(-1).double(), qw.grad.reshape(-1).double(), dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------- export and checkpoints
def test_safetensors_round_trip_is_bit_exact(tmp_path):
    model = _mlp(group_size=8, seed=1)
    x = torch.randn(5, 16)
    model.train()
    model(x)
    opt = SAQ(model, torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1, mode="case3")
    y = torch.randint(0, 3, (5,))
    opt.step(lambda: F.cross_entropy(model(x), y).backward() or F.cross_entropy(model(x), y).detach())
    model.eval()
    want = model(x)
    path = tmp_path / "m.safetensors"
    saq.export(model, path)
    fresh = _mlp(seed=9)  # per-channel: the file's groups win
    load_exported(path, fresh)
    fresh.eval()
    assert torch.equal(fresh(x), want)
    for (_, a), (_, b) in zip(saq.quant_layers(model), saq.quant_layers(fresh)):
        assert b.weight_quantizer.group_size == 8 and torch.equal(a.weight_quantizer.step, b.weight_quantizer.step)
    same = _mlp(group_size=8, seed=9)
    load_exported(path, same)
    same.eval()
    assert torch.equal(same(x), want)


def test_state_dict_checkpoint_round_trip(tmp_path):
    model = _mlp(group_size=8, seed=2)
    x = torch.randn(5, 16)
    model.train()
    model(x)
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    fresh = _mlp(group_size=8, seed=7)
    fresh.load_state_dict(torch.load(tmp_path / "ck.pt"))
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(x), model(x))


def test_train_with_group_size_and_weight_only_checkpoint(tmp_path):
    pytest.importorskip("mnist1d")
    from torchsaq.train.checkpoint import load_model
    from torchsaq.train.config import TrainConfig, parse_field
    from torchsaq.train.runner import train

    assert parse_field("a_bits", "none") is None
    cfg = TrainConfig(dataset="mnist1d", epochs=1, batch_size=32, limit_train_batches=3, limit_eval_batches=2,
                      a_bits=None, group_size=8, exclude=["features.0"], output=str(tmp_path / "run"))
    assert cfg.quant_config() == QuantConfig(w_bits=4, a_bits=None, group_size=8, exclude=("features.0",))
    result = train(cfg, progress=False)
    model, _, _ = load_model(result["checkpoint"])
    layers = saq.quant_layers(model)
    assert all(layer.weight_quantizer.group_size == 8 and not layer.act_quantizer.enabled for _, layer in layers)
