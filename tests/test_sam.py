"""saq.SAQ against independent references: a functional re-implementation of the quantized forward
(F.conv2d / F.linear / F.batch_norm, LSQ written out below), the perturbation formulas of docs/method.md in float64, and
torch.optim.SGD applied to a clone."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq import QuantConfig, QuantLayer
from torchsaq.optim.saq import SAQ, rho_warmup

HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
ETA = 0.01


# ------------------------------------------------------------------------------------------------ model
def batch(i: int, n: int = 8):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def make_model(bn: bool = True, dropout: bool = False, a_bits: int = 3, seed: int = 0) -> nn.Sequential:
    """Conv(q) [BN] ReLU Flatten Linear(q) [Dropout] ReLU Linear(q), 2-3 bit weights with clipping."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Conv2d(1, 3, 3)]
    if bn:
        mods.append(nn.BatchNorm2d(3))
    mods += [nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)]
    if dropout:
        mods.append(nn.Dropout(0.5))
    mods += [nn.ReLU(), nn.Linear(5, 3)]
    m = nn.Sequential(*mods)
    x0, _ = batch(-1, 16)
    cfg = (QuantConfig(w_bits=2, a_bits=a_bits, first_last_bits=3) if a_bits != 32
           else QuantConfig(layer_bits={"*": (2, 32)}))
    saq.quantize(m, cfg, example_inputs=x0)
    with torch.no_grad():
        m(x0)  # LSQ step initialisation from data
        for _, layer in saq.quant_layers(m):
            layer.weight_quantizer.step.mul_(0.5)  # make sure some weights are clipped (STE gives 0 there)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
    return m


