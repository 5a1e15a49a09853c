"""lsq / LSQQuantizer against an independent float64 reference written out from docs/method.md."""
import math

import pytest
import torch
from torch import nn

import torchsaq as saq
from torchsaq.quant.quantizer import LSQQuantizer, NotInitializedError, lsq


def ref_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def ref_lsq(x, s, bits, signed, upstream):
    """Forward value, grad_x and grad_s of LSQ, elementwise from docs/method.md, in float64."""
    x, s, upstream = x.double(), s.double(), upstream.double()
    qn, qp = ref_range(bits, signed)
    v = x / s
    inside = (v >= qn) & (v <= qp)
    y = torch.round(torch.clamp(v, qn, qp)) * s
    grad_x = upstream * inside
    below = torch.full_like(v, float(qn))
    above = torch.full_like(v, float(qp))
    per_elem = torch.where(inside, torch.round(v) - v, torch.where(v < qn, below, above))
    n_per_step = x.numel() // s.numel()
    g = 1.0 / math.sqrt(n_per_step * qp)
    contrib = upstream * per_elem * g
    # sum every element that shares a step: the step's broadcast dims (and the leading dims it lacks)
    lead = x.dim() - s.dim()
    dims = list(range(lead)) + [lead + i for i, n in enumerate(s.shape) if n == 1]
    grad_s = contrib.sum(dim=dims).reshape(s.shape) if dims else contrib
    return y, grad_x, grad_s


def away_from_ties(x, s):
    """Nudge values whose x/s is within 1e-3 of a .5 tie, so float32 and float64 round alike."""
    v = x / s
    frac = v - torch.floor(v)
    bad = (frac - 0.5).abs() < 1e-3
    return torch.where(bad, x + 0.01 * s, x)


STEP_SHAPES = {
    "per_tensor_scalar": ((6, 5, 3, 3), ()),
    "per_tensor_1": ((6, 5, 3, 3), (1,)),
    "per_channel_w": ((6, 5, 3, 3), (6, 1, 1, 1)),
    "per_channel_act_nchw": ((4, 6, 5, 5), (6, 1, 1)),  # step with fewer dims than x
    "per_channel_2d": ((7, 9), (7, 1)),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("case", list(STEP_SHAPES))
def test_lsq_forward_and_both_grads_float64(bits, signed, case):
    xshape, sshape = STEP_SHAPES[case]
    s = (torch.rand(sshape, dtype=torch.float64) * 0.4 + 0.05).requires_grad_()
    qmax = max(-ref_range(bits, signed)[0], ref_range(bits, signed)[1])
    # x/s ~ N(0, (0.7 max(|Qn|, Qp))^2): values inside the range and clipped on both sides
    x = (torch.randn(xshape, dtype=torch.float64) * s.detach() * 0.7 * qmax).requires_grad_()
    up = torch.randn(xshape, dtype=torch.float64)
    y = lsq(x, s, bits, signed)
    y.backward(up)
    ry, rgx, rgs = ref_lsq(x.detach(), s.detach(), bits, signed, up)
    assert s.grad.shape == s.shape
    torch.testing.assert_close(y, ry, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, rgx, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, rgs, rtol=1e-10, atol=1e-12)
    # both sides of the range and the inside must occur for the test to mean something
    v = x.detach() / s.detach()
    qn, qp = ref_range(bits, signed)
    assert (v > qp).any() and ((v < qn).any() or not signed) and ((v > qn) & (v < qp)).any()


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_float32_matches_reference(bits):
    s = torch.rand(8, 1) * 0.3 + 0.05
    x = away_from_ties(torch.randn(8, 50), s).requires_grad_()
    s.requires_grad_()
    up = torch.randn(8, 50)
    lsq(x, s, bits, True).backward(up)
    ry, rgx, rgs = ref_lsq(x.detach(), s.detach(), bits, True, up)
    torch.testing.assert_close(lsq(x, s, bits, True).double(), ry, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), rgx)
    torch.testing.assert_close(s.grad.double(), rgs, rtol=1e-4, atol=1e-6)


