"""Derived stages without Ray: selectors on plain items (and a sweep over every registered
one), the plan of a derived stage (its checks, its upper bound, derive_trials), the runner's
stage gating (`needs`) and the items it builds from MLflow runs and their artifacts."""

from __future__ import annotations

import copy
import json
import math

import pytest
import yaml

from nasrisk.study.plan import RunOptions, build_plan, count_trials, derive_trials, trial_key
from nasrisk.study.selectors import SELECTORS, item_value
from nasrisk.study.spec import load_spec, spec_from_yaml, spec_to_yaml
from nasrisk.trials.errors import UserError


def items(values, key_prefix="k"):
    """One trial item per value, in plan order."""
    return [{"key": f"{key_prefix}{i}", "run_id": f"r{i}", "name": f"t{i}", "index": i,
             "config": {"index": i}, "metrics": {} if v is None else {"value": v}}
            for i, v in enumerate(values)]


def rows(n_runs, n_rows):
    """Artifact-row items: run i holds rows with score 10*i + j."""
    return [{**it, "row": {"score": 10 * i + j, "arch": f"a{i}.{j}"}, "row_index": j}
            for i, it in enumerate(items([0.0] * n_runs)) for j in range(n_rows)]


def pick(name, its, **cfg):
    sel = SELECTORS.get(name)
    return sel.select(its, sel.validate(cfg))


def idx(its):
    return [it["index"] for it in its]


# -- selectors on plain items --------------------------------------------------------------

def test_top_k_orders_best_first_and_breaks_ties_by_plan_order():
    its = items([1.0, 3.0, 3.0, 2.0, 0.5])
    assert idx(pick("top_k", its, k=2, metric="value", mode="max")) == [1, 2]
    assert idx(pick("top_k", its, k=3, metric="value", mode="max")) == [1, 2, 3]
    assert idx(pick("top_k", its, k=2, metric="value", mode="min")) == [4, 0]
    assert idx(pick("top_k", its, k=9, metric="value", mode="max")) == [1, 2, 3, 0, 4]
    # reversed plan order: the tie flips with it
    rev = list(reversed(its))
    assert idx(pick("top_k", rev, k=1, metric="value", mode="max")) == [2]


def test_best_min_and_max():
    its = items([2.0, -1.0, 5.0, 5.0])
    assert idx(pick("best", its, metric="value", mode="max")) == [2]
    assert idx(pick("best", its, metric="metrics.value", mode="min")) == [1]


def test_non_finite_and_missing_values_rank_last_whatever_the_mode():
    its = items([math.inf, 1.0, math.nan, 2.0, None, -math.inf])
    assert idx(pick("best", its, metric="value", mode="max")) == [3]
    assert idx(pick("best", its, metric="value", mode="min")) == [1]
    assert idx(pick("top_k", its, k=6, metric="value", mode="max")) == [3, 1, 0, 2, 4, 5]
    assert idx(pick("top_k", its, k=6, metric="value", mode="min")) == [1, 3, 0, 2, 4, 5]


def test_every_kth_of_trials_and_of_each_runs_artifact_rows():
    assert idx(pick("every_kth", items([0.0] * 7), k=3)) == [0, 3, 6]
    assert idx(pick("every_kth", items([0.0] * 2), k=5)) == [0]
    got = pick("every_kth", rows(2, 5), k=2, artifact="trajectory.json")
    assert [(it["key"], it["row_index"]) for it in got] == [
        ("k0", 0), ("k0", 2), ("k0", 4), ("k1", 0), ("k1", 2), ("k1", 4)]


def test_each_result_and_per_run_best_of_rows():
    its = items([3.0, 1.0, 2.0])
    assert pick("each_result", its) == its
    best = pick("best", rows(3, 4), metric="row.score", mode="min", per_run=True,
                artifact="trajectory.json")
    assert [it["row"]["arch"] for it in best] == ["a0.0", "a1.0", "a2.0"]
    top = pick("top_k", rows(2, 4), k=2, metric="row.score", mode="max", per_run=True,
               artifact="t.json")
    assert [it["row"]["arch"] for it in top] == ["a0.3", "a0.2", "a1.3", "a1.2"]


