"""strategy="momentum" (MSAM, Becker et al. 2024) against a reference of its rule written out here.

The rule (docs/method.md): the gradient is taken at the point perturbed by ``e = -rho * m / ||m||``, ``m`` the base
optimizer's momentum after the previous step (global norm over the perturbed tensors; for case 3 ``e`` is added to
Q(w)), and the base step starts from the unperturbed weights. The reference computes SGD's momentum and Adam's
first moment itself, in float64, from the gradients of plain autograd (``ref_grads``), so neither the optimizer's
state nor the library's perturbation code is used to check themselves.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_sam import HP, Recorder, _closure_free_run, batch, make_model, params0, qnames, ref_grads

import torchsaq as saq
from torchsaq.optim.saq import SAQ


def _targets(model, mode, P0):
    """(hooked layers, data-perturbed parameter names) as docs/method.md selects them (steps only in mode sam)."""
    hooks = [] if mode == "sam" else qnames(model)
    hooked = {f"{n}.weight" for n in hooks}
    data = [k for k in P0 if k not in hooked and (mode == "sam" or not k.endswith("quantizer.step"))]
    return hooks, data


def _msam_e(model, mode, rho, mom, P0):
    """-rho m / ||m|| over the targets, in float64; ({layer: e}, {param: e}); empty before the first step."""
    if not mom:
        return {}, {}
    hooks, data = _targets(model, mode, P0)
    keys = [f"{n}.weight" for n in hooks] + [k for k in data if k in mom]
    norm = math.sqrt(sum(float((mom[k] ** 2).sum()) for k in keys))
    e = {k: (-rho * mom[k] / norm).float() for k in keys}
    return {n: e[f"{n}.weight"] for n in hooks}, {k: e[k] for k in data if k in e}


@pytest.mark.parametrize("mode", ["case3", "sam"])
def test_momentum_strategy_matches_the_msam_rule_with_sgd(mode):
    # (mode sam perturbs the quantizer steps too: a small rho keeps them positive, where the reference's LSQ holds)
    rho, n_it, mu, lr, wd = (0.3 if mode == "case3" else 0.02), 4, HP["momentum"], HP["lr"], HP["weight_decay"]
    model = make_model(bn=False)
    P = {k: v.double() for k, v in params0(model).items()}
    mom: dict = {}
    expected_post = []
    for it in range(n_it):
        hook_e, data_e = _msam_e(model, mode, rho, mom, P)
        expected_post.append(hook_e)
        x, y = batch(it)
        Pf = {k: v.float() for k, v in P.items()}
        post = hook_e if mode == "case3" else None
        G, _, _, _ = ref_grads(model, Pf, x, y, post=post, delta=data_e)
        for k in P:  # torch.optim.SGD's rule: d = g + wd w; v = mu v + d (v = d at the first step); w -= lr v
            if G[k] is None:
                continue
            d = G[k].double() + wd * P[k]
            mom[k] = d.clone() if k not in mom else mu * mom[k] + d
            P[k] = P[k] - lr * mom[k]

    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=rho, mode=mode, strategy="momentum")
    for it in range(n_it):
        rec = Recorder(model, *batch(it))
        opt.step(rec)
        opt.zero_grad()
        assert opt.passes_last_step == 1 and len(rec.calls) == 1
        for n, e in expected_post[it].items():
            assert torch.allclose(rec.calls[0]["post"][n], e, rtol=1e-4, atol=1e-7), (it, n)
        if it == 0 or mode == "sam":
            assert all(v is None for v in rec.calls[0]["post"].values())  # first step unperturbed; sam: in data
    for k, p in model.named_parameters():
        assert torch.allclose(p.detach().double(), P[k], rtol=1e-4, atol=1e-6), k
    # the check can fail: the perturbation moved the trajectory far beyond the tolerance (plain SGD differs)
    plain = make_model(bn=False)
    sgd = torch.optim.SGD(plain.parameters(), **HP)
    for it in range(n_it):
        x, y = batch(it)
        F.cross_entropy(plain(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    assert max(float((p.detach().double() - P[k]).abs().max()) for k, p in plain.named_parameters()) > 1e-3


def test_momentum_strategy_matches_the_msam_rule_with_adamw():
    """Adam's first moment m = b1 m + (1 - b1) g is the direction (the reference keeps its own)."""
    rho, n_it, lr, b1, b2, eps, wd = 0.2, 4, 0.01, 0.9, 0.999, 1e-8, 0.01
    model = make_model(bn=False)
    P = {k: v.double() for k, v in params0(model).items()}
    m1: dict = {}
    m2: dict = {}
    for it in range(n_it):
        hook_e, data_e = _msam_e(model, "case3", rho, m1, P)
        x, y = batch(it)
        G, _, _, _ = ref_grads(model, {k: v.float() for k, v in P.items()}, x, y, post=hook_e, delta=data_e)
        t = it + 1
        for k in P:
            if G[k] is None:
                continue
            g = G[k].double()
            P[k] = P[k] * (1 - lr * wd)
            m1[k] = b1 * m1.get(k, torch.zeros_like(g)) + (1 - b1) * g
            m2[k] = b2 * m2.get(k, torch.zeros_like(g)) + (1 - b2) * g * g
            P[k] = P[k] - lr * (m1[k] / (1 - b1 ** t)) / ((m2[k] / (1 - b2 ** t)).sqrt() + eps)
    opt = SAQ(model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd), rho=rho, strategy="momentum")
    for it in range(n_it):
        opt.step(Recorder(model, *batch(it)))
        opt.zero_grad()
    for k, p in model.named_parameters():
        assert torch.allclose(p.detach().double(), P[k], rtol=1e-4, atol=1e-6), k


