"""In-memory image datasets: every split held as uint8 tensors so batches are sliced, moved to
the device and augmented there (no per-sample Python, no DataLoader workers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata that belongs to a dataset (timm keeps `_cfg` beside each model the same way)."""

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str = ""


@dataclass
class ImageData:
    """All splits of one dataset: ``x_*`` uint8 ``(N, 3, H, W)``, ``y_*`` int64 ``(N,)``."""

    info: DatasetInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"x_{split} must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y_{split} must have shape ({x.shape[0]},), got {tuple(y.shape)}")

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> ImageData:
        """The first ``n`` examples of each split (datasets are stored shuffled by a fixed
        seed, so this is a stratified-enough random subset)."""
        return ImageData(
            self.info,
            self.x_train[:n_train], self.y_train[:n_train],
            self.x_test[:n_test], self.y_test[:n_test],
        )


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]."""
    return x.float().div_(255.0)
