"""Batch augmentation on the device (PROTOCOLS 2): random crop with padding 4, horizontal flip,
and cutout 16 in the `artifact` training profile. Works on float batches in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop_flip", "crop_flip_cutout")


def augment(x: torch.Tensor, kind: str, generator: torch.Generator | None = None,
            pad: int = 4, cutout: int = 16) -> torch.Tensor:
    """Augment a batch ``(B, C, H, W)``; ``generator`` (on x's device) makes it reproducible."""
    if kind == "none":
        return x
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=dev)[None]).view(b, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=dev)[None]).view(b, 1, 1, w)
    idx_b = torch.arange(b, device=dev).view(b, 1, 1, 1)
    idx_c = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
    out = padded[idx_b, idx_c, rows, cols]
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    out = torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)
    if kind == "crop_flip_cutout":
        cy = torch.randint(0, h, (b,), device=dev, generator=generator)
        cx = torch.randint(0, w, (b,), device=dev, generator=generator)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        half = cutout // 2
        # cutout's hole is the square [c - half, c + half) clipped to the image
        hole = (ys >= (cy.view(b, 1, 1) - half)) & (ys < (cy.view(b, 1, 1) + half)) & (
            xs >= (cx.view(b, 1, 1) - half)) & (xs < (cx.view(b, 1, 1) + half))
        out = out * (~hole).unsqueeze(1)
    return out
