"""The custom op torch.ops.torchsaq.lsq and its Triton kernels, against the torch maths and a float64 reference.

The Triton kernels run here under Triton's CPU interpreter (TRITON_INTERPRET=1, set for this module's
fixture only), the GPU machine runs the same tests on CUDA (benchmarks/gpu.sh). The float64 reference is
test_quantizer.ref_lsq, written out from docs/method.md.
"""
import math

import pytest
import torch
from torch import nn

import torchsaq as saq
from torchsaq.quant import kernels
from torchsaq.quant.quantizer import lsq, qrange

from test_quantizer import ref_lsq

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tri():
    """The Triton kernels: interpreted on CPU tensors (conftest.py sets TRITON_INTERPRET=1 without CUDA), or
    compiled on CUDA tensors."""
    mod = kernels._triton()
    if mod.INTERPRET == CUDA:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set" if not CUDA else "interpreter on a GPU")
    return mod


@pytest.fixture
def triton_backend():
    kernels.set_lsq_backend("triton")
    yield
    kernels.set_lsq_backend("autograd")


DEV = "cuda" if CUDA else "cpu"

#: (x shape, step shape, memory format): per-tensor, per-channel along dim 0 / 1 / the last, block-crossing sizes
LAYOUTS = {
    "per_tensor": ((5, 7, 9, 11), (), torch.contiguous_format),
    "per_tensor_channels_last": ((3, 8, 9, 10), (), torch.channels_last),
    "weight_dim0": ((12, 7, 3, 5), (12, 1, 1, 1), torch.contiguous_format),
    "act_dim1": ((3, 6, 13, 17), (1, 6, 1, 1), torch.contiguous_format),
    "act_dim1_short_step": ((2, 6, 40, 31), (6, 1, 1), torch.contiguous_format),
    "linear_last_dim": ((37, 50), (50,), torch.contiguous_format),
    "big_per_tensor": ((3000,), (1,), torch.contiguous_format),
}


def _data(shape, sshape, bits, signed, dtype, fmt, seed=0):
    """x spread over the whole range and past it, with exact .5 ties, infinities and NaN; the step; upstream."""
    g = torch.Generator().manual_seed(seed)
    qn, qp = qrange(bits, signed)
    s = (torch.rand(sshape, generator=g) * 0.4 + 0.1).to(dtype)
    n = math.prod(shape)
    v = (torch.rand(n, generator=g) * (qp - qn + 4) + qn - 2)
    v[: n // 8] = torch.randint(qn - 1, qp + 1, (n // 8,), generator=g) + 0.5  # ties
    x = (v.reshape(shape) * s.float()).to(dtype)
    flat = x.view(-1)
    flat[-1], flat[-2], flat[-3] = float("inf"), -float("inf"), float("nan")
    up = torch.randn(shape, generator=g).to(dtype)
    return (x.to(DEV).contiguous(memory_format=fmt), s.to(DEV), up.to(DEV).contiguous(memory_format=fmt))


def _run(fn, x, s, up, qn, qp, gs):
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    y = fn(x, s, qn, qp, gs)
    y.backward(up)
    return y.detach(), x.grad, s.grad


def _torch_path(x, s, qn, qp, gs):
    return saq.quant.quantizer._LSQFunction.apply(x, s, qn, qp, gs)


def _op(x, s, qn, qp, gs):
    return torch.ops.torchsaq.lsq(x, s, qn, qp, gs)


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_torch_maths(tri, layout, bits, signed, dtype):
    """Forward and grad_x bit-identical to the torch maths (ties to even, inf clipped, NaN kept); grad_step
    equal up to summation order."""
    shape, sshape, fmt = LAYOUTS[layout]
    x, s, up = _data(shape, sshape, bits, signed, dtype, fmt)
    qn, qp = qrange(bits, signed)
    assert kernels._triton_ok(x, s) is not None
    y, gx, gs = _run(_op, x, s, up, qn, qp, 0.37)
    ry, rgx, rgs = _run(_torch_path, x, s, up, qn, qp, 0.37)
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y, ry, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(gx, rgx, rtol=0, atol=0, equal_nan=True)
    # the NaN element makes its step's gradient NaN in both; compare the rest
    assert gs.shape == rgs.shape and gs.dtype == rgs.dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gs.float(), rgs.float(), equal_nan=True, **tol)


