"""Random label-flip poisoning and the clean accuracy drop (PROTOCOLS 4 "label-flip
poisoning"; Pang et al., "On the Security Risks of AutoML", USENIX Security 2022, Sec. 5).

Threat model: the adversary controls the labels of a fraction p of the training set and sets
each to a uniformly random *other* class; the victim retrains from scratch on the poisoned set
(the lineage step ``label_flip``, :mod:`nasrisk.trials.steps.label_flip`). The metric is
CAD = acc(clean) - acc(poisoned) on the clean test set.
"""

from __future__ import annotations

import torch


def flip_labels(y: torch.Tensor, *, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """A copy of ``y`` with exactly ``round(fraction * N)`` labels, at positions chosen
    uniformly at random, each replaced by a uniformly random class other than its own.
    Deterministic per ``seed``; ``fraction=0`` returns an unchanged copy.

    The lineage step ``label_flip`` (:mod:`nasrisk.trials.steps.label_flip`) trains on them.
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
