"""Registry sweeps: every entry of MODELS, DATASETS, ATTACKS, METRICS and TRIAL_KINDS is
parametrized here at collection, so a new entry is tested the moment it is registered (and a
new kind of entry fails until it is given a tiny configuration below). Step kinds and
selectors have their sweeps beside them (tests/test_lineage.py, tests/test_derived_stage.py).

Everything runs on tiny real models (an untrained 3-cell DARTS victim on the embedded
digits, an 8x8 two-layer conv net) in a few seconds per entry."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from nasrisk.trials.attacks.entry import AttackEntry, mean
from nasrisk.trials.context import LocalContext
from nasrisk.trials.data import dataset_info, load_dataset
from nasrisk.trials.kinds.attack import AttackConfig, attack_names
from nasrisk.trials.metrics.entry import MetricEntry
from nasrisk.trials.models.darts import format_genotype, get_genotype
from nasrisk.trials.registry import ATTACKS, DATASETS, METRICS, MODELS, TRIAL_KINDS

# -- MODELS -------------------------------------------------------------------------------------
# the zoo families are swept by tests/test_model_zoo.py (build, forward, backward at 32x32);
# every other model needs tiny builder kwargs here
ZOO_FAMILIES = ("nas", "variant", "manual")
TINY_MODEL = {
    "nats": {"arch": "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|skip_connect~0|none~1|"
                     "nor_conv_1x1~2|", "C": 4, "N": 1},
    "genotype": {"genotype": format_genotype(get_genotype("darts")), "C": 4, "layers": 3},
}


@pytest.mark.parametrize("name", MODELS.names())
def test_model(name):
    meta = MODELS.meta(name)
    assert meta.get("family"), f"model {name!r} has no family metadata"
    if meta["family"] in ZOO_FAMILIES:
        return  # tests/test_model_zoo.py::test_builds_forward_backward[name]
    assert name in TINY_MODEL, f"model {name!r}: add its tiny kwargs to TINY_MODEL"
    torch.manual_seed(0)
    net = MODELS.get(name)(num_classes=5, input_size=16, **TINY_MODEL[name])
    out = net(torch.rand(2, 3, 16, 16))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 4])).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# -- DATASETS -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_info(name):
    info = dataset_info(name)
    assert info.name == name and DATASETS.meta(name)["info"] == info
    assert info.num_classes >= 2 and info.image_size >= 8 and info.description
    assert len(info.mean) == len(info.std) == 3
    assert all(0 <= m <= 1 for m in info.mean) and all(0 < s <= 1 for s in info.std)


def test_embedded_data_matches_its_info():
    # the one dataset that ships with the package: its arrays agree with its info
    info, data = dataset_info("embedded"), load_dataset("embedded")
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, info.image_size, info.image_size)
        assert len(x) == len(y) and 0 <= y.min() and y.max() < info.num_classes
    # normalised by the info's mean/std, the data is about zero-mean, unit-variance (another
    # dataset's statistics would be off by > 1). Measured: mean -0.096, std 0.90 per channel,
    # since the info holds MNIST's 28x28 statistics (0.1307, 0.3081) and the 2-pixel zero
    # padding to 32x32 makes the data's own 0.101 / 0.277
    z = (data.x_train.float().div(255) - torch.tensor(info.mean).view(1, 3, 1, 1)) \
        / torch.tensor(info.std).view(1, 3, 1, 1)
    assert (z.mean((0, 2, 3)).abs() < 0.15).all()
    assert ((z.std((0, 2, 3)) - 1).abs() < 0.15).all()


# -- ATTACKS (through the attack trial kind) ------------------------------------------------------
# an untrained DARTS network (3 cells, C=4) on 64 test digits: no training cost
VICTIM = {"model": "darts", "model_kwargs": {"C": 4, "layers": 3}, "dataset": "embedded",
          "train": {"epochs": 0, "amp": False}, "max_train_examples": 32,
          "max_test_examples": 64}
COMMON = ("victim_acc", "victim_trained", "n_attacked")
# options that keep an attack at a fraction of a second (its defaults otherwise)
TINY_ATTACK = {"nes": {"queries_per_estimate": 10}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep-store")


def _run_attack(store, tmp_path, name, **cfg):
    config = {"victim": VICTIM, "attack": name, "n_inputs": 3, "params": "artifact",
              "batch_size": 16, **cfg}
    ctx = LocalContext(tmp_path / name, device="cpu", store_root=store)
    return TRIAL_KINDS.get("attack")(config, ctx), ctx, AttackConfig.model_validate(config)


def test_every_attacks_entry_is_an_attack_entry():
    assert ATTACKS.names() == attack_names()  # an entry the attack kind cannot run is an error
    assert {"pgd_targeted", "pgd_sweep", "nes", "pgd_overlap"} <= set(ATTACKS.names())


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack(name, store, tmp_path):
    entry = ATTACKS.get(name)
    assert isinstance(entry, AttackEntry) and entry.threat and entry.source
    entry.options()  # the defaults validate
    with pytest.raises(ValueError):  # and the options model forbids unknown keys
        AttackConfig.model_validate({"victim": VICTIM, "attack": name,
                                     "attack_options": {name: {"no_such_option": 1}}})
    out, ctx, cfg = _run_attack(store, tmp_path, name,
                                attack_options={name: TINY_ATTACK.get(name, {})})
    kind = TRIAL_KINDS.get("attack")
    assert set(out) == set(kind.metric_names(cfg)) == {*COMMON, *entry.metrics}
    assert set(kind.metric_names(cfg)) <= set(kind.metric_names())
    assert 0 < out["n_attacked"] <= 3  # the sweep really attacked something
    with np.load(ctx.artifact_dir / entry.artifact_name(name)) as z:
        assert len(z["indices"]) == (out["n_attacked"] if entry.inputs == "correct" else 3)


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: float = 0.0


def run_toy(model, inputs, common, options, ctx, key):
    """One FGSM step of L-inf size ``scale``: untargeted success = the label changes (the
    sweep's untrained victim predicts one class: only scale 0 has a known ASR, 0)."""
    x = inputs.x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(x), inputs.y).backward()
    with torch.no_grad():
        fooled = model((x + options.scale * x.grad.sign()).clamp(0, 1)).argmax(1) != inputs.y
    return {"toy_asr": mean(fooled), "toy_scale": options.scale}, {"success": fooled}


