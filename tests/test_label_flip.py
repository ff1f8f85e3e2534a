"""Label-flip poisoning (PROTOCOLS 4): exact counts, other classes, determinism, and the
clean accuracy drop growing with the poison fraction."""

import pytest
import torch
from torch import nn

from nasrisk.trials import ATTACKS
from nasrisk.trials.context import TrialContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.models.wrapper import Normalized
from nasrisk.trials.poison.label_flip import (
    clean_accuracy_drop,
    flip_labels,
)
from nasrisk.trials.registry import STEP_KINDS
from nasrisk.trials.train import TrainConfig, train


def labels(n=1000, k=10, seed=0):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def test_fraction_zero_changes_nothing():
    y = labels()
    out = flip_labels(y, fraction=0.0, num_classes=10, seed=3)
    assert torch.equal(out, y) and out is not y


@pytest.mark.parametrize("n", [1000, 999, 7])
def test_flips_exact_fraction_to_other_classes(n):
    y = labels(n)
    y0 = y.clone()
    out = flip_labels(y, fraction=0.4, num_classes=10, seed=1)
    assert torch.equal(y, y0)  # input untouched
    changed = out != y
    assert changed.sum().item() == round(0.4 * n)
    assert out.min() >= 0 and out.max() < 10


def test_flips_are_uniform_over_other_classes():
    y = torch.zeros(9000, dtype=torch.long)
    out = flip_labels(y, fraction=1.0, num_classes=10, seed=0)
    counts = torch.bincount(out, minlength=10)
    assert counts[0] == 0  # never the own class
    # 9000 draws over 9 classes: each ~1000, sd ~31; 6 sd of slack
    assert ((counts[1:] - 1000).abs() < 190).all(), counts


def test_deterministic_per_seed():
    y = labels()
    a = flip_labels(y, fraction=0.2, num_classes=10, seed=7)
    b = flip_labels(y, fraction=0.2, num_classes=10, seed=7)
    c = flip_labels(y, fraction=0.2, num_classes=10, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_fraction_raises():
    with pytest.raises(ValueError):
        flip_labels(labels(), fraction=1.5, num_classes=10, seed=0)


def test_a_lineage_step_not_an_attack_and_cad():
    assert "label_flip" not in ATTACKS and "label_flip" in STEP_KINDS
    assert clean_accuracy_drop(0.9, 0.75) == pytest.approx(0.15)


def _cad_curve(fractions, n_train, epochs):
    data = load_dataset("embedded").subset(n_train, 400)

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
        return Normalized(net, data.info.mean, data.info.std)

    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.1, augment="none", amp=False,
                      eval_each_epoch=False)
    ctx = TrialContext(device="cpu")
    accs = [train(build(), data, cfg, seed=0, ctx=ctx, state_key=f"label_flip_{p:g}",
                  labels=flip_labels(data.y_train, fraction=p, num_classes=10, seed=0),
                  )["test_acc"] for p in fractions]
    return [clean_accuracy_drop(accs[0], a) for a in accs]


@pytest.mark.outcome
def test_cad_grows_with_fraction_fast():
    cad = _cad_curve((0.0, 0.8), n_train=1000, epochs=2)
    # Measured over seeds 0-5 (init, flips, training) x default/avx2/avx512 kernels: clean
    # 0.582-0.660, p=0.8 0.083-0.130 (chance), CAD 0.462-0.560; seed 0 (this test) 0.552.
    assert cad[0] == 0.0 and cad[1] > 0.2, cad


@pytest.mark.slow
@pytest.mark.outcome
def test_cad_grows_with_fraction():
    cad = _cad_curve((0.0, 0.4, 0.8), n_train=1500, epochs=3)
    # Measured over seeds 0-4 x default/avx512 kernels: CAD at p=0.4 0.078-0.277, at p=0.8
    # 0.625-0.790 (at least 0.51 above p=0.4's); seed 0 (this test) 0.27 / 0.79.
    assert cad[0] == 0.0 and cad[2] > cad[1] > 0.0, cad
