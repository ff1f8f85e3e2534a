"""The AutoML-risks report on a temporary sqlite MLflow store holding synthetic victim and
attack runs laid out as the `victim` / `attack` trial kinds and the runner log them (tags,
flattened params, metrics, artifacts). The numbers are constructed so that every table the
report computes has a hand-computed answer."""

import math
import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from nasrisk.analysis.load import load_runs  # noqa: E402
from nasrisk.analysis.reports import REPORTS  # noqa: E402
from nasrisk.analysis.reports.automl import build_automl_report  # noqa: E402

EXPERIMENT = "automl-risks"
NAS = ("darts", "enas", "pdarts")
MANUAL = ("resnet18", "vgg13_bn", "densenet121")
VARIANT = ("darts_deep",)
FAMILY = {**{m: "nas" for m in NAS}, **{m: "manual" for m in MANUAL},
          **{m: "variant" for m in VARIANT}}
MODELS = (*NAS, *MANUAL, *VARIANT)
DATASETS = ("cifar10", "cifar100")
POISON = (0.1, 0.4)
ARCH = {"darts": (2, 4, 2), "enas": (3, 4, 2), "pdarts": (2, 4, 2), "darts_deep": (5, 2, 1)}
OVERLAP_INDICES = np.array([3, 17, 25, 40, 41, 58, 77, 90, 91, 99, 120, 131])


def _values():
    """Constructed numbers: clean accuracy, CAD at each poison fraction, gradient variances,
    attack metrics, overlap masks."""
    rng = np.random.default_rng(7)
    v = {}
    for i, m in enumerate(MODELS):
        for d, ds in enumerate(DATASETS):
            v[("acc", m, ds)] = round(0.9 - 0.02 * i - 0.3 * d, 4)
        v[("cad", m, 0.1)] = round(0.01 + 0.003 * i, 4)
        v[("cad", m, 0.4)] = round(0.05 + 0.01 * i, 4)
        v[("gv_init", m)] = float(10 ** rng.uniform(0, 2))
        v[("gv_trained", m)] = float(10 ** rng.uniform(-3, -1))
        v[("asr_m", m)] = float(rng.uniform(0.5, 1.0))
        v[("asr_l", m)] = float(rng.uniform(0.2, 0.6))
        v[("fooled", m)] = rng.random(OVERLAP_INDICES.size) < 0.5
    return v


VALUES = _values()


def _log(client, exp_id, *, name, stage, kind, params, metrics, artifacts=(), status="done"):
    tags = {"nasrisk.role": "trial", "nasrisk.study": EXPERIMENT, "nasrisk.stage": stage,
            "nasrisk.kind": kind, "nasrisk.trial_key": name, "nasrisk.status": status}
    run = client.create_run(exp_id, run_name=name, tags=tags)
    client.log_batch(run.info.run_id,
                     metrics=[Metric(k, float(x), 1_700_000_000_000, 0) for k, x in metrics.items()],
                     params=[Param(k, str(x)) for k, x in params.items()],
                     tags=[RunTag(k, x) for k, x in tags.items()])
    for path in artifacts:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED" if status == "done" else "RUNNING")
    return run.info.run_id


