"""The 7 manual CIFAR-sized models (PROTOCOLS 1.3)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import StdConv2d
from torch import nn

from nasrisk.trials.models.manual import bit_m_r50x1, vgg13_bn
from nasrisk.trials.registry import MODELS

MANUAL = [n for n in MODELS.names() if MODELS.meta(n)["family"] == "manual"]


def test_the_seven_manual_models():
    assert sorted(MANUAL) == ["bit_m_r50x1", "densenet121", "dla34", "resnet18",
                              "resnext50_32x4d", "vgg13_bn", "wide_resnet50_2"]


def _trace(model: nn.Module, size: int) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """(leaf module, output shape) in execution order."""
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: seen.append((mod, tuple(out.shape))))
             for m in model.modules() if not list(m.children())]
    model.eval()
    with torch.no_grad():
        model(torch.rand(1, 3, size, size))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", MANUAL)
def test_cifar_stem(name):
    torch.manual_seed(0)
    trace = _trace(MODELS.get(name)(num_classes=10), 32)
    convs = [(m, s) for m, s in trace if isinstance(m, nn.Conv2d)]
    first, shape = convs[0]
    assert first.kernel_size == (3, 3) and first.stride == (1, 1) and shape[-2:] == (32, 32)
    # No stem max-pool: the first max-pool (if any) runs only after some 32x32 block
    # convolutions, and the last convolutions of ResNet-like models run at 4x4 (total stride
    # 8); VGG's at 2x2, before its fifth max-pool.
    order = [m for m, _ in trace]
    pools = [i for i, m in enumerate(order) if isinstance(m, nn.MaxPool2d)]
    if pools:
        convs_before = sum(isinstance(m, nn.Conv2d) for m in order[:pools[0]])
        assert convs_before >= 2
    # (1x1 outputs are conv classifier heads after global pooling: BiT, DLA.)
    assert min(s[-1] for _, s in convs if s[-1] > 1) == (2 if name == "vgg13_bn" else 4)


def test_resnet18_runs_at_16x16():
    torch.manual_seed(0)
    net = MODELS.get("resnet18")(num_classes=5, input_size=16)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    out = net(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert min(s[-1] for m, s in _trace(net, 16) if isinstance(m, nn.Conv2d)) == 2


def test_bit_is_weight_standardised_with_groupnorm():
    net = bit_m_r50x1(num_classes=10)
    # Every conv of the body (the head's 1x1 conv classifier aside) is weight-standardised.
    convs = [m for part in (net.stem, net.stages) for m in part.modules()
             if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and all(isinstance(c, StdConv2d) for c in convs)
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_vgg_head_and_small_inputs():
    net = vgg13_bn(num_classes=10)
    assert isinstance(net.classifier, nn.Linear) and net.classifier.in_features == 512
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.features) == 5
    small = vgg13_bn(num_classes=10, input_size=16)
    assert sum(isinstance(m, nn.MaxPool2d) for m in small.features) == 4
    assert small(torch.rand(2, 3, 16, 16)).shape == (2, 10)
