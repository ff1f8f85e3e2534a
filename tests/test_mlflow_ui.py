"""What a researcher sees in the MLflow UI and in the printed commands (issue 12): the
experiment opens on its runs table, run names sort and are found at a glance, the summary
run says what it summarises, metric names are not doubled, printed commands work as printed
in a shell where the venv is not activated."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from nasrisk.study.tracking import ensure_experiment  # noqa: E402


def test_experiment_is_tagged_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = ensure_experiment(uri, "s", tmp_path / "art")
    c = mlflow.MlflowClient(uri)
    # the value MLflow 3's UI reads (mlflow/server/js: CUSTOM_MODEL_DEVELOPMENT)
    assert c.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before (no tag) gets it; one the user re-tagged keeps the user's
    old = c.create_experiment("old")
    assert ensure_experiment(uri, "old", None) == old
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    mine = c.create_experiment("mine", tags={"mlflow.experimentKind": "finetuning"})
    ensure_experiment(uri, "mine", None)
    assert c.get_experiment(mine).tags["mlflow.experimentKind"] == "finetuning"


def test_run_names_start_with_the_plan_index_and_are_stable():
    from nasrisk.study.plan import RunOptions, build_plan
    from nasrisk.study.spec import load_spec

    def names(study):
        plan = build_plan(load_spec(study), RunOptions(profile="smoke"))
        return {s.spec.name: [t.name for t in s.trials] for s in plan.stages}

    evas = names("evas-kappa")
    for stage, got in evas.items():
        assert [n[:6] for n in got] == [f"a{i:04d} " for i in range(len(got))], stage
        assert all(n[6] == "|" for n in got)  # then the arch string
    assert names("evas-kappa") == evas  # a re-plan (resume) names every trial the same
    automl = names("automl-risks")
    victims = [n for stage, ns in automl.items() for n in ns if n.startswith("v")]
    attacks = [n for stage, ns in automl.items() for n in ns if n.startswith("x")]
    assert victims and attacks
    assert sum(map(len, automl.values())) == len(victims) + len(attacks)
    # "v0003 darts@cifar10 p=0.1", "x0007 pgd darts@cifar10"
    assert all(n[1:5].isdigit() and n[5] == " " and "@" in n.split()[1] for n in victims)
    assert all(n[1:5].isdigit() and n[5] == " " and "@" in n.split()[2] for n in attacks)
    assert any(" p=" in n for n in victims)


def test_summary_run_carries_version_commit_profile_and_trial_keys(tmp_path):
    from importlib.metadata import version

    from nasrisk.analysis.reports.evas import build_evas_report
    from nasrisk.study.tracking import git_commit

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = mlflow.MlflowClient(uri)
    exp_id = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    rng = np.random.default_rng(0)
    keys = []
    for i in range(4):
        key = f"{i:016x}"
        keys.append(key)
        tags = {"nasrisk.role": "trial", "nasrisk.study": "e", "nasrisk.stage": "evas",
                "nasrisk.kind": "evas", "nasrisk.trial_key": key, "nasrisk.status": "done"}
        run = c.create_run(exp_id, run_name=f"a{i:04d}", tags=tags)
        k = float(10 ** rng.uniform(1, 4))
        c.log_batch(run.info.run_id,
                    metrics=[Metric(m, v, 0, 0) for m, v in
                             {"kappa_generator": k, "asr": 1 - math.log10(k) / 5,
                              "acc": 0.8}.items()],
                    params=[Param("profile", "smoke"), Param("dataset", "embedded")],
                    tags=[RunTag(t, v) for t, v in tags.items()])
        c.set_terminated(run.info.run_id, "FINISHED")
    rep = build_evas_report(uri, "e", tmp_path / "rep", n_boot=50)
    tags = c.get_run(rep.summary_run_id).data.tags
    assert tags["nasrisk.role"] == "summary"
    assert tags["nasrisk.version"] == version("nasrisk")
    assert tags["nasrisk.git_commit"] == git_commit()
    assert tags["nasrisk.profile"] == "smoke"
    assert tags["nasrisk.trial_keys"] == ",".join(sorted(keys))
    assert tags["nasrisk.trial_count"] == "4"
    got = c.download_artifacts(rep.summary_run_id, "report/trial_keys.json", str(tmp_path))
    assert json.loads(Path(got).read_text()) == sorted(keys)


@pytest.fixture
def venv_not_on_path(tmp_path, monkeypatch):
    """An interpreter in a venv (bin/python, bin/mlflow, bin/nasrisk) whose bin/ is not on
    PATH, as in a fresh shell where the venv was never activated."""
    bin_ = tmp_path / "my venv" / "bin"
    bin_.mkdir(parents=True)
    for name in ("python", "mlflow", "nasrisk"):
        (bin_ / name).write_text("#!/bin/sh\n")
        (bin_ / name).chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_ / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    return bin_


def test_printed_commands_name_the_venv_when_it_is_not_on_path(venv_not_on_path, monkeypatch):
    import shlex

    from nasrisk.study.cli import _mlflow_ui_hint, shell_command

    hint = _mlflow_ui_hint("sqlite:////w/mlflow.db")
    argv = shlex.split(hint)
    assert argv[0] == str(venv_not_on_path / "mlflow")  # quoted: the folder has a space
    assert argv[1:] == ["ui", "--backend-store-uri", "sqlite:////w/mlflow.db", "--host",
                        "127.0.0.1", "--port", "5000"]
    assert shlex.split(shell_command("nasrisk")) == [str(venv_not_on_path / "nasrisk")]
    monkeypatch.setenv("PATH", str(venv_not_on_path))  # activated: the bare names work
    assert shell_command("mlflow") == "mlflow"
    assert _mlflow_ui_hint("sqlite:////w/mlflow.db").startswith("mlflow ui ")


def test_a_trial_run_has_its_dataset_as_an_mlflow_input(tmp_path):
    from nasrisk.study.tracking import TrialRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = ensure_experiment(uri, "s", tmp_path / "art")
    run = TrialRun(uri, exp_id, "k1")
    run.open(run_id=None, name="a0000 x", tags={}, params={"dataset": "embedded"})
    cfg = {"dataset": "embedded", "max_train_examples": 1500, "max_test_examples": None}
    assert run.log_dataset(cfg, tmp_path / "data")
    assert run.log_dataset(cfg, tmp_path / "data")  # a resumed trial: still one input
    inputs = mlflow.MlflowClient(uri).get_run(run.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "embedded" and json.loads(ds.profile) == {"train_images": 1500,
                                                                 "test_images": "all"}
    assert json.loads(ds.source)["uri"] == "python-package:nasrisk.trials.data.embedded"
    assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "train")]
    # another cap is another dataset (digest); an attack's dataset is its victim's
    other = TrialRun(uri, exp_id, "k2")
    other.open(run_id=None, name="x0000 y", tags={}, params={})
    assert other.log_dataset({"victim": {"dataset": "cifar10", "max_train_examples": 2000}},
                             tmp_path / "data")
    ds2 = mlflow.MlflowClient(uri).get_run(other.run_id).inputs.dataset_inputs[0].dataset
    assert ds2.name == "cifar10" and ds2.digest != ds.digest
    assert json.loads(ds2.source)["uri"] == str((tmp_path / "data" / "cifar10").resolve())
    none = TrialRun(uri, exp_id, "k3")
    none.open(run_id=None, name="c", tags={}, params={})
    assert not none.log_dataset({"epochs": 2}, tmp_path / "data")
