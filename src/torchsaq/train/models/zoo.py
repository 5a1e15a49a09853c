"""ImageNet-scale models from torchvision and timm, always built without pretrained weights.

Float weights for quantization-aware training are loaded by the caller (``TrainConfig.pretrained``);
nothing here downloads anything.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..._optional import require
from ._registry import register_model

__all__ = ["TORCHVISION_MODELS", "TIMM_MODELS"]

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")
TIMM_MODELS = ("vit_base_patch16_224", "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")

_IMAGENET: dict[str, Any] = dict(family="imagenet", dataset="imagenet", input_shape=(3, 224, 224), num_classes=1000)


def _no_download(name: str, kwargs: dict[str, Any]) -> None:
    for key in ("weights", "pretrained", "pretrained_cfg_overlay", "checkpoint_path"):
        if kwargs.get(key):
            raise ValueError(f"{name}: {key}={kwargs[key]!r} is not supported; torchsaq builds models without weights. "
                             "Load float weights with TrainConfig.pretrained (torchsaq train --pretrained PATH) "
                             "or model.load_state_dict(...)")
        kwargs.pop(key, None)


def _replace_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    geometry: dict[str, Any] = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                    dilation=conv.dilation)
    return nn.Conv2d(in_chans, conv.out_channels, groups=conv.groups, bias=conv.bias is not None, **geometry)


def _torchvision(name: str):
    def build(num_classes: int = 1000, in_chans: Optional[int] = None, img_size: Optional[int] = None,
              **kwargs: Any) -> nn.Module:
        tvm = require("torchvision.models", "vision", f"model {name}")

        _no_download(name, kwargs)
        model = getattr(tvm, name)(weights=None, num_classes=num_classes, **kwargs)
        if in_chans is not None and in_chans != 3:
            if name == "mobilenet_v2":
                model.features[0][0] = _replace_conv(model.features[0][0], in_chans)
            else:
                model.conv1 = _replace_conv(model.conv1, in_chans)
        return model  # img_size: any size >= 32 works (global average pooling)

    build.__doc__ = f"torchvision {name} (weights=None; in_chans replaces the stem conv; any img_size)."
    return build


def _timm(name: str):
    def build(num_classes: int = 1000, in_chans: Optional[int] = None, img_size: Optional[int] = None,
              **kwargs: Any) -> nn.Module:
        timm = require("timm", "timm", f"model {name}")

        _no_download(name, kwargs)
        extra: dict[str, Any] = {}
        if in_chans is not None:
            extra["in_chans"] = in_chans
        if img_size is not None:
            extra["img_size"] = img_size
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **extra, **kwargs)

    build.__doc__ = (f"timm {name} (pretrained=False; img_size, in_chans and timm kwargs such as drop_path_rate "
                     "pass through).")
    return build


for _name in TORCHVISION_MODELS:
    register_model(_torchvision(_name), name=_name, source="torchvision", **_IMAGENET)
for _name in TIMM_MODELS:
    register_model(_timm(_name), name=_name, source="timm", **_IMAGENET)
