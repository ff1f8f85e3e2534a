"""NES (PROTOCOLS 4): the estimate points along the true gradient, the attack succeeds with
enough queries, stops per input, and stays in the threat model."""

import pytest
import torch
from torch import nn

from nasrisk.trials import ATTACKS
from nasrisk.trials.attacks.nes import nes, nes_gradient
from nasrisk.trials.attacks.targets import select_correct, select_targets
from nasrisk.trials.context import TrialContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.models.wrapper import Normalized
from nasrisk.trials.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = load_dataset("embedded").subset(1500, 400)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    model = Normalized(net, data.info.mean, data.info.std)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.1, augment="none", amp=False,
                      eval_each_epoch=False)
    assert train(model, data, cfg, seed=0, ctx=TrialContext(device="cpu"))["test_acc"] > 0.7
    x, y, _ = select_correct(model, data.x_test, data.y_test, 12, seed=2)
    return model.eval(), x, y


def test_estimate_aligns_with_true_gradient(trained):
    model, x, y = trained
    x = x[:6]
    t = select_targets(model(x).detach(), "most")
    xr = x.clone().requires_grad_(True)
    f = -model(xr).log_softmax(1).gather(1, t[:, None]).sum()
    (g_true,) = torch.autograd.grad(f, xr)
    gen = torch.Generator().manual_seed(0)
    cos = {}
    for n in (50, 400, 2000):
        g = nes_gradient(model, x, t, queries=n, generator=gen)
        cos[n] = torch.cosine_similarity(g.flatten(1), g_true.flatten(1), dim=1)
    assert (cos[400] > 0).all(), cos[400]
    # the estimate sharpens with the number of queries (variance ~ d / n)
    assert cos[2000].mean() > cos[400].mean() > cos[50].mean()
    assert cos[2000].mean() > 0.35  # measured 0.49 (sqrt(n / (n + d)) = 0.63 if f were linear)


def test_nes_succeeds_with_enough_queries_and_counts_them(trained):
    model, x, y = trained
    eps, n = 0.3, 100
    r = nes(model, x, y, case="most", eps=eps, step=0.02, queries_per_estimate=n,
            max_queries=30 * (n + 1), seed=0)
    assert r.asr >= 0.75, r.success
    assert (r.x_adv - x).abs().max() <= eps + 1e-6
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    with torch.no_grad():
        pred = model(r.x_adv).argmax(1)
    assert torch.equal(pred[r.success], r.targets[r.success])
    # every step costs n estimate queries + 1 success check; an input stops at success
    assert (r.queries % (n + 1) == 0).all() and (r.queries > 0).all()
    assert (r.queries[~r.success] == 30 * (n + 1)).all()
    assert (r.queries[r.success] <= 30 * (n + 1)).all()
    assert r.queries[r.success].float().std() > 0  # inputs stop at different steps
    m = r.metrics("nes_")
    assert m["nes_asr"] == r.asr and m["nes_queries_mean"] > 0


def test_nes_deterministic_and_params(trained):
    model, x, y = trained
    kw = dict(case="least", eps=8 / 255, max_queries=2 * 101, seed=5)
    a = nes(model, x[:3], y[:3], params="artifact", **kw)
    b = nes(model, x[:3], y[:3], params="artifact", **kw)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    assert set(a.queries.tolist()) <= {101, 202}  # artifact: 100 queries per estimate
    p = nes(model, x[:3], y[:3], params="paper", case="least", eps=8 / 255,
            max_queries=401, seed=5)
    assert set(p.queries.tolist()) <= {401}  # paper: 400 queries per estimate
    assert ATTACKS.get("nes") is nes
