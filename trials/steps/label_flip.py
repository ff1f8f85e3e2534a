"""The ``label_flip`` step: the base network trained from scratch, with the base recipe and
seed, on training labels of which a fraction is flipped (PROTOCOLS 4 "label-flip poisoning";
Pang et al., "On the Security Risks of AutoML", USENIX Security 2022, Sec. 5).

Threat model: the adversary controls the labels of a fraction p of the training set and sets
each to a uniformly random other class (:func:`~nasrisk.trials.poison.label_flip.flip_labels`,
seeded by the base seed); the victim trains on the poisoned set from scratch. CAD, the clean
accuracy drop against the parent (the clean base), is the analysis' subtraction.

Deviations: the paper retrains poisoned models with its poisoning recipe (50 epochs,
``POISON_RETRAIN``); as before lineages existed, the child uses its base's recipe, so clean and
poisoned victims of one study differ in the labels only. The step trains from the base alone,
so it must be a lineage's first step.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..context import TrialContext
from ..data.base import ImageData
from ..lineage import StepKind
from ..poison.label_flip import flip_labels
from ..registry import STEP_KINDS
from ..train import train


class LabelFlipStep(BaseModel):
    """``fraction`` of the training labels flipped, in [0, 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    fraction: float = Field(ge=0.0, lt=1.0)


def apply(parent_model: nn.Module | None, parent_record: dict[str, Any] | None, spec: Any,
          data: ImageData, ctx: TrialContext) -> tuple[nn.Module, dict[str, float]]:
    from ..victims import build_victim, model_state_key  # victims imports the lineage

    cfg: LabelFlipStep = spec.steps[-1].config()
    base = spec.base()
    labels = flip_labels(data.y_train, fraction=cfg.fraction,
                         num_classes=data.info.num_classes, seed=base.seed)
    model = build_victim(base)
    res = train(model, data, base.resolved_train(), seed=base.seed, ctx=ctx,
                state_key=model_state_key(spec), labels=labels, metric_prefix="victim_")
    flipped = int((labels != data.y_train).sum())
    return model, {"acc": float(res["test_acc"]), "n_flipped": float(flipped)}


STEP_KINDS.register("label_flip", StepKind(
    config_model=LabelFlipStep, apply=apply, uses_parent=False, first_only=True,
    version="label_flip/1", metrics=("acc", "n_flipped"), acc_metric="acc",
    describe=lambda cfg: f"label_flip(fraction={cfg.fraction:g})",
    description="retrain the base from scratch on labels with a fraction flipped"))
