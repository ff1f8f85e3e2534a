"""Fine-Pruning (Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks", RAID 2018, Sec. 4-5; EVAS Table 5; PROTOCOLS 5 (e)).

The defender ranks the channels of the last convolutional layer by their mean activation on
clean inputs, prunes the ``ratio`` most dormant ones (the backdoor tends to live in neurons
clean inputs leave idle), then fine-tunes the pruned network on clean data. For each ratio of
``ratios`` (swept inside one trial, each from the original weights) it reports the clean
accuracy and the ASR after pruning and after fine-tuning.

The pruned layer: ``layer: auto`` (default) is the input of the model's last ``nn.Linear``
that runs in an eval forward pass, i.e. the channels of the last feature map after its
BatchNorm/ReLU and global pooling (the pooled output of the last conv layer, the layer Liu et
al. prune, in every network of MODELS); ``layer: <module name>`` (``model.named_modules()``)
prunes that module's output channels (dim 1) instead. A pruned channel is zeroed by a hook for
the rest of the trial (fine-tuning included), as removing the filter would.

Metrics: ``fp_channels`` and, before pruning, ``fp_acc_before`` / ``fp_asr_before``; per
ratio ``r`` (a multiple of 5%, so every name is known up front; ``R`` = ``r`` in percent:
0.2 -> ``20``): ``fp_pruned_rR`` (channels zeroed, always ``round(r * channels)``),
``fp_acc_pruned_rR``, ``fp_asr_pruned_rR``, ``fp_acc_ft_rR``, ``fp_asr_ft_rR``. ASR is NaN when the trial has no trigger inputs.

Deviations: Liu et al. prune step by step until the clean validation accuracy falls by 4% and
rank post-ReLU conv activations; we sweep fixed ratios and rank the layer's mean activation
(mean absolute value for ``layer: <name>``, whose output may be signed). Fine-tuning uses the
one training loop on the defender's clean training split (``epochs`` at ``lr``, constant).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..data.base import ImageData
from ..registry import DEFENSES
from ..train import TrainConfig, train
from .entry import DefenseEntry, DefenseInputs, accuracy, success_rate


class FinePruningOptions(BaseModel):
    """``ratios`` in [0, 1) swept; ``layer`` (module docstring); ``n_rank`` clean inputs for
    the ranking; fine-tuning ``epochs`` / ``lr`` / ``batch_size`` on at most ``n_train``
    clean training images (None: all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratios: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    layer: str = "auto"
    n_rank: int = Field(500, ge=1)
    epochs: int = Field(10, ge=0)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(96, ge=1)
    n_train: int | None = Field(None, ge=1)

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        steps = [r / RATIO_STEP for r in v]
        if (not v or any(not 0.0 <= r < 1.0 for r in v)
                or any(abs(k - round(k)) > 1e-9 for k in steps)
                or len({round(k) for k in steps}) != len(v)):
            raise ValueError(f"ratios must be distinct multiples of {RATIO_STEP} in [0, 1), "
                             f"got {list(v)}")
        return tuple(round(k) / round(1 / RATIO_STEP) for k in steps)


#: ratios are multiples of this (5%), so the metric names of every sweep are known up front
RATIO_STEP = 0.05


def _tag(r: float) -> str:
    return f"r{round(r * 100)}"  # 0.2 -> "r20": one token for ``take: metrics.NAME``


def metric_names(opts: FinePruningOptions) -> tuple[str, ...]:
    per = [f"fp_{m}_{_tag(r)}" for r in opts.ratios
           for m in ("pruned", "acc_pruned", "asr_pruned", "acc_ft", "asr_ft")]
    return ("fp_channels", "fp_acc_before", "fp_asr_before", *per)


def find_layer(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[nn.Module, bool]:
    """``(module, on_input)``: the module whose channels are pruned and whether its input
    (``auto``: the last ``nn.Linear`` run) or its output (a named module) carries them."""
    if layer != "auto":
        mods = dict(model.named_modules())
        if layer not in mods:
            raise ValueError(f"fine_pruning: model has no module {layer!r}")
        return mods[layer], False
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
             for m in model.modules() if isinstance(m, nn.Linear)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x[:2].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if not order:
        raise ValueError("fine_pruning: the model runs no nn.Linear; name a `layer`")
    return order[-1], True


def _channels(t: torch.Tensor) -> torch.Tensor:
    """Per-channel activation summed over the batch and space: ``(C,)``."""
    t = t.float()
    return t.sum(0) if t.dim() == 2 else t.abs().transpose(0, 1).flatten(1).sum(1)


@torch.no_grad()
def channel_activity(model: nn.Module, module: nn.Module, on_input: bool,
                     x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean activation of each channel of the pruned layer over the clean inputs ``x``."""
    total: list[torch.Tensor] = []

    def grab(_m, inp, out=None):
        t = inp[0] if on_input else out
        total.append(_channels(t).cpu())

    h = (module.register_forward_pre_hook(grab) if on_input
         else module.register_forward_hook(grab))
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(dev))
    finally:
        h.remove()
        model.train(was)
    return torch.stack(total).sum(0) / len(x)


@contextmanager
def pruned(module: nn.Module, on_input: bool, keep: torch.Tensor) -> Iterator[None]:
    """Zero the channels where ``keep`` is False (input or output of ``module``, dim 1)."""
    def shape(t: torch.Tensor) -> torch.Tensor:
        k = keep.to(t.device, t.dtype)
        return t * (k if t.dim() == 2 else k.view(1, -1, *([1] * (t.dim() - 2))))

    h = (module.register_forward_pre_hook(lambda _m, inp: (shape(inp[0]), *inp[1:]))
         if on_input else module.register_forward_hook(lambda _m, _i, out: shape(out)))
    try:
        yield
    finally:
        h.remove()


def dormant_mask(activity: torch.Tensor, ratio: float) -> torch.Tensor:
    """``keep``: False on the ``round(ratio * C)`` least active channels (ties: lowest index)."""
    n = round(ratio * len(activity))
    keep = torch.ones(len(activity), dtype=torch.bool)
    keep[torch.argsort(activity, stable=True)[:n]] = False
    return keep


def fine_pruning(model: nn.Module, inputs: DefenseInputs, options: FinePruningOptions,
                 ctx: object, key: str = "defense/fine_pruning") -> dict[str, float]:
    """Prune, measure, fine-tune, measure, per ratio (module docstring)."""
    from ..context import TrialContext

    ctx = ctx if ctx is not None else TrialContext(device=next(model.parameters()).device)
    d = inputs.defender
    x_rank = d.x_train[:options.n_rank].float() / 255.0
    x_clean = inputs.clean()
    bs = inputs.batch_size
    out = {"fp_acc_before": accuracy(model, x_clean, inputs.y, bs),
           "fp_asr_before": success_rate(model, inputs)}
    module, on_input = find_layer(model, options.layer, x_rank)
    activity = channel_activity(model, module, on_input, x_rank, bs)
    out["fp_channels"] = float(len(activity))
    tune = ImageData(d.info, d.x_train[:options.n_train], d.y_train[:options.n_train],
                     inputs.x, inputs.y)
    recipe = TrainConfig(epochs=options.epochs, batch_size=options.batch_size, lr=options.lr,
                         schedule="constant", augment="none", grad_clip=5.0,
                         eval_each_epoch=False)
    for r in options.ratios:
        net = copy.deepcopy(model)
        mod = dict(net.named_modules())[next(n for n, m in model.named_modules() if m is module)]
        keep = dormant_mask(activity, r)
        with pruned(mod, on_input, keep):
            tag = _tag(r)
            out[f"fp_pruned_{tag}"] = float((~keep).sum())
            out[f"fp_acc_pruned_{tag}"] = accuracy(net, x_clean, inputs.y, bs)
            out[f"fp_asr_pruned_{tag}"] = success_rate(net, inputs)
            if options.epochs:
                train(net, tune, recipe, seed=inputs.seed, ctx=ctx, state_key=f"{key}/{tag}")
            out[f"fp_acc_ft_{tag}"] = accuracy(net, x_clean, inputs.y, bs)
            out[f"fp_asr_ft_{tag}"] = success_rate(net, inputs)
    return out


DEFENSES.register("fine_pruning", DefenseEntry(
    run=fine_pruning, options=FinePruningOptions,
    metrics=metric_names(FinePruningOptions(ratios=tuple(k / 20 for k in range(20)))),
    metrics_for=metric_names,
    source="Liu et al., RAID 2018, Sec. 4-5 (EVAS Table 5)",
    description="prune the last conv layer's dormant channels at swept ratios, then fine-tune"))
