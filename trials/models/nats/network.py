"""The NATS-Bench topology-space network: NAS-Bench-201's cell in its TinyNetwork skeleton
(PROTOCOLS 1.1; Dong & Yang, "NAS-Bench-201", ICLR 2020, Fig. 1; Dong et al., "NATS-Bench",
TPAMI 2021).

Skeleton: stem Conv3x3(3->C, no bias)+BN; cells with channels
``[C]*N + [2C] + [2C]*N + [4C] + [4C]*N`` where the two single entries are residual reduction
blocks; then BN-ReLU, global average pool, linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UserError
from ...registry import MODELS
from .arch_string import NUM_NODES, parse_arch


class Zero(nn.Module):
    """The ``none`` op: zeros of the input's shape.

    ``x * 0`` rather than ``zeros_like`` keeps the output in the autograd graph, so gradients of
    earlier parameters are exact zeros, not missing (a Jacobian over all arch weights of an arch
    with dead edges then needs no ``allow_unused``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv(k, no bias) -> BN(affine): NAS-Bench-201's ``nor_conv_kxk`` and the
    branches of its residual block."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, *, stride: int = 1) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2,
                      bias=False),
            nn.BatchNorm2d(c_out, affine=True),
        )


def make_op(name: str, channels: int) -> nn.Module:
    """One cell op on ``channels`` channels, stride 1 (cells never change the shape)."""
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1)
    if name == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise UserError(f"unknown NATS op {name!r}")


class Cell(nn.Module):
    """NAS-Bench-201 cell: node 0 is the input, node j the sum of its incoming edges, the
    output node 3. ``edges[e]`` is the op on :data:`EDGES` ``[e]``."""

    def __init__(self, ops: tuple[str, ...], channels: int) -> None:
        super().__init__()
        self.ops = ops
        self.edges = nn.ModuleList(make_op(op, channels) for op in ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        e = 0
        for node in range(1, NUM_NODES):
            total = None
            for src in range(node):
                y = self.edges[e](nodes[src])
                total = y if total is None else total + y
                e += 1
            nodes.append(total)
        return nodes[-1]


class ResidualReduction(nn.Module):
    """NAS-Bench-201's residual reduction block: ReLU-Conv3x3(stride 2)-BN then
    ReLU-Conv3x3-BN, plus a shortcut AvgPool2d(2) then Conv1x1 (no bias, no BN)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, stride=2),
                                      nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class TinyNetwork(nn.Module):
    """A NATS-Bench topology-space network for one arch string (PROTOCOLS 1.1).

    Maps normalised ``(B, 3, H, W)`` inputs (H, W divisible by 4) to ``(B, num_classes)``
    logits. Paper size: ``C=16, N=5``.
    """

    def __init__(self, arch: str, *, C: int = 16, N: int = 5, num_classes: int = 10) -> None:
        super().__init__()
        if C < 1 or N < 1 or num_classes < 1:
            raise UserError(f"TinyNetwork needs C, N, num_classes >= 1, got {C}, {N}, {num_classes}")
        self.arch = arch
        ops = parse_arch(arch)
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        widths = [C] * N + [2 * C] + [2 * C] * N + [4 * C] + [4 * C] * N
        reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        cells: list[nn.Module] = []
        c_prev = C
        for width, reduction in zip(widths, reductions, strict=True):
            cells.append(ResidualReduction(c_prev, width) if reduction else Cell(ops, width))
            c_prev = width
        self.cells = nn.ModuleList(cells)
        self.lastact = nn.Sequential(nn.BatchNorm2d(c_prev), nn.ReLU(inplace=False))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        x = self.global_pool(self.lastact(x)).flatten(1)
        return self.classifier(x)


def build_nats(*, num_classes: int, input_size: int = 32, arch: str, C: int = 16,
               N: int = 5) -> TinyNetwork:
    """``MODELS["nats"]``: a raw (un-normalised) :class:`TinyNetwork`; callers wrap it in
    :class:`~nasrisk.trials.models.wrapper.Normalized`.

    ``input_size`` must be divisible by 4: a reduction block's strided conv rounds odd sizes up
    while its AvgPool2d shortcut rounds them down, so the two branches would not add.
    """
    if input_size < 4 or input_size % 4:
        raise UserError(f"nats models need an input size divisible by 4, got {input_size}")
    return TinyNetwork(arch, C=C, N=N, num_classes=num_classes)


MODELS.register("nats", build_nats, family="nats")

__all__ = ["Cell", "ReLUConvBN", "ResidualReduction", "TinyNetwork", "Zero",
           "build_nats", "make_op"]