def _victim(client, exp_id, tmp, model, dataset, p, *, contours=False, acc=None, extra=None):
    if acc is None:
        acc = VALUES[("acc", model, dataset)] - (VALUES[("cad", model, p)] if p else 0.0)
    params = {"model": model, "model_kwargs.C": 8, "dataset": dataset, "params": "paper",
              "train": "None", "poison_fraction": p, "seed": 0, "max_train_examples": "None",
              "max_test_examples": "None", "measure_grad_var": True, "contours": True,
              "profile": "smoke", "stage": "victims", "kind": "victim",
              "victim_key": f"{model}-{dataset}-{p}", "family": FAMILY[model]}
    params |= extra or {}
    if model in ARCH:
        params |= dict(zip(("cell_depth", "cell_width", "skip_count"), ARCH[model], strict=True))
    metrics = {"acc": acc, "param_count": 1e5, "train_seconds": 3.0}
    if p == 0:
        metrics |= {"grad_var_init": VALUES[("gv_init", model)],
                    "grad_var_trained": VALUES[("gv_trained", model)]}
    artifacts = []
    if contours:
        for space, span in (("params", 0.5), ("input", 0.2)):
            a = np.linspace(-span, span, 5)
            path = tmp / f"{model}-{dataset}" / f"contour_{space}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, alphas=a, betas=a, losses=np.add.outer(a**2, 2 * a**2) + 1,
                     space=np.array(space))
            artifacts.append(path)
    _log(client, exp_id, name=f"{model} {dataset} p={p}", stage="victims", kind="victim",
         params=params, metrics=metrics, artifacts=artifacts)


def _attack(client, exp_id, tmp, model, attack, metrics, *, status="done", artifacts=(),
            extra=None):
    params = {"victim.model": model, "victim.dataset": "cifar10", "victim.params": "paper",
              "victim.poison_fraction": 0.0, "victim.seed": 0, "attack": attack,
              "n_inputs": 12, "params": "paper", "seed": 0, "profile": "smoke",
              "stage": "attacks", "kind": "attack", "victim_key": f"{model}-cifar10-0",
              "model": model, "dataset": "cifar10", "family": FAMILY[model], **(extra or {})}
    _log(client, exp_id, name=f"{attack} {model} cifar10", stage="attacks", kind="attack",
         params=params, metrics={"victim_acc": 0.9, **metrics}, status=status,
         artifacts=artifacts)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("automl")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "art").as_uri())
    # runs of an earlier configuration of the same trials (absurd numbers), superseded by the
    # later runs below: no table may average them in
    _victim(client, exp_id, root, "enas", "cifar10", 0.0, acc=0.01,
            extra={"max_train_examples": 100})
    _attack(client, exp_id, root, "darts", "pgd_targeted", {"asr_m": 0.0, "asr_l": 0.0},
            extra={"n_inputs": 3})
    for model in MODELS:
        for dataset in DATASETS:
            _victim(client, exp_id, root, model, dataset, 0.0, contours=dataset == "cifar10")
        for p in POISON:
            _victim(client, exp_id, root, model, "cifar10", p)
        _attack(client, exp_id, root, model, "pgd_targeted",
                {"asr_m": VALUES[("asr_m", model)], "asr_l": VALUES[("asr_l", model)]})
        _attack(client, exp_id, root, model, "pgd_sweep",
                {f"asr_eps_{e}": min(1.0, 0.05 * e) for e in (1, 2, 4, 8, 16)})
        _attack(client, exp_id, root, model, "nes",
                {"nes_asr_m": 0.5, "nes_asr_l": 0.3, "nes_queries_m": 800.0,
                 "nes_queries_l": 1600.0})
        npz = root / f"overlap-{model}" / "overlap.npz"
        npz.parent.mkdir()
        fooled = VALUES[("fooled", model)]
        np.savez(npz, indices=OVERLAP_INDICES, fooled=fooled)
        _attack(client, exp_id, root, model, "pgd_overlap", {"overlap_fooled": fooled.mean()},
                artifacts=[npz])
    # an unfinished run with absurd numbers must not enter any table
    _attack(client, exp_id, root, "darts", "pgd_targeted", {"asr_m": 99.0, "asr_l": 99.0},
            status="running")
    out = root / "report"
    report = build_automl_report(uri, EXPERIMENT, out, n_boot=200)
    return {"uri": uri, "client": client, "exp_id": exp_id, "root": root, "out": out,
            "report": report}


def _setting_rows(df, setting="cifar10/paper"):
    return df[df["setting"] == setting].set_index("model")


def test_registered():
    assert REPORTS["automl"] is build_automl_report and "evas" in REPORTS


