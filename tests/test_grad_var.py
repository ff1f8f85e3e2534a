"""Gradient variance (PROTOCOLS 4, Eq. 14 and the artifact's clipped sum of stds) against a
brute-force loop of one backward pass per sample.

Both sides run in float64 (the model is cast with ``.double()``; ``Normalized`` promotes the
float32 pixels), so they agree to rounding, not to a tolerance tuned on one CPU. The metric casts
the logits to float32 before the cross-entropy; the reference does the same. Measured relative
gaps, default/avx2/avx512 kernels: < 1e-14 (a pure-float64 reference would differ by the
float32 cross-entropy, ~7e-9; float32 on both sides by up to 3e-8)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nasrisk.trials import METRICS
from nasrisk.trials.data import load_dataset, to_float
from nasrisk.trials.metrics.grad_var import gradient_variance, kaiming_init_
from nasrisk.trials.models.wrapper import Normalized


@pytest.fixture(scope="module")
def setup():
    data = load_dataset("embedded")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    kaiming_init_(net, seed=0)  # the protocol measures at Kaiming initialisation
    model = Normalized(net, data.info.mean, data.info.std).double()
    with torch.no_grad():  # non-trivial running statistics for the eval-mode check
        model.train()
        model(to_float(data.x_train[:200]))
    assert next(model.parameters()).dtype == torch.float64
    return model.eval(), data.x_test[:13], data.y_test[:13]


def brute_grads(model, x, y, *, train_mode=False):
    model = copy.deepcopy(model).train(train_mode)
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        # the metric's float32 cross-entropy on float64 logits, as in per_sample_grads
        F.cross_entropy(model(to_float(x[i:i + 1])).float(), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def test_paper_equals_brute_force(setup):
    model, x, y = setup
    g = brute_grads(model, x, y)
    expected = ((g - g.mean(0)) ** 2).sum(1).mean().item()
    # chunk 4 over 13 samples exercises the pairwise merge of partial moments
    got = gradient_variance(model, x, y, params="paper", chunk=4)
    assert got == pytest.approx(expected, rel=1e-8)
    assert got == pytest.approx(gradient_variance(model, x, y, chunk=64), rel=1e-8)


def test_artifact_clips_and_sums_stds(setup):
    model, x, y = setup
    g = brute_grads(model, x, y)
    clip = g.norm(dim=1).median().item()  # half the samples get clipped
    gc = g * (clip / g.norm(dim=1, keepdim=True)).clamp(max=1)
    expected = gc.std(0, unbiased=False).sum().item()
    got = gradient_variance(model, x, y, params="artifact", clip=clip, chunk=5)
    assert got == pytest.approx(expected, rel=1e-8)
    unclipped = g.std(0, unbiased=False).sum().item()
    assert got < unclipped
    # the default clip (L2 5) is the artifact's
    g5 = g * (5.0 / g.norm(dim=1, keepdim=True)).clamp(max=1)
    assert gradient_variance(model, x, y, params="artifact") == pytest.approx(
        g5.std(0, unbiased=False).sum().item(), rel=1e-8)


def test_per_sample_batch_norm_mode(setup):
    model, x, y = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = brute_grads(model, x, y, train_mode=True)
    expected = ((g - g.mean(0)) ** 2).sum(1).mean().item()
    got = gradient_variance(model, x, y, bn="per_sample", chunk=4)
    assert got == pytest.approx(expected, rel=1e-8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_identical_samples_have_zero_variance(setup):
    model, x, y = setup
    xs, ys = x[:1].repeat(6, 1, 1, 1), y[:1].repeat(6)
    assert gradient_variance(model, xs, ys) == pytest.approx(0.0, abs=1e-9)
    assert METRICS.get("grad_var").fn is gradient_variance


def test_kaiming_init_is_deterministic_he_normal():
    a = nn.Sequential(nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64), nn.Linear(400, 300))
    b = copy.deepcopy(a)
    kaiming_init_(a, seed=4)
    kaiming_init_(b, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a[0].weight.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.05)
    assert a[2].weight.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.05)
    assert (a[0].bias == 0).all() and (a[1].weight == 1).all()
