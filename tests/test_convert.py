"""saq.quantize / saq.calibrate on torchvision, timm and plain models, checked against the float model."""
import copy
import math

import pytest
import timm
import torch
import torchvision
from torch import nn

import torchsaq as saq

FLOAT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def conv1d_net():
    return nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Conv1d(8, 8, 3, stride=2, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4))


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10),
                 (2, 3, 32, 32)),
    "deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10),
                  (2, 3, 32, 32)),
    "conv1d": (conv1d_net, (4, 2, 32)),
}


def float_reference(model, x):
    """Execution order of the Conv/Linear modules and whether each one's input has negatives (plain hooks)."""
    order, negative = [], {}

    def pre_hook(name):
        def hook(mod, args):
            if name not in order:
                order.append(name)
            negative[name] = negative.get(name, False) or bool((args[0] < 0).any())
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in model.named_modules() if type(m) in FLOAT_TYPES]
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()
    return order, negative, out


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_model(name):
    factory, shape = MODELS[name]
    float_model = factory().train()
    x = torch.randn(shape)
    n_float = sum(type(m) in FLOAT_TYPES for m in float_model.modules())
    model = copy.deepcopy(float_model)
    with torch.random.fork_rng():
        order, negative, float_out = float_reference(float_model, x)

    saq.quantize(model, saq.QuantConfig(w_bits=3, a_bits=4))
    layers = dict(saq.quant_layers(model))
    assert len(layers) == n_float
    assert not any(type(m) in FLOAT_TYPES for m in model.modules())  # every Conv/Linear swapped

    out = model(x)  # first forward: trace, then LSQ init from this batch
    assert out.shape == float_out.shape
    assert [n for n, m in layers.items() if m.quant_role == "first"] == [order[0]]
    assert [n for n, m in layers.items() if m.quant_role == "last"] == [order[-1]]
    for n, m in layers.items():
        expected = (8, 8) if n in (order[0], order[-1]) else (3, 4)
        assert (m.w_bits, m.a_bits) == expected, n
        assert m.act_quantizer.signed == negative[n], n

    loss = nn.functional.mse_loss(out.float(), torch.randn_like(out).float())
    loss.backward()
    for n, m in layers.items():
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, n
        assert m.weight_quantizer.step.grad.abs().sum() > 0, n
        assert m.act_quantizer.step.grad.abs().sum() > 0, n


def test_vit_activations_get_signed_range():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10, depth=2)
    saq.quantize(model)
    saq.calibrate(model, [torch.randn(2, 3, 32, 32)])
    layers = dict(saq.quant_layers(model))
    for n in ("blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.attn.proj"):
        q = layers[n].act_quantizer
        assert q.signed is True, n
        assert saq.qrange(q.bits, q.signed)[0] < 0


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 6, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def test_layer_bits_override_by_pattern():
    model = small_cnn()
    cfg = saq.QuantConfig(w_bits=4, a_bits=4, layer_bits={"3": (2, 3), "[05]": 6})
    saq.quantize(model, cfg, example_inputs=torch.randn(1, 3, 8, 8))
    bits = {n: (m.w_bits, m.a_bits) for n, m in saq.quant_layers(model)}
    # "0" is the first layer but the override wins over first_last_bits; "9" is last -> 8
    assert bits == {"0": (6, 6), "3": (2, 3), "5": (6, 6), "9": (8, 8)}


def test_first_last_follow_execution_order_not_names():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)  # defined first, runs last
            self.stem = nn.Linear(4, 8)  # defined last... runs first
            self.mid = nn.Linear(8, 8)

        def forward(self, x):
            return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))

    model = saq.quantize(Reordered(), saq.QuantConfig(w_bits=2, a_bits=2), example_inputs=torch.randn(2, 4))
    assert model.stem.quant_role == "first" and model.head.quant_role == "last"
    assert (model.mid.w_bits, model.stem.w_bits, model.head.w_bits) == (2, 8, 8)