# ------------------------------------------------------------------------------------- the reference
def fq(x, step, bits, signed, samples=1):
    """LSQ fake-quantizer written out: round(clamp(x/s)) * s, STE for x, LSQ gradient scaled by 1/sqrt(N Qp).

    N counts the elements sharing one step in one of the `samples` samples of x (LSQ: per sample for activations).
    """
    if bits == 32:
        return x
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    g = 1.0 / math.sqrt((x.numel() // samples // step.numel()) * qp)  # activations: N per sample
    s = step.detach() + (step * g - (step * g).detach())  # value = step, gradient scaled by g
    s = s.view(-1, *([1] * (x.dim() - 1))) if step.numel() > 1 else s.reshape(())
    v = torch.clamp(x / s, qn, qp)
    return (torch.round(v).detach() + (v - v.detach())) * s


def ref_forward(model, P, x, pre=None, post=None, qw=None, stats=None):
    h = x
    for i, m in enumerate(model):
        n = str(i)
        if isinstance(m, QuantLayer):
            a = fq(h, P[f"{n}.act_quantizer.step"], m.a_bits, m.act_quantizer.signed, samples=h.shape[0])
            w = P[f"{n}.weight"]
            if pre and n in pre:
                w = w + pre[n]
            wq = fq(w, P[f"{n}.weight_quantizer.step"], m.w_bits, True)
            if qw is not None:
                wq.retain_grad()
                qw[n] = wq
            if post and n in post:
                wq = wq + post[n]
            h = (F.conv2d if isinstance(m, nn.Conv2d) else F.linear)(a, wq, P[f"{n}.bias"])
        elif isinstance(m, nn.BatchNorm2d):
            rm, rv = stats[n] if stats is not None else (m.running_mean.clone(), m.running_var.clone())
            h = F.batch_norm(h, rm, rv, P[f"{n}.weight"], P[f"{n}.bias"], True, m.momentum, m.eps)
        elif isinstance(m, nn.ReLU):
            h = F.relu(h)
        elif isinstance(m, nn.Flatten):
            h = h.flatten(1)
        else:
            raise AssertionError(type(m))
    return h


def params0(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_params_equal(model, before):
    """Every parameter bit-for-bit equal to its :func:`params0` snapshot."""
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k]), k


def ref_grads(model, P0, x, y, pre=None, post=None, delta=None, stats=None):
    """Plain-autograd gradients w.r.t. every parameter and w.r.t. each Q(w), and the Q(w) values."""
    P = {k: (v + delta[k] if delta and k in delta else v).detach().clone().requires_grad_() for k, v in P0.items()}
    qw: dict = {}
    loss = F.cross_entropy(ref_forward(model, P, x, pre, post, qw, stats), y)
    loss.backward()
    return ({k: p.grad for k, p in P.items()}, {n: t.grad for n, t in qw.items()},
            {n: t.detach() for n, t in qw.items()}, loss.detach())


def qnames(model):
    return [str(i) for i, m in enumerate(model) if isinstance(m, QuantLayer)]


def ref_perturbation(model, mode, rho, G, GQ, WQ, P0, adaptive, perturb_steps=None):
    """docs/method.md: e = rho * T^2 g / ||T g|| (T = 1 unless adaptive), global norm, in float64.

    Returns ({layer: e} for the quantized-layer hook, {param name: e} for data-perturbed params)."""
    if perturb_steps is None:
        perturb_steps = mode == "sam"
    steps = {k for k in P0 if k.endswith("quantizer.step")}
    hooks = [] if mode == "sam" else qnames(model)
    hooked = {f"{n}.weight" for n in hooks}
    items = []  # (kind, key, g, w)
    for n in hooks:
        g = GQ[n] if mode == "case3" else G[f"{n}.weight"]
        w = P0[f"{n}.weight"] if mode == "case2" else WQ[n]
        items.append(("hook", n, g, w))
    for k in P0:
        if k in hooked or (k in steps and not perturb_steps) or G[k] is None:
            continue
        items.append(("data", k, G[k], P0[k]))
    ts = [(w.double().abs() + ETA) if adaptive else torch.ones_like(w, dtype=torch.float64) for _, _, _, w in items]
    norm = math.sqrt(sum(float(((t * g.double()) ** 2).sum()) for t, (_, _, g, _) in zip(ts, items)))
    hook_e, data_e = {}, {}
    for t, (kind, key, g, _) in zip(ts, items):
        e = (rho * t * t * g.double() / norm).float()
        (hook_e if kind == "hook" else data_e)[key] = e
    return hook_e, data_e


def sgd_reference(P0, grads, clip=None, **hp):
    names = [k for k in P0 if grads.get(k) is not None]
    ps = {k: P0[k].clone().requires_grad_() for k in P0}
    for k in names:
        ps[k].grad = grads[k].clone()
    if clip is not None:
        total = math.sqrt(sum(float((grads[k].double() ** 2).sum()) for k in names))
        coef = min(1.0, clip / (total + 1e-6))
        for k in names:
            ps[k].grad.mul_(coef)
    torch.optim.SGD([ps[k] for k in names], **hp).step()
    return {k: v.detach() for k, v in ps.items()}


class Recorder:
    """A closure that records, on each call, the perturbation state and (at the base step) the gradients."""

    def __init__(self, model, x, y, loss_scale=None, scaler=None, inject=None):
        self.model, self.x, self.y, self.scaler, self.inject = model, x, y, scaler, inject
        self.calls: list[dict] = []
        self.names = {id(p): k for k, p in model.named_parameters()}

    def __call__(self):
        m = self.model
        rec = {"pre": {}, "post": {}, "params": params0(m), "qw": {}}
        for n in qnames(m):
            layer = m[int(n)]
            rec["pre"][n] = None if layer.perturb_pre is None else layer.perturb_pre.clone()
            rec["post"][n] = None if layer.perturb_post is None else layer.perturb_post.clone()
            with torch.no_grad():
                rec["qw"][n] = layer.quantized_weight().clone()
        self.calls.append(rec)
        loss = F.cross_entropy(m(self.x), self.y)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.inject is not None:
            self.inject(len(self.calls))
        return loss

    def hook_base(self, base):
        self.step_grads: dict = {}

        def pre(opt, args, kwargs):
            self.step_grads = {self.names[id(p)]: (None if p.grad is None else p.grad.clone())
                               for g in opt.param_groups for p in g["params"]}
        base.register_step_pre_hook(pre)


# ------------------------------------------------------------------------------- the four modes, exactly
@pytest.mark.parametrize("adaptive", [False, True], ids=["sgd", "asam"])
@pytest.mark.parametrize("mode", ["sam", "case1", "case2", "case3"])
def test_step_matches_reference(mode, adaptive):
    rho = 0.3
    model = make_model()
    x, y = batch(0)
    P0 = params0(model)
    bn = model[1]
    stats = {"1": (bn.running_mean.clone(), bn.running_var.clone())}
    G1, GQ1, WQ1, loss1 = ref_grads(model, P0, x, y, stats=stats)
    hook_e, data_e = ref_perturbation(model, mode, rho, G1, GQ1, WQ1, P0, adaptive)
    kw = {"pre": hook_e} if mode == "case2" else {"post": hook_e}
    G2, _, _, _ = ref_grads(model, P0, x, y, delta=data_e, **kw)

    base = torch.optim.SGD(model.parameters(), **HP)
    opt = SAQ(model, base, rho=rho, mode=mode, adaptive=adaptive, eta=ETA)
    rec = Recorder(model, x, y)
    rec.hook_base(base)
    loss = opt.step(rec)
    assert opt.passes_last_step == 2 and len(rec.calls) == 2
    assert torch.allclose(loss, loss1, rtol=1e-6)

    # where the perturbation was added, and its value
    second = rec.calls[1]
    got = {}
    for n in qnames(model):
        pre, post = second["pre"][n], second["post"][n]
        if mode == "sam":
            assert pre is None and post is None
        elif mode == "case2":
            assert post is None and pre is not None
            got[("hook", n)] = pre
        else:
            assert pre is None and post is not None
            got[("hook", n)] = post
    for k, v in second["params"].items():
        d = v - P0[k]
        if k in data_e:
            got[("data", k)] = d
        else:
            assert torch.equal(d, torch.zeros_like(d)), f"{k} should not be perturbed in {mode}"
    want = {("hook", n): e for n, e in hook_e.items()} | {("data", k): e for k, e in data_e.items()}
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-4, atol=1e-7), key
    # the global norm relation: ||e|| = rho (SAM), ||e / T|| = rho (ASAM)
    tot = 0.0
    for (kind, key), e in got.items():
        if adaptive:
            w = (P0[f"{key}.weight"] if mode == "case2" else WQ1[key]) if kind == "hook" else P0[key]
            e = e / (w.abs() + ETA)
        tot += float((e.double() ** 2).sum())
    assert math.sqrt(tot) == pytest.approx(rho, rel=1e-5)

    # the base optimizer received the gradient of the separately perturbed reference
    for k, g in G2.items():
        if g is None:
            assert rec.step_grads[k] is None
        else:
            assert torch.allclose(rec.step_grads[k], g, rtol=1e-4, atol=1e-6), k
    # ... and every weight equals SGD(weights, that gradient)
    want_p = sgd_reference(P0, G2, **HP)
    for k, p in model.named_parameters():
        assert torch.allclose(p.detach(), want_p[k], rtol=1e-5, atol=1e-7), k
    # BatchNorm statistics: updated once, by the first (unperturbed) pass
    assert torch.allclose(bn.running_mean, stats["1"][0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(bn.running_var, stats["1"][1], rtol=1e-6, atol=1e-7)
    assert int(bn.num_batches_tracked) == 1


def test_case1_and_case3_directions_differ_where_clipped():
    """The test model clips weights, so grad_w (STE, 0 where clipped) != grad_Q(w): case 1 != case 3."""
    model = make_model()
    x, y = batch(0)
    G, GQ, _, _ = ref_grads(model, params0(model), x, y)
    clipped = (G["4.weight"] == 0) & (GQ["4"] != 0)
    assert clipped.any()


def test_case2_diminishes_case3_does_not():
    x, y = batch(0)
    qw = {}
    for mode in ("case2", "case3"):
        model = make_model()
        unperturbed = {n: model[int(n)].quantized_weight().detach().clone() for n in qnames(model)}
        opt = SAQ(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=1e-6, mode=mode)
        rec = Recorder(model, x, y)
        opt.step(rec)
        qw[mode] = [torch.equal(rec.calls[1]["qw"][n], unperturbed[n]) for n in unperturbed]
        assert all(torch.equal(rec.calls[0]["qw"][n], unperturbed[n]) for n in unperturbed)
    assert all(qw["case2"]), "a tiny pre-quantization perturbation is rounded away"
    assert not any(qw["case3"]), "case 3 perturbs the quantized weights themselves"


def test_sam_without_steps_equals_case2():
    x, y = batch(0)
    out = []
    for mode, kw in (("sam", {"perturb_steps": False}), ("case2", {})):
        model = make_model()
        opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, mode=mode, **kw)
        for i in range(2):
            xb, yb = batch(i)
            opt.step(Recorder(model, xb, yb))
            opt.zero_grad()
        out.append(params0(model))
    for k in out[0]:
        assert torch.allclose(out[0][k], out[1][k], rtol=1e-5, atol=1e-6), k


def test_max_grad_norm_clips_final_gradient():
    rho, clip = 0.2, 0.05
    model = make_model()
    x, y = batch(0)
    P0 = params0(model)
    G1, GQ1, WQ1, _ = ref_grads(model, P0, x, y)
    hook_e, data_e = ref_perturbation(model, "case3", rho, G1, GQ1, WQ1, P0, False)
    G2, _, _, _ = ref_grads(model, P0, x, y, post=hook_e, delta=data_e)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=rho, max_grad_norm=clip)
    opt.step(Recorder(model, x, y))
    want = sgd_reference(P0, G2, clip=clip, **HP)
    for k, p in model.named_parameters():
        assert torch.allclose(p.detach(), want[k], rtol=1e-5, atol=1e-7), k


