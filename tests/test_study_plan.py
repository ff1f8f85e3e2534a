"""Study files -> validated plans: keys, profiles, overrides, one-line errors."""

import pytest
import yaml

from nasrisk.study.plan import RunOptions, build_plan, trial_key
from nasrisk.study.spec import builtin_names, load_spec, spec_to_yaml
from nasrisk.trials.errors import UserError


def write(tmp_path, data, name="s.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


CAL = {
    "name": "cal", "default_profile": "smoke",
    "stages": [{"name": "probe", "kind": "calibrate", "config": {"epochs": 1},
                "grid": {"index": [0, 1, 2]}}],
    "profiles": {"smoke": {"config": {"size": 8}}, "big": {"stages": {"probe": {
        "grid": {"index": [0, 1, 2, 3, 4]}, "resources": {"cpu": 2}}}}},
}


def test_builtin_studies_plan_under_every_profile():
    assert {"evas-kappa", "calibrate"} <= set(builtin_names())
    for name in builtin_names():
        spec = load_spec(name)
        for prof in spec.profiles:
            plan = build_plan(spec, RunOptions(profile=prof))
            assert plan.n_trials > 0
            keys = [t.key for s in plan.stages for t in s.trials]
            assert len(keys) == len(set(keys))


def test_evas_profiles_have_the_promised_sizes():
    spec = load_spec("evas-kappa")
    smoke = build_plan(spec, RunOptions(profile="smoke"))
    paper = build_plan(spec, RunOptions(profile="paper"))
    assert len(smoke.stages[0].trials) >= 24
    assert len(paper.stages[0].trials) == 900
    t = smoke.stages[0].trials[0]
    assert t.config["dataset"] == "embedded" and t.config["C"] == 8
    assert paper.stages[0].trials[0].config["train"]["epochs"] == 200
    assert paper.stages[0].trials[0].config["dataset"] == "cifar10"


def test_grid_profile_overrides_and_resources(tmp_path):
    spec = load_spec(write(tmp_path, CAL))
    smoke = build_plan(spec, RunOptions())
    assert [t.config["index"] for t in smoke.stages[0].trials] == [0, 1, 2]
    assert smoke.stages[0].trials[0].config["size"] == 8
    big = build_plan(spec, RunOptions(profile="big", cpus_per_trial=0.5))
    assert len(big.stages[0].trials) == 5 and big.stages[0].resources.cpu == 0.5


def test_keys_are_deterministic_and_config_sensitive(tmp_path):
    spec = load_spec(write(tmp_path, CAL))
    a = build_plan(spec, RunOptions()).stages[0].trials
    b = build_plan(spec, RunOptions()).stages[0].trials
    assert [t.key for t in a] == [t.key for t in b]
    c = build_plan(spec, RunOptions(seed=1)).stages[0].trials
    assert a[0].key != c[0].key
    assert trial_key("s", "st", "k", {"a": 1, "b": 2}) == trial_key("s", "st", "k", {"b": 2, "a": 1})


def test_show_yaml_round_trips(tmp_path):
    text = spec_to_yaml(load_spec("evas-kappa"))
    p = tmp_path / "copy.yaml"
    p.write_text(text)
    again = build_plan(load_spec(str(p)), RunOptions())
    orig = build_plan(load_spec("evas-kappa"), RunOptions())
    assert [t.key for t in again.stages[0].trials] == [t.key for t in orig.stages[0].trials]


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(bogus=1), "bogus: unknown field"),
    (lambda d: d["stages"][0].update(kind="nope"), "unknown trial kind 'nope'"),
    (lambda d: d["stages"][0]["config"].update(epochs=-1), "epochs"),
    (lambda d: d["stages"][0]["config"].update(colour="red"), "colour: unknown field"),
    (lambda d: d["stages"][0].update(needs=["later"]), "needs 'later'"),
    (lambda d: d["profiles"]["smoke"].update(stages={"nostage": {}}), "unknown stage 'nostage'"),
])
def test_bad_study_files_name_the_problem(tmp_path, mutate, needle):
    import copy

    d = copy.deepcopy(CAL)
    mutate(d)
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        build_plan(load_spec(write(tmp_path, d)), RunOptions())


