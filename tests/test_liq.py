"""The official code's LIQ_wn quantizer (QuantConfig(quantizer="liq")) against float64 references from
docs/method.md."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq.quant.quantizer import LIQActQuantizer, LIQWeightQuantizer

f64 = torch.float64


# -- references, written out from docs/method.md, "LIQ_wn" -------------------------------------------------
def ste_round(u):
    """round(u) forward, identity backward."""
    return u + (torch.round(u) - u).detach()


def ref_weight(w, c, k, standardize=True):
    """LIQ_wn weights: whole-tensor mean/std (detached), clamp(w_std/|c|, -1, 1), 2^k levels from -|c| to |c|.

    ``standardize=False``: the official code's Linear layer, the same without the standardisation.
    """
    if standardize:
        w = (w - w.detach().mean()) / w.detach().std()
    x = torch.clamp(w / c.abs(), -1, 1)
    n = 2**k - 1
    return (ste_round((x + 1) / 2 * n) / n * 2 - 1) * c.abs()


def ref_act(a, c, k, signed=False):
    """LIQ activations: round(clamp(a/|c|, 0, 1) * (2^k-1)) / (2^k-1) * |c|; signed: [-1, 1] and 2^(k-1)-1."""
    m = 2 ** (k - 1) - 1 if signed else 2**k - 1
    x = torch.clamp(a / c.abs(), -1 if signed else 0, 1)
    return ste_round(x * m) / m * c.abs()


def liq_w(bits, clip, w):
    q = LIQWeightQuantizer(bits).double().train()
    q(w.detach())  # initialisation (clip 1.0)
    with torch.no_grad():
        q.clip.fill_(clip)
    return q


def liq_a(bits, clip, a, signed=None):
    q = LIQActQuantizer(bits, signed=signed).double().train()
    q(a.detach())
    with torch.no_grad():
        q.clip.fill_(clip)
    return q


def away_from_ties(u):
    """Values whose fractional part is within 1e-4 of .5 moved off the tie (float32 vs float64 rounding)."""
    frac = u - torch.floor(u)
    return torch.where((frac - 0.5).abs() < 1e-4, u + 1e-3, u)


# -- weights -----------------------------------------------------------------------------------------------
def _against_reference(q, x, ref, clip, bits):
    """q(x) and its gradients w.r.t. x and the clip equal the float64 reference ``ref(x, c, bits)``; returns
    the upstream gradient used."""
    up = torch.randn_like(x)
    y = q(x)
    y.backward(up)
    c = torch.tensor(clip, dtype=f64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ry = ref(x_ref, c, bits)
    ry.backward(up)
    torch.testing.assert_close(y, ry, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.clip.grad, c.grad.reshape(1), rtol=1e-10, atol=1e-12)
    return up


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip", [0.7, -1.3])  # the clip is used as |c|
@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (7, 9)])
def test_weight_forward_and_grads_float64(bits, clip, shape):
    w = (torch.randn(shape, dtype=f64) * 0.1 + 0.02).requires_grad_()
    q = liq_w(bits, clip, w)
    up = _against_reference(q, w, ref_weight, clip, bits)
    # closed form of the clip gradient: inside d/dc [(r/n*2 - 1) c] with x = w_std/c is r/n*2 - 1 - x;
    # outside Q = +-c; times sign(clip)
    ws = (w.detach() - w.detach().mean()) / w.detach().std()
    x = ws / abs(clip)
    n = 2**bits - 1
    inside = x.abs() <= 1
    per = torch.where(inside, torch.round((x + 1) / 2 * n) / n * 2 - 1 - x, torch.sign(x))
    torch.testing.assert_close(q.clip.grad, (up * per).sum().reshape(1) * math.copysign(1, clip))
    assert inside.any() and (~inside).any()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weight_levels_symmetric_without_zero(bits):
    w = torch.randn(64, 32, dtype=f64)
    q = liq_w(bits, 0.9, w)
    levels = torch.unique(q(w).detach())
    assert levels.numel() == 2**bits
    assert not (levels == 0).any()
    torch.testing.assert_close(levels, -levels.flip(0), rtol=0, atol=1e-15)
    assert levels[0].item() == pytest.approx(-0.9) and levels[-1].item() == pytest.approx(0.9)
    codes = q.integer(w)
    assert codes.min() == 0 and codes.max() == 2**bits - 1
    assert torch.equal(q.dequantize(codes), q(w).detach())


def test_weight_statistics_are_detached():
    """d Q / d w is the straight-through 1/std inside the clip: no term through the mean or the std."""
    w = (torch.randn(8, 12, dtype=f64) * 0.3).requires_grad_()
    q = liq_w(3, 1.1, w)
    up = torch.randn(8, 12, dtype=f64)
    q(w).backward(up)
    std = w.detach().std()
    inside = ((w.detach() - w.detach().mean()) / std).abs() <= 1.1
    torch.testing.assert_close(w.grad, up * inside / std, rtol=0, atol=1e-12)
    # with the statistics in the graph the gradient would sum to ~0 along the tensor; here it does not
    in_graph = w.detach().clone().requires_grad_()
    wsg = (in_graph - in_graph.mean()) / in_graph.std()
    (torch.clamp(wsg / 1.1, -1, 1) * up).sum().backward()
    assert not torch.allclose(w.grad, in_graph.grad, atol=1e-6)


def test_linear_form_has_no_standardisation_and_clips_from_max():
    """The official QLinear: weights quantized as they are, clips starting at 0.8 * max|x| of the first data."""
    w = (torch.randn(5, 7, dtype=f64) * 0.2).requires_grad_()
    q = LIQWeightQuantizer(3, standardize=False).double().train()
    up = torch.randn(5, 7, dtype=f64)
    q(w).backward(up)
    assert q.clip.item() == pytest.approx(0.8 * w.detach().abs().max().item())
    c = torch.tensor(q.clip.item(), dtype=f64, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    ref_weight(w_ref, c, 3, standardize=False).backward(up)
    torch.testing.assert_close(q(w), ref_weight(w.detach(), c.detach(), 3, standardize=False), rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.clip.grad, c.grad.reshape(1), rtol=1e-10, atol=1e-12)
    a = torch.rand(4, 9, dtype=f64) * 3
    qa = LIQActQuantizer(4, init_fraction=0.8).double().train()
    qa(a)
    assert qa.clip.item() == pytest.approx(0.8 * a.max().item())


def test_weight_32_bits_is_not_quantized_nor_standardised():
    w = torch.randn(4, 3)
    assert LIQWeightQuantizer(32)(w) is w
    assert LIQActQuantizer(32)(w) is w


# -- activations -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("clip", [0.8, -2.0])
def test_act_forward_and_grads_float64(bits, clip):
    n = 2**bits - 1
    u = away_from_ties(torch.rand(4, 6, 5, dtype=f64) * 1.6 * n)  # a/|c| * n: inside and above the clip
    a = (u / n * abs(clip)).requires_grad_()
    q = liq_a(bits, clip, torch.rand(2, 3, dtype=f64))  # non-negative data: unsigned
    assert q.signed is False
    up = _against_reference(q, a, ref_act, clip, bits)
    # closed form: inside round(x n)/n - x, above 1 (Q = c), times sign(clip)
    x = a.detach() / abs(clip)
    per = torch.where(x <= 1, torch.round(x * n) / n - x, torch.ones_like(x))
    torch.testing.assert_close(q.clip.grad, (up * per).sum().reshape(1) * math.copysign(1, clip))
    assert (x > 1).any() and (x < 1).any()


def test_act_signed_inputs_get_the_symmetric_range():
    """Negative activations (a Transformer's) are not clipped to zero: signed decided from the data."""
    bits = 3
    a = away_from_ties(torch.randn(5, 40, dtype=f64) * 4) / 3  # a/c * m = a * 3
    q = liq_a(bits, 1.0, a)
    assert q.signed is True and q.code_range() == (-3, 3)
    y = q(a)
    torch.testing.assert_close(y, ref_act(a, torch.tensor(1.0, dtype=f64), bits, signed=True), rtol=0, atol=1e-12)
    levels = torch.unique(y)
    assert levels.numel() == 2**bits - 1 and (levels == 0).any() and (y < 0).any()
    torch.testing.assert_close(levels, -levels.flip(0))


def test_act_eval_before_init_raises_and_calibrate_inits():
    q = LIQActQuantizer(4).eval()
    with pytest.raises(saq.NotInitializedError):
        q(torch.rand(3))
    model = saq.quantize(nn.Sequential(nn.Conv1d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 3)),
                         saq.QuantConfig(quantizer="liq"))
    batches = [torch.randn(5, 2, 6), torch.randn(5, 2, 6) * 3]
    saq.calibrate(model, batches)
    conv, lin = model[0], model[3]
    assert all(q.is_initialized for q in (conv.weight_quantizer, conv.act_quantizer, lin.weight_quantizer,
                                          lin.act_quantizer))
    # convolutions (LIQ_wn): clips start at 1.0; Linear (the official QLinear): 0.8 * max|x| (batch mean)
    assert conv.weight_quantizer.clip.item() == 1.0
    # ... except the network input's (the first layer): max|x| (batch mean), so 8 bits cover the data
    assert conv.act_quantizer.clip.item() == pytest.approx(sum(b.abs().max().item() for b in batches) / 2, rel=1e-5)
    assert lin.weight_quantizer.clip.item() == pytest.approx(0.8 * lin.weight.abs().max().item())
    with torch.no_grad():
        maxes = [torch.relu(conv._conv_forward(b, conv.weight, conv.bias)).abs().max().item() for b in batches]
    assert lin.act_quantizer.clip.item() == pytest.approx(0.8 * sum(maxes) / 2, rel=1e-5)
    assert conv.act_quantizer.signed is True and lin.act_quantizer.signed is False
    assert conv.weight_quantizer.standardize and not lin.weight_quantizer.standardize


