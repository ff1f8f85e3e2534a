"""EVAS evaluation (issue 9, "Evaluation: built-in study evas-eval"): the stored generator,
the ``evas_eval`` trial on (a) and (c), the ``trigger_mix`` step, the defense trial's
``generator`` trigger source, the ``neighbours`` selector and the study's plan.

Tiny real setups: a 1-cell NATS net (C=4) on 128 embedded digits, one epoch; a generator of
channels (4, 8, 8), one mask and one pattern epoch on 64 images. Outcome claims (ASR above
the base rate) are not asserted: shapes, names, keys and counts only."""

from __future__ import annotations

import pytest
import torch

from nasrisk.trials.backdoor import evas_store
from nasrisk.trials.backdoor.evas_store import GeneratorSpec, ensure_generator, generator_key
from nasrisk.trials.context import LocalContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.kinds.evas_eval import METRICS, EvasEvalConfig
from nasrisk.trials.models.nats.arch_string import OPS
from nasrisk.trials.registry import TRIAL_KINDS
from nasrisk.trials.steps.trigger_mix import TriggerMixStep, mix
from nasrisk.trials.store import Store
from nasrisk.trials.victims import VictimSpec, ensure_victim

ARCH = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|skip_connect~1|nor_conv_3x3~2|"
MODEL = {"model": "nats", "model_kwargs": {"arch": ARCH, "C": 4, "N": 1}, "dataset": "embedded",
         "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "amp": False, "augment": "none",
                   "eval_each_epoch": False},
         "max_train_examples": 128, "max_test_examples": 64}
GEN = {"config": {"mask_epochs": 1, "pattern_epochs": 1, "batch_size": 32,
                  "channels": [4, 8, 8]}, "train_examples": 64}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("evas-eval-store")


def _ctx(tmp_path, store, name="t"):
    return LocalContext(tmp_path / name, device="cpu", store_root=store)