def test_accuracy_table_is_clean_victims_models_by_dataset(store):
    acc = store["report"].accuracy.set_index("model")
    assert set(acc.index) == set(MODELS)
    assert {"cifar10/paper", "cifar100/paper"} <= set(acc.columns)
    for m in MODELS:
        for ds in DATASETS:  # poisoned victims (lower accuracy) are not averaged in
            assert acc.loc[m, f"{ds}/paper"] == pytest.approx(VALUES[("acc", m, ds)])
    assert list(acc["family"])[:3] == ["nas"] * 3 and acc["family"].iloc[-1] == "variant"


def test_cad_equals_clean_minus_poisoned(store):
    cad = store["report"].cad
    poisoned = cad[cad["poison"] > 0]
    assert len(poisoned) == len(MODELS) * len(POISON)
    for r in poisoned.itertuples():
        assert r.cad == pytest.approx(VALUES[("cad", r.model, r.poison)], abs=1e-9)
        assert r.ref == "exact"
    assert (cad.loc[cad["poison"] == 0, "cad"] == 0).all()
    pm = _setting_rows(store["report"].per_model)
    for m in MODELS:
        assert pm.loc[m, "cad_p40"] == pytest.approx(VALUES[("cad", m, 0.4)], abs=1e-9)
    assert "cad_p10" not in _setting_rows(store["report"].per_model, "cifar100/paper").dropna(
        axis=1, how="all").columns


def test_nas_minus_manual_is_the_constructed_difference(store):
    comp = store["report"].comparisons
    row = comp[(comp["metric"] == "asr_m") & (comp["setting"] == "cifar10/paper")].iloc[0]
    nas = np.mean([VALUES[("asr_m", m)] for m in NAS])
    manual = np.mean([VALUES[("asr_m", m)] for m in MANUAL])
    assert row["diff"] == pytest.approx(nas - manual)  # the running run's 99 is not in it
    assert (row["n_a"], row["n_b"]) == (len(NAS), len(MANUAL))  # variants in neither family
    cad = comp[(comp["metric"] == "cad_p40") & (comp["setting"] == "cifar10/paper")].iloc[0]
    assert cad["diff"] == pytest.approx(np.mean([VALUES[("cad", m, 0.4)] for m in NAS])
                                        - np.mean([VALUES[("cad", m, 0.4)] for m in MANUAL]))
    acc100 = comp[(comp["metric"] == "acc") & (comp["setting"] == "cifar100/paper")].iloc[0]
    assert acc100["diff"] == pytest.approx(
        np.mean([VALUES[("acc", m, "cifar100")] for m in NAS])
        - np.mean([VALUES[("acc", m, "cifar100")] for m in MANUAL]))
    # metrics no attack produced on cifar100 get no row there
    assert comp[(comp["metric"] == "asr_m") & (comp["setting"] == "cifar100/paper")].empty


def test_overlap_histogram_matches_a_hand_count(store):
    hist = store["report"].overlap_hist.set_index("k")
    for family, models in (("nas", NAS), ("manual", MANUAL)):
        per_input = [sum(int(VALUES[("fooled", m)][i]) for m in models)
                     for i in range(OVERLAP_INDICES.size)]
        for k in range(len(models) + 1):
            assert hist.loc[k, f"inputs_{family}"] == sum(c == k for c in per_input)
    assert hist["inputs_nas"].sum() == OVERLAP_INDICES.size


def test_arch_stats_and_correlations(store):
    rep = store["report"]
    arch = rep.arch_stats.set_index("model")
    assert set(arch.index) == set(ARCH)
    for m, (depth, width, skips) in ARCH.items():
        assert tuple(arch.loc[m, ["cell_depth", "cell_width", "skip_count"]]) == (
            depth, width, skips)
    corr = rep.correlations
    row = corr[(corr["x"] == "grad_var_trained") & (corr["y"] == "asr_m")
               & (corr["method"] == "pearson")].iloc[0]
    gv = np.log10([VALUES[("gv_trained", m)] for m in MODELS])
    asr = [VALUES[("asr_m", m)] for m in MODELS]
    assert row["r"] == pytest.approx(sps.pearsonr(gv, asr).statistic)
    assert row["n"] == len(MODELS)
    assert {"asr_eps_8", "nes_asr_l", "overlap_fooled", "cad_p40"} <= set(corr["y"])