# ---------------------------------------------------------------------------- restore, BN, RNG, forms
def test_two_call_form_and_restore_are_exact():
    x, y = batch(0)
    ref = make_model()
    opt_r = SAQ(ref, torch.optim.SGD(ref.parameters(), **HP), rho=0.2, mode="case1")
    opt_r.step(Recorder(ref, x, y))

    model = make_model()
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, mode="case1")
    F.cross_entropy(model(x), y).backward()
    before = params0(model)
    stats = [b.clone() for b in model[1].buffers()]
    assert opt.first_step() is True
    assert all(model[int(n)].perturb_post is not None for n in qnames(model))
    assert model[4].weight.grad is None  # zeroed for the second pass
    F.cross_entropy(model(x), y).backward()
    opt.restore()
    assert all(model[int(n)].perturb_post is None for n in qnames(model))
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), before[k]), k  # bit-exact (BN affine and biases were perturbed in data)
    for b, s in zip(model[1].buffers(), stats):
        assert torch.equal(b, s)  # the second pass's BN update was undone
    opt.second_step()
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), k


def test_sam_mode_restore_is_bit_exact_and_bn_updated_once():
    model = make_model()
    x, y = batch(3)
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y)  # one ordinary pass: the BN statistics the step must end with
    before = params0(model)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), lr=0.0), rho=0.5, mode="sam")
    rec = Recorder(model, x, y)
    opt.step(rec)
    assert any(not torch.equal(rec.calls[1]["params"][k], before[k]) for k in before)  # it was perturbed
    assert_params_equal(model, before)  # lr=0: exactly back
    for b, c in zip(model[1].buffers(), plain[1].buffers()):
        assert torch.equal(b, c)


def test_both_passes_share_dropout_masks_and_rng_ends_as_after_one_pass():
    model = make_model(bn=False, dropout=True)
    x, y = batch(0)
    masks = []
    drop = [m for m in model if isinstance(m, nn.Dropout)][0]
    drop.register_forward_hook(lambda mod, inp, out: masks.append((out == 0) & (inp[0] != 0)))
    plain = copy.deepcopy(model)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    state = torch.get_rng_state()
    opt.step(Recorder(model, x, y))
    after = torch.rand(4)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    assert masks[0].any() and not masks[0].all()
    torch.set_rng_state(state)
    F.cross_entropy(plain(x), y).backward()  # one ordinary forward/backward
    assert torch.equal(torch.rand(4), after)


