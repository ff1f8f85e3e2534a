"""NetworkCIFAR: the DARTS evaluation network built from a genotype (PROTOCOLS 1.2; Liu et al.,
"DARTS", ICLR 2019, Sec. 3.1 and App. A.2).

Stem: 3x3 conv (3 -> 3C, no bias) + BN. Then ``layers`` cells; cells at ``layers//3`` and
``2*layers//3`` are reduction cells (stride 2, channels doubled). Each cell takes the outputs
of the two previous cells, preprocesses them to C channels (ReLU-1x1 conv-BN, or
:class:`FactorizedReduce` for the older one when the previous cell reduced), and concatenates
the genotype's output nodes. Global average pooling and a linear classifier close the network;
an optional auxiliary head reads the output of cell ``2*layers//3``.

Parameter sets (PROTOCOLS 1.2): ``paper`` = DARTS's drop-path (0.2) on every non-identity op
in training; ``artifact`` = no drop-path, ``Dropout(0.2)`` after every non-identity op, no
auxiliary head.

Deviations: DARTS ramps the drop-path probability linearly from 0 to 0.2 over training; the
shared training loop has no per-epoch hook, so the network applies the constant probability in
:attr:`NetworkCIFAR.drop_path_prob` (a trainer may set it each epoch). The auxiliary logits are
returned by :meth:`NetworkCIFAR.forward_aux`, not by ``forward``, so every caller gets plain
logits; the one training loop adds the auxiliary loss (weight ``TrainConfig.aux_weight``, 0.4
as DARTS) for every net built with the head (:func:`~nasrisk.trials.train.training_loss`
reads the head's output by a forward hook). For inputs smaller than 32x32
the auxiliary head pools adaptively to 2x2 (DARTS's 5x5/stride-3 pooling assumes an 8x8 map).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ...errors import UserError
from .genotypes import Genotype
from .ops import FactorizedReduce, ReLUConvBN, make_op

ParamSet = Literal["paper", "artifact"]


def _is_identity(op: nn.Module) -> bool:
    return isinstance(op, nn.Identity)


class Cell(nn.Module):
    """One normal or reduction cell of a genotype."""

    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, c: int, *,
                 reduction: bool, reduction_prev: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(c_prev_prev, c) if reduction_prev
                            else ReLUConvBN(c_prev_prev, c, 1, 1, 0))
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = tuple(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.multiplier = len(self.concat)
        self.steps = len(edges) // 2
        self.indices = tuple(src for _, src in edges)
        ops = []
        for name, src in edges:
            op = make_op(name, c, 2 if reduction and src < 2 else 1)
            if dropout > 0 and not _is_identity(op):
                op = nn.Sequential(op, nn.Dropout(dropout))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            node = 0
            for j in (2 * i, 2 * i + 1):
                op = self.ops[j]
                h = op(states[self.indices[j]])
                if self.training and drop_prob > 0 and not _is_identity(op):
                    from timm.layers import drop_path  # lazy: timm imports torch._dynamo

                    h = drop_path(h, drop_prob, self.training)
                node = node + h
            states.append(node)
        return torch.cat([states[k] for k in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS's CIFAR auxiliary classifier on the 8x8 map after the second reduction: ReLU,
    5x5 avg-pool stride 3, 1x1 conv to 128 + BN + ReLU, 2x2 conv to 768 + BN + ReLU, linear."""

    def __init__(self, c: int, num_classes: int, *, feature_size: int) -> None:
        super().__init__()
        pool: nn.Module = (nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
                           if feature_size >= 8 else nn.AdaptiveAvgPool2d(2))
        self.features = nn.Sequential(
            nn.ReLU(inplace=False), pool,
            nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class NetworkCIFAR(nn.Module):
    """The DARTS evaluation network for CIFAR-sized inputs (see the module docstring)."""

    def __init__(self, genotype: Genotype, *, num_classes: int, C: int = 36, layers: int = 20,
                 auxiliary: bool = False, drop_path_prob: float = 0.0, dropout: float = 0.0,
                 input_size: int = 32, stem_multiplier: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.genotype = genotype
        self.drop_path_prob = drop_path_prob
        self.reduction_layers = (layers // 3, 2 * layers // 3)
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, c_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
        cells, reduction_prev, size = [], False, input_size
        self.aux_index = 2 * layers // 3
        c_aux = size_aux = None
        for i in range(layers):
            reduction = i in self.reduction_layers
            if reduction:
                c_curr *= 2
                size = (size + 1) // 2
            cell = Cell(genotype, c_prev_prev, c_prev, c_curr, reduction=reduction,
                        reduction_prev=reduction_prev, dropout=dropout)
            cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self.aux_index:
                c_aux, size_aux = c_prev, size
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = (AuxiliaryHead(c_aux, num_classes, feature_size=size_aux)
                               if auxiliary else None)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and, in training mode with an auxiliary head, the auxiliary logits."""
        s0 = s1 = self.stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_aux(x)[0]


def build_network(genotype: Genotype, *, num_classes: int, input_size: int = 32, C: int = 36,
                  layers: int = 20, params: ParamSet = "paper", auxiliary: bool = False,
                  drop_path: float | None = None) -> NetworkCIFAR:
    """NetworkCIFAR for ``genotype`` under a parameter set (PROTOCOLS 1.2).

    ``paper``: drop-path ``drop_path`` (default 0.2) in training, optional auxiliary head.
    ``artifact``: ``Dropout(0.2)`` after every non-identity op, no drop-path (``drop_path``
    must stay unset or 0), no auxiliary head.
    """
    if input_size < 8:
        raise UserError(f"DARTS networks need inputs of at least 8x8, got input_size={input_size}")
    if params == "paper":
        return NetworkCIFAR(genotype, num_classes=num_classes, C=C, layers=layers,
                            auxiliary=auxiliary, input_size=input_size,
                            drop_path_prob=0.2 if drop_path is None else drop_path)
    if params == "artifact":
        if auxiliary:
            raise UserError("params='artifact' has no auxiliary head; use params='paper'")
        if drop_path:
            raise UserError("params='artifact' uses Dropout(0.2), not drop-path; use params='paper'")
        return NetworkCIFAR(genotype, num_classes=num_classes, C=C, layers=layers,
                            input_size=input_size, dropout=0.2)
    raise UserError(f"unknown parameter set {params!r}; valid: paper, artifact")