def test_every_file_exists_and_summary_lists_them(store):
    rep, out = store["report"], store["out"]
    for name in ("report.md", "accuracy.csv", "per_model.csv", "comparisons.csv", "cad.csv",
                 "overlap_counts.csv", "overlap_hist.csv", "arch_stats.csv", "correlations.csv",
                 "cad_vs_poison_cifar10_paper.png", "overlap_hist_cifar10_paper.png",
                 "grad_var_cifar10_paper.png", "grad_var_cifar100_paper.png",
                 "contours_params_cifar10_paper.png", "contours_input_cifar10_paper.png",
                 "strips_cifar10_paper.png", "strips_cifar100_paper.png"):
        assert (out / name).stat().st_size > 0, name
    assert all(p.exists() for p in rep.files.values())
    text = rep.summary()
    assert "darts" in text and str(rep.report_md) in text and "asr_m" in text
    # the grad-var bars of the artifact definition were not recorded: said, not drawn
    assert any("grad_var_init_artifact" in n for n in rep.notes)
    assert not (out / "grad_var_artifact_cifar10_paper.png").exists()


def test_report_is_logged_to_the_summary_run(store):
    client, rep = store["client"], store["report"]
    runs = client.search_runs([store["exp_id"]],
                              filter_string="tags.\"nasrisk.role\" = 'summary'")
    assert [r.info.run_id for r in runs] == [rep.summary_run_id]
    logged = {a.path for a in client.list_artifacts(rep.summary_run_id, "report")}
    assert {"report/report.md", "report/accuracy.csv", "report/strips_cifar10_paper.png"} <= logged
    # what it summarises: the victim and attack runs it read, by trial key (issue 12)
    tags = client.get_run(rep.summary_run_id).data.tags
    keys = tags["nasrisk.trial_keys"].split(",")
    done = {r.data.tags["nasrisk.trial_key"] for r in client.search_runs(
        [store["exp_id"]], max_results=1000,
        filter_string="tags.\"nasrisk.role\" = 'trial' and tags.\"nasrisk.status\" = 'done'")}
    assert keys == sorted(done)
    assert {"nasrisk.version", "nasrisk.git_commit", "nasrisk.profile"} <= set(tags)
    assert "report/trial_keys.json" in logged
    metrics = client.get_run(rep.summary_run_id).data.metrics
    assert metrics["nas_minus_manual.asr_m.cifar10/paper"] == pytest.approx(
        rep.comparisons.query("metric == 'asr_m' and setting == 'cifar10/paper'")["diff"].iloc[0])


def test_missing_stages_give_notes_not_errors(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "a").as_uri())
    empty = build_automl_report(uri, EXPERIMENT, tmp_path / "empty", log_to_mlflow=False)
    assert empty.n_victims == 0 and empty.accuracy.empty and empty.comparisons.empty
    assert any("victims" in n for n in empty.notes) and any("attacks" in n for n in empty.notes)
    assert (tmp_path / "empty" / "report.md").exists() and empty.summary()
    # victims only, one poisoned victim without its clean reference
    for m in ("darts", "resnet18"):
        _victim(client, exp_id, tmp_path, m, "cifar10", 0.0)
    _victim(client, exp_id, tmp_path, "enas", "cifar10", 0.4)
    rep = build_automl_report(uri, EXPERIMENT, tmp_path / "victims", log_to_mlflow=False,
                              n_boot=50)
    assert rep.n_attacks == 0 and rep.overlap_hist.empty
    assert any("No clean victim" in n and "enas" in n for n in rep.notes)
    assert any("pgd_overlap" in n for n in rep.notes)
    assert any("contour_params.npz" in n for n in rep.notes)
    assert math.isnan(rep.comparisons.query("metric == 'acc'")["std_a"].iloc[0])  # n=1 each
    assert pd.read_csv(tmp_path / "victims" / "accuracy.csv").shape[0] == 2
    # a report built again reuses the one summary run instead of adding one
    first = build_automl_report(uri, EXPERIMENT, tmp_path / "r1", n_boot=0)
    second = build_automl_report(uri, EXPERIMENT, tmp_path / "r2", n_boot=0)
    assert first.summary_run_id == second.summary_run_id is not None
    summaries = client.search_runs([exp_id], filter_string="tags.\"nasrisk.role\" = 'summary'")
    assert len(summaries) == 1
    assert rep.n_victims == len(load_runs(uri, EXPERIMENT, stage="victims")) == 3


