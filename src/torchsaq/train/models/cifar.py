"""CIFAR-size (32x32) networks: ResNet-20/32/56, pre-activation ResNet-20/32/56, MobileNetV2-CIFAR.

* ``resnet20/32/56``: the CIFAR ResNet of He et al. 2016 ("Deep Residual Learning", Sec. 4.2): a 3x3
  conv with 16 channels, three stages of n basic blocks (16, 32, 64 channels; depth = 6n + 2), global
  average pooling and a linear layer. Shortcuts that change the shape use **option A** by default
  (parameter-free: subsample by 2 and zero-pad the new channels, as in the paper's CIFAR experiments);
  ``shortcut="B"`` uses a 1x1 conv + BatchNorm projection instead.
* ``preresnet20/32/56``: the pre-activation ResNet (He et al. 2016, "Identity Mappings") in the layout
  of the official SAQ code's CIFAR-100 "ResNet-20" (ziplab/SAQ ``core/models/preresnet.py``): the first
  block of each stage applies BN-ReLU before the shortcut split and projects with a bias-free 1x1 conv
  (no BN) where the shape changes; a final BN-ReLU precedes pooling. Module names follow that code, so its
  float checkpoints load with ``load_state_dict``. This is the model behind the paper's CIFAR-100 numbers.
* ``mobilenetv2_cifar``: MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs as in the common
  CIFAR variant that the official SAQ code also uses: stride 1 in the stem conv and in the second
  stage (24 channels), so the 32x32 input is downsampled only 3 times to 4x4; blocks use ReLU (not
  ReLU6), and a stride-1 block whose channel count changes gets a 1x1 conv + BN shortcut.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model

__all__ = ["CifarResNet", "PreActResNet", "MobileNetV2Cifar", "resnet20", "resnet32", "resnet56",
           "preresnet20", "preresnet32", "preresnet56", "mobilenetv2_cifar"]


def _init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, identity affine for BatchNorm (He et al. 2016)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class _ShortcutA(nn.Module):
    """Option-A shortcut: keep every second pixel and zero-pad the extra channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU (post-activation)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "A":
                self.shortcut = _ShortcutA(cin, cout, stride)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet with depth 6n+2 and stage widths 16/32/64."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        shortcut = str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding) or 'B' (1x1 projection), got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_chans, 16)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        stages = []
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, shortcut))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class PreActBlock(nn.Module):
    """Pre-activation basic block. ``split_after_act``: the shortcut starts after the first BN-ReLU
    (first block of a stage, "half pre-activation"); otherwise it starts at the block input."""

    def __init__(self, cin: int, cout: int, stride: int, split_after_act: bool):
        super().__init__()
        self.split_after_act = split_after_act
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.downsample: Optional[nn.Conv2d] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(x))
        residual = out if self.split_after_act else x
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        if self.downsample is not None:
            residual = self.downsample(residual)
        return out + residual


class PreActResNet(nn.Module):
    """Pre-activation CIFAR ResNet (depth 6n+2, widths 16/32/64) laid out like the official SAQ code."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"pre-activation ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv = _conv3x3(in_chans, 16)
        cin = 16
        stages = []
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, split_after_act=(j == 0)))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand - 3x3 depthwise - 1x1 linear projection (BN after each, ReLU after
    the first two); residual when stride is 1 (with a 1x1 conv + BN projection if channels change)."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        hidden = expansion * cin
        self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for 32x32 inputs (stride-1 stem and second stage; see the module docstring)."""

    #: (expansion, out_channels, blocks, stride of the first block)
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks = []
        cin = 32
        for expansion, cout, n, stride in self.CFG:
            for j in range(n):
                blocks.append(InvertedResidual(cin, cout, expansion, stride if j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def _resnet(depth: int):
    def build(num_classes: int = 10, in_chans: Optional[int] = None, img_size: Optional[int] = None,
              shortcut: str = "A") -> nn.Module:
        return CifarResNet(depth, num_classes, in_chans or 3, shortcut)

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016; option-A shortcut by default, shortcut='B' for 1x1 conv)."
    return build


def _preresnet(depth: int):
    def build(num_classes: int = 10, in_chans: Optional[int] = None, img_size: Optional[int] = None) -> nn.Module:
        return PreActResNet(depth, num_classes, in_chans or 3)

    build.__doc__ = f"Pre-activation CIFAR ResNet-{depth} in the official SAQ code's layout."
    return build


_CIFAR: dict[str, Any] = dict(family="cifar", dataset="cifar100", input_shape=(3, 32, 32), num_classes=100)
resnet20 = register_model(_resnet(20), name="resnet20", **_CIFAR)
resnet32 = register_model(_resnet(32), name="resnet32", **_CIFAR)
resnet56 = register_model(_resnet(56), name="resnet56", **_CIFAR)
preresnet20 = register_model(_preresnet(20), name="preresnet20", **_CIFAR)
preresnet32 = register_model(_preresnet(32), name="preresnet32", **_CIFAR)
preresnet56 = register_model(_preresnet(56), name="preresnet56", **_CIFAR)


@register_model(**_CIFAR)
def mobilenetv2_cifar(num_classes: int = 10, in_chans: Optional[int] = None,
                      img_size: Optional[int] = None) -> nn.Module:
    """MobileNetV2 adapted to 32x32 inputs (stride-1 stem and second stage), as in the official SAQ code."""
    return MobileNetV2Cifar(num_classes, in_chans or 3)