def test_zero_grad_clears_qweight_grad_and_param_groups_are_shared():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = SAQ(model, base, rho=0.1)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    assert model[4].qweight_grad is not None
    opt.zero_grad()
    assert model[4].qweight_grad is None and model[4].weight.grad is None
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(Recorder(model, x, y))
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_gradient_accumulation_matches_full_batch():
    x, y = batch(0)
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]

    def run(closure_kind):
        model = make_model(bn=False, a_bits=32)
        opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2)
        seen = []

        def rec():
            seen.append({n: model[int(n)].perturb_post for n in qnames(model)})
        names = {id(p): k for k, p in model.named_parameters()}
        grads = {}
        opt.base_optimizer.register_step_pre_hook(
            lambda o, a, kw: grads.update({names[id(p)]: p.grad.clone() for g in o.param_groups
                                           for p in g["params"] if p.grad is not None}))
        if closure_kind == "full":
            def closure():
                rec()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        elif closure_kind == "micro":
            def closure():
                rec()
                for xb, yb in halves:
                    (F.cross_entropy(model(xb), yb) / 2).backward()
            opt.step(closure)
        else:  # two-call form inside an accumulating loop
            for xb, yb in halves:
                (F.cross_entropy(model(xb), yb) / 2).backward()
            opt.first_step()
            rec()
            for xb, yb in halves:
                (F.cross_entropy(model(xb), yb) / 2).backward()
            opt.second_step()
        e = seen[-1]
        return e, grads, params0(model)

    e_full, g_full, p_full = run("full")
    for kind in ("micro", "two_call"):
        e, g, p = run(kind)
        for n in e_full:
            assert torch.allclose(e[n], e_full[n], rtol=1e-4, atol=1e-7), (kind, n)
        assert g.keys() == g_full.keys()
        for k in g_full:
            assert torch.allclose(g[k], g_full[k], rtol=1e-4, atol=1e-6), (kind, k)
        for k in p_full:
            assert torch.allclose(p[k], p_full[k], rtol=1e-5, atol=1e-7), (kind, k)


# ------------------------------------------------------------------------------- efficient strategies
def _flat(d, keys):
    return torch.cat([d[k].double().reshape(-1) for k in keys])


def _unflat(v, like, keys):
    out, i = {}, 0
    for k in keys:
        out[k] = v[i:i + like[k].numel()].view_as(like[k]).float()
        i += like[k].numel()
    return out


@pytest.mark.parametrize("alpha", [0.7, "auto"])
def test_every_k_matches_looksam_reference(alpha):
    """LookSAM: g + alpha * ||g|| / ||g_v|| * g_v; alpha="auto": g + ||g|| / ||g_full|| * g_v (g_v kept at the
    size it had relative to the gradient of the full step that measured it)."""
    rho, k, n_it = 0.3, 2, 5
    model = make_model(bn=False)
    P = params0(model)
    keys = list(P)
    ref_opt_params = {kk: v.clone().requires_grad_() for kk, v in P.items()}
    ref_sgd = torch.optim.SGD(list(ref_opt_params.values()), **HP)
    gv = None
    for it in range(n_it):
        x, y = batch(it)
        Pc = {kk: v.detach() for kk, v in ref_opt_params.items()}
        G, GQ, WQ, _ = ref_grads(model, Pc, x, y)
        if it % k == 0:
            hook_e, data_e = ref_perturbation(model, "case3", rho, G, GQ, WQ, Pc, False)
            Gs, _, _, _ = ref_grads(model, Pc, x, y, post=hook_e, delta=data_e)
            g, gs = _flat(G, keys), _flat(Gs, keys)
            gv = gs - (gs @ g) / (g @ g) * g
            g_full_norm = g.norm()
            final = Gs
        else:
            g = _flat(G, keys)
            a = gv.norm() / g_full_norm if alpha == "auto" else alpha
            final = _unflat(g + a * g.norm() / gv.norm() * gv, G, keys)
        for kk, p in ref_opt_params.items():
            p.grad = final[kk].clone()
        ref_sgd.step()

    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=rho, strategy="every_k", k=k, alpha=alpha)
    passes = []
    for it in range(n_it):
        x, y = batch(it)
        opt.step(Recorder(model, x, y))
        opt.zero_grad()
        passes.append(opt.passes_last_step)
    assert passes == [2, 1, 2, 1, 2]
    for kk, p in model.named_parameters():
        assert torch.allclose(p.detach(), ref_opt_params[kk].detach(), rtol=1e-4, atol=1e-6), kk


@pytest.mark.parametrize("adaptive", [False, True], ids=["sgd", "asam"])
def test_prev_grad_matches_reference(adaptive):
    rho, n_it = 0.3, 4
    model = make_model(bn=False)
    P = params0(model)
    ref_params = {kk: v.clone().requires_grad_() for kk, v in P.items()}
    ref_sgd = torch.optim.SGD(list(ref_params.values()), **HP)
    hook_e, data_e = None, None
    for it in range(n_it):
        x, y = batch(it)
        Pc = {kk: v.detach() for kk, v in ref_params.items()}
        G, GQ, WQ, _ = ref_grads(model, Pc, x, y, post=hook_e, delta=data_e)  # one pass at Q(w) + e_prev
        hook_e, data_e = ref_perturbation(model, "case3", rho, G, GQ, WQ, Pc, adaptive)
        for kk, p in ref_params.items():
            p.grad = G[kk].clone()
        ref_sgd.step()

    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=rho, strategy="prev_grad",
              adaptive=adaptive, eta=ETA)
    for it in range(n_it):
        x, y = batch(it)
        rec = Recorder(model, x, y)
        opt.step(rec)
        opt.zero_grad()
        assert opt.passes_last_step == 1 and len(rec.calls) == 1
        if it == 0:
            assert all(v is None for v in rec.calls[0]["post"].values())  # first iteration unperturbed
    for kk, p in model.named_parameters():
        assert torch.allclose(p.detach(), ref_params[kk].detach(), rtol=1e-4, atol=1e-6), kk


