"""The pure pieces of the sharpness-aware step against hand computations (docs/method.md), not against the code.

torchsaq.optim.functional (the formulas), torchsaq.optim._update (the final update), torchsaq.optim.perturb (the
mode table and the targets), torchsaq.optim.strategies (their state)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import torchsaq as saq
from torchsaq.optim import _update, perturb
from torchsaq.optim import functional as SF
from torchsaq.optim.perturb import Direction, Mode, Site, Targets
from torchsaq.optim.strategies import STRATEGIES, EveryK, make_strategy


def t(*v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


# ------------------------------------------------------------------------------------- e = rho g / ||g||
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sam_perturbation_is_rho_g_over_the_global_norm(dtype):
    # ||(3, 4), (0, 12)|| = 13 over both tensors together
    g = [t(3.0, 4.0, dtype=dtype), t(0.0, 12.0, dtype=dtype).reshape(1, 2)]
    es, ok = SF.sam_perturbation(g, 0.26)
    assert bool(ok)
    want = [t(0.06, 0.08, dtype=torch.float64), t(0.0, 0.24, dtype=torch.float64).reshape(1, 2)]
    for e, w in zip(es, want):
        assert e.dtype == dtype
        torch.testing.assert_close(e.double(), w, rtol=1e-6, atol=1e-12)
    assert math.isclose(math.sqrt(sum(float((e.double() ** 2).sum()) for e in es)), 0.26, rel_tol=1e-6)
    assert torch.equal(g[0], t(3.0, 4.0, dtype=dtype))  # not owned: the gradient is left alone


def test_asam_perturbation_is_rho_t2_g_over_the_norm_of_t_g():
    # T = |w| + eta = (1, 2), (3); T g = (1, -4), (3); ||T g|| = sqrt(26); T^2 g = (1, -8), (9)
    g = [t(1.0, -2.0), t(1.0)]
    w = [t(0.5, -1.5), t(-2.5)]
    es, ok = SF.sam_perturbation(g, 0.5, refs=w, eta=0.5)
    assert bool(ok)
    n = math.sqrt(26.0)
    torch.testing.assert_close(es[0].double(), torch.tensor([0.5 / n, -4.0 / n], dtype=torch.float64))
    torch.testing.assert_close(es[1].double(), torch.tensor([4.5 / n], dtype=torch.float64))


def test_owned_gradients_hold_the_result_and_others_are_untouched():
    g_own, g_keep = t(0.0, 2.0), t(2.0, 0.0)
    es, _ = SF.sam_perturbation([g_own, g_keep], math.sqrt(8.0), owned=[True, False])
    assert es[0] is g_own and es[1] is not g_keep
    torch.testing.assert_close(g_own, t(0.0, 2.0))  # rho / ||g|| = 1 here
    assert torch.equal(g_keep, t(2.0, 0.0))


def test_a_non_finite_norm_gives_scale_zero_and_zero_nonfinite_gives_exact_zeros():
    for bad in (float("nan"), float("inf")):
        es, ok = SF.sam_perturbation([t(bad, 1.0), t(2.0)], 0.1)
        assert not bool(ok)
        assert float(es[1]) == 0.0  # finite entries: times a zero scale
        es, ok = SF.sam_perturbation([t(bad, 1.0), t(2.0)], 0.1, zero_nonfinite=True)
        assert not bool(ok) and all(torch.equal(e, torch.zeros_like(e)) for e in es)


def test_a_zero_gradient_gives_a_zero_perturbation():
    es, ok = SF.sam_perturbation([torch.zeros(3)], 0.05)
    assert bool(ok) and torch.equal(es[0], torch.zeros(3))


# ------------------------------------------------------------------------------------------- LookSAM g_v
def test_orthogonal_component_by_hand():
    # g = (1, 0), (0, 1); g_s = (1, 2), (3, 4): g_s.g = 5, ||g||^2 = 2, g_v = g_s - 2.5 g
    g = [t(1.0, 0.0), t(0.0, 1.0)]
    gs = [t(1.0, 2.0), t(3.0, 4.0)]
    ok, gvn, ratio = SF.orthogonal_component_(gs, g)
    assert bool(ok)
    torch.testing.assert_close(g[0], t(-1.5, 2.0))
    torch.testing.assert_close(g[1], t(3.0, 1.5))
    assert float(gvn) == pytest.approx(math.sqrt(17.5), rel=1e-6)
    assert float(ratio) == pytest.approx(math.sqrt(17.5) / math.sqrt(2.0), rel=1e-6)
    assert float(sum((a * b).sum() for a, b in zip(g, [t(1.0, 0.0), t(0.0, 1.0)]))) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(gs[0], t(1.0, 2.0))  # g_s is read only


def test_orthogonal_component_of_a_zero_gradient_is_the_sharp_gradient():
    g = [torch.zeros(2)]
    ok, gvn, ratio = SF.orthogonal_component_([t(3.0, 4.0)], g)
    assert bool(ok) and float(ratio) == 0.0 and float(gvn) == pytest.approx(5.0)
    torch.testing.assert_close(g[0], t(3.0, 4.0))


def test_orthogonal_component_flags_non_finite():
    ok, _, _ = SF.orthogonal_component_([t(float("inf"), 0.0)], [t(1.0, 0.0)])
    assert not bool(ok)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_add_orthogonal_by_hand(as_tensor):
    # ||g|| = ||(3, 0), (0, 4)|| = 5; ||g_v|| = 2; alpha 0.5: coefficient 0.5 * 5 / 2 = 1.25
    grads = [t(3.0, 0.0), t(0.0, 4.0)]
    alpha = torch.tensor(0.5, dtype=torch.float64) if as_tensor else 0.5
    SF.add_orthogonal_(grads, [t(0.0, 1.0), None], torch.tensor(2.0), alpha)
    torch.testing.assert_close(grads[0], t(3.0, 1.25))
    assert torch.equal(grads[1], t(0.0, 4.0))  # no stored component there


def test_add_orthogonal_with_a_zero_g_v_adds_nothing():
    grads = [t(3.0, 4.0)]
    SF.add_orthogonal_(grads, [torch.zeros(2)], torch.tensor(0.0), 0.7)
    assert torch.equal(grads[0], t(3.0, 4.0))


# ------------------------------------------------------------------------------------- the final update
def test_base_step_clips_to_the_global_norm_then_steps():
    p, q = nn.Parameter(t(1.0, 1.0)), nn.Parameter(t(1.0))
    p.grad, q.grad = t(3.0, 0.0), t(4.0)  # global norm 5
    _update.base_step(torch.optim.SGD([p, q], lr=1.0), [p, q], max_grad_norm=1.0)
    c = 1.0 / (5.0 + 1e-6)  # torch's clip coefficient
    torch.testing.assert_close(p.detach(), t(1.0 - 3.0 * c, 1.0))
    torch.testing.assert_close(q.detach(), t(1.0 - 4.0 * c))


def test_base_step_with_a_given_norm_and_without_clipping():
    p = nn.Parameter(t(1.0, 1.0))
    p.grad = t(3.0, 4.0)
    _update.base_step(torch.optim.SGD([p], lr=0.5), [p], max_grad_norm=1.0, grad_norm=torch.tensor(10.0))
    c = 1.0 / (10.0 + 1e-6)  # the norm given is used as it is
    torch.testing.assert_close(p.detach(), t(1.0 - 0.5 * 3.0 * c, 1.0 - 0.5 * 4.0 * c))
    p.grad = t(1.0, 1.0)
    _update.base_step(torch.optim.SGD([p], lr=1.0), [p])
    torch.testing.assert_close(p.detach(), t(-0.5 * 3.0 * c, -0.5 * 4.0 * c))


def test_base_step_with_a_grad_scaler_unscales_and_skips_inf():
    p = nn.Parameter(t(1.0))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    opt = torch.optim.SGD([p], lr=1.0)
    scaler.scale(t(1.0))  # the scaler starts its scale on the first use
    p.grad = t(8.0)  # scaled by 4: the true gradient is 2
    _update.base_step(opt, [p], grad_scaler=scaler)
    torch.testing.assert_close(p.detach(), t(-1.0))
    p.grad = t(float("inf"))
    _update.base_step(opt, [p], grad_scaler=scaler)
    torch.testing.assert_close(p.detach(), t(-1.0))  # skipped
    assert scaler.get_scale() < 4.0


def test_finite_and_first_failure():
    assert _update.finite(None) is True and _update.finite(1.0) is True and _update.finite(float("nan")) is False
    assert bool(_update.finite(t(1.0, float("inf")))) is False
    checks = [("a", True), ("b", torch.tensor(True)), ("c", torch.tensor(False)), ("d", False)]
    assert _update.first_failure(checks) == "c"
    assert _update.first_failure(checks[:2]) is None and _update.first_failure([]) is None


# ------------------------------------------------------------------------------------------ the mode table
def test_mode_table_is_docs_method():
    assert perturb.MODES.names() == ("sam", "case1", "case2", "case3")
    assert [perturb.MODES.get(m).value for m in perturb.MODES] == list(perturb.MODES)
    assert STRATEGIES.names() == ("full", "every_k", "prev_grad", "momentum", "sub_batch")
    documented = (Path(__file__).parents[1] / "docs" / "method.md").read_text().split("## Efficient strategies")[1]
    assert [s for s in STRATEGIES if f"`{s}`" not in documented] == []
    assert perturb.WHERE.names() == ("quantized", "latent") and saq.analysis.WHERE is perturb.WHERE
    assert (Mode.SAM.direction, Mode.SAM.site) == (None, None)
    assert (Mode.CASE1.direction, Mode.CASE1.site) == (Direction.WEIGHT_GRAD, Site.AFTER)
    assert (Mode.CASE2.direction, Mode.CASE2.site) == (Direction.WEIGHT_GRAD, Site.BEFORE)
    assert (Mode.CASE3.direction, Mode.CASE3.site) == (Direction.QWEIGHT_GRAD, Site.AFTER)
    assert [m.value for m in Mode if m.needs_capture(False)] == ["case3"]
    assert [m.value for m in Mode if m.needs_capture(True)] == ["case1", "case3"]
    assert perturb.site_of("latent") is Site.BEFORE and perturb.site_of("quantized") is Site.AFTER
    with pytest.raises(ValueError, match="mode"):
        Mode.parse("case4")
    with pytest.raises(ValueError, match="where"):
        perturb.site_of("float")
    with pytest.raises(ValueError, match="strategy"):
        make_strategy("sometimes", nn.Linear(1, 1), Targets([], [], None), 1, "auto")


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    saq.quantize(m, saq.QuantConfig(w_bits=4, a_bits=8, layer_bits={"2": (32, 32)}), example_inputs=torch.randn(5, 4))
    with torch.no_grad():
        m(torch.randn(5, 4))
    return m


def test_targets_select_by_mode_and_options():
    m = _model()
    q0, ln, q2 = m[0], m[1], m[2]
    steps = {id(p) for n, p in m.named_parameters() if "quantizer" in n}
    params = list(m.parameters())
    # cases 1-3: both quantized layers (the 32-bit one too) at the site; norm affine and biases in their data
    tg = Targets.select(m, Mode.CASE3, params)
    assert tg.layers == [q0, q2] and tg.site is Site.AFTER and tg.direction is Direction.QWEIGHT_GRAD
    assert [id(p) for p in tg.params] == [id(q0.bias), id(ln.weight), id(ln.bias), id(q2.bias)]
    assert not Targets.select(m, Mode.CASE1, params, unquantized=False).params
    assert {id(p) for p in Targets.select(m, Mode.CASE2, params, steps=True).params} >= steps
    # sam: every weight in its data; unquantized=False keeps only the layer weights
    tg = Targets.select(m, Mode.SAM, params, unquantized=False)
    assert tg.layers == [] and [id(p) for p in tg.params] == [id(q0.weight), id(q2.weight)]
    # a weight that is not a candidate is not a target; weights_only drops 1-D tensors
    assert Targets.select(m, Mode.CASE3, [q2.weight, ln.weight]).layers == [q2]
    assert Targets.select(m, Site.BEFORE, params, weights_only=True).params == []


def test_targets_apply_and_restore():
    m = _model()
    tg = Targets.select(m, Mode.CASE2, list(m.parameters()))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    e = [torch.full_like(x, 0.25) for x in tg.tensors()]
    e[1] = None  # the second layer not perturbed
    tg.apply(e)
    assert tg.active and m[0].perturb_pre is e[0] and m[2].perturb_pre is None and m[0].perturb_post is None
    torch.testing.assert_close(m[1].weight.detach(), before["1.weight"] + 0.25)
    tg.restore()
    assert not tg.active and m[0].perturb_pre is None
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    # at_layers: within the block only
    d = torch.ones_like(m[2].weight)
    with Targets.select(m, Site.AFTER, list(m.parameters())).at_layers([None, d]):
        assert m[2].perturb_post is d
    assert m[2].perturb_post is None


def test_site_puts_the_perturbation_before_or_after_quantizing():
    m = _model()
    layer = m[0]
    with torch.no_grad():
        q = layer.quantized_weight().clone()
        e = torch.full_like(q, 1e-3)
        Site.AFTER.put(layer, e)
        assert torch.equal(layer.quantized_weight(), q + e)
        Site.AFTER.put(layer, None)
        Site.BEFORE.put(layer, e)
        step = layer.weight_quantizer.step.detach().double().reshape(-1, 1)  # one step per output channel
        w = (layer.weight + 1e-3).double()
        b = layer.w_bits  # the first layer: first_last_bits
        ref = torch.clamp(torch.round(w / step), -(2 ** (b - 1)), 2 ** (b - 1) - 1) * step  # LSQ, by hand
        torch.testing.assert_close(layer.quantized_weight().double(), ref, rtol=0, atol=1e-6)
        Site.BEFORE.put(layer, None)
    assert Site.BEFORE.reference(layer) is layer.weight
    torch.testing.assert_close(Site.AFTER.reference(layer, captured=False), q)


def test_perturb_cleared_restores_the_layers():
    m = _model()
    marker = torch.zeros_like(m[0].weight)
    m[0].perturb_post = marker
    m[2].capture_qweight = True
    with perturb.cleared(m):
        assert m[0].perturb_post is None and not m[2].capture_qweight
    assert m[0].perturb_post is marker and m[2].capture_qweight


# ---------------------------------------------------------------------------------------- strategy state
def test_every_k_state_round_trip():
    p = nn.Parameter(torch.zeros(2))

    class Opt:  # what EveryK reads of the passes (torchsaq.optim.passes.Passes)
        def params(self):
            return [p, p]

    ek = EveryK(3, "auto")
    ek.gv, ek.gv_norm, ek.gv_ratio = [t(1.0, 2.0), None], torch.tensor(2.5), torch.tensor(0.5, dtype=torch.float64)
    sd = ek.state_dict(Opt())
    assert sd == {"gv": sd["gv"], "gv_norm": 2.5, "gv_ratio": 0.5} and sd["gv"][1] is None
    back = EveryK(3, "auto")
    back.load_state_dict(sd, Opt())
    assert torch.equal(back.gv[0], t(1.0, 2.0)) and back.gv[0] is not ek.gv[0] and back.gv[1] is None
    assert float(back.gv_norm) == 2.5 and float(back.gv_ratio) == 0.5
    with pytest.raises(ValueError, match="g_v has 1 entries"):
        back.load_state_dict({"gv": [None]}, Opt())


def test_sam_step_of_a_float64_model_by_hand():
    # L(w) = (w.x)^2: g = 2 (w.x) x; e = rho g / ||g||; the base step uses g at w + e (the norm in float64 too)
    lin = nn.Linear(2, 1, bias=False).double()
    w0 = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w0)
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    opt = saq.SAQ(lin, torch.optim.SGD(lin.parameters(), lr=0.1), rho=0.05, mode="sam")

    def closure():
        loss = (lin(x) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    g = 2 * float(w0 @ x.T) * x
    e = 0.05 * g / g.norm()
    g2 = 2 * float((w0 + e) @ x.T) * x
    torch.testing.assert_close(lin.weight.detach(), w0 - 0.1 * g2, rtol=1e-6, atol=1e-9)
