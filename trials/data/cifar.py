"""CIFAR10/100 through torchvision, downloaded only when the user asks (``--download``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetMissingError
from .base import DatasetInfo, ImageData

CIFAR10 = DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                      "CIFAR-10, 50,000 train / 10,000 test 32x32 colour images")
CIFAR100 = DatasetInfo("cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                       "CIFAR-100, 50,000 train / 10,000 test 32x32 colour images")


def _load(info: DatasetInfo, root: Path, download: bool) -> ImageData:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if info.name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if info.name == "cifar10" else "cifar-100-python"
    root = Path(root)
    if not download and not (root / folder).is_dir():
        raise DatasetMissingError(
            f"{info.name}: {root / folder} not found; put torchvision's extracted "
            f"'{folder}' folder under {root} or pass --download"
        )
    splits = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=download)
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        splits += [x, torch.as_tensor(ds.targets, dtype=torch.int64)]
    return ImageData(info, *splits)


def load_cifar10(*, root: Path, download: bool = False) -> ImageData:
    return _load(CIFAR10, root, download)


def load_cifar100(*, root: Path, download: bool = False) -> ImageData:
    return _load(CIFAR100, root, download)