@pytest.mark.parametrize("mode", ["case3", "sam"])
def test_sub_batch_matches_reference(mode):
    """sub_batch: e from the first ceil(f * B) samples' gradient, the update gradient from the whole batch at the
    perturbed point; BatchNorm statistics from the update pass (whole batch), the returned loss that pass's."""
    rho, frac, n_it = 0.3, 0.25, 3
    model = make_model()
    bn = model[1]
    P = params0(model)
    ref_params = {kk: v.clone().requires_grad_() for kk, v in P.items()}
    ref_sgd = torch.optim.SGD(list(ref_params.values()), **HP)
    ref_model = copy.deepcopy(model)  # its BatchNorm module keeps the reference's running statistics
    ref_bn = ref_model[1]
    losses = []
    for it in range(n_it):
        x, y = batch(it, 16)
        Pc = {kk: v.detach() for kk, v in ref_params.items()}
        m = math.ceil(frac * 16)
        scratch = (ref_bn.running_mean.clone(), ref_bn.running_var.clone())  # the ascent pass's update: dropped
        G1, GQ1, WQ1, _ = ref_grads(model, Pc, x[:m], y[:m], stats={"1": scratch})
        hook_e, data_e = ref_perturbation(model, mode, rho, G1, GQ1, WQ1, Pc, False)
        stats = {"1": (ref_bn.running_mean, ref_bn.running_var)}  # updated in place by the update pass
        kw = {} if mode == "sam" else {"post": hook_e}
        G2, _, _, loss2 = ref_grads(model, Pc, x, y, delta=data_e, stats=stats, **kw)
        losses.append(loss2)
        for kk, p in ref_params.items():
            p.grad = G2[kk].clone()
        ref_sgd.step()

    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=rho, mode=mode, strategy="sub_batch",
              fraction=frac)
    sizes = []
    for it in range(n_it):
        x, y = batch(it, 16)

        def closure():
            xb, yb = opt.pass_batch(x, y)
            sizes.append(xb.shape[0])
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss
        loss = opt.step(closure)
        opt.zero_grad()
        assert opt.passes_last_step == 2
        assert torch.allclose(loss, losses[it], rtol=1e-5)
    assert sizes == [4, 16] * n_it
    for kk, p in model.named_parameters():
        assert torch.allclose(p.detach(), ref_params[kk].detach(), rtol=1e-4, atol=1e-6), kk
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == n_it


def test_sub_batch_refuses_a_closure_that_ignores_pass_batch():
    model = make_model()
    before = params0(model)
    stats = [b.clone() for b in model[1].buffers()]
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.1, strategy="sub_batch")
    x, y = batch(0)
    with pytest.raises(RuntimeError, match="pass_batch"):
        opt.step(Recorder(model, x, y))
    assert_params_equal(model, before)
    assert all(torch.equal(a, b) for a, b in zip(stats, model[1].buffers()))  # BatchNorm statistics too
    assert opt.pass_batch(x, y)[0] is x  # outside a step: the whole batch
    with pytest.raises(ValueError, match="fraction"):
        SAQ(model, torch.optim.SGD(model.parameters(), **HP), strategy="sub_batch", fraction=0.0)


# ------------------------------------------------------------------------------------- state, schedule
@pytest.mark.parametrize("strategy,kw", [("full", {"adaptive": True}), ("every_k", {"k": 2}),
                                         ("prev_grad", {})])
def test_state_dict_resumes_bit_exactly(strategy, kw):
    def build():
        m = make_model()
        base = torch.optim.SGD(m.parameters(), **HP)
        opt = SAQ(m, base, rho=0.2, strategy=strategy, rho_schedule=rho_warmup(0.2, 4), **kw)
        return m, opt, torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=10)

    def run(m, opt, sched, its):
        for it in its:
            x, y = batch(it)
            opt.step(Recorder(m, x, y))
            opt.zero_grad()
            sched.step()

    m, opt, sched = build()
    run(m, opt, sched, range(3))
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    run(m, opt, sched, range(3, 6))

    m2, opt2, sched2 = build()
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.step_count == 3
    run(m2, opt2, sched2, range(3, 6))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_rho_warmup_schedule():
    f = rho_warmup(0.1, 4)
    assert [f(i) for i in range(6)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])
    assert rho_warmup(0.1, 0)(0) == 0.1
    with pytest.raises(ValueError):
        rho_warmup(0.0, 3)
    with pytest.raises(ValueError):
        rho_warmup(0.1, -1)
    g = rho_warmup(0.1, 2, start=3)
    assert [g(i) for i in range(7)] == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.05, 0.1, 0.1])
    assert [rho_warmup(0.1, 0, start=2)(i) for i in range(4)] == [0.0, 0.0, 0.1, 0.1]
    with pytest.raises(ValueError, match="start"):
        rho_warmup(0.1, 2, start=-1)
    model = make_model()
    opt = SAQ(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, rho_schedule=rho_warmup(0.1, 2))
    norms = []
    for it in range(3):
        x, y = batch(it)
        rec = Recorder(model, x, y)
        opt.step(rec)
        opt.zero_grad()
        if it == 0:  # rho 0: a plain step, one pass
            assert len(rec.calls) == 1 and opt.passes_last_step == 1
            norms.append(0.0)
            continue
        e = rec.calls[1]
        sq = sum(float((v ** 2).sum()) for v in e["post"].values())
        sq += sum(float(((e["params"][k] - rec.calls[0]["params"][k]) ** 2).sum()) for k in e["params"])
        norms.append(math.sqrt(sq))
    assert norms == pytest.approx([0.0, 0.05, 0.1], rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------------ AMP, non-finite
def test_grad_scaler_matches_unscaled_and_inf_skips_exactly():
    x, y = batch(0)
    ref = make_model()
    SAQ(ref, torch.optim.SGD(ref.parameters(), **HP), rho=0.2, max_grad_norm=0.5).step(Recorder(ref, x, y))

    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, grad_scaler=scaler, max_grad_norm=0.5)
    opt.step(Recorder(model, x, y, scaler=scaler))
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-8), k  # the power-of-two scale cancels
    opt.zero_grad()

    # inf injected into the first pass: no perturbation; into the second: the step is skipped
    def inject(call):
        model[6].bias.grad[0] = float("inf")  # a data-perturbed parameter: enters the direction
    before = params0(model)
    s0 = scaler.get_scale()
    rec = Recorder(model, x, y, scaler=scaler, inject=inject)
    opt.step(rec)
    # no perturbation: the hook holds zeros (decided on the device, without a host read), the data is unchanged
    assert all(v is None or torch.equal(v, torch.zeros_like(v)) for v in rec.calls[1]["post"].values())
    assert all(torch.equal(rec.calls[1]["params"][k], before[k]) for k in before)
    assert_params_equal(model, before)
    assert scaler.get_scale() < s0