# -- layers, config --------------------------------------------------------------------------------------
def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def liq_model(w_bits=2, a_bits=2, first_last_bits=8, steps=2):
    torch.manual_seed(0)
    model = saq.quantize(cnn(), saq.QuantConfig(w_bits=w_bits, a_bits=a_bits, first_last_bits=first_last_bits,
                                                quantizer="liq")).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):  # clips move away from 1.0
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(6, 3, 8, 8)), torch.randint(0, 5, (6,))).backward()
        opt.step()
    return model


def test_layer_computes_with_standardised_q_and_first_last_at_8_bits():
    model = liq_model()
    layers = dict(saq.quant_layers(model))
    assert [(m.w_bits, m.a_bits) for m in layers.values()] == [(8, 8), (2, 2), (8, 8)]
    assert all(m.weight_quantizer.clip.item() != 1.0 for m in layers.values())
    mid = layers["3"]
    x = torch.relu(torch.randn(2, 8, 8, 8))
    with torch.no_grad():
        out = mid(x)
        c = mid.weight_quantizer.clip.double()
        wq = ref_weight(mid.weight.double(), c, 2).float()
        xq = ref_act(x.double(), mid.act_quantizer.clip.double(), 2).float()
        torch.testing.assert_close(out, F.conv2d(xq, wq, None, padding=1), rtol=1e-5, atol=1e-5)
    assert torch.unique(mid.quantized_weight().detach()).numel() == 4
    assert torch.unique(layers["0"].quantized_weight().detach()).numel() <= 256
    assert "quantizer=liq" in repr(mid)


