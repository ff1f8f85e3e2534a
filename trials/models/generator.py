"""The EVAS input-aware trigger generator (PROTOCOLS 5, "Trigger generator").

EVAS (Pang et al., ICLR 2023, Sec. 3) uses the input-aware dynamic trigger of Nguyen & Tran
("Input-Aware Dynamic Backdoor Attack", NeurIPS 2020, Sec. 3.2): a pattern network ``P`` and a
mask network ``M``, both small encoder-decoders, and the trigger input

    mark(x) = tanh(P(x)) / 2 + 1/2,   m(x) = tanh(10 tanh(M(x))) / 2 + 1/2,
    x~ = x + m(x) (mark(x) - x),

a per-pixel convex blend of ``x`` and ``mark(x)``, so ``x~`` stays in [0, 1] when ``x`` does.
The forward pass is a plain differentiable function of the parameters, so kappa scorers can
differentiate ``f(g(x))`` with :mod:`torch.func`.
"""

from __future__ import annotations

import torch
from torch import nn

BN_MOMENTUM = 0.05


def _conv_bn(c_in: int, c_out: int, *, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                               nn.BatchNorm2d(c_out, momentum=BN_MOMENTUM)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class GeneratorNet(nn.Module):
    """Encoder-decoder of PROTOCOLS 5: three encoder blocks [ConvBNReLU x2 + MaxPool2] to
    32/64/128 channels, a middle ConvBNReLU(128), three decoder blocks [bilinear Upsample x2,
    ConvBNReLU(c->c), ConvBN(+ReLU)(c->next)] with channels 128->64->32->``out_channels``; the
    very last conv (+BN) has no ReLU: its output is the pre-activation of ``tanh``.

    Input ``(B, 3, H, W)`` in [0, 1] with ``H, W`` divisible by 8 (32x32 and 16x16 images);
    output ``(B, out_channels, H, W)``, unbounded.

    ``channels`` are the three encoder widths, (32, 64, 128) as EVAS ran it; the `smoke` profile
    narrows them (a size, like the NATS net's C) so kappa and generator training fit a CPU.

    Deviations: none in structure at the default widths; the input is not normalised (it is in
    [0, 1]).
    """

    def __init__(self, out_channels: int, *, in_channels: int = 3,
                 channels: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        layers: list[nn.Module] = []
        c_prev = in_channels
        for c in channels:
            layers += _conv_bn(c_prev, c) + _conv_bn(c, c) + [nn.MaxPool2d(2)]
            c_prev = c
        layers += _conv_bn(c3, c3)
        for i, (c, c_next) in enumerate(((c3, c2), (c2, c1), (c1, out_channels))):
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            layers += _conv_bn(c, c) + _conv_bn(c, c_next, relu=i < 2)
        self.body = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"GeneratorNet needs H and W divisible by 8, got {tuple(x.shape)}")
        return self.body(x)


class TriggerGenerator(nn.Module):
    """The input-aware trigger ``g(x) = x + m(x) (mark(x) - x)`` (PROTOCOLS 5; Nguyen & Tran
    2020, Eq. 2 with the EVAS mask squashing ``tanh(10 tanh(.))``).

    ``pattern = GeneratorNet(3)`` and ``mask = GeneratorNet(1)``; :meth:`cross` applies the
    trigger generated from another input (the cross-trigger of Nguyen & Tran, Sec. 3.3).
    """

    def __init__(self, *, channels: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        self.pattern = GeneratorNet(3, channels=channels)
        self.mask = GeneratorNet(1, channels=channels)

    def mark(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger pattern in [0, 1], ``(B, 3, H, W)``."""
        return torch.tanh(self.pattern(x)) / 2 + 0.5

    def mask_of(self, x: torch.Tensor) -> torch.Tensor:
        """The blending mask in [0, 1], ``(B, 1, H, W)``; ``tanh(10 tanh(.))`` makes it almost
        binary."""
        return torch.tanh(10 * torch.tanh(self.mask(x))) / 2 + 0.5

    @staticmethod
    def blend(x: torch.Tensor, mark: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x + mask (mark - x)``. ``torch.lerp`` is exact at ``mask`` 0 and 1; the clamp only
        removes float rounding (an ulp past 1), so it is the identity wherever the formula is
        in range and passes its gradient unchanged there."""
        return torch.lerp(x, mark, mask).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger input ``x~`` for ``x`` in [0, 1]."""
        return self.blend(x, self.mark(x), self.mask_of(x))

    def cross(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """``x`` carrying the trigger generated from ``x2`` (same shape as ``x``)."""
        return self.blend(x, self.mark(x2), self.mask_of(x2))
