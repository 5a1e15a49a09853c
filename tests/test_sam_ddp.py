"""saq.SAQ under DistributedDataParallel (CPU, gloo, 2 processes started with subprocess).

Each rank perturbs with its own shard's first-pass gradient (no all-reduce in the ascent backward) and the
second-pass gradients are averaged. The reference below does exactly that in one process with plain autograd
on a functional re-implementation of the quantized forward (no BatchNorm, so it is exact).

This file is also the worker script: ``python test_sam_ddp.py RANK WORLD STORE OUT``.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq import QuantConfig
from torchsaq.optim.saq import SAQ

HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RHO = 0.3
STEPS = 2
WORLD = 2
# name -> SAQ options; only "case3" is compared against the reference, the others must keep ranks identical
CONFIGS = {"case3": {}, "every_k": {"strategy": "every_k", "k": 2}, "prev_grad": {"strategy": "prev_grad"},
           "case2_asam": {"mode": "case2", "adaptive": True}}


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    return quantized_for_ranks(m, global_batch(-1)[0])


def quantized_for_ranks(m: nn.Module, x0: torch.Tensor) -> nn.Module:
    """``m`` quantized w2a3 (first/last 3-bit), its LSQ steps initialised on ``x0`` (identical on every rank), the
    weight steps halved for some clipping; the model the distributed tests start every rank from."""
    saq.quantize(m, QuantConfig(w_bits=2, a_bits=3, first_last_bits=3), example_inputs=x0)
    with torch.no_grad():
        m(x0)  # LSQ step initialisation, identical on every rank
        for _, layer in saq.quant_layers(m):
            layer.weight_quantizer.step.mul_(0.5)  # some clipping
    return m


def global_batch(i: int):
    g = torch.Generator().manual_seed(2000 + i)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def shard(i: int, rank: int, world: int):
    x, y = global_batch(i)
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


# ------------------------------------------------------------------------------------------- worker
def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for name, kw in CONFIGS.items():
            model = make_model()
            ddp = DDP(model)
            opt = SAQ(ddp, torch.optim.SGD(ddp.parameters(), **HP), rho=RHO, **kw)
            for it in range(STEPS + 1 if name == "every_k" else STEPS):
                x, y = shard(it, rank, world)

                def closure():
                    loss = F.cross_entropy(ddp(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
                opt.zero_grad()
            torch.save({k: v.detach().clone() for k, v in model.named_parameters()},
                       os.path.join(out, f"{name}_{rank}.pt"))
        # prev_grad without a closure, as accelerate / HF Trainer loops call it: loss.backward(); opt.step()
        model = make_model()
        ddp = DDP(model)
        opt = SAQ(ddp, torch.optim.SGD(ddp.parameters(), **HP), rho=RHO, strategy="prev_grad")
        for it in range(STEPS):
            x, y = shard(it, rank, world)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()},
                   os.path.join(out, f"prev_grad_closure_free_{rank}.pt"))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- reference
def fq(x, step, bits, signed, samples=1):
    """LSQ written out: round(clamp(x/s)) * s, STE for x, step gradient scaled by 1/sqrt(N Qp)."""
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    g = 1.0 / math.sqrt((x.numel() // samples // step.numel()) * qp)  # activations: N per sample
    s = step.detach() + (step * g - (step * g).detach())
    s = s.view(-1, *([1] * (x.dim() - 1))) if step.numel() > 1 else s.reshape(())
    v = torch.clamp(x / s, qn, qp)
    return (torch.round(v).detach() + (v - v.detach())) * s


def ref_grads(model, P0, x, y, post=None, delta=None):
    P = {k: (v + delta[k] if delta and k in delta else v).detach().clone().requires_grad_() for k, v in P0.items()}
    qw = {}
    h = x
    for i, m in enumerate(model):
        n = str(i)
        if isinstance(m, nn.ReLU):
            h = F.relu(h)
            continue
        a = fq(h, P[f"{n}.act_quantizer.step"], m.a_bits, m.act_quantizer.signed, samples=h.shape[0])
        wq = fq(P[f"{n}.weight"], P[f"{n}.weight_quantizer.step"], m.w_bits, True)
        wq.retain_grad()
        qw[n] = wq
        h = F.linear(a, wq + post[n] if post else wq, P[f"{n}.bias"])
    F.cross_entropy(h, y).backward()
    return {k: p.grad for k, p in P.items()}, {n: t.grad for n, t in qw.items()}


def case3_perturbation(G, GQ):
    """docs/method.md, case 3: e = rho * [grad_Q(w) for layer weights, grad for biases] / global norm (steps
    excluded)."""
    items = {("q", n): g for n, g in GQ.items()} | {("p", k): g for k, g in G.items() if k.endswith("bias")}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in items.values()))
    post = {n: (RHO * g.double() / norm).float() for (kind, n), g in items.items() if kind == "q"}
    delta = {k: (RHO * g.double() / norm).float() for (kind, k), g in items.items() if kind == "p"}
    return post, delta


def reference(local_ascent: bool) -> dict:
    model = make_model()
    P = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    sgd = torch.optim.SGD(list(P.values()), **HP)
    for it in range(STEPS):
        P0 = {k: v.detach() for k, v in P.items()}
        if not local_ascent:  # what a synchronised first backward would give: one global perturbation
            post, delta = case3_perturbation(*ref_grads(model, P0, *global_batch(it)))
        total = {k: torch.zeros_like(v) for k, v in P0.items()}
        for r in range(WORLD):
            x, y = shard(it, r, WORLD)
            if local_ascent:  # each replica perturbs with its own first-pass gradient
                post, delta = case3_perturbation(*ref_grads(model, P0, x, y))
            G2, _ = ref_grads(model, P0, x, y, post=post, delta=delta)
            for k in total:
                total[k] += G2[k] / WORLD
        for k, p in P.items():
            p.grad = total[k]
        sgd.step()
    return {k: v.detach() for k, v in P.items()}


@pytest.mark.slow
def test_ddp_ranks_agree_and_match_local_ascent_reference(tmp_path: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(WORLD), str(store), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(WORLD)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]

    want = reference(local_ascent=True)   # conftest keeps this process at one thread
    synced = reference(local_ascent=False)
    # the reference distinguishes per-replica ascent from an all-reduced one
    assert max(float((want[k] - synced[k]).abs().max()) for k in want) > 1e-4

    for name in CONFIGS:
        ranks = [torch.load(tmp_path / f"{name}_{r}.pt", weights_only=True) for r in range(WORLD)]
        for k in ranks[0]:
            assert torch.equal(ranks[0][k], ranks[1][k]), (name, k)
    for r in range(WORLD):  # the closure-free form: the same step, on every rank
        free = torch.load(tmp_path / f"prev_grad_closure_free_{r}.pt", weights_only=True)
        closure = torch.load(tmp_path / f"prev_grad_{r}.pt", weights_only=True)
        for k in free:
            assert torch.equal(free[k], closure[k]), k
    got = torch.load(tmp_path / "case3_0.pt", weights_only=True)
    start = dict(make_model().named_parameters())
    for k in want:
        assert not torch.equal(got[k], start[k].detach()), k  # it trained
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), k


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