def test_closure_free_momentum_equals_the_closure_form_and_resumes_exactly():
    """HF Trainer / accelerate call opt.step() after their own backward: the same steps; the pending perturbation
    is saved, so a resumed run continues bit for bit."""
    ref = make_model()
    ref_opt = SAQ(ref, torch.optim.SGD(ref.parameters(), **HP), rho=0.2, strategy="momentum")
    for it in range(4):
        ref_opt.step(Recorder(ref, *batch(it)))
        ref_opt.zero_grad()
    model = make_model()
    opt = SAQ(model, torch.optim.SGD(model.parameters(), **HP), rho=0.2, strategy="momentum")
    _closure_free_run(model, opt, 2)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = make_model()
    ropt = SAQ(resumed, torch.optim.SGD(resumed.parameters(), **HP), rho=0.2, strategy="momentum")
    resumed.load_state_dict(state["model"])
    ropt.load_state_dict(state["opt"])
    for it in range(2, 4):  # as _closure_free_run, from step 2
        x, y = batch(it)
        resumed.train()
        F.cross_entropy(resumed(x), y).backward()
        ropt.step()
        ropt.zero_grad()
    for (k, p), (_, q) in zip(resumed.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), k
    for a, b in zip(resumed.buffers(), ref.buffers()):
        assert torch.equal(a, b)
    assert ropt.passes_last_step == 1


def test_momentum_strategy_refuses_what_it_cannot_do():
    model = make_model()
    with pytest.raises(ValueError, match="keeps none"):
        SAQ(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="momentum")  # momentum=0
    with pytest.raises(ValueError, match="no ASAM form"):
        SAQ(model, torch.optim.SGD(model.parameters(), **HP), strategy="momentum", adaptive=True)
    with pytest.raises(ValueError, match="keeps none"):
        SAQ(model, torch.optim.Adagrad(model.parameters(), lr=0.1), strategy="momentum")
    SAQ(model, torch.optim.Adam(model.parameters(), lr=0.1), strategy="momentum")  # fine
    assert "momentum" in saq.integrations.FRAMEWORKS.get("hf_trainer")


def test_train_config_refuses_momentum_where_it_cannot_run():
    from torchsaq.train.config import TrainConfig

    with pytest.raises(ValueError, match="no ASAM form"):
        TrainConfig(sharpness="case3", strategy="momentum", adaptive=True)
    with pytest.raises(ValueError, match="momentum is 0"):
        TrainConfig(sharpness="case3", strategy="momentum", optimizer="sgd", momentum=0.0)
    TrainConfig(sharpness="case3", strategy="momentum", optimizer="adamw", momentum=0.0)  # Adam's first moment
    TrainConfig(sharpness="none", strategy="momentum", momentum=0.0)  # no SAQ: nothing to refuse
