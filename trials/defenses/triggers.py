"""Patch triggers (BadNets) and the trigger inputs a defense is measured on.

* :class:`PatchTrigger` is the spec of a BadNet patch (Gu et al., "BadNets", 2017, Sec. 4: a
  small fixed pattern stamped in a corner); :func:`apply_patch` stamps it on uint8 images. The
  ``badnet`` lineage step (:mod:`nasrisk.trials.steps.badnet`) poisons with it and the
  ``defense`` trial rebuilds the same trigger inputs from the step's config in the lineage, so
  the one function is the only place a patch is drawn.
* :class:`TriggerInputs` is what a defense gets: a function that turns clean uint8 images into
  trigger inputs (float in [0, 1]) and the target class. A patch gives one
  (:func:`patch_trigger`); the EVAS input-aware generator gives another
  (:func:`generator_trigger`, ``x -> generator(x)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..data.base import to_float
from ..models.generator import TriggerGenerator

Position = Literal["bottom_right", "bottom_left", "top_right", "top_left"]


class PatchTrigger(BaseModel):
    """A square patch of ``size`` pixels at ``position`` (one pixel from nothing: flush with
    the corner), relabelling to ``target``. ``pattern``: ``random`` (uniform 0/255 per pixel
    and channel, drawn by ``pattern_seed``), ``white`` (all 255) or ``checkerboard`` (255 and 0
    alternating, 255 in the top-left pixel)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(3, ge=1, le=64)
    position: Position = "bottom_right"
    pattern: Literal["random", "white", "checkerboard"] = "random"
    pattern_seed: int = Field(0, ge=0, lt=2**32)
    target: int = Field(0, ge=0)


def patch_pattern(spec: PatchTrigger, channels: int = 3) -> torch.Tensor:
    """The patch's pixels, uint8 ``(channels, size, size)``."""
    s = spec.size
    if spec.pattern == "white":
        return torch.full((channels, s, s), 255, dtype=torch.uint8)
    if spec.pattern == "checkerboard":
        i = torch.arange(s)
        board = ((i[:, None] + i[None, :]) % 2 == 0).to(torch.uint8) * 255
        return board.expand(channels, s, s).clone()
    gen = torch.Generator().manual_seed(spec.pattern_seed)
    return torch.randint(0, 2, (channels, s, s), generator=gen, dtype=torch.uint8) * 255


def patch_slices(spec: PatchTrigger, height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns the patch covers in a ``height x width`` image."""
    s = spec.size
    if s > min(height, width):
        raise ValueError(f"a {s}x{s} patch does not fit a {height}x{width} image")
    rows = slice(height - s, height) if spec.position.startswith("bottom") else slice(0, s)
    cols = slice(width - s, width) if spec.position.endswith("right") else slice(0, s)
    return rows, cols


def apply_patch(x_uint8: torch.Tensor, spec: PatchTrigger) -> torch.Tensor:
    """``x`` (uint8 ``(N, C, H, W)``) with the patch stamped on every image (a new tensor)."""
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise ValueError(f"apply_patch takes uint8 (N, C, H, W), got {x_uint8.dtype} "
                         f"{tuple(x_uint8.shape)}")
    rows, cols = patch_slices(spec, x_uint8.shape[2], x_uint8.shape[3])
    out = x_uint8.clone()
    out[:, :, rows, cols] = patch_pattern(spec, x_uint8.shape[1]).to(out.device)
    return out


@dataclass(frozen=True)
class TriggerInputs:
    """How a backdoor's trigger inputs are made: ``make(x_uint8) -> float [0, 1]`` (on the
    input's device) and the ``target`` class; ``source`` names it (``patch``, ``generator``)."""

    make: Callable[[torch.Tensor], torch.Tensor]
    target: int
    source: str
    description: str = ""


def patch_trigger(spec: PatchTrigger) -> TriggerInputs:
    """The trigger inputs of a BadNet patch."""
    return TriggerInputs(make=lambda x: to_float(apply_patch(x, spec)), target=spec.target,
                         source="patch",
                         description=f"{spec.size}x{spec.size} {spec.pattern} patch at "
                                     f"{spec.position} -> class {spec.target}")


def generator_trigger(generator: TriggerGenerator, target: int) -> TriggerInputs:
    """The trigger inputs of an EVAS input-aware generator (PROTOCOLS 5): ``generator(x)``."""
    generator.eval()

    @torch.no_grad()
    def make(x: torch.Tensor) -> torch.Tensor:
        xf = to_float(x) if x.dtype == torch.uint8 else x.float()
        dev = next(generator.parameters()).device
        return generator(xf.to(dev)).to(x.device)

    return TriggerInputs(make=make, target=target, source="generator",
                         description=f"input-aware generator -> class {target}")
