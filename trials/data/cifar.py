"""CIFAR10/100 through torchvision, downloaded only when the user asks (``--download``).

Every batch file is checked against torchvision's MD5 list before it is unpickled, so a
truncated, corrupt or replaced file is named in one line (and never unpickled)."""

from __future__ import annotations

import hashlib
import pickle
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
    if not download:
        _check_files(info, cls, root / folder)
    splits = []
    try:
        for train in (True, False):
            ds = cls(str(root), train=train, download=download)
            x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
            splits += [x, torch.as_tensor(ds.targets, dtype=torch.int64)]
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        what = "download or read" if download else "read"
        raise DatasetMissingError(f"{info.name}: cannot {what} {root / folder} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                  ) from None
    return ImageData(info, *splits)


def _check_files(info: DatasetInfo, cls: type, folder: Path) -> None:
    """Each file of torchvision's list is present and has its published MD5."""
    for name, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = folder / name
        if not path.is_file():
            raise DatasetMissingError(f"{info.name}: {path} is missing; restore the extracted "
                                      f"'{folder.name}' folder or pass --download")
        try:
            h = hashlib.md5(usedforsecurity=False)
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(2**20), b""):
                    h.update(block)
        except OSError as e:
            raise DatasetMissingError(f"{info.name}: cannot read {path}: {e.strerror or e}"
                                      ) from None
        if h.hexdigest() != md5:
            raise DatasetMissingError(f"{info.name}: {path} is corrupt or truncated (MD5 differs "
                                      "from the published file); delete the folder and pass "
                                      "--download, or restore it")


def load_cifar10(*, root: Path, download: bool = False) -> ImageData:
    return _load(CIFAR10, root, download)


def load_cifar100(*, root: Path, download: bool = False) -> ImageData:
    return _load(CIFAR100, root, download)
