"""Gradient variance of a model (PROTOCOLS 4 "Also per model"; Pang et al., "On the Security
Risks of AutoML", USENIX Security 2022, Sec. 6.1, Eq. 14).

Per-sample parameter gradients g_i of the cross-entropy are computed with ``torch.func``
(``vmap`` over ``grad`` of a ``functional_call``), a chunk at a time, and folded into
per-coordinate running means and sums of squared deviations in float64 (Chan et al.'s
pairwise update, stable where ``E||g||^2 - ||E g||^2`` would cancel). From those:

* ``paper`` (Eq. 14): Var(g) = E ||g - E[g]||^2 = (1/N) sum_i ||g_i - mean||^2.
* ``artifact``: 512 single validation samples, each g_i clipped to L2 norm 5, reported as
  sum_j std_j (population std, ddof 0, of coordinate j over the samples).

The caller decides the model's state (Kaiming initialisation or trained).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from ..data.base import to_float
from ..registry import METRICS
from .entry import MetricEntry

ParamSet = Literal["paper", "artifact"]
BNMode = Literal["eval", "per_sample"]
ARTIFACT_SAMPLES = 512
ARTIFACT_CLIP = 5.0


def kaiming_init_(model: nn.Module, *, seed: int) -> nn.Module:
    """Re-initialise ``model`` in place for the "at initialisation" measurement (PROTOCOLS 4,
    Eq. 14 "at Kaiming initialisation"): conv and linear weights ~ Kaiming normal (fan-in,
    ReLU gain, He et al. 2015), their biases 0; batch-norm weight 1, bias 0, fresh running
    statistics. Deterministic per ``seed`` (a local generator; the global RNG is untouched).

    Deviations: PyTorch's default init (Kaiming *uniform* with a = sqrt(5)) is not what the
    paper calls Kaiming initialisation, so the caller re-initialises with this.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                w = torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                if m.track_running_stats:
                    m.reset_running_stats()
    return model


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     bn: BNMode = "eval", chunk: int = 32) -> Iterator[torch.Tensor]:
    """Yield ``(b, D)`` flattened per-sample gradients of the cross-entropy w.r.t. all
    trainable parameters (in ``named_parameters`` order), ``chunk`` samples at a time.

    ``bn="eval"``: the model in eval mode (batch norm uses running statistics, so a sample's
    gradient does not depend on the others). ``bn="per_sample"``: each sample is its own
    batch of one in train mode (batch norm normalises with that sample's own statistics, as
    when single samples are fed one by one); runs on a copy, the model is not modified.
    """
    if bn == "per_sample":
        net = copy.deepcopy(model).train()
        replace_all_batch_norm_modules_(net)  # no running-stat updates inside vmap
        randomness = "different"
    elif bn == "eval":
        net, randomness = model, "error"
    else:
        raise ValueError(f"bn must be 'eval' or 'per_sample', got {bn!r}")
    was_training = model.training
    if bn == "eval":
        model.eval()
    device = next(net.parameters()).device
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(net, (p, buffers), (xi[None],))
        return F.cross_entropy(out.float(), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0), randomness=randomness)
    try:
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk].to(device)
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
            g = per_sample(params, xb, y[i:i + chunk].to(device))
            yield torch.cat([g[k].reshape(len(xb), -1) for k in params], 1)
    finally:
        model.train(was_training)


def _moments(chunks: Iterator[torch.Tensor], clip: float | None,
             ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, per-coordinate mean and sum of squared deviations (float64) of the rows."""
    n, mean, m2 = 0, None, None
    for g in chunks:
        g = g.double()
        if clip is not None:
            norms = g.norm(dim=1, keepdim=True)
            g = g * (clip / norms.clamp(min=1e-12)).clamp(max=1.0)
        nb, mb = len(g), g.mean(0)
        m2b = ((g - mb) ** 2).sum(0)
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        delta, tot = mb - mean, n + nb
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta ** 2 * (n * nb / tot)
        n = tot
    if mean is None:
        raise ValueError("gradient variance needs at least one sample")
    return n, mean, m2


def gradient_variance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      params: ParamSet = "paper", n_samples: int | None = None,
                      clip: float | None = None, bn: BNMode = "eval", chunk: int = 32,
                      seed: int = 0) -> float:
    """Gradient variance of ``model`` on ``(x, y)`` (uint8 or [0, 1] images).

    ``paper``: E||g - E g||^2 over per-sample gradients of all of ``x`` (or ``n_samples``
    of them chosen by ``seed``), no clipping unless ``clip`` is given. ``artifact``: 512
    samples chosen by ``seed`` (``n_samples`` overrides), each gradient clipped to L2 5
    (``clip`` overrides), result sum_j std_j.

    Deviations: the artifact's std convention is not stated in the protocol; we use the
    population std (ddof 0). Batch norm defaults to eval mode (running statistics); the
    protocol does not fix it, ``bn="per_sample"`` gives the one-sample-batch alternative.
    """
    if params not in ("paper", "artifact"):
        raise ValueError(f"params must be 'paper' or 'artifact', got {params!r}")
    if params == "artifact":
        n_samples = ARTIFACT_SAMPLES if n_samples is None else n_samples
        clip = ARTIFACT_CLIP if clip is None else clip
    if n_samples is not None and n_samples < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_samples]
        x, y = x[idx], y[idx]
    n, _, m2 = _moments(per_sample_grads(model, x, y, bn=bn, chunk=chunk), clip)
    if params == "paper":
        return (m2.sum() / n).item()
    return (m2 / n).clamp(min=0).sqrt().sum().item()


class GradVarConfig(BaseModel):
    """:func:`gradient_variance`'s options (its defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: ParamSet = "paper"
    n_samples: int | None = Field(None, ge=1)
    clip: float | None = Field(None, gt=0)
    bn: BNMode = "eval"
    chunk: int = Field(32, ge=1)
    seed: int = 0


METRICS.register("grad_var", MetricEntry(
    fn=gradient_variance, config=GradVarConfig, takes=("model", "x", "y"),
    metrics=("grad_var",), source="PROTOCOLS 4, Pang et al. 2022 Eq. 14"))
