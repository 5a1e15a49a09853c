"""Model registry and architectures: names, metadata, shapes, parameter counts, and a pass through saq.quantize."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq.train.models import ModelInfo, create_model, list_models, model_info, register_model
from torchsaq.train.models import _registry

SMALL = ["cnn1d", "cnn_digits", "vit_tiny_digits", "cnn_fmnist", "resnet20", "resnet32", "resnet56", "preresnet20",
         "preresnet32", "preresnet56", "mobilenetv2_cifar"]
IMAGENET = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "vit_base_patch16_224", "deit_tiny_patch16_224",
            "deit_small_patch16_224", "deit_base_patch16_224"]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_names_and_info():
    names = list_models()
    assert set(SMALL + IMAGENET) <= set(names)
    assert names == sorted(names)
    assert list_models("deit_*") == ["deit_base_patch16_224", "deit_small_patch16_224", "deit_tiny_patch16_224"]
    for name in names:
        info = model_info(name)
        assert isinstance(info, ModelInfo) and info.name == name
        assert info.family in ("mnist1d", "digits", "fashion_mnist", "cifar", "imagenet")
        assert info.input_shape and info.num_classes
    assert model_info("cnn1d").input_shape == (1, 40)
    assert model_info("vit_tiny_digits").input_shape == (1, 8, 8)
    assert model_info("resnet20").input_shape == (3, 32, 32)
    assert model_info("deit_small_patch16_224").source == "timm"
    assert model_info("resnet50").source == "torchvision"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="unknown model 'resnet2O'.*resnet20"):
        create_model("resnet2O", 10)
    with pytest.raises(ValueError, match="unknown model"):
        model_info("no_such_net")


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cnn1d", 0)
    with pytest.raises(ValueError, match="in_chans"):
        create_model("cnn1d", 10, in_chans=0)
    with pytest.raises(ValueError, match="does not accept option.*foo"):
        create_model("cnn1d", 10, foo=1)
    with pytest.raises(ValueError, match="pretrained"):
        create_model("deit_tiny_patch16_224", 10, pretrained=True)
    with pytest.raises(ValueError, match="weights"):
        create_model("resnet18", 10, weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="6n\\+2"):
        saq.models.cifar.CifarResNet(depth=21)
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", 10, shortcut="C")


def test_register_model_bare_and_with_metadata():
    try:
        @register_model
        def _test_bare(num_classes: int = 3) -> nn.Module:
            """A linear test model."""
            return nn.Linear(4, num_classes)

        @register_model(name="_test_meta", family="digits", dataset="digits", input_shape=(1, 8, 8), num_classes=10)
        def _builder(num_classes: int = 10, in_chans=None, img_size=None) -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear((in_chans or 1) * (img_size or 8) ** 2, num_classes))

        assert "_test_bare" in list_models() and "_test_meta" in list_models()
        assert model_info("_test_bare").description == "A linear test model."
        assert model_info("_test_meta").input_shape == (1, 8, 8)
        assert create_model("_test_bare", 5)(torch.zeros(2, 4)).shape == (2, 5)
        assert create_model("_test_meta", 7, in_chans=2, img_size=4)(torch.zeros(3, 2, 4, 4)).shape == (3, 7)
        with pytest.raises(ValueError, match="does not accept.*img_size"):
            create_model("_test_bare", 5, img_size=8)
        with pytest.raises(ValueError, match="already registered"):
            register_model(_test_bare)
    finally:
        _registry._REGISTRY.unregister("_test_bare")
        _registry._REGISTRY.unregister("_test_meta")


@pytest.mark.parametrize("name", ["cnn1d", "cnn_digits", "vit_tiny_digits", "cnn_fmnist", "resnet20", "preresnet20",
                                  "mobilenetv2_cifar"])
def test_small_models_forward_shape(name):
    info = model_info(name)
    model = create_model(name, 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *info.input_shape))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_shapes_on_meta(name):
    with torch.device("meta"):
        model = create_model(name, 11)
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 11)


# Parameter counts from the literature / the libraries' model cards (independent references).
@pytest.mark.parametrize("name,count", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032), ("mobilenet_v2", 3_504_872),
    ("vit_base_patch16_224", 86_567_656), ("deit_tiny_patch16_224", 5_717_416),
    ("deit_small_patch16_224", 22_050_664), ("deit_base_patch16_224", 86_567_656)])
def test_imagenet_parameter_counts(name, count):
    with torch.device("meta"):
        model = create_model(name, 1000)
    assert n_params(model) == count


def _cifar_resnet_params(n: int, classes: int) -> int:
    """Closed form for the He et al. CIFAR ResNet with option-A shortcuts (no shortcut parameters)."""
    def conv(cin, cout):
        return 9 * cin * cout
    total = conv(3, 16) + 2 * 16
    cin = 16
    for cout in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, cout) + conv(cout, cout) + 4 * cout
            cin = cout
    return total + 64 * classes + classes


def test_cifar_resnet_parameter_counts():
    assert n_params(create_model("resnet20", 10)) == _cifar_resnet_params(3, 10) == 269_722  # "0.27M" in He et al.
    assert n_params(create_model("resnet32", 100)) == _cifar_resnet_params(5, 100)
    assert n_params(create_model("resnet56", 100)) == _cifar_resnet_params(9, 100)
    # pre-activation: 1x1 projections (no BN) on the two downsampling shortcuts, one BN per block input
    # instead of the stem BN, plus the final BN
    pre = _cifar_resnet_params(9, 100) - 2 * 16 + 16 * 32 + 32 * 64
    pre += sum(2 * (cin - cout) for cin, cout in ((16, 32), (32, 64)))  # bn1 of a stage's first block sees cin
    pre += 2 * 64
    assert n_params(create_model("preresnet56", 100)) == pre
    # option B adds a 1x1 conv + BN on the two downsampling shortcuts
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert n_params(create_model("resnet20", 10, shortcut="B")) == _cifar_resnet_params(3, 10) + extra
    # MobileNetV2-CIFAR (the common CIFAR variant): 2,296,922 parameters with 10 classes
    assert n_params(create_model("mobilenetv2_cifar", 10)) == 2_296_922


def test_resnet20_option_a_shortcut_values():
    model = create_model("resnet20", 10)
    sc = model.layer2[0].shortcut
    assert n_params(sc) == 0
    x = torch.randn(2, 16, 8, 8)
    expected = torch.zeros(2, 32, 4, 4)
    expected[:, 8:24] = x[:, :, ::2, ::2]
    torch.testing.assert_close(sc(x), expected)


def test_preresnet20_state_dict_matches_official_layout():
    """Key names of the official SAQ code's PreResNet-20 (written out from its structure)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv.weight", "fc.weight", "fc.bias", *(f"bn.{k}" for k in bn)}
    for s in (1, 2, 3):
        for b in range(3):
            p = f"layer{s}.{b}."
            keys |= {p + "conv1.weight", p + "conv2.weight", *(p + f"bn1.{k}" for k in bn),
                     *(p + f"bn2.{k}" for k in bn)}
            if s > 1 and b == 0:
                keys.add(p + "downsample.weight")
    assert set(create_model("preresnet20", 100).state_dict()) == keys


