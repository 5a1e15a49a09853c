"""TrainConfig's groups: `quant` (QuantConfig), `sharpness_config` (SharpnessConfig), `saq_kwargs`, `from_parts`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import torchsaq as saq
from torchsaq.train.config import SharpnessConfig, TrainConfig, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_quant_fields_are_quantconfigs_own():
    names = {f.name for f in dataclasses.fields(saq.QuantConfig)} - {"a_signed"}
    assert set(TrainConfig.QUANT_FIELDS) == names
    assert set(SharpnessConfig.FIELDS.values()) == {f.name for f in dataclasses.fields(SharpnessConfig)}
    assert set(SharpnessConfig.FIELDS) <= {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_splits_into_parts_and_back(path):
    cfg = load_recipe(path)
    assert cfg.quant == cfg.quant_config()
    grouped = set(TrainConfig.QUANT_FIELDS) | set(SharpnessConfig.FIELDS)
    rest = {k: v for k, v in cfg.to_dict().items() if k not in grouped}
    assert TrainConfig.from_parts(cfg.quant, cfg.sharpness_config, **rest) == cfg


def test_sharpness_config_maps_the_flat_fields():
    cfg = TrainConfig(sharpness="case1", rho=0.2, adaptive=True, strategy="every_k", strategy_k=3,
                      strategy_alpha=0.7, rho_warmup_epochs=1.5)
    assert cfg.sharpness_config == SharpnessConfig(mode="case1", rho=0.2, adaptive=True, strategy="every_k", k=3,
                                                   alpha=0.7, rho_warmup_epochs=1.5)
    assert TrainConfig().sharpness_config == SharpnessConfig()  # the defaults agree
    assert TrainConfig(sharpness="none").sharpness_config.mode is None
    assert TrainConfig(strategy_alpha=None).sharpness_config.alpha == "auto"
    assert SharpnessConfig(mode=None, alpha="auto").flat()["sharpness"] == "none"


def test_saq_kwargs_are_what_the_training_loop_passes(monkeypatch):
    """train.wrap_sharpness and TrainConfig.saq_kwargs map a config onto SAQ the same way."""
    import torchsaq.optim.saq
    from torchsaq.train.runner import wrap_sharpness

    seen = {}

    class Recorder:
        def __init__(self, model, base, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(torchsaq.optim.saq, "SAQ", Recorder)
    model = torch.nn.Linear(3, 2)
    for cfg in (TrainConfig(), TrainConfig(sharpness="sam", rho=0.1, adaptive=True, strategy="every_k", strategy_k=2,
                                           strategy_alpha=0.5, rho_warmup_epochs=2.0, max_grad_norm=1.0)):
        seen.clear()
        wrap_sharpness(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, steps_per_epoch=4)
        ours = cfg.saq_kwargs(steps_per_epoch=4)
        seen.pop("grad_scaler", None)
        schedules = seen.pop("rho_schedule"), ours.pop("rho_schedule")
        assert seen == ours
        if schedules[0] is None:
            assert schedules[1] is None
        else:
            assert [schedules[0](i) for i in range(12)] == [schedules[1](i) for i in range(12)]


def test_saq_kwargs_build_an_optimizer_and_none_has_none():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    saq.quantize(model, TrainConfig(w_bits=4, a_bits=4).quant, example_inputs=torch.zeros(1, 4))
    opt = saq.SAQ(model, torch.optim.SGD(model.parameters(), lr=0.1), **TrainConfig(rho_warmup_epochs=1).saq_kwargs(5))
    assert isinstance(opt, torch.optim.Optimizer)
    with pytest.raises(ValueError, match="sharpness 'none'"):
        TrainConfig(sharpness="none").saq_kwargs(5)


def test_from_parts_refuses_what_it_cannot_say():
    with pytest.raises(ValueError, match="a_signed"):
        TrainConfig.from_parts(saq.QuantConfig(a_signed=True))
    with pytest.raises(ValueError, match="w_bits given both"):
        TrainConfig.from_parts(saq.QuantConfig(w_bits=2), w_bits=3)
    with pytest.raises(ValueError, match="unknown strategy"):  # the parts go through the same checks
        TrainConfig.from_parts(sharpness=SharpnessConfig(strategy="sometimes"))
    cfg = TrainConfig.from_parts(saq.QuantConfig(w_bits=2, a_bits=3, layer_bits={"fc": (4, 8)}, exclude=("x",)),
                                 SharpnessConfig(mode="sam", alpha=0.3), epochs=3)
    assert (cfg.w_bits, cfg.a_bits, cfg.layer_bits, cfg.exclude) == (2, 3, {"fc": [4, 8]}, ["x"])
    assert (cfg.sharpness, cfg.strategy_alpha, cfg.epochs) == ("sam", 0.3, 3)


def test_perturb_unquantized_reaches_the_optimizer():
    """--no-perturb-unquantized: SAQ perturbs the quantized layers' weights only (no BatchNorm affine, no bias)."""
    from torchsaq.train.runner import wrap_sharpness

    def build(flag: bool):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
        saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4))
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = wrap_sharpness(model, base, TrainConfig(sharpness="case3", strategy="full", perturb_unquantized=flag), 1)
        assert isinstance(opt, saq.SAQ)
        return model, opt._targets

    model, t = build(False)
    assert t.params == [] and {id(m) for m in t.layers} == {id(model[0]), id(model[4])}
    model, t = build(True)
    bn, lin = model[1], model[4]
    assert {id(p) for p in t.params} >= {id(bn.weight), id(bn.bias), id(lin.bias)}


def test_rho_start_epochs_gives_plain_steps_first_then_saq():
    kw = TrainConfig(epochs=3, rho=0.2, rho_start_epochs=1, rho_warmup_epochs=0.4).saq_kwargs(5)
    assert [kw["rho_schedule"](i) for i in range(8)] == pytest.approx([0, 0, 0, 0, 0, 0, 0.1, 0.2])
    assert TrainConfig(epochs=3).saq_kwargs(5)["rho_schedule"] is None
    with pytest.raises(ValueError, match="rho_start_epochs"):
        TrainConfig(epochs=3, rho_start_epochs=3)
    with pytest.raises(ValueError, match="rho_start_epochs"):
        TrainConfig(epochs=3, rho_start_epochs=-1)
    TrainConfig(epochs=3, rho_start_epochs=5, sharpness="none")  # no SAQ: nothing to start
