"""saq.SAQ under FSDP2 (``torch.distributed.fsdp.fully_shard``): CPU, gloo, 2 processes (torch.multiprocessing).

Under FSDP2 the parameters and their gradients are DTensors sharded on dim 0 and every backward averages the
gradients over the ranks, so the ascent is global: the perturbation must be the one of the whole batch, built
from global norms, with case 3's gradient w.r.t. Q(w) (captured unsharded, from each rank's own samples)
averaged over the ranks. The reference is the plain single-process SAQ step on the whole batch (no BatchNorm:
it normalises per rank), which the sharded run must match within float tolerance.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq import QuantConfig
from torchsaq.optim.saq import SAQ

from test_sam_ddp import quantized_for_ranks  # noqa: E402  (the same start model recipe as the DDP tests)

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD = 2
STEPS = 3
RHO = 0.3
VOCAB = 64
TIMEOUT_S = 240
# A local norm, or a gradient w.r.t. Q(w) not averaged over the ranks, moves the weights by 1e-4..5e-2 here; the
# sharded runs match within 1e-6. The LM trains with SGD: with AdamW (lr 0.01) the float-level differences of
# the sharded reductions (plain FSDP2 AdamW, no SAQ: 1.4e-6 after one step) flip the rounding of a few Q(w)
# elements by the second step, whose step sizes Adam then moves by 1e-4..1e-3 (chaotic, not a SAQ error).
SGD = ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=5e-4))
ADAMW = ("adamw", dict(lr=0.01, weight_decay=0.01))
# name -> (model, base optimizer, SAQ options, closure-free)
CONFIGS = {
    "mlp_full_sgd": ("mlp", SGD, {}, False),
    "mlp_full_adamw": ("mlp", ADAMW, {}, False),
    "mlp_prev_grad_sgd": ("mlp", SGD, {"strategy": "prev_grad"}, False),
    "mlp_prev_grad_adamw_closure_free": ("mlp", ADAMW, {"strategy": "prev_grad"}, True),
    "mlp_momentum_adamw_closure_free": ("mlp", ADAMW, {"strategy": "momentum"}, True),
    "mlp_asam_sgd": ("mlp", SGD, {"adaptive": True}, False),
    "mlp_case2_asam_sgd": ("mlp", SGD, {"mode": "case2", "adaptive": True}, False),
    "mlp_every_k_sgd": ("mlp", SGD, {"strategy": "every_k", "k": 2}, False),
    "llama_full_sgd": ("llama", SGD, {}, False),
    "llama_prev_grad_sgd_closure_free": ("llama", SGD, {"strategy": "prev_grad"}, True),
    # SAQ built before fully_shard, its parameters then swapped for the sharded ones (accelerate's FSDP2 prepare)
    "mlp_prev_grad_adamw_closure_free_swapped": ("mlp", ADAMW, {"strategy": "prev_grad"}, True),
    "mlp_full_sgd_swapped": ("mlp", SGD, {}, False),
}


# ------------------------------------------------------------------------------------------ the models
def mlp_batch(i: int):
    g = torch.Generator().manual_seed(3000 + i)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return quantized_for_ranks(m, mlp_batch(-1)[0])


def llama_batch(i: int):
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(4000 + i))
    return ids, ids


def make_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).float()
    saq.quantize(model, QuantConfig(w_bits=4, a_bits=None, group_size=16))
    with torch.no_grad():
        model(input_ids=llama_batch(-1)[0])  # the steps' initialisation, before fully_shard (see SAQ's check)
    return model


MODELS = {"mlp": (make_mlp, mlp_batch), "llama": (make_llama, llama_batch)}


def loss_of(model: nn.Module, kind: str, x, y):
    if kind == "llama":
        return model(input_ids=x, labels=y).loss
    return F.cross_entropy(model(x), y)


def make_opt(model: nn.Module, base, kw) -> SAQ:
    name, hp = base
    cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    return SAQ(model, cls(model.parameters(), **hp), rho=RHO, **kw)


def train(model: nn.Module, kind: str, opt: SAQ, closure_free: bool, rank: int = 0, world: int = 1) -> None:
    """STEPS steps; ``world`` > 1: this rank's share of each (global) batch."""
    for it in range(STEPS):
        x, y = MODELS[kind][1](it)
        n = x.shape[0] // world
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        if closure_free:  # as accelerate / the HF Trainer call it
            loss_of(model, kind, x, y).backward()
            opt.step()
        else:
            def closure():
                loss = loss_of(model, kind, x, y)
                loss.backward()
                return loss
            opt.step(closure)
        opt.zero_grad()


# ------------------------------------------------------------------------------------------ the worker
def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for name, (kind, base, kw, closure_free) in CONFIGS.items():
            model = MODELS[kind][0]()
            swapped = name.endswith("_swapped")
            if swapped:
                opt = make_opt(model, base, kw)
                names = {id(p): n for n, p in model.named_parameters()}
            blocks = model.model.layers if kind == "llama" else [m for _, m in saq.quant_layers(model)]
            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            assert all(p.placements[0].is_shard() for p in model.parameters())  # type: ignore[attr-defined]
            if swapped:
                sharded = dict(model.named_parameters())
                for group in opt.param_groups:
                    group["params"] = [sharded[names[id(p)]] for p in group["params"]]
            else:
                opt = make_opt(model, base, kw)
            train(model, kind, opt, closure_free, rank, world)
            full = {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}  # type: ignore
            if rank == 0:
                torch.save(full, os.path.join(out, f"{name}.pt"))
        # quantizers initialised after fully_shard would keep their placeholder steps: refused
        model = nn.Sequential(nn.Linear(6, 4))
        saq.quantize(model, QuantConfig(w_bits=4, a_bits=4, first_last_bits=4), example_inputs=mlp_batch(-1)[0])
        fully_shard(model, mesh=mesh)
        try:
            make_opt(model, SGD, {})
        except ValueError as e:
            if rank == 0 and "before fully_shard" in str(e):
                Path(out, "uninitialised_refused").touch()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out: Path) -> None:
    """Run the workers; never hangs: every worker is killed after TIMEOUT_S."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):  # raises if a worker failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"FSDP2 workers still running after {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    _spawn(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_matches_single_process_on_the_whole_batch(name, sharded_runs):
    kind, base, kw, closure_free = CONFIGS[name]
    got = torch.load(sharded_runs / f"{name}.pt", weights_only=True)
    model = MODELS[kind][0]()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    train(model, kind, make_opt(model, base, kw), closure_free)
    want = dict(model.named_parameters())
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(want[k].detach(), start[k])]
    assert len(changed) > len(want) // 2, changed  # it trained
    for k in want:
        torch.testing.assert_close(got[k], want[k].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} {k}: {m}")


@pytest.mark.slow
def test_fsdp2_refuses_quantizers_initialised_after_sharding(sharded_runs):
    assert (sharded_runs / "uninitialised_refused").exists()
