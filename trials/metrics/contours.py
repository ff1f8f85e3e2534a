"""Loss contours in parameter and input space (PROTOCOLS 4 "Also per model"; Pang et al.,
"On the Security Risks of AutoML", USENIX Security 2022, Sec. 6.1, Fig. 10; the plotting idea
of Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018).

* Parameter space: the first ``nn.Conv2d`` (module order) has its weight W replaced by
  W + a d1 + b d2 for (a, b) on a grid over [-0.5, 0.5]^2; loss = mean cross-entropy on the
  given batch.
* Input space: one input x moved to x + a d1 + b d2 over [-0.2, 0.2]^2; loss = its
  cross-entropy.

Directions (:func:`orthogonal_sign_directions`): d1 has i.i.d. random +-1 entries; d2 = d1
with the sign flipped on a random half of the entries, so <d1, d2> = 0 exactly for an even
number of entries (|cos| = 1/D for odd D). No normalisation: entries are +-1, so a and b
are in weight (pixel) units per entry, as the protocol's spans read.

The model is evaluated with ``torch.func.functional_call`` on substituted weights, so its own
parameters are never written: they are bit-exactly what they were (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.func import functional_call

from ..data.base import to_float
from ..registry import METRICS
from .entry import MetricEntry


@dataclass(frozen=True)
class ContourGrid:
    """``losses[i, j]`` is the loss at ``(alphas[i], betas[j])``; ``space`` is
    ``"params"`` or ``"input"``."""

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray
    space: Literal["params", "input"]

    @property
    def centre(self) -> float:
        """The loss at (0, 0) (the grid has an odd number of steps)."""
        return float(self.losses[len(self.alphas) // 2, len(self.betas) // 2])

    def save(self, path: str | Path) -> Path:
        """Write the grid as ``.npz`` (alphas, betas, losses, space)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, alphas=self.alphas, betas=self.betas, losses=self.losses,
                 space=np.array(self.space))
        return path


def orthogonal_sign_directions(shape: torch.Size | tuple[int, ...], *, seed: int,
                               device: torch.device | str = "cpu",
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random +-1 tensors of ``shape`` that are orthogonal (exactly when the number of
    entries is even; otherwise their inner product is 1)."""
    gen = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    d1 = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
    flip = torch.ones(d)
    flip[torch.randperm(d, generator=gen)[: d // 2]] = -1
    d2 = d1 * flip
    return d1.view(shape).to(device), (d2.view(shape)).to(device)


def _grid(span: float, steps: int) -> np.ndarray:
    if steps < 1 or steps % 2 == 0:
        raise ValueError(f"steps must be odd so the grid has a centre, got {steps}")
    return np.linspace(-span, span, steps)


def first_conv(model: nn.Module) -> str:
    """The qualified name of the first ``nn.Conv2d`` in module order."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise ValueError("the model has no nn.Conv2d layer")


@torch.no_grad()
def loss_contour_params(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                        span: float = 0.5, steps: int = 21, seed: int = 0,
                        layer: str | None = None) -> ContourGrid:
    """Loss of ``model`` on the batch ``(x, y)`` with the first conv layer's weight (or
    ``layer``'s) moved along two orthogonal +-1 directions over [-span, span]^2 (eval mode).

    Deviations: the protocol does not say which batch; the caller passes it (we suggest a
    fixed test subset). Biases and other layers are left unchanged.
    """
    device = next(model.parameters()).device
    name = f"{layer or first_conv(model)}.weight"
    w = dict(model.named_parameters())[name].detach()
    d1, d2 = orthogonal_sign_directions(w.shape, seed=seed, device=device)
    xb = x.to(device)
    xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
    yb = y.to(device)
    alphas, betas = _grid(span, steps), _grid(span, steps)
    losses = np.empty((steps, steps))
    was_training = model.training
    model.eval()
    try:
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                wij = w + float(a) * d1 + float(b) * d2
                out = functional_call(model, {name: wij}, (xb,), strict=False)
                losses[i, j] = F.cross_entropy(out.float(), yb).item()
    finally:
        model.train(was_training)
    return ContourGrid(alphas, betas, losses, "params")


@torch.no_grad()
def loss_contour_input(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                       span: float = 0.2, steps: int = 21, seed: int = 0,
                       batch_size: int = 512) -> ContourGrid:
    """Cross-entropy of one input ``x`` (``(C, H, W)`` or the first of a batch) with label
    ``y`` moved along two orthogonal +-1 directions over [-span, span]^2 (eval mode).

    Deviations: moved inputs are not clamped to [0, 1], so the grid shows the loss surface
    itself rather than its clipped version.
    """
    device = next(model.parameters()).device
    x0 = x[0] if x.dim() == 4 else x
    x0 = to_float(x0) if x0.dtype == torch.uint8 else x0.float()
    x0 = x0.to(device)
    y0 = (y[0] if y.dim() == 1 else y).to(device)
    d1, d2 = orthogonal_sign_directions(x0.shape, seed=seed, device=device)
    alphas, betas = _grid(span, steps), _grid(span, steps)
    a = torch.as_tensor(alphas, dtype=torch.float32, device=device)
    b = torch.as_tensor(betas, dtype=torch.float32, device=device)
    pts = (x0 + a.view(-1, 1, 1, 1, 1) * d1 + b.view(1, -1, 1, 1, 1) * d2).flatten(0, 1)
    was_training = model.training
    model.eval()
    try:
        out = torch.cat([model(pts[i:i + batch_size]).float()
                         for i in range(0, len(pts), batch_size)])
    finally:
        model.train(was_training)
    losses = F.cross_entropy(out, y0.expand(len(out)), reduction="none")
    return ContourGrid(alphas, betas, losses.view(steps, steps).cpu().double().numpy(), "input")


def plot_contour(grid: ContourGrid, path: str | Path, *, levels: int = 20,
                 title: str | None = None) -> Path:
    """Write a filled contour plot of ``grid`` to ``path`` (matplotlib's object API with the
    Agg canvas: no pyplot global state, no display needed)."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    cs = ax.contourf(grid.alphas, grid.betas, grid.losses.T, levels=levels, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="loss")
    ax.plot(0, 0, "r+")
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title(title or f"loss contour ({grid.space} space)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


class _Odd(BaseModel):
    @field_validator("steps", check_fields=False)
    @classmethod
    def _odd(cls, v: int) -> int:
        _grid(1.0, v)  # the function's own check: odd, so the grid has a centre
        return v


class ContourParamsConfig(_Odd):
    """:func:`loss_contour_params`'s options (its defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    span: float = Field(0.5, gt=0)
    steps: int = Field(21, ge=1)
    seed: int = 0
    layer: str | None = None


class ContourInputConfig(_Odd):
    """:func:`loss_contour_input`'s options (its defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    span: float = Field(0.2, gt=0)
    steps: int = Field(21, ge=1)
    seed: int = 0
    batch_size: int = Field(512, ge=1)


# the summary scalars are the victim kind's names: the loss at the grid's centre
METRICS.register("loss_contour_params", MetricEntry(
    fn=loss_contour_params, config=ContourParamsConfig, takes=("model", "x", "y"),
    metrics=("contour_params_centre",),
    summarize=lambda g: {"contour_params_centre": g.centre}, source="PROTOCOLS 4"))
METRICS.register("loss_contour_input", MetricEntry(
    fn=loss_contour_input, config=ContourInputConfig, takes=("model", "x", "y"),
    metrics=("contour_input_centre",),
    summarize=lambda g: {"contour_input_centre": g.centre}, source="PROTOCOLS 4"))
