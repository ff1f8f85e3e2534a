"""Datasets: each registry entry loads all splits into memory as uint8 tensors."""

from pathlib import Path

from ..registry import DATASETS
from .base import DatasetInfo, ImageData, to_float
from .cifar import CIFAR10, CIFAR100, load_cifar10, load_cifar100
from .embedded import INFO as EMBEDDED
from .embedded import load_embedded
from .imagenet_downsampled import (
    IMAGENET16_120,
    IMAGENET32_60,
    load_imagenet16_120,
    load_imagenet32_60,
)

for _info, _loader in [
    (EMBEDDED, load_embedded),
    (CIFAR10, load_cifar10),
    (CIFAR100, load_cifar100),
    (IMAGENET16_120, load_imagenet16_120),
    (IMAGENET32_60, load_imagenet32_60),
]:
    _loader.info = _info
    DATASETS.register(_info.name, _loader, info=_info)


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name).info


def load_dataset(name: str, *, root: str | Path = "data", download: bool = False) -> ImageData:
    """Load a registered dataset by name (raises UserError naming what is missing)."""
    return DATASETS.get(name)(root=Path(root), download=download)


__all__ = ["DatasetInfo", "ImageData", "to_float", "dataset_info", "load_dataset"]