def one_linear():
    """A converted Linear(6, 4), traced (first and last layer: 3 bits) and initialised."""
    model = saq.quantize(nn.Sequential(nn.Linear(6, 4)), saq.QuantConfig(quantizer="liq", first_last_bits=3)).train()
    model(torch.rand(2, 6))
    assert model[0].w_bits == 3
    return model


def test_capture_qweight_and_its_gradient():
    model = one_linear()
    lin = model[0]
    x = torch.rand(5, 6)
    lin.capture_qweight = True
    up = torch.randn(5, 4)
    (model(x) * up).sum().backward()
    with torch.no_grad():
        expected = ref_weight(lin.weight.double(), lin.weight_quantizer.clip.double(), 3, standardize=False)
        torch.testing.assert_close(lin.qweight, expected.float())
        torch.testing.assert_close(lin.qweight_grad, up.t() @ lin.act_quantizer(x))


def test_case2_standardises_the_perturbed_weight():
    model = saq.quantize(nn.Sequential(nn.Conv1d(2, 4, 3)), saq.QuantConfig(quantizer="liq", first_last_bits=3))
    model.train()(torch.randn(2, 2, 5))
    conv = model[0]
    e = torch.randn(4, 2, 3) * 0.05
    conv.perturb_pre = e
    with torch.no_grad():
        expected = ref_weight((conv.weight + e).double(), conv.weight_quantizer.clip.double(), 3).float()
        torch.testing.assert_close(conv.quantized_weight(), expected)


