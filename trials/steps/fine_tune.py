"""The ``fine_tune`` step: continue training the parent with the one training loop (the
defense "fine-tuning" of EVAS, ICLR 2023, Table 2: 50 epochs SGD lr 0.01 cosine batch 96 at
`paper`; PROTOCOLS 5).

The recipe is the base's (:meth:`~nasrisk.trials.victims.VictimSpec.resolved_train`) with the
step's ``epochs`` and ``lr``; ``batch_size``, ``weight_decay``, ``schedule`` and ``augment``
override the base's when set. Metrics: ``acc_before`` (the parent) and ``acc_after`` (the
child) on the base's test subset.

Deviations: the optimiser starts fresh (no momentum carried over from the parent's training,
which the store does not keep); the loop's shuffling is seeded by ``seed`` (default: the base
seed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..context import TrialContext
from ..data.base import ImageData
from ..lineage import StepKind
from ..registry import STEP_KINDS
from ..train import evaluate, train


class FineTuneStep(BaseModel):
    """Fine-tuning the parent: ``epochs`` at learning rate ``lr``; unset fields are the
    base recipe's."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    epochs: int = Field(1, ge=1, le=100_000)
    lr: float = Field(0.01, gt=0)
    batch_size: int | None = Field(None, ge=1)
    weight_decay: float | None = Field(None, ge=0)
    schedule: Literal["cosine", "constant"] | None = None
    augment: Literal["none", "crop_flip", "crop_flip_cutout"] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)


def apply(parent_model: nn.Module | None, parent_record: dict[str, Any] | None, spec: Any,
          data: ImageData, ctx: TrialContext) -> tuple[nn.Module, dict[str, float]]:
    from ..victims import model_state_key  # victims imports the lineage

    if parent_model is None:
        raise ValueError("fine_tune needs its parent's trained weights")
    cfg: FineTuneStep = spec.steps[-1].config()
    base = spec.base()
    update: dict[str, Any] = {"epochs": cfg.epochs, "lr": cfg.lr}
    for field in ("batch_size", "weight_decay", "schedule", "augment"):
        if getattr(cfg, field) is not None:
            update[field] = getattr(cfg, field)
    recipe = base.resolved_train().model_copy(update=update)
    parent_model.to(ctx.device)
    before = evaluate(parent_model, data.x_test, data.y_test, device=ctx.device)
    res = train(parent_model, data, recipe, seed=base.seed if cfg.seed is None else cfg.seed,
                ctx=ctx, state_key=model_state_key(spec), metric_prefix="fine_tune_")
    return parent_model, {"acc_before": float(before), "acc_after": float(res["test_acc"])}


STEP_KINDS.register("fine_tune", StepKind(
    config_model=FineTuneStep, apply=apply, uses_parent=True, version="fine_tune/1",
    metrics=("acc_before", "acc_after"), acc_metric="acc_after",
    description="continue training the parent (the base recipe at the step's epochs and lr)"))