def test_selector_bounds():
    sel = SELECTORS.get
    assert sel("best").max_trials(5, sel("best").validate({"metric": "v", "mode": "max"})) == 1
    assert sel("top_k").max_trials(3, sel("top_k").validate(
        {"k": 5, "metric": "v", "mode": "max"})) == 3
    assert sel("every_kth").max_trials(7, sel("every_kth").validate({"k": 3})) == 3
    assert sel("every_kth").max_trials(7, sel("every_kth").validate(
        {"k": 3, "artifact": "t.json"})) is None  # rows per run: known once the source ran
    assert sel("top_k").max_trials(4, sel("top_k").validate(
        {"k": 2, "metric": "row.s", "mode": "max", "per_run": True, "artifact": "t.json"})) == 8


@pytest.mark.parametrize("name", SELECTORS.names())
def test_every_registered_selector(name):
    """Registry sweep: the example config validates; selecting from trial items (and, for a
    selector that reads artifacts, from row items) returns items that each descend from a
    given one (its key and run), within the selector's bound, the same on a second call."""
    sel = SELECTORS.get(name)
    assert sel.description
    cfg = sel.validate(sel.example)
    its = items([0.3, 0.9, 0.1, 0.7, 0.5])
    got = sel.select(its, cfg)
    runs = {(it["key"], it["run_id"]) for it in its}
    assert got and all((g["key"], g["run_id"]) in runs for g in got)
    assert len(got) <= sel.max_trials(len(its), cfg)
    assert sel.select(its, cfg) == got
    if "artifact" in sel.config_model.model_fields:
        rcfg = sel.validate({**sel.example, "artifact": "rows.json"})
        assert sel.artifact(rcfg) == "rows.json"
        r = rows(3, 4)
        got = sel.select(r, rcfg)
        assert sel.rows(rcfg) and all("row" in g for g in got)
        assert got and all((g["key"], g["run_id"]) in runs for g in got)
        bound = sel.max_trials(3, rcfg)
        assert bound is None or len(got) <= bound


def test_item_paths():
    it = {**items([1.5])[0], "config": {"victim": {"arch": "|x|"}}, "row": {"a": {"b": 2}}}
    assert item_value(it, "config.victim.arch") == "|x|"
    assert item_value(it, "metrics.value") == 1.5
    assert item_value(it, "row.a.b") == 2
    assert item_value(it, "run_id") == "r0"
    with pytest.raises(LookupError, match="no metrics.kappa"):
        item_value(it, "metrics.kappa")
    with pytest.raises(ValueError, match="not a path"):
        item_value(it, "metric.value")


# -- plans -----------------------------------------------------------------------------------

TWO = {
    "name": "two", "default_profile": "smoke",
    "stages": [
        {"name": "score", "kind": "calibrate", "config": {"epochs": 1, "size": 8},
         "grid": {"index": [0, 1, 2, 3]}},
        {"name": "best", "kind": "calibrate", "from": "score",
         "select": {"selector": "top_k", "k": 2, "metric": "value", "mode": "max"},
         "take": {"index": "config.index"}, "config": {"epochs": 3},
         "grid": {"size": [4, 8]}},
        {"name": "again", "kind": "calibrate", "from": "best",
         "select": {"selector": "each_result"}, "take": {"index": "index", "size": "config.size"}},
    ],
    "profiles": {"smoke": {"seed": 3}, "paper": {"stages": {"best": {"select": {"k": 3}}}}},
}


def spec_of(tmp_path, d=TWO):
    p = tmp_path / "two.yaml"
    p.write_text(yaml.safe_dump(d))
    return load_spec(str(p))


