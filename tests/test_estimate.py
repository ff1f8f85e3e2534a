"""`nasrisk plan`'s resources and estimate (study/estimate.py)."""

from __future__ import annotations

import pytest

from nasrisk.study.plan import RunOptions, build_plan
from nasrisk.study.spec import load_spec


@pytest.mark.parametrize("study", ["evas-kappa", "automl-risks", "evas-atlas", "evas-search"])
def test_paper_profiles_ask_for_gpus(study):
    spec = load_spec(study)
    plan = build_plan(spec, RunOptions(profile="paper"))
    for st in plan.stages:
        assert 0 < st.resources.gpu <= 1, (study, st.spec.name, st.resources)
    smoke = build_plan(spec, RunOptions(profile="smoke"))
    assert all(st.resources.gpu == 0 for st in smoke.stages)  # smoke stays on CPUs


def _store(tmp_path, runs):
    """A tracking store holding finished trial runs: (kind, profile, params, seconds)."""
    from mlflow import MlflowClient

    from nasrisk.study import tags
    from nasrisk.study.tracking import flatten

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("earlier-study", artifact_location=str(tmp_path / "art"))
    for kind, profile, params, seconds in runs:
        r = c.create_run(exp, tags={tags.ROLE: "trial", tags.STATUS: "done", tags.KIND: kind,
                                    tags.PROFILE: profile, tags.STAGE: "x"})
        for k, v in flatten(params).items():
            c.log_param(r.info.run_id, k, v)
        c.log_metric(r.info.run_id, "time_total_s", seconds)
        c.set_terminated(r.info.run_id)
    return uri


def test_trial_size_is_epochs_images_width():
    from nasrisk.study.estimate import flat_config, trial_size

    smoke = build_plan(load_spec("evas-kappa"), RunOptions(profile="smoke")).stages[0]
    paper = build_plan(load_spec("evas-kappa"), RunOptions(profile="paper")).stages[0]
    s_size, used = trial_size("evas", flat_config(smoke.trials[0].config))
    p_size, _ = trial_size("evas", flat_config(paper.trials[0].config))
    assert used == ("epochs", "images", "width")
    assert s_size == 3 * 1500 * 8 ** 2 * 5            # C=8 N=1: cells 3N+2
    assert p_size == 200 * 50_000 * 16 ** 2 * 17       # CIFAR-10's 50,000, C=16 N=5
    # MLflow params (strings) give the same size as the planned config
    from nasrisk.study.tracking import flatten
    assert trial_size("evas", flatten(smoke.trials[0].config))[0] == s_size


def test_plan_without_same_profile_runs_is_modelled_from_other_profiles(tmp_path):
    from nasrisk.study.estimate import describe_plan

    spec = load_spec("evas-kappa")
    smoke_cfg = build_plan(spec, RunOptions(profile="smoke")).stages[0].trials[0].config
    # 3 smoke trials of 40, 60, 80 s: median 60 s at size 3 x 1500 x 320
    uri = _store(tmp_path, [("evas", "smoke", smoke_cfg, s) for s in (40.0, 60.0, 80.0)]
                 + [("victim", "smoke", {"train": {"epochs": 3}}, 5.0)])  # another kind: unused
    plan = build_plan(spec, RunOptions(profile="paper", num_archs=10))
    text = describe_plan(plan, workdir=tmp_path, tracking_uri=uri, cpus=4)
    line = next(ln for ln in text.splitlines() if "modelled" in ln)
    assert "from 3 finished evas trials (profile smoke)" in line, line
    assert "epochs x images x width" in line
    ratio = (200 * 50_000 * 256 * 17) / (3 * 1500 * 64 * 5)
    per_trial_h = 60 * ratio / 3600
    assert f"~{per_trial_h * 10:.3g} trial-hours" in line, line
    assert "uncertain by ~4x" in line  # spread 2x, doubled for extrapolating > 100x
    assert "2 CPU + 0.25 GPU each" in text
    # with a measured trial of the same profile, the measurement wins
    paper_cfg = plan.stages[0].trials[0].config
    uri2 = _store(tmp_path / "b", [("evas", "smoke", smoke_cfg, 60.0)])
    from mlflow import MlflowClient

    from nasrisk.study import tags
    c = MlflowClient(uri2)
    exp = c.create_experiment("evas-kappa")
    r = c.create_run(exp, tags={tags.ROLE: "trial", tags.STATUS: "done", tags.KIND: "evas",
                                tags.PROFILE: "paper", tags.STAGE: "evas"})
    c.log_metric(r.info.run_id, "time_total_s", 3600.0)
    assert paper_cfg
    text2 = describe_plan(plan, workdir=tmp_path, tracking_uri=uri2, cpus=4)
    assert "measured: 3600.0 s per trial (n=1)" in text2 and "modelled" not in text2


def test_fit_separates_a_fixed_overhead_when_sizes_differ():
    from nasrisk.study.estimate import fit

    # seconds = 10 + 0.5 x size, exactly: the line is recovered
    a, b = fit([(10.0, 15.0), (20.0, 20.0), (40.0, 30.0)])
    assert abs(a - 10) < 1e-9 and abs(b - 0.5) < 1e-12
    # one size only: proportional, the median of seconds / size
    assert fit([(10.0, 15.0), (10.0, 25.0), (10.0, 20.0)]) == (0.0, 2.0)
    # a line that would need a negative overhead falls back to proportional
    assert fit([(10.0, 1.0), (20.0, 10.0)])[0] == 0.0