def test_config_options():
    with pytest.raises(ValueError, match="weight_standardize"):
        saq.QuantConfig(quantizer="liq", weight_standardize=True)
    with pytest.raises(ValueError, match="quantizer"):
        saq.QuantConfig(quantizer="apot")
    cfg = saq.TrainConfig(quantizer="liq")
    assert cfg.quant_config().quantizer == "liq"
    with pytest.raises(ValueError, match="weight_standardize"):
        saq.TrainConfig(quantizer="liq", weight_standardize=True)
    assert saq.QuantConfig.from_dict(saq.QuantConfig(quantizer="liq").to_dict()).quantizer == "liq"
    from torchsaq.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--quantizer", "liq", "--act-grad-scale", "batch"])
    qc = config_from_args(args).quant_config()
    assert (qc.quantizer, qc.act_grad_scale) == ("liq", "batch")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--quantizer", "apot"])


# -- SAQ ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["case1", "case2", "case3"])
def test_saq_step_perturbs_the_liq_layers(mode):
    model = liq_model(steps=0)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    saq.calibrate(model, [x])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    rho = 0.1
    layers = [m for _, m in saq.quant_layers(model)]
    seen = []

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        attr = "perturb_pre" if mode == "case2" else "perturb_post"
        seen.append([getattr(m, attr) for m in layers])
        return loss

    # the reference direction: the gradient w.r.t. Q(w) (case 3) or w (cases 1, 2) at the unperturbed point
    for m in layers:
        m.capture_qweight = True
    F.cross_entropy(model(x), y).backward()
    g = [m.qweight_grad if mode == "case3" else m.weight.grad for m in layers]
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
    e_ref = [rho * t / norm for t in g]
    model.zero_grad()
    for m in layers:
        m.capture_qweight = False
        m.zero_qweight_grad()

    opt = saq.SAQ(model, torch.optim.SGD(model.parameters(), lr=0.05), rho=rho, mode=mode, perturb_unquantized=False)
    opt.step(closure)
    assert len(seen) == 2 and all(e is None for e in seen[0])
    for e, r in zip(seen[1], e_ref):
        torch.testing.assert_close(e, r, rtol=1e-4, atol=1e-7)
    assert all(m.perturb_pre is None and m.perturb_post is None for m in layers)
    assert any(not torch.equal(p.detach(), before[k]) for k, p in model.named_parameters() if k.endswith(".clip"))
    assert all(not torch.equal(m.weight.detach(), before[f"{n}.weight"]) for n, m in saq.quant_layers(model))