def test_superseded_runs_are_left_out_and_noted(store):
    assert store["report"].n_victims == len(MODELS) * (len(DATASETS) + len(POISON))
    text = (store["out"] / "report.md").read_text()
    assert "1 victim and 1 attack run(s) superseded" in text
    acc = pd.read_csv(store["out"] / "accuracy.csv")
    assert 0.01 not in acc.select_dtypes("number").to_numpy()


def test_cad_reference_is_the_parent_by_lineage_key(tmp_path):
    """A poisoned victim's clean reference is the run whose lineage_key is its parent_key,
    even where the old matching (same params but the poison fraction) names another clean
    run; runs without lineage params still match the old way, with a note."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "a").as_uri())
    common = {"model": "darts", "dataset": "cifar10", "params": "paper", "seed": 0,
              "profile": "smoke", "kind": "victim", "family": "nas", "train": "None"}

    def victim(stage, p, acc, **extra):
        _log(client, exp_id, name=f"{stage} p={p} {extra}", stage=stage, kind="victim",
             params={**common, "stage": stage, "poison_fraction": p, **extra},
             metrics={"acc": acc})

    # two clean runs of darts: the recipe-matched one (by params) and the actual parent
    victim("victims", 0.0, 0.90, lineage_key="0123456789012345", parent_key="")
    victim("poisoning", 0.0, 0.80, lineage_key="kparent", parent_key="",
           max_train_examples=100)
    # its params equal the first clean run's but its parent is the second
    victim("poisoning", 0.4, 0.70, lineage_key="kchild", parent_key="kparent")
    # a child whose parent never ran as a victim trial: no CAD, a note naming the key
    victim("poisoning", 0.2, 0.60, lineage_key="korphan", parent_key="kmissing")
    # an old run (no lineage params): matched by params to the first clean run
    victim("victims", 0.1, 0.85)
    rep = build_automl_report(uri, EXPERIMENT, tmp_path / "r", log_to_mlflow=False, n_boot=0)
    cad = rep.cad.set_index("poison")
    assert cad.loc[0.4, "acc_clean"] == pytest.approx(0.80) and cad.loc[0.4, "ref"] == "lineage"
    assert cad.loc[0.4, "cad"] == pytest.approx(0.10)
    assert cad.loc[0.1, "acc_clean"] == pytest.approx(0.90) and cad.loc[0.1, "ref"] == "exact"
    assert 0.2 not in cad.index
    assert any("kmissing" in n for n in rep.notes)
    assert any("1 poisoned victim run(s) without lineage params" in n for n in rep.notes)


def test_every_reported_metric_has_a_unit():
    from nasrisk.analysis.reports.automl_data import ARCH_STATS, ATTACK_METRICS, VICTIM_METRICS
    from nasrisk.analysis.reports.automl_figures import unit_of

    missing = [m for m in (*VICTIM_METRICS, *ATTACK_METRICS, *ARCH_STATS, "victim_acc")
               if not unit_of(m)]
    assert not missing, missing
    assert unit_of("asr_m").startswith("success") and unit_of("nes_queries_l").startswith("quer")