def test_generator_trained_once_and_keyed_by_the_model(store, tmp_path, monkeypatch):
    calls = []
    real = evas_store.train_generator
    monkeypatch.setattr(evas_store, "train_generator",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    spec, gspec = VictimSpec(**MODEL), GeneratorSpec(**GEN)
    g1, r1 = ensure_generator(spec, gspec, _ctx(tmp_path, store, "a"))
    g2, r2 = ensure_generator(spec, gspec, _ctx(tmp_path, store, "b"))  # another trial
    assert len(calls) == 1 and (r1["source"], r2["source"]) == ("computed", "store")
    assert r1["key"] == r2["key"] == generator_key(spec, gspec) and r1["model_key"] == spec.key()
    assert 0.0 <= r2["asr"] <= 1.0 and r2["acc"] == r1["acc"]
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(g1(x), g2(x))  # the stored weights, not a fresh generator
    other = VictimSpec(**{**MODEL, "seed": 1})
    assert generator_key(other, gspec) != r1["key"]
    assert generator_key(spec, GeneratorSpec(**{**GEN, "seed": 1})) != r1["key"]
    assert Store(store).record(r1["key"])["kind"] == "generator"


def test_evas_eval_table1_and_retrain(store, tmp_path):
    kind = TRIAL_KINDS.get("evas_eval")
    a = {"model": MODEL, "generator": GEN, "n_inputs": 40}
    out = kind(a, _ctx(tmp_path, store, "a"))
    assert set(out) == set(METRICS) == set(kind.metric_names(kind.validate(a)))
    assert all(isinstance(v, float) for v in out.values())
    assert 0.0 <= out["asr"] <= 1.0 and 0.0 <= out["acc"] <= 1.0
    # (a): model and generator trained on the same model, ACC/ASR on the same test inputs
    # (generator_acc over the whole 64-image test subset, acc over 40 of them)
    # (c) re-training: the same generator (from the store), applied to another seed's model
    # (``trained_on: {seed: 0}``: the model's base fields, at seed 0)
    c = {"model": {**MODEL, "seed": 1}, "generator": {**GEN, "trained_on": {"seed": 0}},
         "n_inputs": 40}
    out_c = kind(c, _ctx(tmp_path, store, "c"))
    assert set(out_c) == set(METRICS)
    assert out_c["generator_trained"] == 0.0 and out_c["model_trained"] == 1.0
    assert out_c["generator_asr"] == out["generator_asr"]
    pa, pc = kind.extra_params(kind.validate(a)), kind.extra_params(kind.validate(c))
    assert pa["generator_key"] == pc["generator_key"] and pa["lineage_key"] != pc["lineage_key"]
    assert {"lineage_key", "parent_key", "lineage", "generator_key"} <= set(pa)
    assert (tmp_path / "c" / "artifacts" / "triggers.png").exists() or any(
        (tmp_path / "c").rglob("triggers.png"))
    assert EvasEvalConfig.model_validate(c).trained_on() == VictimSpec(**MODEL)
    b = {"model": {**MODEL, "steps": [{"kind": "fine_tune"}]},
         "generator": {**GEN, "trained_on": {}}}
    assert EvasEvalConfig.model_validate(b).trained_on() == VictimSpec(**MODEL)  # (b)
    with pytest.raises(ValueError, match="trained_on"):
        EvasEvalConfig.model_validate({**c, "generator": {**GEN, "trained_on": {
            "dataset": "cifar10"}}})


def test_trigger_mix_composes_and_its_ratio_keys(store, tmp_path):
    mixstep = {"kind": "trigger_mix", "ratio": 0.1, "generator": GEN, "epochs": 1}
    spec = VictimSpec(**{**MODEL, "steps": [{"kind": "fine_tune", "epochs": 1}, mixstep]})
    model, rec = ensure_victim(spec, _ctx(tmp_path, store))
    assert set(rec["metrics"]) == {"acc", "asr", "parent_asr", "n_mixed"}
    assert rec["metrics"]["n_mixed"] == round(0.1 * 128)
    assert rec["parent_key"] == VictimSpec(**{**MODEL, "steps": [
        {"kind": "fine_tune", "epochs": 1}]}).key()
    keys = {VictimSpec(**{**MODEL, "steps": [{**mixstep, "ratio": r}]}).key()
            for r in (0.1, 0.01, 0.0001)}
    assert len(keys) == 3
    assert VictimSpec(**{**MODEL, "steps": [{**mixstep, "label": "true"}]}).key() not in keys
    # the mix itself: exactly the chosen non-target images change, relabelled the target
    data = load_dataset("embedded").subset(128, 16)
    gen, _ = ensure_generator(VictimSpec(**MODEL), GeneratorSpec(**GEN), _ctx(tmp_path, store))
    cfg = TriggerMixStep(ratio=0.25, generator=GEN)
    x, y, idx = mix(data, gen, cfg, 0, "cpu")
    assert len(idx) == 32 and bool((data.y_train[idx] != 0).all()) and bool((y[idx] == 0).all())
    rest = torch.ones(128, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(x[rest], data.x_train[rest]) and torch.equal(y[rest], data.y_train[rest])
    assert not torch.equal(x[idx], data.x_train[idx])
    _, y_true, _ = mix(data, gen, cfg.model_copy(update={"label": "true"}), 0, "cpu")
    assert torch.equal(y_true, data.y_train)


def test_defense_runs_with_the_generator_trigger(store, tmp_path):
    kind = TRIAL_KINDS.get("defense")
    config = {"victim": MODEL, "defense": "strip", "n_inputs": 8,
              "trigger": {"source": "generator", "generator": GEN},
              "defense_options": {"strip": {"n_superimpose": 2, "pool": 8}}}
    out = kind(config, _ctx(tmp_path, store, "d"))
    assert set(out) == set(kind.metric_names(kind.validate(config)))
    assert 0.0 <= out["model_asr"] <= 1.0  # the generator's trigger inputs were measured
    key = generator_key(VictimSpec(**MODEL), GeneratorSpec(**GEN))
    by_key = kind({**config, "trigger": {"source": "generator", "object_key": key}},
                  _ctx(tmp_path, store, "k"))
    assert by_key["model_asr"] == out["model_asr"]
    with pytest.raises(ValueError, match="one of"):
        kind.validate({**config, "trigger": {"source": "generator"}})


CENTER = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|nor_conv_3x3~1|avg_pool_3x3~2|"


def test_neighbours_selector_is_the_papers_landscape():
    from nasrisk.study.selectors import SELECTORS
    from nasrisk.trials.models.nats.arch_string import parse_arch

    sel = SELECTORS.get("neighbours")
    src = [{"key": f"k{i}", "run_id": f"r{i}", "name": "", "index": i,
            "config": {"model": {"model_kwargs": {"arch": a}}}, "metrics": {}}
           for i, a in enumerate([CENTER, CENTER, ARCH])]
    got = sel.select(src, sel.validate({"edges": [0, 5]}))
    archs = [g["row"]["arch"] for g in got]
    assert len(archs) == len(set(archs))  # each arch once, however many sources name it
    for center in (CENTER, ARCH):
        mine = [g for g in got if g["row"]["center"] == center]
        c = parse_arch(center)
        two = [parse_arch(g["row"]["arch"]) for g in mine if g["row"]["group"] == "edges"]
        assert len(two) == 25 and tuple(c) in two
        assert all(o[i] == c[i] for o in two for i in (1, 2, 3, 4))
        assert {(o[0], o[5]) for o in two} == {(a, b) for a in OPS for b in OPS}
        convs = [i for i, op in enumerate(c) if "conv" in op]
        conv = [parse_arch(g["row"]["arch"]) for g in mine if g["row"]["group"] == "conv"]
        # every conv assignment not already among the 25 (those differing only on edges 0, 5)
        assert len(conv) + sum(1 for o in two if all(
            (o[i] in ("nor_conv_1x1", "nor_conv_3x3")) if i in convs else o[i] == c[i]
            for i in range(6))) == 2 ** len(convs)
        assert all(o[i] == c[i] or i in convs for o in conv for i in range(6))
    assert len(got) <= sel.max_trials(3, sel.validate({"edges": [0, 5]}))
    assert len(sel.select(src, sel.validate({"arch": CENTER, "conv": False}))) == 25
    with pytest.raises(ValueError, match="two different edges"):
        sel.validate({"edges": [2, 2]})


@pytest.mark.parametrize("profile", ["smoke", "paper", "artifact"])
def test_evas_eval_study_shares_one_generator_per_model(profile):
    """`nasrisk plan evas-eval` under every profile; every later stage measures a generator
    that table1 trains (same store key), so each is trained once per model."""
    from nasrisk.study.plan import RunOptions, build_plan
    from nasrisk.study.spec import load_spec
    from nasrisk.trials.kinds.defense import DefenseConfig

    plan = build_plan(load_spec("evas-eval"), RunOptions(profile=profile))
    keys: dict[str, set[str]] = {}
    for st in plan.stages:
        for t in st.trials:
            if t.kind == "evas_eval":
                cfg = EvasEvalConfig.model_validate(t.config)
                keys.setdefault(st.spec.name, set()).add(
                    generator_key(cfg.trained_on(), cfg.generator))
                for step in cfg.model.steps:
                    if step.kind == "trigger_mix":
                        keys["mix_step"] = keys.get("mix_step", set()) | {generator_key(
                            cfg.model.base(), step.config().generator)}
            elif t.kind == "defense":
                d = DefenseConfig.model_validate(t.config)
                keys.setdefault("defenses", set()).add(generator_key(d.victim, d.trigger.generator))
    table1 = keys.pop("table1")
    assert set(keys) == {"finetune", "retrain", "mix", "mix_step", "defenses"}
    for stage, ks in keys.items():
        assert ks <= table1, stage


def test_report_tables_keep_each_runs_values_together():
    """The report's mix table sorts by model and ratio with each value on its run's row (a
    ratio column built apart from the rows it belongs to was once misaligned), and the paper
    shape has one row per model, ACC/ASR per dataset."""
    import pandas as pd

    from nasrisk.analysis.reports.evas_eval import _eval_table, paper_shape

    runs = pd.DataFrame({"run_id": ["r0", "r1", "r2", "r3"],
                         "param.model": ["nats", "nats", "nats", "resnet18"],
                         "param.arch": ["|b|", "|a|", "|b|", None],
                         "param.dataset": ["cifar10"] * 3 + ["cifar100"],
                         "param.lineage": ["x"] * 4, "param.mix_ratio": [0.1, 0.5, 0.01, 0.1],
                         "acc": [0.1, 0.5, 0.01, 0.7], "asr": [0.9, 0.4, 0.8, 0.3]})
    mix = _eval_table(runs, mix=True)
    assert list(mix["run_id"]) == ["r3", "r1", "r2", "r0"]  # by model label, then ratio
    assert (mix["ratio"] == mix["acc"]).iloc[1:].all()  # each ratio on its own run's row
    wide = paper_shape(_eval_table(runs))
    assert list(wide["model"]) == ["resnet18", "|a|", "|b|"]
    assert wide.loc[wide["model"] == "|b|", "cifar10 ACC"].item() == pytest.approx(0.055)
    assert {"cifar10 ASR", "cifar100 ACC"} <= set(wide.columns)


def test_report_landscape_grid_is_the_two_swept_edges():
    import pandas as pd

    from nasrisk.analysis.reports.evas_eval import landscape_grid
    from nasrisk.study.selectors import neighbour_archs
    from nasrisk.trials.models.nats.arch_string import parse_arch

    rows = neighbour_archs(CENTER, (1, 4), True)
    nb = pd.DataFrame({"arch": [a for a, _ in rows],
                       "asr": [OPS.index(parse_arch(a)[1]) / 10 + OPS.index(parse_arch(a)[4])
                               / 100 + (parse_arch(a)[0] != "nor_conv_3x3")  # off-centre
                               for a, _ in rows]}, index=range(100, 100 + len(rows)))
    grid = landscape_grid(nb)
    assert grid.shape == (5, 5) and (grid.index.name, grid.columns.name) == ("edge 1", "edge 4")
    # the conv-assignment archs (other edges changed) stay out of the cells
    assert grid.loc["avg_pool_3x3", "skip_connect"] == pytest.approx(0.4 + 0.01)
    assert grid.loc["skip_connect", "nor_conv_3x3"] == pytest.approx(0.1 + 0.03)  # the centre