# -- export, summary, analysis ------------------------------------------------------------------------------
@pytest.mark.parametrize("w_bits", [2, 3, 4])
@pytest.mark.parametrize("into", ["liq", "lsq"])
def test_export_round_trip_is_exact(tmp_path, w_bits, into):
    model = liq_model(w_bits=w_bits, a_bits=3).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        qweights = {n: m.quantized_weight() for n, m in saq.quant_layers(model)}
    path = tmp_path / "liq.safetensors"
    saq.export(model, path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    layers = json.loads(header["__metadata__"]["layers"])
    assert all(info["quantizer"] == "liq" for info in layers.values())
    assert [info["weight_standardized"] for info in layers.values()] == [True, True, False]  # the fc: Linear
    mid = layers["3"]
    w = model[3].weight.detach()
    assert mid["w_mean"] == pytest.approx(w.mean().item()) and mid["w_std"] == pytest.approx(w.std().item())
    assert header["3.weight_codes"]["dtype"] == "U8"
    assert "3.weight_quantizer.clip" in header and "3.act_quantizer.clip" in header

    torch.manual_seed(99)
    fresh = saq.quantize(cnn(), saq.QuantConfig(quantizer=into, w_bits=8, a_bits=8))
    saq.load_exported(path, fresh).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        for name, layer in saq.quant_layers(fresh):
            assert layer.weight_quantizer.kind == "liq" and layer.act_quantizer.kind == "liq"
            assert torch.equal(layer.quantized_weight(), layer.weight)  # on the grid: Q(w) = w
            assert torch.equal(layer.weight, qweights[name])
    assert torch.unique(fresh[3].weight).numel() == 2**w_bits


def test_summary_reports_liq(tmp_path):
    model = liq_model()
    s = saq.summary(model, example_inputs=torch.randn(1, 3, 8, 8))
    rows = {r.name: r for r in s.rows}
    mid = model[3]
    assert rows["3"].quantizer == "liq" and not rows["3"].per_channel
    assert rows["3"].w_step_mean == pytest.approx(2 * abs(mid.weight_quantizer.clip.item()) / 3)
    assert rows["3"].a_step == pytest.approx(abs(mid.act_quantizer.clip.item()) / 3)
    assert " liq " in str(s)
    bits = {id(m.weight): m.w_bits for _, m in saq.quant_layers(model)}  # other params (6 clips too) at 32
    assert sum(1 for n, _ in model.named_parameters() if n.endswith(".clip")) == 6
    assert s.size_bits == sum(p.numel() * bits.get(id(p), 32) for p in model.parameters())


@pytest.mark.parametrize("wrt", ["quantized", "latent"])
def test_sharpness_measures_run_with_liq(wrt):
    model = liq_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,)))]
    crit = nn.CrossEntropyLoss()
    from torchsaq import analysis

    lam = analysis.hessian_top_eigenvalue(model, crit, batches, iters=3, wrt=wrt)
    tr = analysis.hessian_trace(model, crit, batches, samples=2, wrt=wrt)
    sh = analysis.sam_sharpness(model, crit, batches, rho=0.05, steps=2, wrt=wrt)
    assert all(math.isfinite(v) for v in (lam, tr, sh)) and sh >= 0
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k]), k


def test_liq_first_layer_input_clip_covers_the_data():
    """LIQ's fixed 1.0 clip would cut normalised inputs; the first layer's starts at max|x| (8-bit there)."""
    import torchsaq as saq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    saq.quantize(model, saq.QuantConfig(w_bits=2, a_bits=2, quantizer="liq"))
    x = 3.0 * torch.randn(5, 1, 8, 8)
    saq.calibrate(model, [x])
    first, middle = model[0].act_quantizer, model[2].act_quantizer
    assert first.bits == 8 and torch.allclose(first.clip.abs(), x.abs().max().reshape(1))  # one batch
    assert middle.clip.item() == 1.0  # the official LIQ_wn start everywhere else
