"""The one training loop (PROTOCOLS 3). Studies differ in :class:`TrainConfig`, never in copies
of this loop.

* SGD (momentum, optional Nesterov), cosine or constant schedule, optional gradient clipping.
* Data are in-memory uint8 tensors; each batch is moved to the device, scaled to [0, 1] and
  augmented there (:mod:`nasrisk.trials.data.augment`). The model is expected to normalise
  (:class:`~nasrisk.trials.models.wrapper.Normalized`).
* Deterministic under a seed: every epoch re-seeds its shuffling/augmentation generator and the
  global RNG (dropout, drop-path) from ``(seed, epoch)``, so a run resumed from an epoch
  checkpoint ends with exactly the weights of an uninterrupted run.
* Checkpoints each epoch through :meth:`TrialContext.save_state` (model, optimiser, scheduler,
  history), so a killed trial continues from its last finished epoch.
* Precision: float32 by default, as the reference codes trained (DARTS, NATS-Bench, the AutoML
  artifact, TrojanZoo); ``amp="bf16"`` turns on bfloat16 autocast on CUDA (no grad scaler
  needed for bf16; a no-op on CPU). ``nasrisk run --amp bf16`` sets it in every trial.
* Auxiliary head (DARTS, Liu et al. ICLR 2019 App. A.2; PROTOCOLS 1.2 `paper`): a model that
  contains an :class:`~nasrisk.trials.models.darts.network.AuxiliaryHead` (a DARTS-space net
  built with ``auxiliary=True``) is trained on ``CE(logits) + aux_weight * CE(aux logits)``
  (:func:`training_loss`, weight 0.4 as DARTS). The head's output is read with a forward hook,
  so any wrapper around the network (normalisation) keeps working.

Deviations: none in the loss; DARTS ramps drop-path over training, the network applies a
constant probability (see :mod:`~nasrisk.trials.models.darts.network`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from .context import TrialContext
from .data.augment import augment
from .data.base import ImageData, to_float
from .models.darts.network import AuxiliaryHead

BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class TrainConfig(BaseModel):
    """A training recipe. Presets: :data:`NATS_RECIPE`, :data:`DARTS_PAPER`,
    :data:`DARTS_ARTIFACT`, :data:`POISON_RETRAIN`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(ge=0, le=100_000)
    batch_size: int = Field(96, ge=1)
    lr: float = Field(0.025, gt=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = Field(3e-4, ge=0)
    grad_clip: float | None = Field(5.0, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    augment: Literal["none", "crop_flip", "crop_flip_cutout"] = "crop_flip"
    #: mixed precision: "off" (float32, the references' precision) or "bf16" (autocast on
    #: CUDA); booleans are accepted (False = "off", True = "bf16")
    amp: Literal["off", "bf16"] = "off"
    #: weight of an auxiliary head's loss (DARTS: 0.4); used only by models that have one
    aux_weight: float = Field(0.4, ge=0)
    eval_each_epoch: bool = True

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_bool(cls, v: object) -> object:
        if isinstance(v, bool):
            return "bf16" if v else "off"
        return v


# NATS-Bench's recipe (EVAS trains NATS archs with it): SGD nesterov lr 0.1 cosine wd 5e-4.
NATS_RECIPE = TrainConfig(epochs=200, batch_size=256, lr=0.1, nesterov=True,
                          weight_decay=5e-4, grad_clip=None)
# AutoML study (PROTOCOLS 3): `paper` and `artifact` parameter sets.
DARTS_PAPER = TrainConfig(epochs=600, batch_size=96, lr=0.025, weight_decay=3e-4, grad_clip=5.0)
DARTS_ARTIFACT = TrainConfig(epochs=200, batch_size=96, lr=0.025, weight_decay=5e-4,
                             grad_clip=5.0, augment="crop_flip_cutout")
# Label-flip poisoning retrains from scratch for 50 epochs (PROTOCOLS 4).
POISON_RETRAIN = TrainConfig(epochs=50, batch_size=96, lr=0.025, weight_decay=3e-4, grad_clip=5.0)


def _autocast(device: torch.device, amp: str):
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=amp == "bf16" and device.type == "cuda")


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                  aux_weight: float = 0.4) -> torch.Tensor:
    """The training loss of one batch: ``CE(model(x), y)``, plus ``aux_weight * CE(aux, y)``
    for the logits ``aux`` of every :class:`AuxiliaryHead` inside ``model`` that ran in this
    forward pass (DARTS's auxiliary tower runs in training mode only, so in eval mode, or
    without a head, this is the plain cross-entropy)."""
    def upcast(t: torch.Tensor) -> torch.Tensor:  # bf16 autocast logits -> float32; never down
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    aux: list[torch.Tensor] = []
    # weight 0: the head's output is not in the loss at all (its weights get no gradient),
    # exactly as a net without a head
    handles = ([m.register_forward_hook(lambda _m, _in, out: aux.append(out))
                for m in model.modules() if isinstance(m, AuxiliaryHead)] if aux_weight else [])
    try:
        loss = F.cross_entropy(upcast(model(x)), y)
    finally:
        for h in handles:
            h.remove()
    for a in aux:
        loss = loss + aux_weight * F.cross_entropy(upcast(a), y)
    return loss


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, device: torch.device | str,
                   batch_size: int = 500) -> torch.Tensor:
    """Logits (float32, on CPU) of uint8 or [0,1]-float images, in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True)
        xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
        out.append(model(xb).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device | str,
             batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1]."""
    if len(y) == 0:
        return float("nan")
    pred = predict_logits(model, x, device=device, batch_size=batch_size).argmax(1)
    return (pred == y.cpu()).float().mean().item()


