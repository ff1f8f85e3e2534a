"""The down-sampled ImageNet readers: official layout read, classes kept, unsafe pickles refused."""

import os
import pickle

import numpy as np
import pytest

from nasrisk.trials.data import load_dataset
from nasrisk.trials.errors import DatasetMissingError


def write_batches(folder, size, n=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]
    for name in names:
        labels = [1, 2, 120, 121, 1000, 60][:n]   # 1-based in the files
        data = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "mean": data.mean(0)}, f)


def test_imagenet16_120_keeps_classes_1_to_120(tmp_path):
    write_batches(tmp_path / "ImageNet16", 16)
    d = load_dataset("imagenet16-120", root=tmp_path)
    assert d.x_train.shape == (40, 3, 16, 16) and d.x_test.shape == (4, 3, 16, 16)
    assert sorted(set(d.y_train.tolist())) == [0, 1, 59, 119]


def test_imagenet32_60(tmp_path):
    write_batches(tmp_path / "ImageNet32", 32)
    d = load_dataset("imagenet32-60", root=tmp_path)
    assert d.x_train.shape[1:] == (3, 32, 32) and set(d.y_test.tolist()) == {0, 1, 59}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    write_batches(tmp_path / "ImageNet16", 16)
    with open(tmp_path / "ImageNet16" / "val_data", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [1]}, f)
    with pytest.raises(DatasetMissingError, match="posix.system|os.system"):
        load_dataset("imagenet16-120", root=tmp_path)