def test_a_derived_stage_plans_no_trials_and_an_upper_bound(tmp_path):
    spec = spec_of(tmp_path)
    plan = build_plan(spec, RunOptions())
    score, best, again = plan.stages
    assert len(score.trials) == 4 and best.trials == [] and again.trials == []
    assert best.derived.upper == 2 * 2 and again.derived.upper == 4  # a chain: its source's bound
    assert plan.n_derived == 8
    assert count_trials(spec, "smoke") == [("score", 4), ("best", 4), ("again", 4)]
    paper = build_plan(spec, RunOptions(profile="paper"))
    assert paper.stages[1].derived.upper == 3 * 2 and paper.stages[1].derived.select.k == 3
    assert count_trials(spec, "paper") == [("score", 4), ("best", 6), ("again", 6)]


def test_plan_output_shows_the_derived_stage(tmp_path):
    from nasrisk.study.estimate import describe_plan

    text = describe_plan(build_plan(spec_of(tmp_path), RunOptions()), workdir=tmp_path / "wd")
    lines = text.splitlines()
    assert lines[0].endswith(": 4 trials + up to 8 derived"), text
    assert "  stage best (calibrate): derived from score: up to 4 trials, 1 CPU + 0 GPU each" in lines
    assert ("    selector top_k (k=2, metric=value, mode=max); take index <- config.index"
            in lines), text


def test_derived_stage_round_trips_through_yaml(tmp_path):
    spec = spec_of(tmp_path)
    text = spec_to_yaml(spec)
    assert "from: score" in text and "from_" not in text
    assert "from:" not in text.split("- name: best")[0]  # plain stages carry no from: null
    again = spec_from_yaml(text)
    assert again == spec
    a = build_plan(again, RunOptions()).stages[1].derived
    assert a == build_plan(spec, RunOptions()).stages[1].derived


def test_derive_trials_keys_names_and_grid(tmp_path):
    plan = build_plan(spec_of(tmp_path), RunOptions())
    score, best, _ = plan.stages
    its = [{"key": t.key, "run_id": f"run{i}", "name": t.name, "index": i, "config": t.config,
            "metrics": {"value": [0.2, 0.9, 0.4, 0.7][i]}} for i, t in enumerate(score.trials)]
    chosen = SELECTORS.get("top_k").select(its, best.derived.select)
    trials = derive_trials(plan, best, chosen)
    assert [(t.config["index"], t.config["size"], t.source_run_id) for t in trials] == [
        (1, 4, "run1"), (1, 8, "run1"), (3, 4, "run3"), (3, 8, "run3")]
    for t in trials:
        assert t.config["epochs"] == 3 and t.config["seed"] == 3  # stage config + profile seed
        assert t.key == trial_key("two", "best", "calibrate", t.config)
    assert [t.key for t in derive_trials(plan, best, chosen)] == [t.key for t in trials]
    # the same case from another source run is the same trial (one key, the first run)
    twice = derive_trials(plan, best, [chosen[0], {**chosen[0], "run_id": "other"}])
    assert [t.source_run_id for t in twice] == ["run1", "run1"]


@pytest.mark.parametrize("item_change,needles", [
    (lambda it: it["config"].pop("index"), ["stage best", "selected calibrate-00001 (run r1)",
                                            "take index", "config.index"]),
    (lambda it: it["config"].update(index=-4), ["stage best", "selected calibrate-00001",
                                                "index"]),
])
def test_a_selected_item_that_does_not_fit_is_named(tmp_path, item_change, needles):
    plan = build_plan(spec_of(tmp_path), RunOptions())
    t = plan.stages[0].trials[1]
    it = {"key": t.key, "run_id": "r1", "name": t.name, "index": 1,
          "config": copy.deepcopy(t.config), "metrics": {"value": 1.0}}
    item_change(it)
    with pytest.raises(UserError) as e:
        derive_trials(plan, plan.stages[1], [it])
    for n in needles:
        assert n in str(e.value)


def _change(d, path, value):
    d = copy.deepcopy(d)
    node = d
    for p in path[:-1]:
        node = node[p]
    if value is None:
        node.pop(path[-1])
    else:
        node[path[-1]] = value
    return d


