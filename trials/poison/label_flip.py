"""Random label-flip poisoning and the clean accuracy drop (PROTOCOLS 4 "label-flip
poisoning"; Pang et al., "On the Security Risks of AutoML", USENIX Security 2022, Sec. 5).

Threat model: the adversary controls the labels of a fraction p of the training set and sets
each to a uniformly random *other* class; the victim retrains from scratch on the poisoned set
(``paper``: 50 epochs, lr 0.025 cosine, clip 5, batch 96 = :data:`~..train.POISON_RETRAIN`).
The metric is CAD = acc(clean) - acc(poisoned) on the clean test set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..context import TrialContext
from ..data.base import ImageData
from ..registry import ATTACKS
from ..train import POISON_RETRAIN, TrainConfig, train

PAPER_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4)  # the paper plots 0-40%
ARTIFACT_FRACTIONS = (0.0, 0.1, 0.2, 0.4)


@ATTACKS.register("label_flip", kind="poison", takes="labels", source="PROTOCOLS 4")
def flip_labels(y: torch.Tensor, *, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """A copy of ``y`` with exactly ``round(fraction * N)`` labels, at positions chosen
    uniformly at random, each replaced by a uniformly random class other than its own.
    Deterministic per ``seed``; ``fraction=0`` returns an unchanged copy.

    Registered in ATTACKS (kind ``poison``): unlike the evasion attacks it takes the training
    labels, not a model, and returns the poisoned labels.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if num_classes < 2:
        raise ValueError("label flipping needs at least 2 classes")
    gen = torch.Generator().manual_seed(seed)
    y = y.clone()
    k = round(fraction * len(y))
    idx = torch.randperm(len(y), generator=gen)[:k]
    # an offset in 1..K-1 added mod K is uniform over the K-1 other classes
    offset = torch.randint(1, num_classes, (k,), generator=gen)
    y[idx] = (y[idx] + offset.to(y.device)) % num_classes
    return y


def clean_accuracy_drop(acc_clean: float, acc_poisoned: float) -> float:
    """CAD = acc(clean) - acc(poisoned) (PROTOCOLS 4), in the accuracies' units."""
    return acc_clean - acc_poisoned


def poisoned_test_accuracy(build_model: Callable[[], nn.Module], data: ImageData, *,
                           fraction: float, seed: int, ctx: TrialContext,
                           cfg: TrainConfig = POISON_RETRAIN, poison_seed: int | None = None,
                           state_key: str | None = None) -> float:
    """Train a fresh ``build_model()`` from scratch on ``data`` with a ``fraction`` of its
    training labels flipped (:func:`flip_labels`, seed ``poison_seed``, default ``seed``)
    using the one training loop, and return its clean test accuracy. Resumable through
    ``ctx`` under ``state_key`` (default ``"label_flip_<fraction>"``)."""
    labels = flip_labels(data.y_train, fraction=fraction, num_classes=data.info.num_classes,
                         seed=seed if poison_seed is None else poison_seed)
    key = state_key or f"label_flip_{fraction:g}"
    return train(build_model(), data, cfg, seed=seed, ctx=ctx, state_key=key,
                 labels=labels)["test_acc"]