def test_a_new_attack_is_one_registration(store, tmp_path, monkeypatch):
    """Registering an entry is all an attack needs: the kind validates its name and options,
    runs it, and names its metrics, with no other edit."""
    monkeypatch.setitem(ATTACKS._entries, "toy_noise", AttackEntry(
        run=run_toy, metrics=("toy_asr", "toy_scale"), options=ToyOptions, threat="white-box",
        source="test"))
    monkeypatch.setitem(ATTACKS._meta, "toy_noise", {})
    out, ctx, cfg = _run_attack(store, tmp_path, "toy_noise")
    assert set(out) == {*COMMON, "toy_asr", "toy_scale"} == set(
        TRIAL_KINDS.get("attack").metric_names(cfg))
    assert out["toy_asr"] == 0.0  # scale 0: the correctly classified inputs stay correct
    loud, _, cfg = _run_attack(store, tmp_path / "loud", "toy_noise",
                               attack_options={"toy_noise": {"scale": 0.5}})
    assert cfg.options() == ToyOptions(scale=0.5) and loud["toy_scale"] == 0.5  # reached it
    with pytest.raises(ValueError, match="toy_noise: scal"):
        AttackConfig.model_validate({"victim": VICTIM, "attack": "pgd_targeted",
                                     "attack_options": {"toy_noise": {"scal": 1}}})
    with np.load(ctx.artifact_dir / "toy_noise.npz") as z:
        assert set(z.files) == {"indices", "success"}


# -- METRICS ------------------------------------------------------------------------------------
def tiny_net(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, classes)).eval()


def tiny_generator() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Sigmoid())


def _inputs() -> dict:
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    return {"model": tiny_net(), "classifier": tiny_net(), "x": x,
            "y": torch.tensor([0, 1, 2, 0, 1, 2]), "build_classifier": tiny_net,
            "build_generator": tiny_generator}


# sizes that keep a metric at a fraction of a second (defaults otherwise)
TINY_METRIC = {"kappa": {"n_init": 1}, "loss_contour_params": {"steps": 3},
               "loss_contour_input": {"steps": 3}}


@pytest.mark.parametrize("name", METRICS.names())
def test_metric(name):
    entry = METRICS.get(name)
    assert isinstance(entry, MetricEntry) and entry.source
    # the config model is the function's keyword options, with the function's defaults
    sig = inspect.signature(entry.fn).parameters
    defaults = entry.config()
    for field in type(defaults).model_fields:
        default = sig[field].default
        got = getattr(defaults, field)
        assert got == (tuple(default) if isinstance(got, tuple) else default), field
    assert set(entry.takes) <= set(sig), "takes names the function's inputs"
    inputs = _inputs()
    missing = [t for t in entry.takes if t not in inputs]
    assert not missing, f"metric {name!r} takes {missing}: add tiny inputs to _inputs()"
    cfg = TINY_METRIC.get(name, {})
    out = entry.measure({t: inputs[t] for t in entry.takes}, cfg)
    assert set(out) == set(entry.metric_names(cfg))
    assert all(isinstance(v, float) and not math.isnan(v) for v in out.values()), out