@pytest.mark.parametrize("path,value,needle", [
    (["stages", 1, "from"], "nope", "from 'nope': no such stage"),
    (["stages", 1, "from"], "again", "from 'again': not an earlier stage"),
    (["stages", 1, "from"], "best", "from 'best': not an earlier stage"),
    (["stages", 1, "select", "selector"], "worst", "unknown selector 'worst'"),
    (["stages", 1, "select", "k"], 0, "select (top_k): k"),
    (["stages", 1, "select", "colour"], 1, "select (top_k): colour: unknown field"),
    (["stages", 1, "select", "mode"], None, "select (top_k): mode"),
    (["stages", 1, "take", "seed"], "metrics.kappa", "log no metric 'kappa'"),
    (["stages", 1, "select", "metric"], "kappa", "log no metric 'kappa'"),
    (["stages", 1, "take", "seed"], "config.nope", "'nope' is not a config field of calibrate"),
    (["stages", 1, "take", "nope"], "config.index", "take nope: not a config field"),
    (["stages", 1, "take", "seed"], "row.arch", "reads artifact rows"),
    (["stages", 1, "take", "size"], "index", "'size' is both taken"),
    (["stages", 1, "cases"], [{"size": 4}], "it has no cases"),
    (["stages", 1, "select"], None, "needs select"),
    (["stages", 0, "take"], {"index": "index"}, "stage score: take needs from"),
    (["profiles", "paper", "stages", "best", "select", "k"], -1, "profile paper, stage best"),
])
def test_bad_derived_stages_name_the_problem(tmp_path, path, value, needle):
    with pytest.raises(UserError) as e:
        spec = spec_of(tmp_path, _change(TWO, path, value))
        for prof in spec.profiles:
            build_plan(spec, RunOptions(profile=prof))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- the runner: gating and items ------------------------------------------------------------

GATED = {
    "name": "gated", "default_profile": "smoke",
    "stages": [
        {"name": "a", "kind": "calibrate", "grid": {"index": [0, 1]}},
        {"name": "b", "kind": "calibrate", "needs": ["a"], "grid": {"index": [2]}},
        {"name": "c", "kind": "calibrate", "grid": {"index": [3, 4, 5]}},
        {"name": "d", "kind": "calibrate", "from": "c",
         "select": {"selector": "best", "metric": "value", "mode": "min"},
         "take": {"index": "config.index"}, "config": {"epochs": 2}},
        {"name": "e", "kind": "calibrate", "from": "b", "select": {"selector": "each_result"}},
        {"name": "f", "kind": "calibrate", "needs": ["c", "e"]},
        {"name": "g", "kind": "calibrate", "from": "d", "select": {"selector": "each_result"},
         "take": {"index": "config.index"}, "grid": {"size": [4, 8]}},
    ],
    "profiles": {"smoke": {}},
}


def test_a_stage_runs_only_when_what_it_needs_is_complete(tmp_path, capsys):
    """a fails: b (needs a) is skipped, e (from b) and f (needs e) too, naming why; c, the
    stage derived from it (d) and the one derived from that (g) still run."""
    from nasrisk.study.runner import StageOutcome, StudyOutcome, run_stages

    plan = build_plan(spec_of(tmp_path, GATED), RunOptions())
    ran = []

    def run_stage(stage):
        ran.append((stage.spec.name, [t.config["index"] for t in stage.trials]))
        failed = [stage.trials[1].name] if stage.spec.name == "a" else []
        n = len(stage.trials)
        return StageOutcome(stage.spec.name, n, 0, n - len(failed), failed)

    def items_of(stage):
        src = plan.stage(stage.derived.source).trials  # d's trials once d has been derived
        return [{"key": t.key, "run_id": f"r{i}", "name": t.name, "index": i, "config": t.config,
                 "metrics": {"value": [5.0, 1.0, 3.0][i]}} for i, t in enumerate(src)]

    outs = run_stages(plan, run_stage, items_of, "nasrisk resume gated")
    assert ran == [("a", [0, 1]), ("c", [3, 4, 5]), ("d", [4]), ("g", [4, 4])]
    err = capsys.readouterr()
    skipped = [ln for ln in err.err.splitlines() if "skipped" in ln]
    assert skipped == ["[gated/b] skipped: needs a (1 trials failed)",
                       "[gated/e] skipped: needs b (skipped)",
                       "[gated/f] skipped: needs e (skipped)"]
    assert "[gated/d] derived 1 trials from c: 1 of 3 results selected by best" in err.out
    study = StudyOutcome("gated", "uri", "0", outs)
    assert study.skipped == ["b", "e", "f"] and study.failed == 1
    assert [o.blocked is None for o in outs] == [True, False, True, True, False, False, True]