def test_unknown_profile_and_dataset():
    spec = load_spec("evas-kappa")
    with pytest.raises(UserError, match="unknown profile 'huge'.*smoke"):
        build_plan(spec, RunOptions(profile="huge"))
    with pytest.raises(UserError, match="unknown dataset 'mnist3d'"):
        build_plan(spec, RunOptions(dataset="mnist3d"))


def test_cases_merge_and_cross_with_the_grid(tmp_path):
    d = {"name": "cases", "stages": [{"name": "probe", "kind": "calibrate",
                                      "config": {"epochs": 1, "size": 4},
                                      "cases": [{"size": 8}, {"size": 16, "epochs": 2}],
                                      "grid": {"index": [0, 1, 2]}}],
         "profiles": {"smoke": {"seed": 7}}}
    plan = build_plan(load_spec(write(tmp_path, d)), RunOptions())
    cfgs = [t.config for t in plan.stages[0].trials]
    assert len(cfgs) == 6
    assert sorted((c["size"], c["epochs"], c["index"]) for c in cfgs) == [
        (8, 1, 0), (8, 1, 1), (8, 1, 2), (16, 2, 0), (16, 2, 1), (16, 2, 2)]
    assert all(c["seed"] == 7 for c in cfgs)


def test_profile_values_reach_nested_configs():
    from pydantic import BaseModel, ConfigDict

    from nasrisk.study.plan import _inject

    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        dataset: str = "cifar10"
        seed: int = 0

    class Outer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        victim: Inner = Inner()
        seed: int = 0

    cfg = {"victim": {"dataset": "cifar10"}}
    _inject(cfg, Outer, {"dataset": "embedded", "seed": 3, "params": None})
    assert cfg == {"victim": {"dataset": "embedded", "seed": 3}, "seed": 3}


def test_a_stage_wide_nes_setting_changes_only_the_nes_trials(tmp_path):
    d = yaml.safe_load(spec_to_yaml(load_spec("automl-risks")))
    before = build_plan(load_spec(write(tmp_path, d)), RunOptions()).stages[2].trials
    d["profiles"]["smoke"]["stages"]["attacks"]["config"]["nes_queries_per_estimate"] = 20
    after = build_plan(load_spec(write(tmp_path, d)), RunOptions()).stages[2].trials
    changed = {a.config["attack"] for a, b in zip(before, after, strict=True) if a.key != b.key}
    assert changed == {"nes"}
    assert all("nes_queries_per_estimate" not in t.config or t.config["attack"] == "nes"
               or t.config["nes_queries_per_estimate"] is None for t in after)


def test_unique_takes_one_arch_per_isomorphism_class():
    from nasrisk.study.plan import N_UNIQUE, RunOptions, build_plan
    from nasrisk.study.spec import load_spec
    from nasrisk.trials.models.nats.arch_string import isomorphism_key, unique_archs

    assert N_UNIQUE == len(unique_archs())
    plan = build_plan(load_spec("evas-kappa"), RunOptions(all_archs=True, unique=True))
    archs = [t.config["arch"] for t in plan.stages[0].trials]
    assert len(archs) == N_UNIQUE == len({isomorphism_key(a) for a in archs})
    # the atlas scores the classes: --unique sets its `unique` field
    atlas = build_plan(load_spec("evas-atlas"), RunOptions(unique=True))
    assert all(t.config["unique"] for s in atlas.stages for t in s.trials)
    assert not any(t.config["unique"] for s in build_plan(load_spec("evas-atlas"),
                                                          RunOptions()).stages for t in s.trials)
