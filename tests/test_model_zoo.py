"""Registry sweep over the AutoML study's model zoo (PROTOCOLS 1.3) and the model table."""

from __future__ import annotations

import pytest
import torch

import nasrisk.trials.models  # noqa: F401  (registers the zoo)
from nasrisk.trials.models.darts.stats import model_table
from nasrisk.trials.registry import MODELS

ZOO = [n for n in MODELS.names() if MODELS.meta(n).get("family") in ("nas", "variant", "manual")]


def test_zoo_composition():
    fam = {n: MODELS.meta(n)["family"] for n in ZOO}
    assert sorted(n for n, f in fam.items() if f == "nas") == [
        "amoebanet", "darts", "drnas", "enas", "nasnet", "pc_darts", "pdarts", "random",
        "sgas", "snas"]
    assert sorted(n for n, f in fam.items() if f == "variant") == [
        "darts-i", "darts-ii", "darts-iii"]
    assert sum(f == "manual" for f in fam.values()) == 7
    assert all(MODELS.meta(n)["source"] for n in ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_builds_forward_backward(name):
    torch.manual_seed(0)
    small = {"C": 8, "layers": 5} if MODELS.meta(name)["family"] != "manual" else {}
    net = MODELS.get(name)(num_classes=10, input_size=32, **small)
    net.train()
    x = torch.rand(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_model_table():
    rows = {r["name"]: r for r in model_table(families=("nas", "variant", "manual"))}
    assert set(rows) == set(ZOO)
    assert rows["darts"]["params"] == 3_349_342
    assert rows["resnet18"]["params"] == 11_173_962  # the standard CIFAR ResNet-18 count
    # The variants swap skips for convolutions: darts-ii and darts-iii have more parameters.
    assert rows["darts-ii"]["params"] > rows["darts"]["params"]
    assert rows["darts-i"]["params"] == rows["darts"]["params"]  # same ops, rewired
    assert rows["amoebanet"]["family"] == "nas" and rows["vgg13_bn"]["family"] == "manual"
