"""A trivial trial for measuring the runner itself (``nasrisk run calibrate``): per-trial
start-up, tracking and checkpoint overhead on a laptop or a cluster, with no model in the way.

Each "epoch" multiplies a seeded random matrix ``size`` times and checkpoints, so the trial
exercises exactly the runner paths a real trial does (state, metrics, resume) at ~no cost."""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..context import TrialContext
from ..registry import TRIAL_KINDS
from .base import TrialKind


class CalibrateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    index: int = Field(0, ge=0)
    epochs: int = Field(1, ge=0, le=100_000)
    size: int = Field(32, ge=1, le=4096)
    seconds_per_epoch: float = Field(0.0, ge=0, le=86_400)
    seed: int = 0


def run_calibrate(config: dict, ctx: TrialContext) -> dict[str, float]:
    cfg = CalibrateConfig.model_validate(config)
    state = ctx.load_state("calibrate") or {"epoch": 0, "value": 0.0}
    start = state["epoch"]
    if start:
        ctx.log_metrics({"resumed_from_epoch": start})
    g = torch.Generator().manual_seed(cfg.seed * 1000 + cfg.index)
    m = torch.randn(cfg.size, cfg.size, generator=g) / cfg.size ** 0.5
    value = state["value"]
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        value = float(torch.linalg.matrix_norm(torch.linalg.matrix_power(m, epoch + 1)))
        time.sleep(max(0.0, cfg.seconds_per_epoch - (time.perf_counter() - t0)))
        ctx.log_metrics({"value": value}, step=epoch + 1)
        ctx.save_state("calibrate", {"epoch": epoch + 1, "value": value})
    return {"value": value, "epochs_run": float(cfg.epochs - start)}


TRIAL_KINDS.register("calibrate", TrialKind(
    fn=run_calibrate, config_model=CalibrateConfig, metrics=("value", "epochs_run"),
    name=lambda cfg: f"calibrate-{cfg.index:05d}",
    description="a seeded matrix power per epoch: measures the runner, not a model"))