def test_two_call_amp_recipe_equals_closure():
    x, y = batch(0)
    ref = make_model()
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    SAQ(ref, torch.optim.SGD(ref.parameters(), **HP), rho=0.2, grad_scaler=s_ref).step(
        Recorder(ref, x, y, scaler=s_ref))

    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.first_step()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.restore()
    scaler.step(opt)
    scaler.update()
    assert opt.passes_last_step == 2
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("strategy", ["full", "every_k"])
@pytest.mark.parametrize("use_scaler", [False, True], ids=["step", "scaler.step"])
def test_step_without_closure_refuses_instead_of_stepping_plainly(strategy, use_scaler):
    """loss.backward(); opt.step() (or scaler.step(opt)) would be plain QAT: it raises, weights untouched."""
    x, y = batch(0)
    model = make_model()
    before = params0(model)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, strategy=strategy)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    loss = F.cross_entropy(model(x), y)
    (scaler.scale(loss) if use_scaler else loss).backward()
    with pytest.raises(RuntimeError, match="without a closure.*not sharpness-aware|plain, non-sharpness-aware"):
        scaler.step(opt) if use_scaler else opt.step()
    assert_params_equal(model, before)
    assert opt.step_count == 0


@pytest.mark.parametrize("where,message", [("loss", "loss of the first pass"),
                                           ("first_grad", "gradient of the first pass"),
                                           ("second_pass", "loss or gradient of the pass at the perturbed point")])
def test_nonfinite_raise_and_skip_leave_weights_unchanged(where, message):
    """One finiteness read at the end of the step still names the stage that failed first."""
    x, y = batch(0)
    if where == "loss":
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")

    def inject(call):
        if (where == "first_grad" and call == 1) or (where == "second_pass" and call == 2):
            model[6].bias.grad[0] = float("nan")  # a data-perturbed parameter: enters the direction

    model = make_model()
    before = params0(model)
    stats = [b.clone() for b in model[1].buffers()]
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2)
    with pytest.raises(FloatingPointError, match=f"non-finite {message}"):
        opt.step(Recorder(model, x, y, inject=inject))
    assert_params_equal(model, before)
    for b, s in zip(model[1].buffers(), stats):
        assert torch.equal(b, s)
    assert opt.step_count == 0
    assert all(model[int(n)].perturb_post is None for n in qnames(model))

    opt_skip = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, nonfinite="skip")
    opt_skip.zero_grad()
    opt_skip.step(Recorder(model, x, y, inject=inject))
    assert_params_equal(model, before)
    for b, s in zip(model[1].buffers(), stats):
        assert torch.equal(b, s)
    assert opt_skip.step_count == 1
    # and the next, finite step is an ordinary one
    opt_skip.zero_grad()
    opt_skip.step(Recorder(model, *batch(1)))
    assert any(not torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())


# ------------------------------------------------------------------------ host-device syncs, device-side fall-backs
class HostReads:
    """Counts Python-level reads of tensor values on the host (each one a host-device sync on a GPU).

    Reads made inside a closure (the model's own) are not counted; nested reads count once.
    """

    METHODS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        self._depth = 0
        self._paused = False
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, orig):
        def read(t, *args, **kwargs):
            if not self._paused and self._depth == 0:
                self.count += 1
            self._depth += 1
            try:
                return orig(t, *args, **kwargs)
            finally:
                self._depth -= 1
        return read

    def uncounted(self, closure):
        def run():
            self._paused = True
            try:
                return closure()
            finally:
                self._paused = False
        return run

    def during(self, fn) -> int:
        start = self.count
        fn()
        return self.count - start


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad_scaler"])
@pytest.mark.parametrize("strategy,kw", [("full", {}),
                                         ("full", {"mode": "sam", "adaptive": True, "max_grad_norm": 1.0}),
                                         ("every_k", {"k": 2}), ("prev_grad", {"adaptive": True})])
def test_one_host_device_sync_per_step(monkeypatch, strategy, kw, scaled):
    """A step reads the device once (its finiteness check), or not at all beyond the grad scaler's own read."""
    def make_scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if scaled else None

    # what the base optimizer's own step reads (the grad scaler's inf check), measured the same way
    plain = make_model()
    base = torch.optim.SGD(plain.parameters(), **HP)
    scaler = make_scaler()
    reads = HostReads(monkeypatch)

    def plain_backward():
        loss = F.cross_entropy(plain(batch(0)[0]), batch(0)[1])
        (scaler.scale(loss) if scaled else loss).backward()

    def plain_update():
        if scaled:
            scaler.step(base)
            scaler.update()
        else:
            base.step()
    reads.uncounted(plain_backward)()
    base_reads = reads.during(plain_update)
    assert base_reads == (1 if scaled else 0)

    model = make_model()
    scaler = make_scaler()
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, strategy=strategy, grad_scaler=scaler, **kw)
    counts = []
    for it in range(5):
        rec = Recorder(model, *batch(it), scaler=scaler)
        counts.append(reads.during(lambda: opt.step(reads.uncounted(rec))))
        opt.zero_grad()
    own = [c - base_reads for c in counts]
    if strategy == "every_k":  # step 1 reads whether the first g_v (step 0) was finite; never again
        assert own == ([1, 2, 1, 1, 1] if not scaled else [0, 1, 0, 0, 0])
    else:
        assert own == [0 if scaled else 1] * 5


