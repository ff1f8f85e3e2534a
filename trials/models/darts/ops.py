"""The operations of the DARTS search space (PROTOCOLS 1.2; Liu et al., "DARTS: Differentiable
Architecture Search", ICLR 2019, Sec. 3.1 and App. A.1), plus the two extra ops that published
genotypes of the AutoML study use (`sep_conv_7x7` from NASNet/AmoebaNet, `conv_7x1_1x7` from
AmoebaNet).

Every op maps ``(B, C, H, W)`` to ``(B, C, H/stride, W/stride)``. The exact layer structure is
pinned by the DARTS V2 parameter count (3,349,342 at C=36, 20 cells, 10 classes):

* ``sep_conv_kxk`` = two stacked [ReLU, depthwise k x k conv, pointwise 1x1 conv, BN]; only the
  first depthwise conv is strided.
* ``dil_conv_kxk`` = ReLU, depthwise k x k conv with dilation 2, pointwise 1x1 conv, BN.
* ``conv_7x1_1x7`` = ReLU, 1x7 conv, 7x1 conv, BN.
* ``skip_connect`` = identity, or :class:`FactorizedReduce` when strided.
* pools are 3x3 with padding 1; average pooling excludes the padding from the count.
* ``none`` = zeros (strided).

Convolutions have no bias; BN is affine unless ``affine=False`` (the search supernet's choice).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import nn


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv(k, stride, padding, no bias) -> BN; DARTS's 1x1 input preprocessing."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, *,
                 affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise k x k conv (dilated) -> pointwise 1x1 conv -> BN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, *, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked undilated :class:`DilConv` blocks; the first carries the stride (DARTS App. A.1:
    "the separable convolutions are always applied twice")."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, *,
                 affine: bool = True) -> None:
        super().__init__(
            DilConv(c_in, c_in, kernel_size, stride, padding, 1, affine=affine),
            DilConv(c_in, c_out, kernel_size, 1, padding, 1, affine=affine),
        )


class Conv7x1x1x7(nn.Sequential):
    """ReLU -> 1x7 conv -> 7x1 conv -> BN (AmoebaNet's factorised 7x7 conv)."""

    def __init__(self, c: int, stride: int, *, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c, c, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
            nn.Conv2d(c, c, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
            nn.BatchNorm2d(c, affine=affine),
        )


class Zero(nn.Module):
    """The `none` op: zeros of the output shape (keeps the graph connected for autograd)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halves the resolution without losing pixels: ReLU, then two 1x1 stride-2 convs (each to
    c_out/2 channels), the second on the input shifted by one pixel, concatenated, then BN."""

    def __init__(self, c_in: int, c_out: int, *, affine: bool = True) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even c_out, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        # Pad the shifted copy on the far side so odd sizes give the same output shape.
        shifted = nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


OpBuilder = Callable[..., nn.Module]


def _skip(c: int, stride: int, *, affine: bool = True) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine=affine)


# name -> builder(c, stride, *, affine=True). Read-only so no caller can change the space.
OPS: Mapping[str, OpBuilder] = MappingProxyType({
    "none": lambda c, stride, *, affine=True: Zero(stride),
    "avg_pool_3x3": lambda c, stride, *, affine=True: nn.AvgPool2d(
        3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda c, stride, *, affine=True: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": _skip,
    "sep_conv_3x3": lambda c, stride, *, affine=True: SepConv(c, c, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda c, stride, *, affine=True: SepConv(c, c, 5, stride, 2, affine=affine),
    "sep_conv_7x7": lambda c, stride, *, affine=True: SepConv(c, c, 7, stride, 3, affine=affine),
    "dil_conv_3x3": lambda c, stride, *, affine=True: DilConv(c, c, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda c, stride, *, affine=True: DilConv(c, c, 5, stride, 4, 2, affine=affine),
    "conv_7x1_1x7": lambda c, stride, *, affine=True: Conv7x1x1x7(c, stride, affine=affine),
})

# The eight ops of the DARTS search space proper (the supernet's candidates, PROTOCOLS 1.2).
DARTS_PRIMITIVES: tuple[str, ...] = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)


def make_op(name: str, c: int, stride: int, *, affine: bool = True) -> nn.Module:
    """Build the op ``name`` on ``c`` channels with ``stride`` (1 or 2)."""
    try:
        builder = OPS[name]
    except KeyError:
        raise ValueError(f"unknown DARTS op {name!r}; valid: {', '.join(sorted(OPS))}") from None
    return builder(c, stride, affine=affine)