def test_first_last_bits_32_keeps_them_float():
    model = saq.quantize(small_cnn(), saq.QuantConfig(first_last_bits=32), example_inputs=torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    model.train()
    model(x)
    assert model[0].w_bits == 32 and model[9].a_bits == 32
    torch.testing.assert_close(model[0].quantized_weight(), model[0].weight)


@pytest.mark.parametrize("kwargs", [{"w_bits": 0}, {"a_bits": 1}, {"w_bits": 33}, {"first_last_bits": 1},
                                    {"w_bits": True}, {"layer_bits": {"0": 0}}, {"layer_bits": {"0": (4, 4, 4)}}])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        saq.QuantConfig(**kwargs)


def test_bad_patterns_and_models():
    with pytest.raises(ValueError, match="matches no"):
        saq.quantize(small_cnn(), saq.QuantConfig(layer_bits={"nope.*": 4}))
    with pytest.raises(ValueError, match="matches no"):
        saq.quantize(small_cnn(), saq.QuantConfig(exclude=("nope",)))
    with pytest.raises(ValueError, match="no nn.Conv1d"):
        saq.quantize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    model = saq.quantize(small_cnn())
    with pytest.raises(ValueError, match="already quantized"):
        saq.quantize(model)
    with pytest.raises(ValueError):
        saq.calibrate(small_cnn(), [torch.randn(1, 3, 8, 8)])


def test_exclude_keeps_float_module():
    model = saq.quantize(small_cnn(), saq.QuantConfig(exclude=("5",)))
    assert type(model[5]) is nn.Conv2d
    assert len(saq.quant_layers(model)) == 3


def test_eval_before_init_raises():
    model = saq.quantize(small_cnn()).eval()
    with pytest.raises(saq.NotInitializedError):
        model(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("per_channel,trained_bn", [(True, True), (False, True), (True, False)])
def test_calibrate_matches_hook_reference(per_channel, trained_bn):
    float_model = small_cnn()
    with torch.no_grad():  # non-trivial BN statistics, so eval mode differs from train mode
        float_model[1].running_mean.uniform_(-0.5, 0.5)
        float_model[1].running_var.uniform_(0.5, 2.0)
        # a BN that has never been trained normalises with batch statistics during calibration
        float_model[1].num_batches_tracked.fill_(10 if trained_bn else 0)
    model = copy.deepcopy(float_model)
    bn_before = {k: v.clone() for k, v in float_model[1].state_dict().items()}
    cfg = saq.QuantConfig(w_bits=3, a_bits=4, per_channel=per_channel)
    saq.quantize(model, cfg)
    batches = [torch.randn(3, 3, 8, 8) for _ in range(3)]

    # reference: float model in eval mode, mean|input| per batch from forward hooks, averaged over batches
    sums, negative = {}, {}

    def hook(name):
        def fn(mod, args):
            x = args[0].double()
            sums[name] = sums.get(name, 0.0) + x.abs().mean().item()
            negative[name] = negative.get(name, False) or bool((x < 0).any())
        return fn

    float_model.eval()
    float_model[1].train(not trained_bn)
    for n, m in float_model.named_modules():
        if type(m) in FLOAT_TYPES:
            m.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        for b in batches:
            float_model(b)

    saq.calibrate(model, batches)
    assert model.training  # mode restored
    for n, m in saq.quant_layers(model):
        bits = 8 if n in ("0", "9") else None
        w_bits, a_bits = (bits, bits) if bits else (3, 4)
        assert (m.w_bits, m.a_bits) == (w_bits, a_bits)
        a_signed = negative[n]
        a_qp = 2 ** (a_bits - 1) - 1 if a_signed else 2**a_bits - 1
        assert m.act_quantizer.signed == a_signed
        expected_a = 2 * (sums[n] / len(batches)) / math.sqrt(a_qp)
        assert m.act_quantizer.step.item() == pytest.approx(expected_a, rel=1e-5)
        w = float_model.get_submodule(n).weight.detach().double()
        w_qp = 2 ** (w_bits - 1) - 1
        if per_channel:
            expected_w = torch.stack([2 * w[c].abs().mean() / math.sqrt(w_qp) for c in range(w.shape[0])])
        else:
            expected_w = (2 * w.abs().mean() / math.sqrt(w_qp)).reshape(1)
        torch.testing.assert_close(m.weight_quantizer.step.detach().double(), expected_w, rtol=1e-5, atol=0)
        assert m.weight_quantizer.is_initialized and m.act_quantizer.is_initialized
    # BatchNorm statistics untouched by calibration
    for k, v in bn_before.items():
        assert torch.equal(model[1].state_dict()[k], v), k
    model.eval()
    model(batches[0])  # evaluates without NotInitializedError


def test_calibrate_num_batches_and_pairs():
    model = saq.quantize(small_cnn())
    data = [(torch.randn(2, 3, 8, 8), torch.zeros(2)) for _ in range(4)]
    saq.calibrate(model, data, num_batches=1)
    ref = copy.deepcopy(model)
    saq.calibrate(ref, [data[0][0]])
    for (n, m), (_, r) in zip(saq.quant_layers(model), saq.quant_layers(ref)):
        torch.testing.assert_close(m.act_quantizer.step, r.act_quantizer.step)
    with pytest.raises(ValueError, match="no batch"):
        saq.calibrate(saq.quantize(small_cnn()), [])
