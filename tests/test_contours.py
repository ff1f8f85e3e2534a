"""Loss contours (PROTOCOLS 4): the centre is the unmodified loss, off-centre points are the
loss with the directions applied by hand, the weights come back bit-exactly.

The comparisons run the trained model in float64 (``.double()``; ``Normalized`` promotes the
float32 pixels), as the metric and the by-hand reference both do, and both cast the logits to
float32 for the cross-entropy as the metric does: they agree to rounding (measured < 1e-14
relative on default/avx2/avx512 kernels), so 1e-8 is a bound, not a tuned tolerance."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nasrisk.trials import METRICS
from nasrisk.trials.context import TrialContext
from nasrisk.trials.data import load_dataset, to_float
from nasrisk.trials.metrics.contours import (
    loss_contour_input,
    loss_contour_params,
    orthogonal_sign_directions,
    plot_contour,
)
from nasrisk.trials.models.wrapper import Normalized
from nasrisk.trials.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = load_dataset("embedded").subset(600, 200)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    model = Normalized(net, data.info.mean, data.info.std)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.1, augment="none", amp=False,
                      eval_each_epoch=False)
    train(model, data, cfg, seed=0, ctx=TrialContext(device="cpu"))
    model = model.double()
    model.train()  # the metric must switch to eval itself and restore this
    return model, to_float(data.x_test[:32]), data.y_test[:32]


def test_directions_are_orthogonal_signs():
    for shape in [(8, 3, 3, 3), (3, 5, 5)]:
        d1, d2 = orthogonal_sign_directions(shape, seed=0)
        assert d1.shape == shape and set(d1.unique().tolist()) == {-1.0, 1.0}
        assert set(d2.unique().tolist()) == {-1.0, 1.0}
        assert abs((d1 * d2).sum().item()) <= d1.numel() % 2


def test_param_contour_centre_and_restore(trained):
    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grid = loss_contour_params(model, x, y, steps=5, seed=1)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    with torch.no_grad():
        loss0 = F.cross_entropy(model(x).float(), y).item()
        # an off-centre point by hand: move the first conv's weight on a copy
        d1, d2 = orthogonal_sign_directions(model.net[0].weight.shape, seed=1)
        moved = copy.deepcopy(model)
        moved.net[0].weight += 0.25 * d1 - 0.5 * d2
        loss_ab = F.cross_entropy(moved(x).float(), y).item()
    model.train()
    assert grid.losses.shape == (5, 5) and np.allclose(grid.alphas, [-0.5, -0.25, 0, 0.25, 0.5])
    assert grid.centre == pytest.approx(loss0, rel=1e-8)
    assert grid.losses[3, 0] == pytest.approx(loss_ab, rel=1e-8)
    assert grid.losses.max() > grid.centre  # +-0.5 on every weight entry hurts


def test_input_contour_centre_and_corner(trained, tmp_path):
    model, x, y = trained
    grid = loss_contour_input(model, x[3], y[3], steps=7, seed=2)
    model.eval()
    with torch.no_grad():
        loss0 = F.cross_entropy(model(x[3:4]).float(), y[3:4]).item()
        d1, d2 = orthogonal_sign_directions(x[3].shape, seed=2)
        corner = F.cross_entropy(model((x[3] - 0.2 * d1 + 0.2 * d2)[None]).float(),
                                 y[3:4]).item()
    model.train()
    assert grid.losses.shape == (7, 7) and grid.alphas[0] == pytest.approx(-0.2)
    assert grid.centre == pytest.approx(loss0, rel=1e-8)
    assert grid.losses[0, -1] == pytest.approx(corner, rel=1e-8)
    png = plot_contour(grid, tmp_path / "c.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    saved = np.load(grid.save(tmp_path / "c.npz"))
    assert np.array_equal(saved["losses"], grid.losses)


def test_even_steps_rejected_and_registered(trained):
    model, x, y = trained
    with pytest.raises(ValueError):
        loss_contour_input(model, x[0], y[0], steps=4)
    assert METRICS.get("loss_contour_params").fn is loss_contour_params
    assert METRICS.get("loss_contour_input").fn is loss_contour_input
