"""What a ``DEFENSES`` entry is: a frozen :class:`DefenseEntry` that runs one backdoor defense
on one trained model, with its typed options and the metric names it returns, so the
``defense`` trial kind (:mod:`nasrisk.trials.kinds.defense`) dispatches by name and a new
defense is one module holding one registration (``trials/defenses/__init__`` imports them).

The kind hands an entry's :attr:`DefenseEntry.run`:

* ``model``: the model in eval mode on its device, mapping [0, 1] inputs to logits (the run
  may change it: it gets a copy);
* ``inputs``: a :class:`DefenseInputs`: clean test inputs, the backdoor's trigger inputs when
  one is known (:class:`~nasrisk.trials.defenses.triggers.TriggerInputs`), and the clean data
  the defender holds (the victim's clean training split, labels untouched);
* ``options``: the entry's own options (an instance of :attr:`DefenseEntry.options`);
* ``ctx`` and ``key``: the trial context and a state key for resumable parts.

It returns exactly :meth:`DefenseEntry.metric_names` of its options (floats; NaN where a
number needs a trigger the trial does not have).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from ..data.base import ImageData, to_float
from .triggers import TriggerInputs

RunDefense = Callable[[nn.Module, "DefenseInputs", Any, Any, str], dict[str, float]]


@dataclass(frozen=True)
class DefenseInputs:
    """``x`` uint8 / ``y``: the clean test inputs the defense is measured on; ``trigger``: how
    the backdoor's trigger inputs are made (None: unknown, e.g. a model with no backdoor
    step); ``defender``: the clean data the defender holds (its ``x_train`` / ``y_train``);
    ``num_classes``; ``seed`` for every random choice; ``batch_size`` of forward passes."""

    x: torch.Tensor
    y: torch.Tensor
    trigger: TriggerInputs | None
    defender: ImageData
    num_classes: int
    seed: int = 0
    batch_size: int = 256

    @property
    def target(self) -> int | None:
        return None if self.trigger is None else self.trigger.target

    def clean(self) -> torch.Tensor:
        """The clean inputs as float in [0, 1]."""
        return to_float(self.x)

    def triggered(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(trigger inputs, their true labels)`` of the clean inputs whose label is not the
        target (PROTOCOLS 5's ASR population), None without a trigger."""
        if self.trigger is None:
            return None
        keep = self.y != self.trigger.target
        return self.trigger.make(self.x[keep]), self.y[keep]


@dataclass(frozen=True)
class DefenseEntry:
    """One defense (see the module docstring). ``metrics``: every name it may return;
    ``metrics_for(options)``: the names of one configuration (a swept list of ratios, say);
    ``needs_trigger``: whether it measures nothing without trigger inputs (STRIP);
    ``source``: the paper; ``uses_art``: what it takes from ART, if anything."""

    run: RunDefense
    options: type[BaseModel]
    metrics: tuple[str, ...]
    source: str
    description: str = ""
    metrics_for: Callable[[Any], tuple[str, ...]] | None = None
    needs_trigger: bool = False
    uses_art: str = ""

    def __post_init__(self) -> None:
        if len(set(self.metrics)) != len(self.metrics) or not self.metrics:
            raise ValueError(f"metrics must be distinct names, got {self.metrics}")

    def metric_names(self, options: Any | None = None) -> tuple[str, ...]:
        if options is not None and self.metrics_for is not None:
            return tuple(self.metrics_for(options))
        return self.metrics


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits (float32, CPU) of float [0, 1] inputs, in eval mode (the mode is restored)."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        out = [model(x[i:i + batch_size].to(dev)).float().cpu()
               for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy on float inputs; NaN on none."""
    if len(y) == 0:
        return float("nan")
    return (logits(model, x, batch_size).argmax(1) == y.cpu()).float().mean().item()


def success_rate(model: nn.Module, inputs: DefenseInputs) -> float:
    """ASR: the fraction of trigger inputs labelled the target; NaN without a trigger."""
    trig = inputs.triggered()
    if trig is None or len(trig[1]) == 0:
        return float("nan")
    pred = logits(model, trig[0], inputs.batch_size).argmax(1)
    return (pred == inputs.target).float().mean().item()