def test_lsq_explicit_grad_scale():
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    lsq(x, s, 3, True, grad_scale=0.5).sum().backward()
    _, _, rgs = ref_lsq(x.detach(), s.detach(), 3, True, torch.ones(20, dtype=torch.float64))
    g_default = 1.0 / math.sqrt(20 * 3)
    torch.testing.assert_close(s.grad, rgs / g_default * 0.5)


@pytest.mark.parametrize("signed", [True, False])
def test_grad_s_fully_clipped_equals_finite_difference(signed):
    """Where every x/s is clipped, Q(x) = bound * s is linear in s: the central difference is exact."""
    bits = 3
    qn, qp = ref_range(bits, signed)
    x = torch.cat([torch.rand(30, dtype=torch.float64) * 5 + 10,
                   -(torch.rand(30, dtype=torch.float64) * 5 + 10)])
    w = torch.randn(60, dtype=torch.float64)
    s0 = 0.5  # |x/s| >= 20 > qp + 1 everywhere

    def loss(s):
        return (w * lsq(x, s, bits, signed, grad_scale=1.0)).sum()

    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    loss(s).backward()
    h = 1e-4
    fd = (loss(torch.tensor(s0 + h, dtype=torch.float64)) - loss(torch.tensor(s0 - h, dtype=torch.float64))) / (2 * h)
    torch.testing.assert_close(s.grad, fd, rtol=1e-9, atol=1e-9)
    expected = (w * torch.where(x > 0, float(qp), float(qn))).sum()
    torch.testing.assert_close(s.grad, expected)


