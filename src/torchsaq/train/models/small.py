"""Small models for the embedded data sets (MNIST-1D, scikit-learn digits) and Fashion-MNIST: fast enough for CPUs."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..._optional import require
from ._registry import register_model

__all__ = ["CNN1d", "CNNDigits", "CNNFashion", "CNNFashionStrided", "cnn1d", "cnn_digits", "cnn_fmnist",
           "cnn_fmnist_strided", "vit_tiny_digits", "vit_fmnist"]


def _conv_bn_relu(conv: type, bn: type, cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
    return [conv(cin, cout, kernel, stride, kernel // 2, bias=False), bn(cout), nn.ReLU(inplace=True)]


class CNN1d(nn.Module):
    """Conv1d-BN-ReLU blocks (stride 1, 2, 1, 2, ...), global average pooling and a linear head.

    The first conv has kernel 5, the others kernel 3, all "same" padding. Default widths
    (32, 64, 64, 64) reach ~98% float test accuracy on MNIST-1D in 30 epochs (a few CPU seconds).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, channels: Sequence[int] = (32, 64, 64, 64)):
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive widths, got {channels!r}")
        layers: list[nn.Module] = []
        cin = in_chans
        for i, c in enumerate(channels):
            layers += _conv_bn_relu(nn.Conv1d, nn.BatchNorm1d, cin, int(c), 5 if i == 0 else 3, 2 if i % 2 else 1)
            cin = int(c)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _width(width: int) -> int:
    w = int(width)
    if w < 1:
        raise ValueError(f"width must be >= 1, got {width!r}")
    return w


class _GAPCNN(nn.Module):
    """``features``, global average pooling, a linear head: what the small 2-D CNNs share."""

    def __init__(self, features: nn.Sequential, channels: int, num_classes: int):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class CNNDigits(_GAPCNN):
    """A 3-conv CNN for 8x8 images: 32 (stride 1), 64 (stride 2), 64 (stride 1) channels, GAP, linear head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32):
        w = _width(width)
        super().__init__(nn.Sequential(
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, in_chans, w, 3, 1),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, w, 2 * w, 3, 2),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, 2 * w, 2 * w, 3, 1),
        ), 2 * w, num_classes)


class CNNFashion(_GAPCNN):
    """Four 3x3 Conv-BN-ReLU (w, 2w, 2w, 4w channels; 2x2 max-pool after the first and third), GAP, linear head.

    For 28x28 grey-scale images (Fashion-MNIST): 28x28 -> 14x14 -> 7x7 feature maps. With ``width=32``:
    130k parameters, 14.6M multiply-accumulates per image.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32):
        w = _width(width)
        super().__init__(nn.Sequential(
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, in_chans, w, 3, 1), nn.MaxPool2d(2),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, w, 2 * w, 3, 1),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, 2 * w, 2 * w, 3, 1), nn.MaxPool2d(2),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, 2 * w, 4 * w, 3, 1),
        ), 4 * w, num_classes)


class CNNFashionStrided(_GAPCNN):
    """Five 3x3 Conv-BN-ReLU (w, w, 2w, 2w, 4w channels; the 2nd and 4th with stride 2, no pooling), GAP, head.

    A second shape for the Fashion-MNIST study (one layer deeper than :class:`CNNFashion`, strided convolutions
    where that one max-pools, the resolution falling one layer later): 28x28 -> 14x14 -> 7x7.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 24):
        w = _width(width)
        super().__init__(nn.Sequential(
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, in_chans, w, 3, 1),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, w, w, 3, 2),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, w, 2 * w, 3, 1),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, 2 * w, 2 * w, 3, 2),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, 2 * w, 4 * w, 3, 1),
        ), 4 * w, num_classes)


@register_model(family="mnist1d", dataset="mnist1d", input_shape=(1, 40), num_classes=10)
def cnn1d(num_classes: int = 10, in_chans: Optional[int] = None, img_size: Optional[int] = None,
          channels: Sequence[int] = (32, 64, 64, 64)) -> nn.Module:
    """Small 1-D CNN for MNIST-1D (input (B, 1, 40)); any sequence length works (global pooling)."""
    return CNN1d(num_classes, in_chans or 1, channels)


@register_model(family="digits", dataset="digits", input_shape=(1, 8, 8), num_classes=10)
def cnn_digits(num_classes: int = 10, in_chans: Optional[int] = None, img_size: Optional[int] = None,
               width: int = 32) -> nn.Module:
    """Small 2-D CNN for scikit-learn digits (input (B, 1, 8, 8)); any image size works (global pooling)."""
    return CNNDigits(num_classes, in_chans or 1, width)


@register_model(family="fashion_mnist", dataset="fashion_mnist", input_shape=(1, 28, 28), num_classes=10)
def cnn_fmnist(num_classes: int = 10, in_chans: Optional[int] = None, img_size: Optional[int] = None,
               width: int = 32) -> nn.Module:
    """Small 2-D CNN for Fashion-MNIST (input (B, 1, 28, 28)); any image size >= 4 works (global pooling)."""
    return CNNFashion(num_classes, in_chans or 1, width)


@register_model(family="fashion_mnist", dataset="fashion_mnist", input_shape=(1, 28, 28), num_classes=10)
def cnn_fmnist_strided(num_classes: int = 10, in_chans: Optional[int] = None, img_size: Optional[int] = None,
                       width: int = 24) -> nn.Module:
    """A second small CNN for Fashion-MNIST: five convolutions, strided instead of max-pooled (see the class)."""
    return CNNFashionStrided(num_classes, in_chans or 1, width)


@register_model(family="digits", dataset="digits", input_shape=(1, 8, 8), num_classes=10, source="timm")
def vit_tiny_digits(num_classes: int = 10, in_chans: Optional[int] = None, img_size: Optional[int] = None,
                    **kwargs: Any) -> nn.Module:
    """Tiny timm VisionTransformer for 8x8 digits: patch 2 (16 tokens + class token), dim 64, depth 4, 4 heads."""
    VisionTransformer = require("timm.models.vision_transformer", "timm", "model vit_tiny_digits").VisionTransformer

    cfg: dict[str, Any] = dict(patch_size=2, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    cfg.update(kwargs)
    return VisionTransformer(img_size=img_size or 8, in_chans=in_chans or 1, num_classes=num_classes, **cfg)


@register_model(family="fashion_mnist", dataset="fashion_mnist", input_shape=(1, 28, 28), num_classes=10, source="timm")
def vit_fmnist(num_classes: int = 10, in_chans: Optional[int] = None, img_size: Optional[int] = None,
               **kwargs: Any) -> nn.Module:
    """Small timm VisionTransformer for Fashion-MNIST: patch 7 (16 tokens + class token), dim 64, depth 4, 4 heads.

    Sized for CPUs (docs/vit.md): 139k parameters, ~2.3M multiply-accumulates per 28x28 image; timm kwargs
    (``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``drop_path_rate``) override the defaults.
    """
    VisionTransformer = require("timm.models.vision_transformer", "timm", "model vit_fmnist").VisionTransformer

    cfg: dict[str, Any] = dict(patch_size=7, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    cfg.update(kwargs)
    return VisionTransformer(img_size=img_size or 28, in_chans=in_chans or 1, num_classes=num_classes, **cfg)
