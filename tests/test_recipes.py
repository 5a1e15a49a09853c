"""Every recipe in recipes/ parses to a TrainConfig, builds its model, quantizes, and builds its optimizer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import torchsaq as saq
from torchsaq.train.config import TrainConfig, load_recipe
from torchsaq.train.data import DATASETS
from torchsaq.train.models import create_model, model_info

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
NAMES = [p.stem for p in RECIPES]
# classes per data set, from the data sets' definitions (independent of saq.data)
NUM_CLASSES = {"mnist1d": 10, "digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "flowers102": 102,
               "pets": 37}
TRANSFORMERS = ("vit_", "deit_")
EMBEDDED = ("mnist1d", "digits")


def test_every_experiment_family_of_the_paper_has_a_recipe():
    have = set()
    for p in RECIPES:
        c = load_recipe(p)
        have.add((c.dataset, c.model, c.w_bits, c.a_bits))
    want = {("cifar100", "preresnet20", 4, 4), ("cifar100", "preresnet20", 3, 3),
            ("cifar100", "mobilenetv2_cifar", 4, 4), ("cifar100", "mobilenetv2_cifar", 3, 3),
            ("imagenet", "mobilenet_v2", 4, 4), ("mnist1d", "cnn1d", 4, 4), ("digits", "vit_tiny_digits", 4, 4)}
    want |= {("imagenet", m, b, b) for m in ("resnet18", "resnet34", "resnet50") for b in (2, 3, 4)}
    want |= {("imagenet", m, 4, 4) for m in ("vit_base_patch16_224", "deit_tiny_patch16_224",
                                             "deit_small_patch16_224", "deit_base_patch16_224")}
    want |= {(d, "vit_base_patch16_224", 4, 4) for d in ("cifar10", "cifar100", "flowers102", "pets")}
    assert want <= have, sorted(want - have)


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_recipe_text(path):
    text = path.read_text()
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict) and set(raw) <= {f for f in TrainConfig.__dataclass_fields__}
    cfg = load_recipe(path)
    assert cfg.dataset in DATASETS
    assert f"torchsaq train --config recipes/{path.name}" in text  # the header shows how to run this very file
    assert cfg.output == f"runs/{path.stem}"
    expected_bits = f"w{cfg.w_bits}a{cfg.a_bits}"
    assert path.stem.endswith(expected_bits)
    # base optimizer as in the paper: SGD for CNNs, AdamW for Transformers
    assert cfg.optimizer == ("adamw" if cfg.model.startswith(TRANSFORMERS) else "sgd")
    assert cfg.sharpness == "case3"
    if cfg.dataset not in EMBEDDED:  # QAT starts from a float model: every paper recipe asks for one
        assert cfg.pretrained and "pretrained" in text.split("\n\n")[0]
        assert "Reproduces:" in text


def _build(cfg: TrainConfig):
    """Model of a recipe, quantized as the recipe says; ImageNet-size ones on the meta device (no memory)."""
    info = model_info(cfg.model)
    classes = NUM_CLASSES[cfg.dataset]
    if cfg.dataset in EMBEDDED:
        shape = info.input_shape
        model = create_model(cfg.model, classes, **cfg.model_kwargs)
        x = torch.randn(2, *shape)
    else:
        size = cfg.img_size or (32 if cfg.dataset.startswith("cifar") else 224)
        with torch.device("meta"):
            model = create_model(cfg.model, classes, img_size=cfg.img_size, **cfg.model_kwargs)
            x = torch.empty(1, 3, size, size)
    saq.quantize(model, cfg.quant_config(), example_inputs=x)
    return model, x


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_recipe_model_builds_and_quantizes(path):
    cfg = load_recipe(path)
    model, x = _build(cfg)
    layers = saq.quant_layers(model)
    roles = {m.quant_role: m for _, m in layers if m.quant_role}
    assert set(roles) == {"first", "last"}
    for role, m in roles.items():
        assert (m.w_bits, m.a_bits) == (cfg.first_last_bits, cfg.first_last_bits), role
    inner = [m for _, m in layers if not m.quant_role]
    assert inner and all((m.w_bits, m.a_bits) == (cfg.w_bits, cfg.a_bits) for m in inner)
    assert all(m.weight_standardize == cfg.weight_standardize for m in inner)
    if cfg.dataset in EMBEDDED:  # real forward for the CPU-sized ones
        model.train()
        assert model(x).shape == (2, NUM_CLASSES[cfg.dataset])


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_recipe_optimizer_builds(path):
    from torchsaq.train.runner import build_optimizer

    cfg = load_recipe(path)
    model, _ = _build(cfg)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD)
    decay = {}
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(cfg.lr)
        for p in g["params"]:
            decay[id(p)] = g["weight_decay"]
    assert set(decay) == {id(p) for p in model.parameters() if p.requires_grad}  # every parameter, once
    for name, p in model.named_parameters():
        if name.endswith(".step"):  # quantizer step sizes get no weight decay
            assert decay[id(p)] == 0, name
    conv_weights = [m.weight for _, m in saq.quant_layers(model) if m.weight.dim() > 1]
    assert any(decay[id(w)] == pytest.approx(cfg.weight_decay) for w in conv_weights)
