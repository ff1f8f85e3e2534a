"""MLflow -> pandas loading and the EVAS report, on a temporary sqlite MLflow store holding
synthetic trial runs (the numbers are made up; these tests check the plumbing)."""

import math
import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from nasrisk.analysis.figures import scatter_grid  # noqa: E402
from nasrisk.analysis.load import load_runs, metric_history  # noqa: E402
from nasrisk.analysis.reports.evas import SCORES, TARGETS, build_evas_report  # noqa: E402
from nasrisk.trials.errors import UserError  # noqa: E402

EXPERIMENT = "evas-kappa"
N_DONE = 10


def _log_trial(client, exp_id, i, *, metrics, status="done", stage="corr", curve=()):
    tags = {"nasrisk.role": "trial", "nasrisk.study": EXPERIMENT, "nasrisk.stage": stage,
            "nasrisk.kind": "evas", "nasrisk.trial_key": f"key{i:03d}", "nasrisk.status": status}
    run = client.create_run(exp_id, run_name=f"trial-{i}", tags=tags)
    params = {"arch": f"|nor_conv_3x3~0|+|skip_connect~0|{i}|", "dataset": "cifar10",
              "profile": "smoke", "params": "paper", "seed": str(i), "lr": "0.1"}
    now = 1_700_000_000_000
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
        + [Metric("acc_epoch", float(v), now + s, s) for s, v in enumerate(curve)],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run.info.run_id, "FINISHED" if status == "done" else "RUNNING")
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    client.create_experiment("other-study", artifact_location=(root / "other").as_uri())
    rng = np.random.default_rng(0)
    ids = []
    for i in range(N_DONE):
        kappa = float(10 ** rng.uniform(1, 5))
        m = {"kappa_generator": kappa, "kappa_arch": kappa * rng.uniform(0.5, 2),
             "kappa_bare": math.inf if i == 4 else kappa * 3, "kappa_bare_flagged": i == 4,
             "asr": 1 - math.log10(kappa) / 6 + 0.02 * rng.normal(), "acc": rng.uniform(0.8, 0.9)}
        ids.append(_log_trial(client, exp_id, i, metrics=m, curve=[0.1, 0.5, 0.7]))
    _log_trial(client, exp_id, 99, metrics={"kappa_generator": 5.0, "asr": 0.1}, status="running")
    _log_trial(client, exp_id, 98, metrics={"kappa_generator": 5.0, "asr": 0.1}, stage="search")
    return {"uri": uri, "client": client, "exp_id": exp_id, "ids": ids, "root": root}


def test_load_runs_columns_and_filters(store):
    df = load_runs(store["uri"], EXPERIMENT)
    assert len(df) == N_DONE + 1  # the running trial is left out, both stages kept
    assert {"run_id", "run_name", "status", "start_time", "end_time"} <= set(df.columns)
    assert {"param.arch", "param.seed", "tag.nasrisk.trial_key", "asr", "acc_epoch"} <= set(df)
    assert pd.api.types.is_integer_dtype(df["param.seed"])
    assert pd.api.types.is_float_dtype(df["param.lr"])
    assert df["param.arch"].map(type).eq(str).all()
    assert df.loc[df["tag.nasrisk.stage"] == "corr", "acc_epoch"].eq(0.7).all()  # latest value
    bare = df.set_index("param.seed")["kappa_bare"]
    assert bare[4] == math.inf  # stored as float max by the SQL store, read back as inf
    assert len(load_runs(store["uri"], EXPERIMENT, stage="corr")) == N_DONE
    assert len(load_runs(store["uri"], EXPERIMENT, only_done=False)) == N_DONE + 2
    paged = load_runs(store["uri"], EXPERIMENT, stage="corr", page_size=3)
    assert sorted(paged["run_id"]) == sorted(store["ids"])
    assert load_runs(store["uri"], EXPERIMENT, role="nobody").empty


def test_load_runs_unknown_experiment_names_the_existing(store):
    with pytest.raises(UserError, match="evas-kapa") as err:
        load_runs(store["uri"], "evas-kapa")
    assert "evas-kappa" in str(err.value) and "other-study" in str(err.value)


def test_metric_history_is_the_curve(store):
    h = metric_history(store["uri"], store["ids"][0], "acc_epoch")
    assert list(h["step"]) == [0, 1, 2]
    assert list(h["value"]) == pytest.approx([0.1, 0.5, 0.7])


