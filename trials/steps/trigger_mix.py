"""The ``trigger_mix`` step: fine-tune the parent on its training set with a ``ratio`` of the
images replaced by their EVAS trigger inputs (EVAS, Pang et al., ICLR 2023, Figure 6 /
PROTOCOLS 5 (d): "fine-tuning on data with trigger inputs mixed in, ratio down to 0.01%").

Our reading (stated because the issue and the paper leave it open): Figure 6 asks how the
EVAS backdoor combines with a little data poisoning, so by default (``label: target``) the
mixed-in trigger inputs carry the **target** label, a poisoning ratio in the usual sense; the
issue's check "fine-tuning with a 10% trigger mix raises ASR" is this reading. ``label:
true`` keeps their true labels instead: a defender fine-tuning on data that happens to hold
trigger inputs, which measures how long the backdoor survives being shown its own triggers
with honest labels (one expects it to lower the ASR; not measured here). Both are steps of
a lineage, so a study sweeps either.

The trigger inputs come from the stored generator named by ``generator``
(:class:`~nasrisk.trials.backdoor.evas_store.GeneratorSpec`; ``trained_on`` None: the parent,
the EVAS setting), made once in the store. ``n = round(ratio * n_train)`` images (drawn by
``seed`` among the non-target ones; 0.01% of 50,000 CIFAR images is 5) are replaced; the
recipe is the base's at the step's ``epochs`` / ``lr`` / ``schedule`` (as ``fine_tune``).
Metrics: ``acc``, ``asr`` (the generator against the child), ``parent_asr`` (against the
parent: the generator's own ASR before mixing) and ``n_mixed``.

Deviations: the trigger inputs are quantised to uint8 (a poisoned dataset is a set of
images); they are made before augmentation, so crops and flips move the trigger, as they
would on a poisoned training file. A ratio that rounds to 0 images is plain fine-tuning (the
control of the sweep; ``n_mixed`` says so).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..backdoor.evas_store import GeneratorSpec, ensure_generator
from ..backdoor.input_aware import attack_success_rate
from ..context import TrialContext
from ..data.base import ImageData, to_float
from ..lineage import StepKind
from ..registry import STEP_KINDS
from ..train import train


class TriggerMixStep(BaseModel):
    """The mix (module docstring): ``ratio`` of the training images, their ``label``, the
    generator, and the fine-tuning recipe (unset: the base's)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ratio: float = Field(0.1, ge=0.0, lt=1.0)
    label: Literal["target", "true"] = "target"
    generator: GeneratorSpec = GeneratorSpec()
    epochs: int = Field(1, ge=1, le=100_000)
    lr: float = Field(0.01, gt=0)
    schedule: Literal["cosine", "constant"] = "constant"
    batch_size: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**32)


@torch.no_grad()
def mix(data: ImageData, generator: nn.Module, cfg: TriggerMixStep, seed: int,
        device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, indices)`` with ``round(ratio * n)`` non-target images replaced by
    their trigger inputs (uint8) and, for ``label: target``, relabelled the target."""
    target = cfg.generator.config.target
    candidates = (data.y_train != target).nonzero().flatten()
    n = min(round(cfg.ratio * len(data.y_train)), len(candidates))
    gen = torch.Generator().manual_seed(seed)
    idx = candidates[torch.randperm(len(candidates), generator=gen)[:n]].sort().values
    x, y = data.x_train.clone(), data.y_train.clone()
    generator.eval()
    for i in range(0, n, 256):
        part = idx[i:i + 256]
        xt = generator(to_float(x[part].to(device))).clamp(0, 1)
        x[part] = (xt * 255).round().to(torch.uint8).cpu()
    if cfg.label == "target":
        y[idx] = target
    return x, y, idx


def apply(parent_model: nn.Module | None, parent_record: dict[str, Any] | None, spec: Any,
          data: ImageData, ctx: TrialContext) -> tuple[nn.Module, dict[str, float]]:
    from ..victims import model_state_key  # victims imports the lineage

    if parent_model is None:
        raise ValueError("trigger_mix needs its parent's trained weights")
    cfg: TriggerMixStep = spec.steps[-1].config()
    base = spec.base()
    target = cfg.generator.config.target
    if target >= data.info.num_classes:
        raise ValueError(f"trigger_mix target {target} is not a class of {data.info.name}")
    on = cfg.generator.trained_on or spec.parent()
    if on.dataset != base.dataset:
        raise ValueError(f"trigger_mix: the generator is trained on {on.dataset}, the model "
                         f"is on {base.dataset}")
    generator, _ = ensure_generator(on, cfg.generator, ctx)
    seed = base.seed if cfg.seed is None else cfg.seed
    parent_model.to(ctx.device).eval()
    parent_asr = attack_success_rate(parent_model, generator, data.x_test, data.y_test,
                                     target=target, device=ctx.device)
    x, y, idx = mix(data, generator, cfg, seed, ctx.device)
    update: dict[str, Any] = {"epochs": cfg.epochs, "lr": cfg.lr, "schedule": cfg.schedule}
    if cfg.batch_size is not None:
        update["batch_size"] = cfg.batch_size
    recipe = base.resolved_train().model_copy(update=update)
    res = train(parent_model, ImageData(data.info, x, y, data.x_test, data.y_test), recipe,
                seed=seed, ctx=ctx, state_key=model_state_key(spec),
                metric_prefix="trigger_mix_")
    parent_model.eval()
    asr = attack_success_rate(parent_model, generator, data.x_test, data.y_test,
                              target=target, device=ctx.device)
    return parent_model, {"acc": float(res["test_acc"]), "asr": float(asr),
                          "parent_asr": float(parent_asr), "n_mixed": float(len(idx))}


STEP_KINDS.register("trigger_mix", StepKind(
    config_model=TriggerMixStep, apply=apply, uses_parent=True, version="trigger_mix/1",
    metrics=("acc", "asr", "parent_asr", "n_mixed"), acc_metric="acc",
    describe=lambda c: f"trigger_mix(ratio={c.ratio:g}, label={c.label}, epochs={c.epochs}, "
                       f"lr={c.lr:g})",
    description="fine-tune the parent with a ratio of EVAS trigger inputs mixed in"))
