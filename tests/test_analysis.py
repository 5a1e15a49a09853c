"""saq.analysis: each measure against a closed form (quadratic losses of linear models, in float64)."""
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
import torchsaq.train.checkpoint
import torchsaq.train.data
from torchsaq import analysis as A

f64 = torch.float64


# ----------------------------------------------------------------------------------------------------- refs
def lsq_ref(x, s, bits, signed):
    """docs/method.md formula: round(clamp(x/s, Qn, Qp)) * s."""
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return torch.round(torch.clamp(x / s, qn, qp)) * s


def quad_problem(lams, n=8, seed=0, rotate=True):
    """X (n x d) with 2/n X^T X = Q diag(lams) Q^T, targets y (n x 1)."""
    g = torch.Generator().manual_seed(seed)
    d = len(lams)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=f64))[0] if rotate else torch.eye(d, dtype=f64)
    u = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=f64))[0]
    x = math.sqrt(n / 2) * u @ torch.diag(torch.tensor(lams, dtype=f64).sqrt()) @ q.T
    y = torch.randn(n, 1, generator=g, dtype=f64)
    return x, y


def trust_region_max(g, h, rho):
    """max_{||e||<=rho} g.e + e^T h e / 2 (convex h): boundary solution e = (mu I - h)^-1 g, mu > lambda_max."""
    lam, vec = torch.linalg.eigh(h)
    gt = vec.T @ g
    lo, hi = float(lam.max()) + 1e-12, float(lam.max()) + float(g.norm()) / rho + 1.0
    for _ in range(200):
        mu = (lo + hi) / 2
        if float((gt / (mu - lam)).norm()) > rho:
            lo = mu
        else:
            hi = mu
    e = gt / (hi - lam)
    return float(gt @ e + 0.5 * (lam * e * e).sum())


def linear_model(d, bits, x=None):
    m = nn.Linear(d, 1, bias=False).double()
    saq.quantize(m, saq.QuantConfig(w_bits=bits, a_bits=bits, first_last_bits=bits))
    if bits == 32:
        m(torch.zeros(1, d, dtype=f64))  # trace
    else:
        saq.calibrate(m, [x])
    return m


def mse(out, y):
    return F.mse_loss(out, y)


def split(x, y, sizes):
    return list(zip(torch.split(x, sizes), torch.split(y, sizes)))


# ---------------------------------------------------------------------------------------------- sharpness
def test_float_quadratic_eigenvalue_trace_and_sam():
    lams = [4.0, 2.0, 1.0, 0.5]
    x, y = quad_problem(lams)
    m = linear_model(4, 32)
    wstar = torch.linalg.lstsq(x, y).solution
    with torch.no_grad():
        m.weight.copy_(wstar.T)
    batches = split(x, y, [5, 3])  # uneven: the loss is weighted by batch size
    top = A.hessian_top_eigenvalue(m, mse, batches, iters=200, tol=1e-12)
    assert top == pytest.approx(4.0, rel=1e-6)
    tr, se = A.hessian_trace(m, mse, batches, samples=300, return_stderr=True)
    assert abs(tr - sum(lams)) < 4 * se and 0 < se < 1.0
    rho = 0.1
    # at the minimum: rho^2 lambda_max / 2
    assert A.sam_sharpness(m, mse, batches, rho=rho, steps=40) == pytest.approx(rho**2 * 4.0 / 2, rel=1e-4)


def test_hutchinson_exact_for_diagonal_hessian():
    lams = [3.0, 1.0, 0.25]
    x, y = quad_problem(lams, rotate=False)  # H diagonal: v^T H v = trace for every Rademacher v
    m = linear_model(3, 32)
    tr, se = A.hessian_trace(m, mse, [(x, y)], samples=5, return_stderr=True)
    assert tr == pytest.approx(sum(lams), rel=1e-9) and se < 1e-9