def test_preresnet_block_computation():
    """Half pre-activation block (first of a stage) against the formula written with torch.nn.functional."""
    torch.manual_seed(1)
    model = create_model("preresnet20", 10).eval()
    blk = model.layer2[0]
    for b in (blk.bn1, blk.bn2):  # non-trivial BN statistics
        b.running_mean.uniform_(-0.5, 0.5)
        b.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 8, 8)
    def bnf(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    a = F.relu(bnf(x, blk.bn1))
    body = F.conv2d(F.relu(bnf(F.conv2d(a, blk.conv1.weight, stride=2, padding=1), blk.bn2)),
                    blk.conv2.weight, padding=1)
    expected = body + F.conv2d(a, blk.downsample.weight, stride=2)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), expected)
        # a later block: the shortcut starts at the block input
        blk2 = model.layer2[1]
        a2 = F.relu(bnf(expected, blk2.bn1))
        body2 = F.conv2d(F.relu(bnf(F.conv2d(a2, blk2.conv1.weight, padding=1), blk2.bn2)), blk2.conv2.weight,
                         padding=1)
        torch.testing.assert_close(blk2(expected), body2 + expected)


def test_mobilenetv2_cifar_downsamples_32_to_4():
    model = create_model("mobilenetv2_cifar", 10).eval()
    seen = {}
    model.conv2.register_forward_pre_hook(lambda m, i: seen.update(shape=tuple(i[0].shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen["shape"] == (1, 320, 4, 4)
    assert model.conv1.stride == (1, 1) and model.layers[1].conv2.stride == (1, 1)


def test_in_chans_and_img_size_pass_through():
    assert create_model("resnet18", 5, in_chans=1).conv1.in_channels == 1
    assert create_model("mobilenet_v2", 5, in_chans=4).features[0][0].in_channels == 4
    vit = create_model("deit_tiny_patch16_224", 5, img_size=32, drop_path_rate=0.1)
    assert vit.pos_embed.shape == (1, 1 + (32 // 16) ** 2, 192)
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert create_model("cnn1d", 3, in_chans=2)(torch.randn(4, 2, 40)).shape == (4, 3)
    tiny = create_model("vit_tiny_digits", 10)
    assert tiny.patch_embed.num_patches == 16 and tiny.embed_dim == 64 and len(tiny.blocks) == 4


@pytest.mark.parametrize("name", ["cnn1d", "cnn_digits", "vit_tiny_digits", "cnn_fmnist", "resnet20", "preresnet20",
                                  "mobilenetv2_cifar"])
def test_quantize_and_one_training_step(name):
    info = model_info(name)
    model = create_model(name, 10)
    shape = (3, 16, 16) if info.family == "cifar" else info.input_shape  # any size works; smaller is faster
    x = torch.randn(4, *shape)
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4), example_inputs=x[:1])
    layers = saq.quant_layers(model)
    n_float = sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in create_model(name, 10).modules())
    assert len(layers) == n_float  # every conv/linear converted
    roles = [m.quant_role for _, m in layers]
    assert roles.count("first") == 1 and roles.count("last") == 1
    loss = F.cross_entropy(model.train()(x), torch.randint(0, 10, (4,)))
    loss.backward()
    for _, m in layers:
        assert m.weight.grad is not None and m.weight_quantizer.step.grad is not None


@pytest.mark.slow
def test_quantized_vit_tiny_digits_fits_a_batch():
    """The quantized tiny ViT trains: AdamW drives the loss on one fixed batch well down."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_digits", 10)
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4))
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_cnn1d_float_accuracy_on_mnist1d():
    """The benchmark model is a strong baseline: >= 90% test accuracy after 8 epochs (a few CPU seconds)."""
    from torchsaq.train.data import build_datasets

    b = build_datasets("mnist1d")
    (x, y), (xt, yt) = b.train.tensors, b.test.tensors
    torch.manual_seed(0)
    model = create_model("cnn1d", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = 8 * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(8):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc = (model.eval()(xt).argmax(1) == yt).float().mean().item()
    assert acc >= 0.90
