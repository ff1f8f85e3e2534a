"""The ``victim`` trial of the AutoML security study (PROTOCOLS 4 "Train each victim once" and
"Also per model"; Pang et al., "On the Security Risks of AutoML", USENIX Security 2022,
Sec. 4 and 6.1): train (or load) one victim through the store, then measure it. The victim is
any lineage (:mod:`nasrisk.trials.lineage`): a base, a label-flipped child, a fine-tuned one.

Metrics: ``acc`` (clean test accuracy), ``param_count``, ``train_seconds``; gradient variance
(:func:`~nasrisk.trials.metrics.grad_var.gradient_variance`) at Kaiming initialisation and
after training under both definitions (``grad_var_init``/``grad_var_trained``: paper Eq. 14;
``*_artifact``: the artifact's clipped sum of stds); loss contours in parameter and input
space (:mod:`~nasrisk.trials.metrics.contours`), whose grids and figures become artifacts and
whose centre losses are ``contour_params_centre``/``contour_input_centre``.

Deviations: gradient variance and contours are measured on the (seeded subset of the) *test*
split: the artifact uses "validation samples" and CIFAR has no separate validation split; the
paper does not say which split Eq. 14 averages over, so both definitions use the same one.
``grad_var_samples`` (default: the whole test subset for `paper`, 512 for `artifact`),
``contour_steps`` and ``contour_examples`` are sizes, which the `smoke` profile shrinks. The
input contour uses the first test image.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..context import TrialContext
from ..metrics.contours import loss_contour_input, loss_contour_params, plot_contour
from ..metrics.grad_var import gradient_variance, kaiming_init_
from ..models.darts.genotypes import parse_genotype
from ..models.darts.stats import genotype_stats, stats_of
from ..registry import MODELS, TRIAL_KINDS
from ..victims import VictimSpec, build_model, ensure_victim, victim_data
from .base import TrialKind


class VictimConfig(VictimSpec):
    """A :class:`~nasrisk.trials.victims.VictimSpec` plus what to measure. The extra fields
    never change the victim's key."""

    measure_grad_var: bool = True
    contours: bool = True
    grad_var_samples: int | None = Field(None, ge=2)
    contour_steps: int = Field(21, ge=1, le=401)
    contour_examples: int = Field(256, ge=1)


def _grad_vars(cfg: VictimConfig, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               prefix: str) -> dict[str, float]:
    out = {}
    for params, suffix in (("paper", ""), ("artifact", "_artifact")):
        out[f"{prefix}{suffix}"] = gradient_variance(model, x, y, params=params,
                                                     n_samples=cfg.grad_var_samples,
                                                     seed=cfg.seed)
    return out


def run_victim(config: dict, ctx: TrialContext) -> dict[str, float]:
    cfg = VictimConfig.model_validate(config)
    spec = cfg.spec()
    data = victim_data(spec, ctx)
    model, record = ensure_victim(spec, ctx, data=data)
    out: dict[str, float] = {"acc": float(record["acc"]),
                             "param_count": float(record["param_count"]),
                             "train_seconds": float(record["seconds"])}
    x, y = data.x_test, data.y_test

    if cfg.measure_grad_var:
        measured = ctx.load_state("grad_var")
        if measured is None:
            init = build_model(spec)
            kaiming_init_(init, seed=cfg.seed)
            measured = _grad_vars(cfg, init.to(ctx.device), x, y, "grad_var_init")
            measured.update(_grad_vars(cfg, model, x, y, "grad_var_trained"))
            ctx.save_state("grad_var", measured, metrics=measured)
        out.update(measured)

    if cfg.contours:
        n = cfg.contour_examples
        grids = {
            "params": loss_contour_params(model, x[:n], y[:n], steps=cfg.contour_steps,
                                          seed=cfg.seed),
            "input": loss_contour_input(model, x[:1], y[:1], steps=cfg.contour_steps,
                                        seed=cfg.seed),
        }
        for space, grid in grids.items():
            grid.save(ctx.artifact_dir / f"contour_{space}.npz")
            plot_contour(grid, ctx.artifact_dir / f"contour_{space}.png",
                         title=f"{cfg.model} {cfg.dataset}: loss ({space} space)")
            out[f"contour_{space}_centre"] = grid.centre
    return out


def extra_params(cfg: VictimConfig) -> dict[str, Any]:
    """Logged beside the config: the model's lineage key (``lineage_key``, also as
    ``victim_key``), its parent's key and the lineage in words (study/tags.py ``P_*``), its
    label-flip fraction, its MODELS family and, for the DARTS genotypes, the normal cell's
    depth, width and skip count (PROTOCOLS 1.3)."""
    key = cfg.key()
    extra: dict[str, Any] = {"lineage_key": key, "parent_key": cfg.parent_key(),
                             "lineage": cfg.describe(), "victim_key": key,
                             "poison_fraction": cfg.poison_fraction,
                             "family": MODELS.meta(cfg.model).get("family", "")}
    stats = None
    if "genotype" in MODELS.meta(cfg.model):  # a named genotype
        stats = genotype_stats(cfg.model)
    elif isinstance(cfg.model_kwargs.get("genotype"), str):  # MODELS["genotype"]: a string
        stats = stats_of(parse_genotype(str(cfg.model_kwargs["genotype"])))
    if stats is not None:
        extra.update(cell_depth=stats["depth"], cell_width=stats["width"],
                     skip_count=stats["skip"])
    return extra


def trial_name(cfg: VictimConfig) -> str:
    # after the plan's index: "v0003 darts@cifar10 p=0.1", "v0004 darts@cifar10 -> fine_tune(...)"
    if not cfg.steps or (len(cfg.steps) == 1 and cfg.steps[0].kind == "label_flip"):
        name = f"{cfg.model}@{cfg.dataset}"
        return name + (f" p={cfg.poison_fraction:g}" if cfg.poison_fraction > 0 else "")
    return cfg.describe()


def metric_names(cfg: VictimConfig) -> tuple[str, ...]:
    grad = ("grad_var_init", "grad_var_init_artifact", "grad_var_trained",
            "grad_var_trained_artifact") if cfg.measure_grad_var else ()
    contours = ("contour_params_centre", "contour_input_centre") if cfg.contours else ()
    return ("acc", "param_count", "train_seconds", *grad, *contours)


TRIAL_KINDS.register("victim", TrialKind(
    fn=run_victim, config_model=VictimConfig,
    metrics=metric_names(VictimConfig.model_construct(measure_grad_var=True, contours=True)),
    metrics_for=metric_names, name=trial_name, name_prefix="v", params=extra_params,
    description="train (or load) one victim through the store; gradient variance, contours"))