# -- TRIAL_KINDS ---------------------------------------------------------------------------------
ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
# one tiny config per kind; run=False: only validated (none is, today: each runs in < 10 s)
TINY = {
    "calibrate": {"config": {"epochs": 2, "size": 8}, "run": True},
    "attack": {"config": {"victim": VICTIM, "attack": "pgd_targeted", "n_inputs": 2,
                          "params": "artifact"}, "run": True},
    # as tests/test_victim_kind.py's darts_config (epochs 0: the measurements, no training)
    "victim": {"config": {**VICTIM, "grad_var_samples": 8, "contour_steps": 3,
                          "contour_examples": 16}, "run": True},
    # as tests/test_evas_study.py's TINY, smaller still
    "evas": {"config": {
        "arch": ARCH, "dataset": "embedded", "C": 4, "N": 1, "seed": 0,
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.1, "grad_clip": None},
        "generator": {"mask_epochs": 1, "pattern_epochs": 1, "batch_size": 32,
                      "channels": [4, 8, 8]},
        "kappa": {"batch_size": 8, "n_init": 1}, "max_train_examples": 128,
        "max_test_examples": 64, "generator_train_examples": 64}, "run": True},
    "evas_search": {"config": {
        "pool_size": 3, "sample_size": 2, "iterations": 3, "dataset": "embedded", "C": 4,
        "N": 1, "kappa": {"batch_size": 8, "n_init": 1}, "generator_channels": [4, 8, 8],
        "max_train_examples": 128}, "run": True},
    "kappa_atlas": {"config": {"limit": 2, "dataset": "embedded", "C": 4, "N": 1, "batch_size": 4, "n_init": 1, "bn_modes": ["eval"], "variants": ["bare"], "max_train_examples": 128}, "run": True},
    "evas_eval": {"config": {"model": {**VICTIM, "train": {"epochs": 1, "amp": False}},
                             "generator": {"config": {"mask_epochs": 1, "pattern_epochs": 1,
                                                      "batch_size": 32, "channels": [4, 8, 8]},
                                           "train_examples": 32}, "n_inputs": 16}, "run": True},
    "defense": {"config": {"victim": {**VICTIM, "steps": [{"kind": "badnet", "epochs": 1}]},
                           "defense": "strip", "n_inputs": 4,
                           "defense_options": {"strip": {"n_superimpose": 2, "pool": 8}}},
                "run": True},
}


@pytest.mark.parametrize("name", TRIAL_KINDS.names())
def test_trial_kind(name, store, tmp_path):
    kind = TRIAL_KINDS.get(name)
    assert kind.metric_names(), f"kind {name!r} declares no metrics"
    assert name in TINY, f"kind {name!r}: add a tiny config to TINY"
    cfg = kind.validate(TINY[name]["config"])
    assert set(kind.metric_names(cfg)) <= set(kind.metric_names())
    kind.trial_name(cfg), kind.extra_params(cfg)  # noqa: B018 - both work on a valid config
    if TINY[name]["run"]:
        out = kind(TINY[name]["config"],
                   LocalContext(tmp_path / name, device="cpu", store_root=store))
        declared = set(kind.metric_names(cfg))
        assert set(out) == declared, (set(out) - declared, declared - set(out))
        assert all(isinstance(v, float) for v in out.values())


def test_model_kinds_log_the_param_names_the_report_reads():
    # trials/ does not import study/: the victim and attack kinds spell the store-key params
    # out, and they must be study/tags.py's names, which analysis/ reads
    from nasrisk.study import tags

    names = {tags.P_LINEAGE_KEY, tags.P_PARENT_KEY, tags.P_LINEAGE, tags.P_POISON_FRACTION,
             tags.P_FAMILY}
    for kind in ("victim", "attack"):
        k = TRIAL_KINDS.get(kind)
        assert names <= set(k.extra_params(k.validate(TINY[kind]["config"]))), kind
    attack = TRIAL_KINDS.get("attack")
    extra = attack.extra_params(attack.validate(TINY["attack"]["config"]))
    assert {tags.P_MODEL, tags.P_DATASET, tags.P_ATTACK} <= set(extra)
