"""Readers for the official down-sampled ImageNet pickled batches (manual download: licence).

* ImageNet16-120 (NATS-Bench / EVAS): ``train_data_batch_1..10`` and ``val_data`` of the 16x16
  release, keeping classes 1..120 (labels are 1-based in the files), as NATS-Bench does.
* ImageNet32 (AutoML study, 60-class subset): the 32x32 release's ``train_data_batch_1..10``
  and ``val_data``; classes 1..60.

Each pickle holds ``data`` (N x 3*S*S uint8, channel-planar) and ``labels`` (1-based).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetMissingError
from .base import DatasetInfo, ImageData

IMAGENET16_120 = DatasetInfo("imagenet16-120", 120, 16, (0.4811, 0.4575, 0.4078),
                             (0.2471, 0.2405, 0.2449), "ImageNet 16x16, first 120 classes")
IMAGENET32_60 = DatasetInfo("imagenet32-60", 60, 32, (0.4811, 0.4575, 0.4078),
                            (0.2471, 0.2405, 0.2449), "ImageNet 32x32, first 60 classes")

_FILES = [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and plain Python values only: a file handed in by a user cannot
    run code (the official batches need nothing else)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode"),
               ("codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self.ALLOWED:
            raise DatasetMissingError(f"{self.path}: not an official down-sampled ImageNet batch "
                                      f"(it asks to load {module}.{name})")
        return super().find_class(module, name)


def _read(path: Path, size: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            up = _ArraysOnly(f, encoding="latin1")
            up.path = path
            entry = up.load()
        x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, size, size)
        y = np.asarray(entry["labels"], dtype=np.int64) - 1
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            pickle.UnpicklingError) as e:
        raise DatasetMissingError(f"{path}: corrupt or truncated down-sampled ImageNet batch "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                  ) from None
    m = y < keep
    return torch.from_numpy(x[m].copy()), torch.from_numpy(y[m].copy())


def _load(info: DatasetInfo, root: Path, sub: str) -> ImageData:
    folder = Path(root) / sub
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if missing:
        raise DatasetMissingError(
            f"{info.name}: missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            f"in {folder}; download the official down-sampled ImageNet ({info.image_size}x"
            f"{info.image_size}) pickled batches and extract them there (no --download: licence)"
        )
    xs, ys = zip(*(_read(folder / f, info.image_size, info.num_classes) for f in _FILES[:-1]), strict=True)
    xt, yt = _read(folder / "val_data", info.image_size, info.num_classes)
    return ImageData(info, torch.cat(xs), torch.cat(ys), xt, yt)


def load_imagenet16_120(*, root: Path, download: bool = False) -> ImageData:
    return _load(IMAGENET16_120, root, "ImageNet16")


def load_imagenet32_60(*, root: Path, download: bool = False) -> ImageData:
    return _load(IMAGENET32_60, root, "ImageNet32")