def test_device_side_select_is_bit_exact_with_nan_and_inf():
    from torchsaq.optim._foreach import select_ as _select_, zero_unless as _zero_unless
    vals = torch.tensor([1.5, -0.0, float("nan"), float("inf"), -float("inf"), 3e-39])
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = vals.to(dtype)
        for ok in (True, False):
            a, b = x.clone(), x.flip(0).clone()
            _select_(torch.tensor(ok), [a], [b])
            want = x if ok else x.flip(0)
            assert torch.equal(a.view(torch.uint8), want.view(torch.uint8)), (dtype, ok)  # bit for bit
            z = x.clone()
            _zero_unless(torch.tensor(ok), [z])
            assert torch.equal(z.view(torch.uint8), (x if ok else torch.zeros_like(x)).view(torch.uint8))


def test_every_k_with_grad_scaler_overflow_keeps_g_v():
    """An overflowing full step: no g_v yet -> the next step is a full one again; else the previous g_v stays."""
    model = make_model(bn=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, strategy="every_k", k=2,
              grad_scaler=scaler)

    def inf(call):
        model[5].bias.grad[0] = float("inf")

    def run(it, inject=None):
        before = params0(model)
        opt.step(Recorder(model, *batch(it), scaler=scaler, inject=inject))
        opt.zero_grad()
        return opt.passes_last_step, before

    assert run(0, inf)[0] == 2
    assert opt.state_dict()["saq"]["gv"] is None  # the overflowed g_v was dropped
    assert run(1)[0] == 2                          # so step 1 is a full step again (g_v now finite)
    sd = opt.state_dict()["saq"]
    gv = [None if t is None else t.clone() for t in sd["gv"]]
    assert any(t is not None and t.abs().sum() > 0 for t in gv) and sd["gv_norm"] > 0
    passes, before = run(2, inf)                   # overflowing full step: skipped, g_v kept bit for bit
    assert passes == 2
    assert_params_equal(model, before)
    sd2 = opt.state_dict()["saq"]
    assert sd2["gv_norm"] == sd["gv_norm"]
    for a, b in zip(gv, sd2["gv"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert run(3)[0] == 1                          # and the plain steps go on using it


def test_prev_grad_with_grad_scaler_overflow_gives_zero_next_perturbation():
    model = make_model(bn=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, strategy="prev_grad", grad_scaler=scaler)

    def inf(call):
        model[5].bias.grad[0] = float("inf")

    for it, inject in enumerate((None, inf)):
        opt.step(Recorder(model, *batch(it), scaler=scaler, inject=inject))
        opt.zero_grad()
    rec = Recorder(model, *batch(2), scaler=scaler)
    before = params0(model)
    opt.step(rec)
    assert all(v is not None and torch.equal(v, torch.zeros_like(v)) for v in rec.calls[0]["post"].values())
    assert all(torch.equal(rec.calls[0]["params"][k], before[k]) for k in before)


def test_snapshot_buffers_are_reused_across_steps():
    model = make_model()
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2)
    ptrs = []
    for it in range(3):
        opt.step(Recorder(model, *batch(it)))
        opt.zero_grad()
        snaps = (opt._passes.bn_pre, opt._passes.bn_mid, opt._targets._saved)
        ptrs.append([t.data_ptr() for snap in snaps for t in snap.copies])
    assert ptrs[0] and ptrs[0] == ptrs[1] == ptrs[2]


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw, msg in [({"rho": 0.0}, "rho"), ({"rho": -1.0}, "rho"), ({"mode": "case4"}, "mode"),
                    ({"strategy": "sometimes"}, "strategy"), ({"strategy": "every_k", "k": 0}, "k"),
                    ({"nonfinite": "ignore"}, "nonfinite"), ({"max_grad_norm": 0.0}, "max_grad_norm")]:
        with pytest.raises(ValueError, match=msg):
            SAQ(model, base, **kw)
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not parameters of the model"):
        SAQ(model, torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1))
    float_model = nn.Sequential(nn.Linear(3, 2))
    for mode in ("case1", "case2", "case3"):
        with pytest.raises(ValueError, match="quantized model"):
            SAQ(float_model, torch.optim.SGD(float_model.parameters(), lr=0.1), mode=mode)
    SAQ(float_model, torch.optim.SGD(float_model.parameters(), lr=0.1), mode="sam")  # fine
    with pytest.raises(ValueError, match="strategy='full'"):
        SAQ(model, base, strategy="prev_grad").first_step()
    with pytest.raises(ValueError, match="SAQ state_dict"):
        SAQ(model, base).load_state_dict(base.state_dict())



# ------------------------------------------------------------------------------------- closure-free prev_grad
def _closure_free_run(model, opt, steps, scaler=None, eval_between=False):
    """``loss.backward(); opt.step()`` as any training loop does it (no closure)."""
    evals = []
    for it in range(steps):
        x, y = batch(it)
        model.train()
        loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        if eval_between:
            model.eval()
            with torch.no_grad():
                evals.append(model(batch(99)[0]))
    return evals