def train(
    model: nn.Module,
    data: ImageData,
    cfg: TrainConfig,
    *,
    seed: int,
    ctx: TrialContext,
    state_key: str = "train",
    labels: torch.Tensor | None = None,
    batch_hook: BatchHook | None = None,
    metric_prefix: str = "",
) -> dict:
    """Train ``model`` in place on ``data.x_train`` (with ``labels`` instead of
    ``data.y_train`` when given, e.g. poisoned labels) and return
    ``{"test_acc", "train_loss", "history", "seconds"}``.

    ``batch_hook(x, y, gen)`` may rewrite each augmented batch (e.g. mix in trigger inputs).
    Resumes from ``ctx.load_state(state_key)``; a finished state returns at once.
    """
    device = ctx.device
    model.to(device)
    y_all = data.y_train if labels is None else labels
    if len(y_all) != len(data.x_train):
        raise ValueError("labels must have one entry per training image")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov and cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
             if cfg.schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    start, history, seconds = 0, [], 0.0
    saved = ctx.load_state(state_key)
    if saved is not None:
        model.load_state_dict(saved["model"])
        if saved.get("done"):
            return {k: saved[k] for k in ("test_acc", "train_loss", "history", "seconds")}
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        start, history, seconds = saved["epoch"], saved["history"], saved["seconds"]
        if start:
            ctx.log_metrics({f"{metric_prefix}resumed_from_epoch": start})
            ctx.progress(f"{metric_prefix}resuming from epoch {start}")

    n = len(y_all)
    gen = torch.Generator(device=device)
    loss_v = float("nan")
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        gen.manual_seed(seed * 100_003 + epoch)
        torch.manual_seed(seed * 100_019 + epoch)
        model.train()
        perm = torch.randperm(n, device=device, generator=gen).cpu()
        total, count = torch.zeros((), device=device), 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb = to_float(data.x_train[idx].to(device, non_blocking=True))
            yb = y_all[idx].to(device, non_blocking=True)
            xb = augment(xb, cfg.augment, generator=gen)
            if batch_hook is not None:
                xb, yb = batch_hook(xb, yb, gen)
            with _autocast(device, cfg.amp):
                loss = training_loss(model, xb, yb, aux_weight=cfg.aux_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            total += loss.detach() * len(yb)
            count += len(yb)
        sched.step()
        loss_v = (total / max(count, 1)).item()
        last = epoch == cfg.epochs - 1
        acc = (evaluate(model, data.x_test, data.y_test, device=device)
               if cfg.eval_each_epoch or last else float("nan"))
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": loss_v, "test_acc": acc})
        step_metrics = {f"{metric_prefix}train_loss": loss_v}
        if acc == acc:
            step_metrics[f"{metric_prefix}test_acc"] = acc
        ctx.log_metrics(step_metrics, step=epoch + 1)
        ctx.progress(f"{metric_prefix}epoch {epoch + 1}/{cfg.epochs} loss {loss_v:.3f} acc {acc:.3f}")
        ctx.save_state(state_key, {
            "epoch": epoch + 1, "model": model.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "history": history, "seconds": seconds,
        }, metrics=step_metrics)

    test_acc = evaluate(model, data.x_test, data.y_test, device=device)
    result = {"test_acc": test_acc, "train_loss": loss_v if history else float("nan"),
              "history": history, "seconds": seconds}
    ctx.save_state(state_key, {"done": True, "model": model.state_dict(), **result})
    return result