def test_sam_sharpness_away_from_minimum():
    x, y = quad_problem([4.0, 2.0, 1.0, 0.5], seed=1)
    m = linear_model(4, 32)
    wstar = torch.linalg.lstsq(x, y).solution
    w = wstar + torch.tensor([[0.05], [-0.1], [0.2], [0.1]], dtype=f64)
    with torch.no_grad():
        m.weight.copy_(w.T)
    h = 2 / len(x) * x.T @ x
    g = (h @ (w - wstar)).squeeze(1)
    rho = 0.2
    # one step = the SAM step: L(w + rho g/|g|) - L(w) = rho |g| + rho^2 ghat^T H ghat / 2
    gh = g / g.norm()
    one = float(rho * g.norm() + rho**2 / 2 * gh @ h @ gh)
    assert A.sam_sharpness(m, mse, [(x, y)], rho=rho, steps=1) == pytest.approx(one, rel=1e-9)
    exact = trust_region_max(g, h, rho)
    est = A.sam_sharpness(m, mse, [(x, y)], rho=rho, steps=50)
    assert one < est <= exact * (1 + 1e-9)
    assert est == pytest.approx(exact, rel=1e-5)


def test_m_sharpness_averages_per_chunk_maxima():
    x, y = quad_problem([4.0, 2.0, 1.0], n=8, seed=2)
    m = linear_model(3, 32)
    w = torch.linalg.lstsq(x, y).solution
    with torch.no_grad():
        m.weight.copy_(w.T)
    rho, mm = 0.1, 4
    ref = 0.0
    for xc, yc in zip(torch.split(x, mm), torch.split(y, mm)):
        hc = 2 / mm * xc.T @ xc
        gc = (2 / mm * xc.T @ (xc @ w - yc)).squeeze(1)
        ref += trust_region_max(gc, hc, rho) / 2
    est = A.sam_sharpness(m, mse, [(x, y)], rho=rho, m=mm, steps=60)
    assert est == pytest.approx(ref, rel=1e-4)
    # without m the whole set shares one perturbation (and sits at its minimum)
    assert A.sam_sharpness(m, mse, [(x, y)], rho=rho, steps=40) == pytest.approx(rho**2 * 4.0 / 2, rel=1e-4)


def _quantized_setup(seed=3):
    x, y = quad_problem([3.0, 1.5, 1.0, 0.6], n=16, seed=seed)
    m = linear_model(4, 4, x)
    aq, wq = m.act_quantizer, m.weight_quantizer
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.9, -0.3, 0.2, 0.05]], dtype=f64))
        wq.step.fill_(0.9 / 7 / 1.3)  # 0.9 is clipped (0.9/s = 9.1 > Qp = 7), the others are inside
    xq = lsq_ref(x, aq.step.detach(), 4, aq.signed)
    return m, x, y, xq


def test_quantized_hessian_is_wrt_qw_and_latent_goes_through_ste():
    m, x, y, xq = _quantized_setup()
    assert m.act_quantizer.signed is True
    hq = 2 / len(x) * xq.T @ xq  # Hessian w.r.t. Q(w): inputs are the quantized activations
    top = A.hessian_top_eigenvalue(m, mse, [(x, y)], iters=300, tol=1e-12, wrt="quantized")
    assert top == pytest.approx(float(torch.linalg.eigvalsh(hq).max()), rel=1e-6)
    tr, se = A.hessian_trace(m, mse, [(x, y)], samples=300, wrt="quantized", return_stderr=True)
    assert abs(tr - float(hq.trace())) < 4 * se
    # latent: through the STE, d Q(w)/dw = 1 inside the range, 0 where clipped -> M Hq M
    s = m.weight_quantizer.step.detach()
    v = (m.weight.detach() / s).squeeze(0)
    mask = torch.diag(((v >= -8) & (v <= 7)).to(f64))
    assert mask.diag().tolist() == [0.0, 1.0, 1.0, 1.0]
    hl = mask @ hq @ mask
    top_l = A.hessian_top_eigenvalue(m, mse, [(x, y)], iters=300, tol=1e-12, wrt="latent")
    assert top_l == pytest.approx(float(torch.linalg.eigvalsh(hl).max()), rel=1e-6)
    assert abs(top_l - top) > 1e-3
    tr_l, se_l = A.hessian_trace(m, mse, [(x, y)], samples=300, wrt="latent", return_stderr=True)
    assert abs(tr_l - float(hl.trace())) < 4 * se_l


