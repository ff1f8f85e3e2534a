"""The 7 manually designed models of the AutoML study, CIFAR-sized (PROTOCOLS 1.3).

Each is the torchvision/timm constructor (no weights, nothing downloaded) with the ImageNet stem
replaced the way CIFAR versions of these networks do it: a 3x3 stride-1 first conv and no stem
max-pool, so a 32x32 input reaches the classifier at 4x4 (ResNet family, DenseNet, DLA, BiT).

* ``resnet18``, ``resnext50_32x4d``, ``wide_resnet50_2`` (torchvision): ``conv1`` -> 3x3/1,
  ``maxpool`` removed.
* ``densenet121`` (torchvision): ``conv0`` -> 3x3/1 (64 channels), ``pool0`` removed.
* ``dla34`` (timm): ``base_layer`` 7x7 -> 3x3 (already stride 1); ``level1`` and ``level2``
  stride 2 -> 1, as the study's artifact does for CIFAR (its ``dla34_comp``: "strides
  [1, 2, 2, 2]" and level-1 stride 1), leaving levels 3-5 to downsample 32 -> 4.
* ``bit_m_r50x1`` (timm ``resnetv2_50x1_bit``: pre-activation ResNet-50 with weight-standardised
  convs and GroupNorm): stem conv 7x7/2 -> weight-standardised 3x3/1, stem pad + max-pool removed.
* ``vgg13_bn`` (torchvision's VGG-13-BN layers): its convs are already 3x3/1; the ImageNet head
  (7x7 adaptive pooling, 3 FC layers of 4096) is replaced by global average pooling + one linear layer on the
  512 features, the usual CIFAR VGG head. Of its 5 max-pools only the first log2(input_size)
  are kept, so 16x16 inputs work too (32x32 keeps all 5).

Deviations: BiT-M's "M" names the ImageNet-21k pre-training; here, as everywhere in the study's
training from scratch, only the architecture is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from ..errors import UserError
from ..registry import MODELS


def _conv3x3(conv: nn.Conv2d) -> nn.Conv2d:
    """A 3x3 stride-1 conv of the same type and channels as ``conv`` (keeps e.g. StdConv2d)."""
    kwargs = {"eps": conv.eps} if hasattr(conv, "eps") else {}
    return type(conv)(conv.in_channels, conv.out_channels, 3, stride=1, padding=1,
                      bias=conv.bias is not None, **kwargs)


def _check_size(input_size: int, minimum: int = 8) -> None:
    if input_size < minimum:
        raise UserError(f"input_size must be >= {minimum}, got {input_size}")


def _tvm():
    # torchvision and timm import torch._dynamo (seconds per process): only when a model is built
    import torchvision.models as tvm

    return tvm


def _timm():
    import timm

    return timm


def _torchvision_resnet(ctor_name: str) -> Callable[..., nn.Module]:
    def build(*, num_classes: int, input_size: int = 32) -> nn.Module:
        _check_size(input_size)
        net = getattr(_tvm(), ctor_name)(weights=None, num_classes=num_classes)
        net.conv1 = _conv3x3(net.conv1)
        net.maxpool = nn.Identity()
        return net

    return build


def densenet121(*, num_classes: int, input_size: int = 32) -> nn.Module:
    """torchvision DenseNet-121, CIFAR stem."""
    _check_size(input_size)
    net = _tvm().densenet121(weights=None, num_classes=num_classes)
    net.features.conv0 = _conv3x3(net.features.conv0)
    net.features.pool0 = nn.Identity()
    return net


def dla34(*, num_classes: int, input_size: int = 32) -> nn.Module:
    """timm DLA-34, CIFAR stem and strides (see the module docstring)."""
    _check_size(input_size)
    net = _timm().create_model("dla34", pretrained=False, num_classes=num_classes)
    net.base_layer[0] = _conv3x3(net.base_layer[0])
    net.level1[0].stride = (1, 1)
    net.level2.downsample = nn.Identity()
    net.level2.tree1.conv1.stride = (1, 1)
    return net


def bit_m_r50x1(*, num_classes: int, input_size: int = 32) -> nn.Module:
    """timm ``resnetv2_50x1_bit`` (BiT-R50x1), CIFAR stem."""
    _check_size(input_size)
    net = _timm().create_model("resnetv2_50x1_bit", pretrained=False, num_classes=num_classes)
    net.stem.conv = _conv3x3(net.stem.conv)
    net.stem.pad = nn.Identity()
    net.stem.pool = nn.Identity()
    return net


class CifarVGG(nn.Sequential):
    """VGG features, global average pooling, one linear layer."""

    def __init__(self, features: nn.Sequential, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(512, num_classes)


def vgg13_bn(*, num_classes: int, input_size: int = 32) -> nn.Module:
    """VGG-13-BN (torchvision's layer configuration "B" with BN) with a global-pool + linear
    head (see the module docstring).

    Deviations: built from ``torchvision.models.vgg.make_layers`` rather than ``vgg13_bn()``
    because the latter first allocates the discarded 124M-parameter ImageNet head (seconds per
    build); the initialisation is torchvision's VGG one (Kaiming-normal fan-out convs with zero
    bias, N(0, 0.01) linear with zero bias).
    """
    _check_size(input_size, 2)
    tvm = _tvm()
    features = tvm.vgg.make_layers(tvm.vgg.cfgs["B"], batch_norm=True)
    keep = int(math.log2(input_size))
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    for i in pools[keep:]:
        features[i] = nn.Identity()
    net = CifarVGG(features, num_classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return net


def _register() -> None:
    entries: dict[str, tuple[Callable[..., nn.Module], str]] = {
        "bit_m_r50x1": (bit_m_r50x1, "timm.create_model('resnetv2_50x1_bit')"),
        "densenet121": (densenet121, "torchvision.models.densenet121"),
        "dla34": (dla34, "timm.create_model('dla34')"),
        "resnet18": (_torchvision_resnet("resnet18"), "torchvision.models.resnet18"),
        "resnext50_32x4d": (_torchvision_resnet("resnext50_32x4d"),
                            "torchvision.models.resnext50_32x4d"),
        "vgg13_bn": (vgg13_bn, "torchvision.models.vgg.make_layers(cfgs['B'], batch_norm=True)"),
        "wide_resnet50_2": (_torchvision_resnet("wide_resnet50_2"),
                            "torchvision.models.wide_resnet50_2"),
    }
    for name, (builder, source) in entries.items():
        MODELS.register(name, builder, family="manual", source=f"{source}, CIFAR stem")


_register()
