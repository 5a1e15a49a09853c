"""Model registry (timm-style) with the paper's networks and small models for the embedded data sets.

    from torchsaq.models import create_model, list_models, model_info
    model = create_model("resnet20", num_classes=100)          # float model, random init
    model_info("resnet20").input_shape                         # (3, 32, 32)

Registered: ``cnn1d`` (MNIST-1D), ``cnn_digits`` and ``vit_tiny_digits`` (scikit-learn digits), ``cnn_fmnist``
and ``vit_fmnist`` (Fashion-MNIST), CIFAR ``resnet20/32/56``, ``preresnet20/32/56``, ``mobilenetv2_cifar`` (all
three also take ``in_chans=1`` and 28x28 inputs), torchvision ``resnet18/34/50`` and ``mobilenet_v2``, timm
``vit_base_patch16_224`` and ``deit_{tiny,small,base}_patch16_224``. Models are float; quantize them with
:func:`saq.quantize`. Nothing is downloaded.
"""
from __future__ import annotations

from ._registry import ModelInfo, create_model, list_models, model_info, register_model
from . import cifar, small, zoo  # noqa: F401  (registers the models)

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