def test_quantized_sam_sharpness_closed_form():
    m, x, y, xq = _quantized_setup(seed=4)
    s = m.weight_quantizer.step.detach()
    qw = lsq_ref(m.weight.detach(), s, 4, True).T
    hq = 2 / len(x) * xq.T @ xq
    g = (2 / len(x) * xq.T @ (xq @ qw - y)).squeeze(1)
    rho = 0.05
    exact = trust_region_max(g, hq, rho)
    assert A.sam_sharpness(m, mse, [(x, y)], rho=rho, steps=50, wrt="quantized") == pytest.approx(exact, rel=1e-5)


def _conv_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * 5 * 5, 3))
    saq.quantize(m, saq.QuantConfig(w_bits=4, a_bits=4, first_last_bits=8))
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(12, 2, 5, 5, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    m.train()
    m(x)  # steps initialised from data, BN statistics move once
    return m, [(x[:8], y[:8]), (x[8:], y[8:])]


def test_measures_leave_model_bit_for_bit_unchanged_and_in_its_mode():
    m, batches = _conv_model(dropout=0.5)
    m.train()
    m[3].perturb_post = marker = torch.zeros_like(m[3].weight)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ce = nn.CrossEntropyLoss()
    r1 = A.sam_sharpness(m, ce, batches, rho=0.05, steps=3)
    r2 = A.sam_sharpness(m, ce, batches, rho=0.05, steps=3)
    assert r1 == r2 and r1 > 0  # dropout off (eval mode): deterministic
    for wrt in ("quantized", "latent"):
        A.hessian_top_eigenvalue(m, ce, batches, iters=3, wrt=wrt)
        A.hessian_trace(m, ce, batches, samples=2, wrt=wrt)
        A.sam_sharpness(m, ce, batches, rho=0.05, m=4, steps=2, wrt=wrt)
        A.loss_landscape(m, ce, batches, dims=2, steps=3, where=wrt, progress=False)
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats, steps
    assert all(mod.training for mod in m.modules())
    assert m[3].perturb_post is marker and m[0].perturb_pre is None
    assert all(p.grad is None for p in m.parameters())


# ---------------------------------------------------------------------------------------------- landscape
def test_landscape_1d_quantized_and_latent_match_closed_form():
    m, x, y, xq = _quantized_setup()
    s = m.weight_quantizer.step.detach()
    w = m.weight.detach().clone()
    d = torch.tensor([[0.3, -0.2, 0.5, 0.1]], dtype=f64)
    ls = A.loss_landscape(m, mse, split(x, y, [10, 6]), steps=9, span=2.0, directions=[{"weight": d}],
                          progress=False)
    a = torch.linspace(-2, 2, 9, dtype=f64)
    qw = lsq_ref(w, s, 4, True)
    ref = [float(((xq @ (qw + t * d).T - y) ** 2).mean()) for t in a]
    np.testing.assert_allclose(ls.alphas, a.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ls.losses, ref, rtol=1e-10)
    assert np.isnan(ls.accuracies).all() and ls.betas is None and ls.meta["where"] == "quantized"
    lat = A.loss_landscape(m, mse, [(x, y)], steps=9, span=2.0, where="latent", directions=[{"weight": d}],
                           progress=False)
    ref_l = [float(((xq @ lsq_ref(w + t * d, s, 4, True).T - y) ** 2).mean()) for t in a]
    np.testing.assert_allclose(lat.losses, ref_l, rtol=1e-10)
    assert not np.allclose(lat.losses, ls.losses)


def test_landscape_2d_closed_form():
    x, y = quad_problem([2.0, 1.0, 0.5])
    m = linear_model(3, 32)
    w = m.weight.detach().clone()
    d1 = torch.tensor([[1.0, 0.0, 0.5]], dtype=f64)
    d2 = torch.tensor([[0.0, -1.0, 0.25]], dtype=f64)
    ls = A.loss_landscape(m, mse, [(x, y)], dims=2, steps=5, span=1.0, directions=[{"weight": d1}, {"weight": d2}],
                          progress=False)
    g = np.linspace(-1, 1, 5)
    assert ls.losses.shape == (5, 5) and ls.dims == 2
    for i, a in enumerate(g):
        for j, b in enumerate(g):
            ref = float(((x @ (w + a * d1 + b * d2).T - y) ** 2).mean())
            assert ls.losses[i, j] == pytest.approx(ref, rel=1e-10)


def test_random_directions_filter_normalised_and_reproducible():
    m, batches = _conv_model(seed=0)
    layers = [m[0], m[3], m[8]]
    names = ["0.weight", "3.weight", "8.weight"]
    dq = A.random_directions(m, dims=2, seed=7, where="quantized")
    assert len(dq) == 2 and all(sorted(d) == names for d in dq)  # no bias / BN direction
    for d in dq:
        for name, layer in zip(names, layers):
            s = layer.weight_quantizer.step.detach().view(-1, *[1] * (layer.weight.dim() - 1))
            qw = lsq_ref(layer.weight.detach(), s, layer.w_bits, True)
            np.testing.assert_allclose(d[name].flatten(1).norm(dim=1), qw.flatten(1).norm(dim=1), rtol=1e-5)
    dl = A.random_directions(m, dims=1, seed=7, where="latent")[0]
    for name, layer in zip(names, layers):
        np.testing.assert_allclose(dl[name].flatten(1).norm(dim=1), layer.weight.detach().flatten(1).norm(dim=1),
                                   rtol=1e-5)
    again = A.random_directions(m, dims=2, seed=7, where="quantized")
    assert all(torch.equal(a[n], b[n]) for a, b in zip(dq, again) for n in names)
    other = A.random_directions(m, dims=1, seed=8)[0]
    assert not torch.allclose(other["3.weight"], dq[0]["3.weight"])
    # another checkpoint of the same architecture: same raw directions, only the filter scale differs
    m2, _ = _conv_model(seed=1)
    d2 = A.random_directions(m2, dims=1, seed=7, where="quantized")[0]
    for n in names:
        u1 = dq[0][n].flatten(1) / dq[0][n].flatten(1).norm(dim=1, keepdim=True)
        u2 = d2[n].flatten(1) / d2[n].flatten(1).norm(dim=1, keepdim=True)
        torch.testing.assert_close(u1, u2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_landscape_centre_is_the_model_loss_and_accuracy(tmp_path):
    m, batches = _conv_model(seed=2)
    m.eval()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        out = m(x)
    ref_loss, ref_acc = float(F.cross_entropy(out, y)), 100 * float((out.argmax(1) == y).double().mean())
    ls = A.loss_landscape(m, nn.CrossEntropyLoss(), batches, steps=5, span=0.5, progress=False)
    assert ls.losses[2] == pytest.approx(ref_loss, rel=1e-5)
    assert ls.accuracies[2] == pytest.approx(ref_acc)
    assert A.evaluate(m, nn.CrossEntropyLoss(), batches) == pytest.approx((ref_loss, ref_acc), rel=1e-5)
    assert ls.losses[0] != ls.losses[2]
    # files: npz round trip, csv, plots
    p = A.save_landscape(ls, tmp_path / "a.npz")
    back = A.load_landscape(p)
    np.testing.assert_array_equal(back.losses, ls.losses)
    assert back.meta == ls.meta and back.betas is None
    csv = A.save_landscape(ls, tmp_path / "a.csv").read_text().splitlines()
    assert csv[0] == "alpha,loss,accuracy" and len(csv) == 6
    ls2 = A.loss_landscape(m, nn.CrossEntropyLoss(), batches, dims=2, steps=3, progress=False)
    assert len(A.save_landscape(ls2, tmp_path / "b.csv").read_text().splitlines()) == 10
    for name, group in (("one.png", {"a": ls, "b": back}), ("two.png", {"a": ls2, "b": ls2})):
        png = A.plot_landscapes(group, tmp_path / name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="1-D and 2-D"):
        A.plot_landscapes({"a": ls, "b": ls2}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=".npz or .csv"):
        A.save_landscape(ls, tmp_path / "a.txt")


def test_bad_input_raises():
    m, batches = _conv_model()
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="wrt"):
        A.hessian_trace(m, ce, batches, wrt="float")
    with pytest.raises(ValueError, match="rho"):
        A.sam_sharpness(m, ce, batches, rho=0.0)
    with pytest.raises(ValueError, match="m must be"):
        A.sam_sharpness(m, ce, batches, m=0)
    with pytest.raises(ValueError, match="dims"):
        A.loss_landscape(m, ce, batches, dims=3)
    with pytest.raises(ValueError, match="steps"):
        A.loss_landscape(m, ce, batches, steps=1)
    with pytest.raises(ValueError, match="single"):
        A.hessian_top_eigenvalue(m, ce, batches[0])
    with pytest.raises(ValueError, match="no batch"):
        A.hessian_top_eigenvalue(m, ce, [])
    with pytest.raises(ValueError, match="cannot perturb"):
        A.loss_landscape(m, ce, batches, directions=[{"1.weight": torch.zeros(4)}])


# ------------------------------------------------------------------------------------------ drivers
class _TfDataset(torch.utils.data.Dataset):
    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


@pytest.fixture
def fake_ckpt(monkeypatch):
    """torchsaq.train.checkpoint.load_model / torchsaq.train.data.build_datasets stand-ins: a conv model and a tensor
    data set."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 2, 5, 5, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    models = {"a/best.pt": _conv_model(seed=0)[0], "b/best.pt": _conv_model(seed=1)[0]}
    cfg = types.SimpleNamespace(dataset="toy", data_dir=None, img_size=None, val_split=0.0, seed=0)

    def load_model(path, device):
        return models[path].to(device), cfg, {}

    def build_datasets(name, data_dir, img_size=None, val_split=0.0, seed=0, augment=True):
        augment = lambda t: t + 100.0  # noqa: E731 - a training augmentation the analysis must not use
        return types.SimpleNamespace(train=_TfDataset(x, y, augment), val=None, test=_TfDataset(x, y, lambda t: t))

    # the drivers import these functions from the real modules when called: replace the attributes there
    monkeypatch.setattr(torchsaq.checkpoint, "load_model", load_model)
    monkeypatch.setattr(torchsaq.data, "build_datasets", build_datasets)
    return models, x, y


def test_run_sharpness_uses_fixed_eval_subset(fake_ckpt):
    models, x, y = fake_ckpt
    row = A.run_sharpness("a/best.pt", num_samples=12, batch_size=5, iters=3, samples=2, steps=2)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:12]
    m = models["a/best.pt"].eval()
    with torch.no_grad():
        ref = float(F.cross_entropy(m(x[idx]), y[idx]))
    assert row["loss"] == pytest.approx(ref, rel=1e-5) and row["num_samples"] == 12
    for k in ("hessian_top_eigenvalue", "hessian_trace", "hessian_trace_stderr", "sam_sharpness"):
        assert math.isfinite(row[k])
    table = A.format_sharpness_table([row, dict(row, checkpoint="b|c")]).splitlines()
    assert table[0].startswith("| checkpoint | wrt | num_samples | loss |") and len(table) == 4
    assert "b\\|c" in table[3]


def test_run_landscape_writes_plot_and_data(fake_ckpt, tmp_path):
    paths = A.run_landscape(["a/best.pt", "b/best.pt"], tmp_path, steps=5, num_samples=10, batch_size=4,
                            progress=False)
    assert set(paths) == {"plot", "npz:a/best.pt", "csv:a/best.pt", "npz:b/best.pt", "csv:b/best.pt"}
    assert all(Path(p).is_file() and Path(p).parent == tmp_path for p in paths.values())
    assert Path(paths["plot"]).read_bytes()[:4] == b"\x89PNG"
    ls = A.load_landscape(paths["npz:b/best.pt"])
    assert ls.meta["label"] == "b/best.pt" and ls.meta["num_samples"] == 10 and ls.losses.shape == (5,)


def test_format_sharpness_table_exact():
    out = A.format_sharpness_table([{"name": "x", "v": 0.123456, "m": None}, {"name": "y", "v": float("nan"), "w": 3}])
    assert out == ("| name | v | m | w |\n|---|---|---|---|\n| x | 0.1235 | - | - |\n| y | nan | - | 3 |\n")