@pytest.mark.parametrize("layout", ["per_tensor", "weight_dim0", "act_dim1_short_step", "linear_last_dim"])
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False)])
def test_triton_matches_float64_reference(tri, layout, bits, signed):
    """Value and both gradients against the float64 reference, away from ties and with finite inputs."""
    shape, sshape, fmt = LAYOUTS[layout]
    g = torch.Generator().manual_seed(1)
    s = torch.rand(sshape, generator=g, dtype=torch.float64) * 0.4 + 0.05
    qn, qp = qrange(bits, signed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * s * 0.7 * qp
    v = x / s
    x = torch.where(((v - v.floor()) - 0.5).abs() < 1e-3, x + 0.01 * s, x)
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    ry, rgx, rgs = ref_lsq(x, s, bits, signed, up)
    xs = x.float().to(DEV).requires_grad_()
    ss = s.float().to(DEV).requires_grad_()
    kernels.set_lsq_backend("triton")
    try:
        y = lsq(xs, ss, bits, signed)
    finally:
        kernels.set_lsq_backend("autograd")
    y.backward(up.float().to(DEV))
    torch.testing.assert_close(y.double().cpu(), ry, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xs.grad.double().cpu(), rgx)
    torch.testing.assert_close(ss.grad.double().cpu(), rgs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("need", ["x", "step"])
def test_only_the_needed_gradient(tri, need):
    x, s, up = _data((4, 5, 6, 7), (5, 1, 1), 4, True, torch.float32, torch.contiguous_format)
    x, s = x.nan_to_num(0.0, 0.0, 0.0).requires_grad_(need == "x"), s.requires_grad_(need == "step")
    _op(x, s, -8, 7, 0.5).backward(up)
    ref_x, ref_s = x.detach().clone().requires_grad_(need == "x"), s.detach().clone().requires_grad_(need == "step")
    _torch_path(ref_x, ref_s, -8, 7, 0.5).backward(up)
    got, want = (x.grad, ref_x.grad) if need == "x" else (s.grad, ref_s.grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (s.grad if need == "x" else x.grad) is None


def test_opcheck_triton(tri):
    """PyTorch's own validator of custom ops: schema, fake tensors, autograd registration, AOT dispatch."""
    x, s, _ = _data((4, 6, 5, 5), (1, 6, 1, 1), 3, True, torch.float32, torch.contiguous_format)
    torch.library.opcheck(torch.ops.torchsaq.lsq.default, (x.nan_to_num(0.0, 0.0, 0.0).requires_grad_(),
                                                          s.requires_grad_(), -4, 3, 0.25))


def test_opcheck_torch_maths(tri, monkeypatch):
    """The op's implementation where Triton does not run (CPU tensors without the interpreter)."""
    monkeypatch.setattr(tri, "INTERPRET", False)
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    s = (torch.rand(6, 1, 1) + 0.1).requires_grad_()
    torch.library.opcheck(torch.ops.torchsaq.lsq.default, (x, s, 0, 15, 0.1))


def test_step_varying_along_two_dims_runs_the_torch_maths(tri):
    x = torch.randn(4, 6, 5, device=DEV)
    s = torch.rand(4, 6, 1, device=DEV) + 0.1
    assert kernels._triton_ok(x, s) is None
    y, gx, gs = _run(_op, x, s, torch.ones_like(x), -2, 1, 0.5)
    ry, rgx, rgs = _run(_torch_path, x, s, torch.ones_like(x), -2, 1, 0.5)
    assert torch.equal(y, ry) and torch.equal(gx, rgx) and torch.equal(gs, rgs)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    return saq.quantize(m, saq.QuantConfig(w_bits=3, a_bits=3, first_last_bits=8)).to(DEV)


def _sgd_steps(backend, steps=3):
    kernels.set_lsq_backend(backend)
    try:
        model = _model()
        opt = saq.SAQ(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rho=0.1)
        g = torch.Generator().manual_seed(3)
        for _ in range(steps):
            x = torch.randn(6, 3, 8, 8, generator=g).to(DEV)
            y = torch.randint(0, 5, (6,), generator=g).to(DEV)

            def closure():
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
            opt.zero_grad()
        return [p.detach().cpu() for p in model.parameters()]
    finally:
        kernels.set_lsq_backend("autograd")


def test_saq_training_with_the_triton_backend_matches_autograd(tri):
    """Three SAQ (case 3) steps of a quantized CNN (per-channel weights, per-tensor activations)."""
    for a, b in zip(_sgd_steps("triton"), _sgd_steps("autograd")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiles_as_one_op_without_graph_breaks(tri, triton_backend):
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model = _model()
    x = torch.randn(2, 3, 8, 8, device=DEV)
    model(x)  # initialise the steps eagerly
    cnt = CompileCounter()
    out = torch.compile(model, backend=cnt, fullgraph=True)(x)
    out.sum().backward()
    assert cnt.frame_count == 1
    torch._dynamo.reset()


def test_backend_choice_errors():
    with pytest.raises(ValueError, match="unknown LSQ backend 'cuda'"):
        kernels.set_lsq_backend("cuda")
    assert kernels.get_lsq_backend() == "autograd"


def test_triton_backend_on_cpu_without_interpreter_is_the_torch_maths(tri, triton_backend, monkeypatch):
    """Without the interpreter, CPU tensors take the torch maths inside the op: identical results."""
    monkeypatch.setattr(tri, "INTERPRET", False)
    x = torch.randn(3, 4, 5, 5)
    s = torch.rand(4, 1, 1) + 0.1
    _, _, rgs = _run(_torch_path, x, s, torch.ones_like(x), 0, 7, 0.3)
    y, gx, gs = _run(_op, x, s, torch.ones_like(x), 0, 7, 0.3)
    assert torch.equal(y, saq.quant.quantizer._LSQFunction.apply(x, s, 0, 7, 0.3)) and torch.equal(gs, rgs)


def test_train_refuses_the_triton_backend_off_cuda(tmp_path):
    from torchsaq.train.config import TrainConfig
    from torchsaq.train.runner import train
    with pytest.raises(ValueError, match="unknown lsq backend 'fast'; choose one of autograd, triton"):
        TrainConfig(lsq_backend="fast")
    cfg = TrainConfig(lsq_backend="triton", device="cpu", epochs=1, output=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="lsq_backend 'triton' runs Triton kernels on CUDA devices only"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists() and kernels.get_lsq_backend() == "autograd"


def test_train_restores_the_backend(monkeypatch, tmp_path):
    """train() sets the backend it was given for its run and puts the caller's back, also after a failure."""
    from torchsaq.train import runner as train_mod
    from torchsaq.train.config import TrainConfig

    seen = []

    def fake_train(cfg, *a, **k):
        seen.append(kernels.get_lsq_backend())
        raise RuntimeError("stop")
    monkeypatch.setattr(train_mod, "_train", fake_train)
    monkeypatch.setattr(train_mod, "resolve_device", lambda *a: torch.device("cuda"))
    monkeypatch.setattr(train_mod, "init_distributed", lambda *a: False)
    with pytest.raises(RuntimeError, match="stop"):
        train_mod.train(TrainConfig(lsq_backend="triton", save=False), progress=False)
    assert seen == ["triton"] and kernels.get_lsq_backend() == "autograd"