def test_source_items_from_mlflow_runs_and_their_artifact_rows(tmp_path):
    """Items come from the source stage's done runs (metrics from MLflow, configs from the
    plan, plan order); with an artifact, one item per row of each run's JSON file; a run
    without that artifact is one line naming it."""
    from nasrisk.study import tags
    from nasrisk.study.runner import source_items
    from nasrisk.study.tracking import client, ensure_experiment

    d = _change(TWO, ["stages", 1, "select"], {"selector": "every_kth", "k": 2,
                                               "artifact": "traj/rows.json"})
    d = _change(d, ["stages", 1, "take"], {"index": "config.index", "seed": "row.step"})
    plan = build_plan(spec_of(tmp_path, d), RunOptions())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = ensure_experiment(uri, "two", tmp_path / "art")
    src = plan.stages[0].trials
    c = client(uri)
    for i, t in enumerate(src):            # the 4th is not done: not an item
        run = c.create_run(exp, run_name=t.name, tags={
            tags.STAGE: "score", tags.ROLE: "trial", tags.TRIAL_KEY: t.key,
            tags.STATUS: "done" if i < 3 else "failed"}).info.run_id
        art = tmp_path / f"a{i}" / "traj"
        art.mkdir(parents=True)
        (art / "rows.json").write_text(json.dumps([{"step": 10 * i + j} for j in range(3)]))
        c.log_artifacts(run, str(art.parent))
        c.log_metric(run, "value", float(i))
    got = source_items(plan, plan.stages[1], uri, exp)
    assert [(it["index"], it["row_index"], it["row"]["step"]) for it in got] == [
        (i, j, 10 * i + j) for i in range(3) for j in range(3)]
    assert got[4]["metrics"]["value"] == 1.0 and got[4]["config"] == src[1].config
    chosen = SELECTORS.get("every_kth").select(got, plan.stages[1].derived.select)
    trials = derive_trials(plan, plan.stages[1], chosen)
    assert sorted({(t.config["index"], t.config["seed"]) for t in trials}) == [
        (0, 0), (0, 2), (1, 10), (1, 12), (2, 20), (2, 22)]
    runs = {r.data.tags[tags.TRIAL_KEY]: r.info.run_id for r in c.search_runs([exp])}
    assert {t.source_run_id for t in trials} == {runs[t.key] for t in src[:3]}
    d2 = _change(d, ["stages", 1, "select", "artifact"], "missing.json")
    plan2 = build_plan(spec_of(tmp_path, d2), RunOptions())
    with pytest.raises(UserError, match=r"stage best: score trial calibrate-00000 \(run .*"
                                        r"cannot read its artifact missing.json") as e:
        source_items(plan2, plan2.stages[1], uri, exp)
    assert "\n" not in str(e.value)


def test_a_bound_known_only_after_the_source_runs_is_said_so(tmp_path):
    from nasrisk.study.estimate import describe_plan

    d = _change(TWO, ["stages", 1, "select"], {"selector": "every_kth", "k": 10,
                                               "artifact": "trajectory.json"})
    spec = spec_of(tmp_path, d)
    plan = build_plan(spec, RunOptions())
    assert plan.stages[1].derived.upper is None and plan.n_derived is None
    assert count_trials(spec, "smoke") == [("score", 4), ("best", None), ("again", None)]
    text = describe_plan(plan, workdir=tmp_path / "wd")
    assert "+ derived (how many is known once their sources have run)" in text.splitlines()[0]
    assert "derived from score: up to ? trials" in text