@pytest.mark.parametrize("mode,adaptive", [("case3", False), ("case3", True), ("case1", False), ("case2", False),
                                           ("sam", False)])
def test_closure_free_prev_grad_equals_the_closure_form(mode, adaptive):
    """The one-pass strategy needs no closure: opt.step() after the caller's backward is the same SAQ step."""
    ref = make_model()
    ref_opt = SAQ(ref, torch.optim.SGD(ref.parameters(), **HP), rho=0.2, mode=mode, adaptive=adaptive,
                  strategy="prev_grad")
    for it in range(4):
        x, y = batch(it)
        ref_opt.step(Recorder(ref, x, y))
        ref_opt.zero_grad()
    model = make_model()
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, mode=mode, adaptive=adaptive,
              strategy="prev_grad")
    _closure_free_run(model, opt, 4)
    assert opt.passes_last_step == 1 and opt.step_count == 4
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), k
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.equal(a, b)
    # and it is not plain SGD: the perturbation changed the trajectory
    plain = make_model()
    sgd = torch.optim.SGD(plain.parameters(), **HP)
    for it in range(4):
        x, y = batch(it)
        F.cross_entropy(plain(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


def test_closure_free_eval_never_sees_the_perturbation():
    model = make_model(bn=False)  # (a training forward would also move BatchNorm statistics)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.5, strategy="prev_grad")
    _closure_free_run(model, opt, 2)
    clean = copy.deepcopy(model)  # between steps nothing is applied: this copy holds the weights
    x = batch(50)[0]
    model.train()
    model(x)  # a training forward applies the pending perturbation ...
    assert any(layer.perturb_post is not None for _, layer in saq.quant_layers(model))
    model.eval()
    clean.eval()
    with torch.no_grad():
        assert torch.equal(model(x), clean(x))  # ... an eval forward removes it first
    assert all(layer.perturb_post is None for _, layer in saq.quant_layers(model))
    assert_params_equal(model, params0(clean))


def test_closure_free_resume_is_exact(tmp_path):
    """The pending perturbation is in state_dict: an interrupted run continues as if it had not stopped."""
    full = make_model()
    _closure_free_run(full, SAQ(full, torch.optim.SGD(full.parameters(), **HP), rho=0.2, strategy="prev_grad"), 4)

    first = make_model()
    opt = SAQ(first, torch.optim.SGD(first.parameters(), **HP), rho=0.2, strategy="prev_grad")
    _closure_free_run(first, opt, 2)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed = make_model(seed=1)
    resumed.load_state_dict(state["model"])
    opt2 = SAQ(resumed, torch.optim.SGD(resumed.parameters(), **HP), rho=0.2, strategy="prev_grad")
    opt2.load_state_dict(state["opt"])
    for it in range(2, 4):
        x, y = batch(it)
        F.cross_entropy(resumed(x), y).backward()
        opt2.step()
        opt2.zero_grad()
    for (k, p), (_, q) in zip(resumed.named_parameters(), full.named_parameters()):
        assert torch.equal(p, q), k


def test_closure_free_with_grad_scaler_equals_the_closure_form():
    ref = make_model()
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    ref_opt = SAQ(ref, torch.optim.SGD(ref.parameters(), **HP), rho=0.2, strategy="prev_grad", grad_scaler=s_ref)
    for it in range(3):
        x, y = batch(it)
        ref_opt.step(Recorder(ref, x, y, scaler=s_ref))
        ref_opt.zero_grad()
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, strategy="prev_grad", grad_scaler=scaler)
    _closure_free_run(model, opt, 3, scaler=scaler)
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-8), k  # power-of-two scales cancel

    # with a grad scaler, opt.step() on scaled gradients (instead of scaler.step(opt)) is refused
    x, y = batch(5)
    before = params0(model)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.step()
    assert_params_equal(model, before)


@pytest.mark.parametrize("name", ["sgd", "lamb"])
def test_timm_optimizer_factory_as_the_base(name):
    """timm's create_optimizer_v2 (its param groups: no weight decay on 1-D tensors; its own LAMB) under SAQ."""
    timm_optim = pytest.importorskip("timm.optim")

    def run(sharp: bool):
        model = make_model()
        base = timm_optim.create_optimizer_v2(model, name, lr=0.05, weight_decay=5e-4)
        opt = SAQ(model, base, rho=0.2, strategy="prev_grad") if sharp else base
        _closure_free_run(model, opt, 3)
        return model, base

    model, base = run(True)
    assert {g["weight_decay"] for g in base.param_groups} == {0.0, 5e-4}
    plain, _ = run(False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


@pytest.mark.parametrize("mode", ["case3", "sam"])
def test_a_full_step_at_rho_zero_is_the_plain_step_in_one_pass(mode):
    """A step whose scheduled rho is 0 (warm-up, or before rho_start) is torch.optim.SGD's step on the batch
    gradient, BatchNorm statistics and dropout included, at the cost of one forward/backward; later steps are
    two-pass again."""
    model = make_model(dropout=True)
    ref = copy.deepcopy(model)
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.1, mode=mode, strategy="full",
              rho_schedule=rho_warmup(0.1, 0, start=2))
    ref_opt = torch.optim.SGD(ref.parameters(), **HP)
    for it in range(2):
        x, y = batch(it)
        torch.manual_seed(it)
        rec = Recorder(model, x, y)
        loss = opt.step(rec)
        opt.zero_grad()
        torch.manual_seed(it)
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert len(rec.calls) == 1 and opt.passes_last_step == 1 and torch.equal(loss, ref_loss)
        for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(a, b), (it, k)
    rec = Recorder(model, *batch(2))
    opt.step(rec)
    assert len(rec.calls) == 2 and opt.passes_last_step == 2
