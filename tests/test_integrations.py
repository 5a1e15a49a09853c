"""SAQ inside training loops that never pass a closure: accelerate (the README's example) and transformers.Trainer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchsaq as saq


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 40, generator=g), torch.randint(0, 10, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _model_and_opt():
    torch.manual_seed(0)
    model = saq.create_model("cnn1d", 10)
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4))
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, saq.SAQ(model, base, rho=0.1, strategy="prev_grad")  # one pass: no closure needed


def test_accelerate_prepared_loop_is_real_saq():
    accelerate = pytest.importorskip("accelerate")

    # the README's accelerate example
    model, opt = _model_and_opt()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt, loader = accelerator.prepare(model, opt, _data())
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()

    # the same SAQ steps with a closure, and plain SGD: accelerate's run is the first, not the second
    ref, ref_opt = _model_and_opt()
    for x, y in _data():
        def closure():
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss
        ref_opt.step(closure)
        ref_opt.zero_grad()
    torch.manual_seed(0)
    plain = saq.quantize(saq.create_model("cnn1d", 10), saq.QuantConfig(w_bits=4, a_bits=4))
    sgd = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    for x, y in _data():
        F.cross_entropy(plain(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    got = accelerator.unwrap_model(model)
    for (k, p), (_, q) in zip(got.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), k
    assert any(not torch.equal(p, q) for p, q in zip(got.parameters(), plain.parameters()))


def _hf_run(tmp_path, sharp: bool):
    """A tiny ViTForImageClassification from a config (no download) trained by transformers.Trainer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = transformers.ViTForImageClassification(cfg)
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4))

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"pixel_values": self.x[i], "labels": self.y[i]}

    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = saq.SAQ(model, base, rho=0.1, strategy="prev_grad") if sharp else base
    seen: dict[bool, list[bool]] = {True: [], False: []}  # training mode -> perturbation applied in each forward
    model.register_forward_hook(lambda m, a, o: seen[m.training].append(
        any(layer.perturb_post is not None for _, layer in saq.quant_layers(m))))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8,
                                          num_train_epochs=1, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(),
                                   optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(base, lambda s: 1.0)))
    trainer.train()
    metrics = trainer.evaluate(Data())
    return model, opt, seen, metrics


@pytest.mark.slow
def test_hf_trainer_with_saq_perturbs_and_differs_from_sgd(tmp_path):
    model, opt, seen, metrics = _hf_run(tmp_path, sharp=True)
    assert opt.step_count == 4 and opt.passes_last_step == 1
    assert seen[True] == [False, True, True, True]  # the first step is unperturbed, then every forward is
    assert seen[False] and not any(seen[False])  # evaluation never sees the perturbation
    assert all(layer.perturb_post is None for _, layer in saq.quant_layers(model))
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    plain, _, _, _ = _hf_run(tmp_path, sharp=False)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


def test_accelerate_gradient_accumulation_is_saq_over_the_whole_batch():
    """``accelerator.accumulate(model)`` with ``gradient_accumulation_steps=2``: accelerate calls ``opt.step()`` at
    every micro-batch but steps at the second only; e_prev stays applied over both micro-batches, and the run
    equals prev_grad with a closure over the concatenated batches (no BatchNorm: it would see micro-batches)."""
    accelerate = pytest.importorskip("accelerate")

    def model_and_opt():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
        x0 = torch.randn(16, 1, 40)
        saq.quantize(m, saq.QuantConfig(w_bits=4, a_bits=4, first_last_bits=4), example_inputs=x0)
        saq.calibrate(m, [x0])  # (else the steps start from the first batch: a micro-batch here, not there)
        return m, saq.SAQ(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), rho=0.1, strategy="prev_grad")

    model, opt = model_and_opt()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt, loader = accelerator.prepare(model, opt, _data())
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))  # divides the loss by 2
            opt.step()
            opt.zero_grad()
    ref, ref_opt = model_and_opt()
    xs, ys = zip(*_data())
    for i in range(0, len(xs), 2):
        x, y = torch.cat(xs[i:i + 2]), torch.cat(ys[i:i + 2])

        def closure():
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            return loss
        ref_opt.step(closure)
        ref_opt.zero_grad()
    assert ref_opt.step_count == 2 and opt.optimizer.step_count == 2
    got = accelerator.unwrap_model(model)
    for (k, p), (_, q) in zip(got.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), k


# -- what torchsaq relies on of torch.amp.GradScaler's private state (torchsaq.integrations.gradscaler) -------
def test_gradscaler_private_state_torchsaq_reads_is_still_there():
    """Fails loudly the day torch renames or changes GradScaler._per_optimizer_states / _scale or the call chain
    of GradScaler.step: the closure-free prev_grad step under Lightning's 16-mixed depends on them."""
    from torchsaq.integrations import gradscaler as gs

    w = torch.nn.Parameter(torch.ones(3))
    seen = {}

    class Probe(torch.optim.SGD):
        def step(self, closure=None):
            seen["scaler"] = gs.stepping_scaler(self)
            seen["unscaled"] = seen["scaler"] is not None and gs.has_unscaled(seen["scaler"], self)
            return super().step(closure)

    opt = Probe([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for name in gs.PRIVATE:
        assert hasattr(scaler, name), f"torch.amp.GradScaler lost {name}: update torchsaq/integrations/gradscaler.py"
    scaler.scale((w * 2).sum()).backward()
    assert not gs.has_unscaled(scaler, opt)
    scaler.step(opt)
    assert seen["scaler"] is scaler, "GradScaler.step(opt) is no longer found from the optimizer's step frames"
    assert seen["unscaled"], "GradScaler's per-optimizer stage no longer reads OptState.UNSCALED inside step(opt)"
    assert float(gs.inverse_scale(scaler)) == 1 / 1024.0 and gs.inverse_scale(scaler).dtype == torch.float64
    assert gs.stepping_scaler(opt) is None  # outside scaler.step
    scaler.update()