def test_report_files_table_and_single_summary_run(store, tmp_path):
    first = build_evas_report(store["uri"], EXPERIMENT, tmp_path / "a", stage="corr", n_boot=200)
    second = build_evas_report(store["uri"], EXPERIMENT, tmp_path / "b", stage="corr", n_boot=200)
    for path in (second.table_md, second.csv, second.figure, second.trials_csv):
        assert path.is_file() and path.stat().st_size > 0
    assert second.n_trials == N_DONE
    corr = second.correlations
    present = [s for s in SCORES if s != "te_nas"]  # the synthetic trials record no TE-NAS
    assert set(zip(corr.x, corr.y, strict=True)) == {(s, t) for s in present for t in TARGETS}
    assert len(corr) == len(present) * len(TARGETS) * 3
    pd.testing.assert_frame_equal(corr, pd.read_csv(second.csv))
    bare = corr[(corr.x == "kappa_bare") & (corr.y == "asr")]
    assert (bare.n == N_DONE - 1).all() and (bare.n_dropped == 1).all()
    # asr falls with log kappa by construction: the report must see it
    gen = corr[(corr.x == "kappa_generator") & (corr.y == "asr")].set_index("method")
    assert gen.loc["spearman", "r"] < -0.8 and gen.loc["pearson", "ci_high"] < 0
    md = second.table_md.read_text()
    assert "kappa_generator" in md and "flagged" in md and "te_nas" in md

    client = store["client"]
    summaries = client.search_runs([store["exp_id"]], "tags.\"nasrisk.role\" = 'summary'")
    assert len(summaries) == 1
    assert first.summary_run_id == second.summary_run_id == summaries[0].info.run_id
    assert summaries[0].info.run_name == "summary"
    logged = {a.path for a in client.list_artifacts(second.summary_run_id, "report")}
    assert logged == {f"report/{p.name}" for p in (second.table_md, second.csv, second.figure,
                                                    second.trials_csv)} | {"report/trial_keys.json"}
    assert summaries[0].data.metrics["n_trials"] == N_DONE
    # trial loading ignores the summary run
    trials = load_runs(store["uri"], EXPERIMENT, stage="corr")
    assert second.summary_run_id not in set(trials.run_id)
    assert len(load_runs(store["uri"], EXPERIMENT, role=None, only_done=False)) == N_DONE + 3


def test_report_with_too_few_trials_writes_nan_rows(store, tmp_path):
    client = store["client"]
    exp_id = client.create_experiment("evas-tiny",
                                      artifact_location=(store["root"] / "tiny").as_uri())
    _log_trial(client, exp_id, 0, metrics={"kappa_generator": 10.0, "asr": 0.5, "acc": 0.9})
    rep = build_evas_report(store["uri"], "evas-tiny", tmp_path, log_to_mlflow=False)
    assert rep.n_trials == 1 and rep.summary_run_id is None
    assert len(rep.correlations) == len(TARGETS) * 3
    assert rep.correlations["r"].isna().all()
    assert "Too few usable trials" in rep.table_md.read_text()
    assert rep.figure.is_file()
    # no trials at all: every score gets NaN rows
    client.create_experiment("evas-empty", artifact_location=(store["root"] / "e").as_uri())
    empty = build_evas_report(store["uri"], "evas-empty", tmp_path / "e", log_to_mlflow=False)
    assert empty.n_trials == 0 and len(empty.correlations) == len(SCORES) * len(TARGETS) * 3


def test_scatter_grid_marks_infinite_points(tmp_path):
    df = pd.DataFrame({"k": [10.0, 100.0, np.inf, 1000.0], "asr": [0.9, 0.5, 0.2, 0.1]})
    path = scatter_grid(df, ["k"], ["asr"], path=tmp_path / "s.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="nope"):
        scatter_grid(df, ["nope"], ["asr"], path=tmp_path / "x.png")


def test_store_keys_stay_strings_even_when_all_digits(tmp_path):
    """A 16-hex-digit store key made of digits only (1 in ~1,900 keys) must not become a number
    (it would lose its leading zero and never equal a parent_key again)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(exp_id, tags={"nasrisk.role": "trial", "nasrisk.status": "done"})
    client.log_batch(run.info.run_id, params=[Param("lineage_key", "0123456789012345"),
                                              Param("parent_key", "0000000000000042"),
                                              Param("victim_key", "0123456789012345"),
                                              Param("seed", "7")])
    df = load_runs(uri, EXPERIMENT)
    assert df.loc[0, "param.lineage_key"] == "0123456789012345"
    assert df.loc[0, "param.parent_key"] == "0000000000000042"
    assert df.loc[0, "param.victim_key"] == "0123456789012345"
    assert df.loc[0, "param.seed"] == 7  # other numeric params still convert
