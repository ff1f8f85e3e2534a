"""The kappa atlas (issue 9 "Atlas"): chunks partition the arch list, a chunk's kappa is
kappa_scores' on the same batch and seeds, a killed chunk resumes where it stopped and ends as
an uninterrupted one, the report assembles the chunks of real MLflow runs, the built-in study
plans the right trials."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from nasrisk.trials.context import LocalContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.kinds.evas import kappa_batch
from nasrisk.trials.kinds.kappa_atlas import (
    AtlasConfig,
    atlas_archs,
    chunk_archs,
    run_kappa_atlas,
    score_columns,
)
from nasrisk.trials.metrics.ntk import kappa_scores
from nasrisk.trials.models.generator import TriggerGenerator
from nasrisk.trials.models.nats.arch_string import isomorphism_key, sample_archs
from nasrisk.trials.models.nats.network import TinyNetwork
from nasrisk.trials.models.wrapper import Normalized

TINY = {"dataset": "embedded", "C": 4, "N": 1, "batch_size": 4, "n_init": 1,
        "generator_channels": [4, 8, 8], "max_train_examples": 128}


def _csv(ctx: LocalContext, chunk: int) -> pd.DataFrame:
    return pd.read_csv(ctx.artifact_dir / f"atlas_chunk_{chunk}.csv")


@pytest.mark.parametrize("unique, size", [(False, 15_625), (True, 6_466)])
@pytest.mark.parametrize("n_chunks", [1, 7, 250])
def test_chunks_partition_the_atlas(unique, size, n_chunks):
    archs = atlas_archs(unique=unique)
    assert len(archs) == len(set(archs)) == size
    if unique:
        assert len({isomorphism_key(a) for a in archs}) == size
    seen = [pos for c in range(n_chunks) for pos, _ in chunk_archs(archs, c, n_chunks)]
    assert sorted(seen) == list(range(size))  # every arch once, none twice
    sizes = [len(chunk_archs(archs, c, n_chunks)) for c in range(n_chunks)]
    assert max(sizes) - min(sizes) <= 1
    assert all(archs[p] == a for p, a in chunk_archs(archs, n_chunks - 1, n_chunks))
    # limit keeps a prefix of the same seeded order; the unique order is sample_archs' walk
    assert atlas_archs(unique=unique, limit=200) == archs[:200]
    if unique:
        assert archs[:900] == sample_archs(900, seed=0)


def test_chunk_scores_equal_kappa_scores(tmp_path):
    cfg = {**TINY, "limit": 4, "n_chunks": 3, "chunk": 2, "bn_modes": ["eval", "coupled"],
           "variants": ["generator", "bare"], "n_init": 2, "seed": 3}
    ctx = LocalContext(tmp_path / "c", device="cpu")
    out = run_kappa_atlas(cfg, ctx)
    table = _csv(ctx, 2)
    archs = atlas_archs(unique=False, limit=4)
    assert table["index"].tolist() == [2] and table["arch"].tolist() == [archs[2]]
    assert out["n_archs"] == 1
    data = load_dataset("embedded").subset(128, None)
    x = kappa_batch(data, 4, 3, "cpu")
    arch = archs[2]
    info = data.info
    for mode in ("eval", "coupled"):
        ref = kappa_scores(
            lambda: Normalized(TinyNetwork(arch, C=4, N=1, num_classes=info.num_classes),
                               info.mean, info.std), x,
            build_generator=lambda: TriggerGenerator(channels=(4, 8, 8)),
            variants=("generator", "bare"), n_init=2, seed=3, bn_mode=mode)
        for v in ("generator", "bare"):
            got = float(table[f"{mode}.kappa_{v}"].iloc[0])
            # the same float32 forward and float64 kernel: equal up to the CSV's repr
            assert got == pytest.approx(ref[f"kappa_{v}"], rel=1e-12), (mode, v)
            assert table[f"{mode}.kappa_{v}_flagged"].iloc[0] == ref[f"kappa_{v}_flagged"]
    # the summary is the median over the chunk's archs
    col = table["coupled.kappa_bare"].to_numpy(float)
    assert out["median.coupled.kappa_bare"] == pytest.approx(float(np.median(col)), rel=1e-12)


class Killed(Exception):
    pass


class KillAfter(LocalContext):
    """Raises once the saved atlas state holds ``k`` archs or more (the worker dies)."""

    def __init__(self, directory, k: int, **kw):
        super().__init__(directory, **kw)
        self.k = k

    def save_state(self, key, value, metrics=None):
        super().save_state(key, value, metrics)
        if len(value["scores"]) >= self.k:
            raise Killed


class Recording(LocalContext):
    def __init__(self, directory, **kw):
        super().__init__(directory, **kw)
        self.scored: list[str] = []

    def progress(self, message: str) -> None:
        self.scored.append(message)


def test_killed_chunk_resumes_at_next_arch(tmp_path):
    cfg = {**TINY, "limit": 6, "n_chunks": 1, "bn_modes": ["eval", "fixed-stats"],
           "variants": ["bare"]}
    whole = LocalContext(tmp_path / "whole", device="cpu")
    run_kappa_atlas(cfg, whole)
    with pytest.raises(Killed):
        run_kappa_atlas(cfg, KillAfter(tmp_path / "killed", 3, device="cpu"))
    again = Recording(tmp_path / "killed", device="cpu")  # reads the last checkpoint
    saved = len(again.load_state("atlas")["scores"])
    assert 3 <= saved < 6
    out = run_kappa_atlas(cfg, again)
    assert out["resumed_at"] == saved
    assert len(again.scored) == 6 - saved  # only the unscored archs are scored again
    assert f"arch {saved + 1}/6 " in again.scored[0]
    pd.testing.assert_frame_equal(_csv(again, 0), _csv(whole, 0), check_exact=True)


def test_config_refuses_what_cannot_run():
    for bad in ({"chunk": 4, "n_chunks": 4}, {"limit": 3, "n_chunks": 4},
                {"unique": True, "limit": 7000}, {"bn_modes": []},
                {"variants": ["bare", "bare"]}):
        with pytest.raises(ValueError):
            AtlasConfig.model_validate(bad)
    assert score_columns(AtlasConfig(limit=1, bn_modes=("coupled",), variants=("arch",))) == [
        "coupled.kappa_arch", "coupled.kappa_arch_flagged"]


def test_builtin_study_plans_the_chunks():
    from nasrisk.study.plan import RunOptions, build_plan, count_trials
    from nasrisk.study.spec import load_spec
    from nasrisk.trials.kinds.kappa_atlas import atlas_size, extra_params

    spec = load_spec("evas-atlas")
    for profile, n, size in (("smoke", 2, 200), ("paper", 250, 15_625), ("unique", 100, 6_466)):
        trials = build_plan(spec, RunOptions(profile=profile)).stages[0].trials
        assert len(trials) == n and count_trials(spec, profile) == [("atlas", n)]
        cfgs = [AtlasConfig.model_validate(t.config) for t in trials]
        assert sorted(c.chunk for c in cfgs) == list(range(n))
        assert {c.n_chunks for c in cfgs} == {n} and {atlas_size(c) for c in cfgs} == {size}
        assert sum(extra_params(c)["chunk_size"] for c in cfgs) == size


# -- the report, from real MLflow runs ---------------------------------------------------------
@pytest.fixture(scope="module")
def chunk_tables(tmp_path_factory):
    """Two real chunks of a 6-arch atlas (modes eval and coupled, the bare variant)."""
    root = tmp_path_factory.mktemp("atlas")
    cfg = {**TINY, "limit": 6, "n_chunks": 2, "bn_modes": ["eval", "coupled"],
           "variants": ["bare"]}
    out = {}
    for c in (0, 1):
        ctx = LocalContext(root / str(c), device="cpu")
        metrics = run_kappa_atlas({**cfg, "chunk": c}, ctx)
        out[c] = (ctx.artifact_dir / f"atlas_chunk_{c}.csv", {**cfg, "chunk": c}, metrics)
    return out


def _log_chunk(client, exp_id, path, cfg, metrics):
    from nasrisk.study import tags

    run = client.create_run(exp_id, run_name=f"c{cfg['chunk']:04d}", tags={
        tags.ROLE: tags.ROLE_TRIAL, tags.STATUS: "done", tags.KIND: "kappa_atlas",
        tags.STAGE: "atlas", tags.STUDY: "evas-atlas"})
    rid = run.info.run_id
    for k, v in {**cfg, "atlas_size": 6}.items():
        client.log_param(rid, k, json.dumps(v) if isinstance(v, list) else v)
    for k, v in metrics.items():
        client.log_metric(rid, k, v)
    client.log_artifact(rid, str(path))
    client.set_terminated(rid, "FINISHED")


def test_report_assembles_chunks_from_mlflow(tmp_path, chunk_tables):
    import mlflow

    from nasrisk.analysis.reports import REPORTS

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("evas-atlas", artifact_location=(tmp_path / "a").as_uri())
    _log_chunk(client, exp, *chunk_tables[0])
    partial = REPORTS["evas-atlas"](uri, "evas-atlas", tmp_path / "r1", n_boot=50)
    assert partial.missing_chunks == [1] and partial.atlas["index"].tolist() == [0, 2, 4]

    _log_chunk(client, exp, *chunk_tables[1])
    archs = atlas_archs(unique=False, limit=6)
    search = client.create_experiment("evas-search", artifact_location=(tmp_path / "s").as_uri())
    from nasrisk.study import tags

    srun = client.create_run(search, run_name="s0000 evolution", tags={
        tags.ROLE: tags.ROLE_TRIAL, tags.STATUS: "done", tags.KIND: "evas_search"})
    found = tmp_path / "found.json"
    found.write_text(json.dumps([{"arch": archs[4], "score": 1.0}]))
    client.log_artifact(srun.info.run_id, str(found))
    rep = REPORTS["evas-atlas"](uri, "evas-atlas", tmp_path / "r2", n_boot=200)

    atlas = pd.read_csv(rep.atlas_csv)
    assert atlas["index"].tolist() == list(range(6)) and atlas["arch"].tolist() == archs
    assert rep.missing_chunks == [] and rep.hist.stat().st_size > 0 and rep.ecdf.stat().st_size
    a, b = atlas["eval.kappa_bare"].to_numpy(float), atlas["coupled.kappa_bare"].to_numpy(float)
    ok = np.isfinite(a) & np.isfinite(b)
    row = rep.agreement.set_index("method").loc["spearman"]
    assert row["modes"] == "eval vs coupled" and row["n"] == ok.sum()
    assert row["r"] == pytest.approx(sps.spearmanr(a[ok], b[ok]).statistic, abs=1e-12)
    assert row["ci_low"] <= row["r"] <= row["ci_high"]
    kendall = rep.agreement.set_index("method").loc["kendall", "r"]
    assert kendall == pytest.approx(sps.kendalltau(a[ok], b[ok]).statistic, abs=1e-12)
    placed = pd.read_csv(rep.placed_csv)
    hit = placed[placed["group"] == "found"].iloc[0]
    assert hit["arch"] == archs[4] and hit["matched_by"] == "string"
    expect = 100 * ((a < a[4]).sum() + 0.5 * (a == a[4]).sum()) / 6
    assert hit["eval.kappa_bare.pct"] == pytest.approx(expect)
    text = rep.table_md.read_text()
    assert "eval vs coupled" in text and f"{row['r']:.3f}" in text
    assert not math.isnan(row["r"])
