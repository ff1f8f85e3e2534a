"""The ``badnet`` step: a patch backdoor planted by poisoning the training set (Gu et al.,
"BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain", 2017,
Sec. 4; the AutoML-risks study's `artifact` backdoor, PROTOCOLS 4: "BadNet, 2% poisoned, 20
epochs"; Pang et al., "On the Security Risks of AutoML", USENIX Security 2022, Sec. 5).

Threat model: the adversary controls a ``fraction`` of the training set: each chosen image
(drawn by ``seed`` among those whose label is not ``target``) gets the patch
(:func:`~nasrisk.trials.defenses.triggers.apply_patch`; ``size`` 3, ``bottom_right``, a seeded
random 0/255 ``pattern`` by default) and the label ``target``. The victim then trains on the
poisoned set with the one training loop:

* ``mode: fine_tune`` (default; the TrojanZoo-style attack the AutoML artifact ran): the
  trained parent is trained ``epochs`` (20) more at ``lr`` (0.01, constant) on the poisoned
  set, the rest of the recipe the base's;
* ``mode: from_scratch``: the base network is trained from its initialisation with the base
  recipe on the poisoned set (the BadNets paper's setting); only a lineage's first step.

Metrics: ``acc`` (clean test accuracy), ``asr`` (the fraction of patched test inputs whose
true label is not ``target`` that the model labels ``target``), ``cad`` (the parent's clean
accuracy minus ``acc``), ``parent_asr`` (the parent's ASR on the same inputs: the base rate)
and ``n_poisoned``. The patch itself is the step's config, so it is in every record's
``lineage`` and a defense rebuilds the trigger inputs from it
(:func:`trigger_of`).

Deviations: a step kind's use of its parent is fixed, so ``from_scratch`` still has its parent
(the clean base) trained: it is the clean reference CAD is measured against, which a backdoor
study trains anyway. The poisoned images are stamped before augmentation (the victim augments
what the adversary handed over), so a flip moves the patch to the other corner for half the
epochs of a ``crop_flip`` recipe.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..context import TrialContext
from ..data.base import ImageData
from ..defenses.triggers import PatchTrigger, apply_patch
from ..lineage import StepKind
from ..registry import STEP_KINDS
from ..train import evaluate, predict_logits, train


class BadNetStep(PatchTrigger):
    """The patch (:class:`~nasrisk.trials.defenses.triggers.PatchTrigger`'s fields), the
    poisoned ``fraction`` and how the victim trains on the poisoned set (module docstring).
    ``epochs`` / ``lr`` apply to ``fine_tune``; ``seed`` (default: the base seed) draws the
    poisoned images and the loop's shuffling."""

    fraction: float = Field(0.02, gt=0.0, lt=1.0)
    mode: Literal["fine_tune", "from_scratch"] = "fine_tune"
    epochs: int = Field(20, ge=1, le=100_000)
    lr: float = Field(0.01, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**32)

    def trigger(self) -> PatchTrigger:
        return PatchTrigger(**{k: getattr(self, k) for k in PatchTrigger.model_fields})


def poison(data: ImageData, cfg: BadNetStep, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """``(x_train, y_train, indices)``: the training set with ``round(fraction * n)`` images
    (drawn by ``seed`` among the non-target ones) patched and relabelled ``target``."""
    candidates = (data.y_train != cfg.target).nonzero().flatten()
    n = min(round(cfg.fraction * len(data.y_train)), len(candidates))
    gen = torch.Generator().manual_seed(seed)
    idx = candidates[torch.randperm(len(candidates), generator=gen)[:n]].sort().values
    x, y = data.x_train.clone(), data.y_train.clone()
    x[idx] = apply_patch(x[idx], cfg.trigger())
    y[idx] = cfg.target
    return x, y, idx


@torch.no_grad()
def patch_asr(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, trigger: PatchTrigger,
              *, device: torch.device | str) -> float:
    """Fraction of patched inputs whose true label is not the target that ``model`` labels
    the target; NaN when none qualifies."""
    keep = y != trigger.target
    if not bool(keep.any()):
        return float("nan")
    pred = predict_logits(model, apply_patch(x_uint8[keep], trigger), device=device).argmax(1)
    return (pred == trigger.target).float().mean().item()


def trigger_of(steps: Any) -> PatchTrigger | None:
    """The patch of the last ``badnet`` step of a lineage's steps, None without one."""
    for step in reversed(tuple(steps)):
        if step.kind == "badnet":
            return step.config().trigger()
    return None


def apply(parent_model: nn.Module | None, parent_record: dict[str, Any] | None, spec: Any,
          data: ImageData, ctx: TrialContext) -> tuple[nn.Module, dict[str, float]]:
    from ..victims import build_victim, model_state_key  # victims imports the lineage

    if parent_model is None:
        raise ValueError("badnet needs its parent (the clean reference of CAD)")
    cfg: BadNetStep = spec.steps[-1].config()
    base = spec.base()
    if cfg.target >= data.info.num_classes:
        raise ValueError(f"badnet target {cfg.target} is not a class of {data.info.name} "
                         f"({data.info.num_classes} classes)")
    if cfg.mode == "from_scratch" and len(spec.steps) > 1:
        raise ValueError("badnet mode from_scratch trains from the base alone, so it can only "
                         "be a lineage's first step")
    seed = base.seed if cfg.seed is None else cfg.seed
    trig = cfg.trigger()
    parent_model.to(ctx.device).eval()
    before = evaluate(parent_model, data.x_test, data.y_test, device=ctx.device)
    base_rate = patch_asr(parent_model, data.x_test, data.y_test, trig, device=ctx.device)
    x, y, idx = poison(data, cfg, seed)
    poisoned = ImageData(data.info, x, y, data.x_test, data.y_test)
    if cfg.mode == "fine_tune":
        model = parent_model
        recipe = base.resolved_train().model_copy(update={"epochs": cfg.epochs, "lr": cfg.lr,
                                                          "schedule": "constant"})
    else:
        model = build_victim(base)
        recipe = base.resolved_train()
    res = train(model, poisoned, recipe, seed=seed, ctx=ctx, state_key=model_state_key(spec),
                metric_prefix="badnet_")
    acc = float(res["test_acc"])
    asr = patch_asr(model, data.x_test, data.y_test, trig, device=ctx.device)
    return model, {"acc": acc, "asr": asr, "cad": before - acc, "parent_asr": base_rate,
                   "n_poisoned": float(len(idx))}


STEP_KINDS.register("badnet", StepKind(
    config_model=BadNetStep, apply=apply, uses_parent=True, version="badnet/1",
    metrics=("acc", "asr", "cad", "parent_asr", "n_poisoned"), acc_metric="acc",
    describe=lambda c: (f"badnet({c.size}x{c.size} {c.pattern} {c.position}, target={c.target}, "
                        f"fraction={c.fraction:g}, {c.mode}"
                        + (f" epochs={c.epochs} lr={c.lr:g})" if c.mode == "fine_tune" else ")")),
    description="plant a BadNet patch backdoor by training on a poisoned training set"))
