"""The EVAS trial, alone and as a study through Ray Tune + MLflow + the report."""

import math
import subprocess
import sys

import mlflow
import pytest
import yaml

from nasrisk.trials.context import LocalContext
from nasrisk.trials.errors import UserError
from nasrisk.trials.registry import TRIAL_KINDS

ARCHS = [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
    "|nor_conv_1x1~0|+|skip_connect~0|nor_conv_3x3~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|",
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|nor_conv_3x3~1|none~2|",
]
TINY = {
    "dataset": "embedded", "C": 4, "N": 1, "seed": 0,
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.1, "nesterov": True, "weight_decay": 5e-4,
              "grad_clip": None},
    "generator": {"mask_epochs": 1, "pattern_epochs": 1, "batch_size": 32, "channels": [4, 8, 8]},
    "kappa": {"batch_size": 8, "n_init": 1},
    "max_train_examples": 300, "max_test_examples": 200, "generator_train_examples": 128,
}
METRICS = {"kappa_generator", "kappa_arch", "kappa_bare", "te_nas", "acc", "asr", "clean_acc",
           "time_kappa_s", "time_train_s", "time_generator_s"}


def test_one_trial_without_ray(tmp_path):
    run = TRIAL_KINDS.get("evas")
    ctx = LocalContext(tmp_path / "t")
    m = run({**TINY, "arch": ARCHS[0]}, ctx)
    assert METRICS <= set(m)
    for k in ("kappa_generator", "kappa_arch", "kappa_bare"):
        assert m[k] >= 1 or math.isinf(m[k])      # a condition number
    assert 0 <= m["asr"] <= 1 and 0 <= m["acc"] <= 1
    assert (ctx.artifact_dir / "triggers.png").stat().st_size > 1000
    curves = {k for metrics, step in ctx.metrics_log if step is not None for k in metrics}
    assert {"train_loss", "test_acc"} <= curves  # the clean training's per-epoch curves
    assert not any(k.startswith("train_train") for k in curves)  # no doubled prefix
    again = run({**TINY, "arch": ARCHS[0]}, LocalContext(tmp_path / "t"))  # resumes: all done
    assert {k: again[k] for k in METRICS - {"time_kappa_s"}} == {k: m[k] for k in METRICS - {"time_kappa_s"}}


def test_bad_arch_is_a_user_error():
    from nasrisk.trials.kinds.evas import EvasConfig

    with pytest.raises(Exception, match="arch"):
        EvasConfig.model_validate({**TINY, "arch": "|nor_conv_3x3~0|+|"})
    with pytest.raises(UserError):
        from nasrisk.trials.models.nats.arch_string import parse_arch

        parse_arch("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|")


def test_tiny_evas_study_runs_tracks_and_reports(tmp_path):
    study = {"name": "evas-tiny", "default_profile": "smoke", "report": "evas",
             "stages": [{"name": "evas", "kind": "evas", "config": TINY,
                         "grid": {"arch": ARCHS}}],
             "profiles": {"smoke": {}}}
    f = tmp_path / "evas-tiny.yaml"
    f.write_text(yaml.safe_dump(study))
    wd = tmp_path / "wd"
    p = subprocess.run([sys.executable, "-m", "nasrisk.study.cli", "run", str(f), "--workdir",
                        str(wd)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "3/3 done" in p.stdout and "figure:" in p.stdout and "mlflow ui" in p.stdout
    c = mlflow.MlflowClient(f"sqlite:///{wd}/mlflow.db")
    exp = c.get_experiment_by_name("evas-tiny")
    runs = c.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags["nasrisk.role"] == "trial"]
    summaries = [r for r in runs if r.data.tags["nasrisk.role"] == "summary"]
    assert len(trials) == 3 and len(summaries) == 1
    # the plan's index first: a0000, a0001, ... in the plan's order of the archs
    names = sorted(r.info.run_name for r in trials)
    assert [n[:6] for n in names] == [f"a{i:04d} " for i in range(len(ARCHS))]
    assert sorted(n[6:] for n in names) == sorted(f"{a} embedded" for a in ARCHS)
    for r in trials:
        assert METRICS <= set(r.data.metrics), set(r.data.metrics)
        prm = r.data.params
        assert prm["arch"] in ARCHS and prm["dataset"] == "embedded" and prm["profile"] == "smoke"
        assert prm["params"] == "paper" and prm["seed"] == "0" and "ops.nor_conv_3x3" in prm
        assert prm["train.epochs"] == "1"
        assert {"nasrisk.git_commit", "nasrisk.version", "nasrisk.trial_key"} <= set(r.data.tags)
        hist = c.get_metric_history(r.info.run_id, "train_loss")
        assert [h.step for h in hist] == [1]
        assert "triggers.png" in [a.path for a in c.list_artifacts(r.info.run_id)]
    rep = wd / "reports" / "evas-tiny"
    for name in ("correlations.md", "correlations.csv", "kappa_vs_asr_acc.png"):
        assert (rep / name).stat().st_size > 100, name
    table = (rep / "correlations.md").read_text()
    assert "kappa_generator" in table and "asr" in table
    # the report again, from MLflow alone: still one summary run
    p = subprocess.run([sys.executable, "-m", "nasrisk.study.cli", "report", str(f), "--workdir",
                        str(wd)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    runs = c.search_runs([exp.experiment_id])
    assert sum(r.data.tags["nasrisk.role"] == "summary" for r in runs) == 1
