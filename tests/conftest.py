import os

import pytest
import torch

# Tiny models on 2 shared cores: one thread is several times faster than two and deterministic.
torch.set_num_threads(1)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``nasrisk ARGS`` in-process through the real entry point; returns
    (exit code, stdout, stderr)."""
    from nasrisk.study.cli import main

    def _run(*args: str):
        monkeypatch.setattr("sys.argv", ["nasrisk", *args])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


@pytest.fixture(scope="session")
def embedded_cnn():
    """A tiny CNN (two strided convs) trained 3 epochs on 1,500 embedded digits, test accuracy
    > 0.7: the victim of tests/test_pgd.py and tests/test_nes.py (trained once per session).
    Returns ``(model in eval mode, data)``; tests must not change its weights."""
    from torch import nn

    from nasrisk.trials.context import TrialContext
    from nasrisk.trials.data import load_dataset
    from nasrisk.trials.models.wrapper import Normalized
    from nasrisk.trials.train import TrainConfig, train

    torch.manual_seed(0)
    data = load_dataset("embedded").subset(1500, 400)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    model = Normalized(net, data.info.mean, data.info.std)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.1, augment="none", amp=False,
                      eval_each_epoch=False)
    res = train(model, data, cfg, seed=0, ctx=TrialContext(device="cpu"))
    assert res["test_acc"] > 0.7  # learnt something: the attack tests are meaningful
    return model.eval(), data
