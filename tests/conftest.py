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
