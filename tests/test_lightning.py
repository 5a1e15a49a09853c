"""SAQ as a Lightning LightningModule's optimizer (``configure_optimizers``), with automatic optimisation.

bf16-mixed (and 32-true): Lightning passes its closure to ``optimizer.step``, so the two-pass step runs.
16-mixed: Lightning's MixedPrecision plugin runs the closure itself, unscales, then calls ``scaler.step(opt)``
without a closure: the two-pass strategies raise (never a plain step); ``prev_grad`` takes its closure-free step
with that scaler. Tested on the CPU with the plugin given a CPU GradScaler (Lightning's default one is CUDA's).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchsaq as saq

L = pytest.importorskip("lightning")
MixedPrecision = pytest.importorskip("lightning.pytorch.plugins.precision").MixedPrecision

pytestmark = pytest.mark.filterwarnings("ignore")  # Lightning's own deprecation / data-loader warnings


def _loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 3, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x0 = torch.randn(16, 20)
    saq.quantize(net, saq.QuantConfig(w_bits=4, a_bits=4, first_last_bits=4), example_inputs=x0)
    saq.calibrate(net, [x0])
    return net


class QuantModule(L.LightningModule):
    """The README's Lightning example: a quantized model, SAQ from configure_optimizers."""

    def __init__(self, sharp: bool = True, **saq_kw):
        super().__init__()
        self.net = _net()
        self.sharp, self.saq_kw = sharp, saq_kw

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return saq.SAQ(self, base, rho=0.1, **self.saq_kw) if self.sharp else base


def _fit(module: QuantModule, **trainer_kw) -> QuantModule:
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_kw)
    trainer.fit(module, _loader())
    return module


def _fp16_plugin():
    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))]


@pytest.mark.slow
@pytest.mark.parametrize("precision,adaptive", [("bf16-mixed", False), ("bf16-mixed", True), ("32-true", False)])
def test_automatic_optimisation_runs_the_two_pass_step(precision, adaptive):
    # (adaptive: Lightning zeroes the gradients between its forward and backward; the captured Q(w) must stay)
    module = _fit(QuantModule(strategy="full", adaptive=adaptive), precision=precision)
    opt = module.trainer.optimizers[0]
    assert isinstance(opt, saq.SAQ) and opt.step_count == 3 and opt.passes_last_step == 2
    assert all(layer.perturb_post is None for _, layer in saq.quant_layers(module.net))  # restored
    plain = _fit(QuantModule(sharp=False), precision=precision)
    assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), plain.parameters()))


@pytest.mark.slow
def test_16_mixed_two_pass_strategy_raises_instead_of_a_plain_step():
    module = QuantModule(strategy="full")
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match="16-mixed"):
        _fit(module, plugins=_fp16_plugin())
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))  # no step was taken


@pytest.mark.slow
def test_16_mixed_prev_grad_is_the_closure_free_amp_step():
    """Lightning unscales the gradients, then scaler.step(opt): the optimizer was given no grad_scaler, yet the
    captured Q(w) gradients are unscaled with the running scaler's scale (else case 3's direction would weigh
    them 2^8 times the biases' gradients): the same steps as the README's AMP recipe with grad_scaler=."""
    module = _fit(QuantModule(strategy="prev_grad"), plugins=_fp16_plugin())
    opt = module.trainer.optimizers[0]
    assert opt.step_count == 3 and opt.passes_last_step == 1

    net = _net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    ref = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), rho=0.1, strategy="prev_grad",
                  grad_scaler=scaler)
    for i, (x, y) in enumerate(_loader()):
        if i == 3:
            break
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(ref)
        scaler.update()
        ref.zero_grad()
    for (k, p), (_, q) in zip(module.net.named_parameters(), net.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), k


@pytest.mark.slow
def test_readme_lightning_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### Lightning\n.*?```python\n(.*?)```", text, re.S)
    assert block, "README.md has no Lightning example"
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    opt = scope["trainer"].optimizers[0]
    assert isinstance(opt, saq.SAQ) and opt.passes_last_step == 2 and opt.step_count == 4