def test_grad_s_inside_is_true_derivative_minus_v():
    """With no rounding flip, d/ds round(x/s)*s = round(x/s) (finite difference); LSQ's STE adds -x/s."""
    s0 = 0.25
    x = away_from_ties(torch.randn(40, dtype=torch.float64) * 0.5, torch.tensor(s0, dtype=torch.float64))
    w = torch.randn(40, dtype=torch.float64)
    bits = 8

    def loss(s):
        return (w * lsq(x, s, bits, True, grad_scale=1.0)).sum()

    h = 1e-9  # far too small to move any x/s across a rounding boundary
    fd = (loss(torch.tensor(s0 + h, dtype=torch.float64)) - loss(torch.tensor(s0 - h, dtype=torch.float64))) / (2 * h)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    loss(s).backward()
    assert ((x / s0).abs() < 127).all()
    torch.testing.assert_close(s.grad, fd - (w * x / s0).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_gradcheck_scaled_input(signed):
    """Q(s*u; s) = round(clamp(u)) * s is linear in s, so STE grad_x*u + grad_s equals its derivative."""
    u = torch.randn(3, 12, dtype=torch.float64) * 6
    u = torch.where((u - u.floor() - 0.5).abs() < 1e-3, u + 0.01, u)

    def f(s):
        return lsq(s * u, s, 3, signed, grad_scale=1.0)

    s = torch.tensor([[0.3], [0.7], [1.1]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (s,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_double_backward_gradgradcheck(per_channel):
    """Differentiating the backward (create_graph=True, as Hessian-vector products do) against finite differences
    of the backward: the fast backward overwrites its buffers, this path must not."""
    x = torch.randn(3, 12, dtype=torch.float64) * 2
    s = torch.tensor([[0.3], [0.7], [1.1]] if per_channel else [0.5], dtype=torch.float64)
    v = x / s
    x = torch.where((v - v.floor() - 0.5).abs() < 1e-2, x + 0.05 * s, x)  # away from ties and bounds
    x, s = x.requires_grad_(), s.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: lsq(a, b, 3, True, grad_scale=0.7), (x, s), eps=1e-7,
                                        atol=1e-6)
    # and the Hessian-vector product w.r.t. x through the STE is exactly zero (the STE is piecewise linear)
    g, = torch.autograd.grad(lsq(x, s, 3, True).pow(2).sum(), x, create_graph=True)
    hv, = torch.autograd.grad((g * torch.ones_like(g)).sum(), x)
    inside = ((x / s >= -4) & (x / s <= 3)).double()
    torch.testing.assert_close(hv, 2 * inside)


def test_bits_32_returns_input():
    x = torch.randn(5)
    assert lsq(x, torch.tensor(0.1), 32, True) is x


@pytest.mark.parametrize("bits", [0, 1, 33, True, 4.0, -4])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        lsq(torch.randn(4), torch.tensor(0.1), bits, True)


@pytest.mark.parametrize("step", [0.0, -0.1])
def test_non_positive_step(step):
    with pytest.raises(ValueError, match="positive"):
        lsq(torch.randn(4), torch.tensor(step), 4, True)
    with pytest.raises(ValueError, match="positive"):
        lsq(torch.randn(2, 3), torch.tensor([[0.1], [step]]), 4, True)


@pytest.mark.parametrize("shape", [(4,), (3, 1, 1), (2, 3, 1), (1, 2, 3, 4)])
def test_step_shape_must_broadcast(shape):
    with pytest.raises(ValueError, match="broadcast"):
        lsq(torch.randn(2, 3), torch.full(shape, 0.1), 4, True)


def test_qrange():
    assert saq.qrange(4, True) == (-8, 7) and saq.qrange(4, False) == (0, 15)
    assert saq.qrange(2, True) == (-2, 1) and saq.qrange(8, False) == (0, 255)


# -- LSQQuantizer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_quantizer_init_rule_per_channel(bits):
    w = torch.randn(5, 3, 3, 3)
    q = LSQQuantizer(bits, signed=True, channel_dim=0, num_channels=5).train()
    out = q(w)
    qp = 2 ** (bits - 1) - 1
    wd = w.double()
    expected = torch.tensor([2 * wd[c].abs().sum().item() / wd[c].numel() / math.sqrt(qp) for c in range(5)],
                            dtype=torch.float64)
    torch.testing.assert_close(q.step.detach().double(), expected, rtol=1e-6, atol=0)
    assert q.is_initialized and bool(q.initialized)
    ry, _, _ = ref_lsq(w, expected.view(5, 1, 1, 1), bits, True, torch.ones_like(w))
    torch.testing.assert_close(out.double(), ry, rtol=1e-5, atol=1e-6)


def test_quantizer_signed_auto_detection_and_init():
    relu_like = torch.rand(4, 10) * 3
    q = LSQQuantizer(4).train()
    q(relu_like)
    assert q.signed is False and int(q.is_signed) == 0
    torch.testing.assert_close(q.step.double(),
                               torch.tensor([2 * relu_like.double().abs().mean().item() / math.sqrt(15)],
                                            dtype=torch.float64),
                               rtol=1e-6, atol=0)
    q2 = LSQQuantizer(4).train()
    x = torch.randn(4, 10)
    q2(x)
    assert q2.signed is True and int(q2.is_signed) == 1
    torch.testing.assert_close(q2.step.double(),
                               torch.tensor([2 * x.double().abs().mean().item() / math.sqrt(7)], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    # negative values are inside the signed range, not clipped to zero
    assert (q2(x) < 0).any()


def test_quantizer_eval_before_init_raises():
    q = LSQQuantizer(4).eval()
    with pytest.raises(NotInitializedError):
        q(torch.randn(3))


def test_quantizer_grad_scale_uses_elements_per_channel():
    w = torch.randn(4, 6, dtype=torch.float64)
    q = LSQQuantizer(3, signed=True, channel_dim=0, num_channels=4).double().train()
    q(w)  # init
    q.step.grad = None
    up = torch.randn(4, 6, dtype=torch.float64)
    q(w).backward(up)
    _, _, rgs = ref_lsq(w, q.step.detach().view(4, 1), 3, True, up)  # N = 6 elements per step
    torch.testing.assert_close(q.step.grad, rgs.view(4))


def test_quantizer_integer_codes():
    x = torch.randn(3, 8)
    q = LSQQuantizer(3, signed=True, channel_dim=0, num_channels=3).train()
    y = q(x)
    codes = q.integer(x)
    assert codes.min() >= -4 and codes.max() <= 3
    assert torch.equal(codes, codes.round())
    torch.testing.assert_close(codes * q.step.detach().view(3, 1), y.detach(), rtol=0, atol=0)


def test_float_state_dict_loads_strictly_into_converted_model():
    float_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    saq.quantize(model)
    result = model.load_state_dict(float_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model[0].weight, float_model[0].weight)
    assert not model[0].weight_quantizer.is_initialized


def test_quantizer_state_dict_round_trip_restores_flags():
    q = LSQQuantizer(4, channel_dim=0, num_channels=3).train()
    q(torch.randn(3, 5))
    q2 = LSQQuantizer(4, channel_dim=0, num_channels=3)
    q2.load_state_dict(q.state_dict())
    assert q2.is_initialized and q2.signed is True
    q2.eval()
    x = torch.randn(3, 5)
    torch.testing.assert_close(q2(x), q.eval()(x))


def test_infinite_inputs_clip_with_finite_gradients():
    """An overflowed activation (inf) is clipped: no gradient to x, the bound times g to the step."""
    x = torch.tensor([float("inf"), -float("inf"), 0.3], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = lsq(x, s, 4, True, grad_scale=1.0)
    y.backward(torch.ones(3))
    torch.testing.assert_close(y.detach(), torch.tensor([0.7, -0.8, 0.3]))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 1.0]))
    assert torch.isfinite(s.grad) and s.grad.item() == pytest.approx(7 - 8 + (3 - 0.3 / 0.1), abs=1e-5)


# -- LSQ's activation step-gradient scale: N counts one sample ---------------------------------------------
def step_grad_sum(x, s, bits, signed, upstream=None):
    """LSQ's unscaled step gradient (round(v) - v inside, Qn/Qp outside, times upstream) summed, float64."""
    up = torch.ones_like(x, dtype=torch.float64) if upstream is None else upstream
    _, _, g = ref_lsq(x, torch.tensor(s, dtype=torch.float64), bits, signed, up)
    return float(g) * math.sqrt(x.numel() * ref_range(bits, signed)[1])  # undo the reference's 1/sqrt(N*Qp)


@pytest.mark.parametrize("per_sample", [True, False])
def test_act_step_grad_scale_batch_1_vs_8(per_sample):
    """Per-sample rule: g = 1/sqrt(C*H*W*Qp) whatever the batch, so 8 copies of a sample give exactly 8 times
    the step gradient of one (summed loss); the whole-batch rule gives sqrt(8) times."""
    bits, s = 4, 0.1
    x1 = torch.rand(1, 3, 5, 5, dtype=torch.float64) * 2  # x/s up to 20 > Qp = 15: inside and clipped
    x8 = x1.repeat(8, 1, 1, 1)

    def grad(x):
        q = LSQQuantizer(bits, signed=False, per_sample_grad_scale=per_sample).double().train()
        q.init_from(x)
        q.step.data.fill_(s)
        q(x, samples=x.shape[0]).sum().backward()
        return q.step.grad.item()

    closed_1 = step_grad_sum(x1, s, bits, False) / math.sqrt(3 * 5 * 5 * 15)
    assert grad(x1) == pytest.approx(closed_1, rel=1e-12)
    assert grad(x8) == pytest.approx(closed_1 * (8 if per_sample else math.sqrt(8)), rel=1e-12)


@pytest.mark.parametrize("act_grad_scale", ["per_sample", "batch"])
def test_layer_act_step_grad_counts_tokens_per_sample(act_grad_scale):
    """A Linear on (B, T, features): N = T * features per sample (default), or B * T * features ("batch")."""
    model = saq.quantize(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)),
                         saq.QuantConfig(a_bits=4, first_last_bits=4, act_grad_scale=act_grad_scale)).double()
    x = torch.randn(8, 5, 6, dtype=torch.float64)
    saq.calibrate(model, [x])
    aq = model[0].act_quantizer
    assert aq.signed is True and aq.per_sample_grad_scale == (act_grad_scale == "per_sample")
    seen = []

    def keep(mod, args, out):
        out.retain_grad()
        seen.append(out)

    aq.register_forward_hook(keep)
    model.train()(x).sum().backward()
    n = 5 * 6 if act_grad_scale == "per_sample" else 8 * 5 * 6
    expected = step_grad_sum(x, aq.step.item(), 4, True, seen[0].grad) / math.sqrt(n * 7)
    assert aq.step.grad.item() == pytest.approx(expected, rel=1e-10)
    # weights: N stays the number of weights sharing a step (6 per output channel)
    wq = model[0].weight_quantizer
    assert wq.per_sample_grad_scale is False and wq.step.numel() == 4
