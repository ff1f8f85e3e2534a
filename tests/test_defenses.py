"""Backdoor defenses (issue 9 (e)): NeuralCleanse flags a BadNet target and not a clean model,
STRIP tells patched from clean inputs, Fine-Pruning prunes exactly the asked channels, the
``defense`` trial kind on a lineage, and a sweep over every DEFENSES entry.

The outcome tests share one pair of tiny CNNs (a clean one and a BadNet one: 10% of 1,500
embedded digits patched and relabelled 0, 4 epochs from scratch; about 3 s), trained once per
module. The kind and the sweep use a tiny NATS lineage (base + badnet) made once in a store.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nasrisk.trials.context import LocalContext, TrialContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.data.base import ImageData
from nasrisk.trials.defenses.entry import DefenseInputs
from nasrisk.trials.defenses.fine_pruning import (
    FinePruningOptions,
    channel_activity,
    dormant_mask,
    find_layer,
    fine_pruning,
    pruned,
)
from nasrisk.trials.defenses.neural_cleanse import (
    CONSISTENCY,
    NeuralCleanseOptions,
    anomaly_indices,
    neural_cleanse,
)
from nasrisk.trials.defenses.strip import StripOptions, auroc, strip, strip_entropy
from nasrisk.trials.defenses.triggers import PatchTrigger, patch_trigger
from nasrisk.trials.models.wrapper import Normalized
from nasrisk.trials.registry import DEFENSES, TRIAL_KINDS
from nasrisk.trials.steps.badnet import BadNetStep, patch_asr, poison
from nasrisk.trials.train import TrainConfig, evaluate, train

TRIGGER = PatchTrigger()  # 3x3 seeded random patch, bottom right, target 0


def _cnn(seed: int, data: ImageData) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    return Normalized(net, data.info.mean, data.info.std)


@pytest.fixture(scope="module")
def pair():
    """(clean CNN, BadNet CNN, data): both trained with the one loop from the same init."""
    data = load_dataset("embedded").subset(1500, 300)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.1, augment="none", eval_each_epoch=False)
    clean = _cnn(0, data)
    train(clean, data, cfg, seed=0, ctx=TrialContext(device="cpu"))
    x, y, _ = poison(data, BadNetStep(fraction=0.1), seed=0)
    bad = _cnn(0, data)
    train(bad, ImageData(data.info, x, y, data.x_test, data.y_test), cfg, seed=0,
          ctx=TrialContext(device="cpu"))
    return clean.eval(), bad.eval(), data


def inputs_of(data: ImageData, trigger: PatchTrigger | None = TRIGGER, n: int = 200,
              seed: int = 0) -> DefenseInputs:
    return DefenseInputs(x=data.x_test[:n], y=data.y_test[:n],
                         trigger=None if trigger is None else patch_trigger(trigger),
                         defender=data, num_classes=10, seed=seed)


@pytest.mark.outcome
def test_the_shared_backdoor_is_planted(pair):
    # measured (pair seeds 0-3, native and ATEN_CPU_CAPABILITY=default): ASR 0.996-1.0 against
    # a base rate <= 0.015, clean accuracy 0.87-0.91 for both models
    clean, bad, data = pair
    assert patch_asr(bad, data.x_test, data.y_test, TRIGGER, device="cpu") > 0.9
    assert patch_asr(clean, data.x_test, data.y_test, TRIGGER, device="cpu") < 0.1
    assert evaluate(bad, data.x_test, data.y_test, device="cpu") > 0.8


@pytest.mark.outcome
def test_neural_cleanse_flags_the_badnet_target_and_not_the_clean_model(pair):
    # measured at these options (pair seeds 0-3, native and ATEN_CPU_CAPABILITY=default):
    # backdoored target-class index 2.36-4.75 (mask L1 4-8 px vs median 23-32), class 0
    # flagged in all 8 runs; clean model: target-class index 0.20-0.97. On the clean model the
    # smallest-norm class was an outlier (index > 2) in 1 of the 8 runs (seed 1, default
    # kernels): NeuralCleanse's false positives on a tiny net, so the clean assertion is about
    # the target class, as the issue states it (index <= 2, not the flagged class)
    clean, bad, data = pair
    opts = NeuralCleanseOptions(steps=300, batch_size=12, n_inputs=256, init_cost=1e-2)
    out_bad = neural_cleanse(bad, inputs_of(data), opts)
    assert out_bad["nc_anomaly_index"] > 2 and out_bad["nc_flagged"] == 1.0
    assert out_bad["nc_flagged_class"] == 0.0
    assert out_bad["nc_target_norm"] < 0.5 * out_bad["nc_median_norm"]
    out_clean = neural_cleanse(clean, inputs_of(data), opts)
    assert out_clean["nc_anomaly_index"] <= 2 and out_clean["nc_flagged_class"] != 0.0
    assert out_clean["nc_target_norm"] > 0.5 * out_clean["nc_median_norm"]


def test_anomaly_index_is_the_mad_outlier_score():
    norms = torch.tensor([10.0, 11.0, 12.0, 13.0, 2.0])
    index, med = anomaly_indices(norms)
    assert med == 11.0
    mad = CONSISTENCY * 1.0  # |deviations| = 1, 0, 1, 2, 9 -> median 1
    assert torch.allclose(index, torch.tensor([1.0, 0.0, 1.0, 2.0, 9.0], dtype=torch.float64)
                          / mad, atol=1e-12)


@pytest.mark.outcome
def test_strip_tells_patched_from_clean_inputs(pair):
    # measured (pair seeds 0-3, native and default kernels, 10 blends): AUROC 0.945-1.0 on the
    # BadNet model, 0.476-0.511 on the clean model with the same patch (it means nothing there)
    clean, bad, data = pair
    opts = StripOptions(n_superimpose=10, pool=300)
    out = strip(bad, inputs_of(data), opts)
    assert out["strip_auroc"] > 0.8
    assert out["strip_entropy_trigger"] < out["strip_entropy_clean"]
    assert out["strip_frr_at_far"] < 0.6
    assert abs(strip(clean, inputs_of(data), opts)["strip_auroc"] - 0.5) < 0.15


def test_strip_entropy_and_auroc_match_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    x, pool = torch.rand(7, 3, 2, 2, dtype=torch.float64), torch.rand(9, 3, 2, 2,
                                                                      dtype=torch.float64)
    got = strip_entropy(model, x, pool, n=4, alpha=0.5, seed=3, batch_size=8)
    picks = torch.randint(0, 9, (7, 4), generator=torch.Generator().manual_seed(3))
    for i in range(7):
        hs = []
        for j in picks[i]:
            p = model((0.5 * x[i] + 0.5 * pool[j])[None]).softmax(1)[0].detach()
            hs.append(-sum(float(q) * math.log2(float(q)) for q in p))
        assert abs(float(got[i]) - sum(hs) / 4) < 1e-8
    pos, neg = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.0, 2.0])
    pairs = [(a > b) + 0.5 * (a == b) for a in pos.tolist() for b in neg.tolist()]
    assert auroc(pos, neg) == pytest.approx(sum(pairs) / len(pairs))


@pytest.mark.outcome
def test_fine_pruning_removes_exactly_the_asked_channels(pair):
    _, bad, data = pair
    x = data.x_train[:64].float() / 255
    module, on_input = find_layer(bad, "net.4", x)  # the last conv's ReLU: 32 channels
    assert module is bad.net[4] and not on_input
    activity = channel_activity(bad, module, on_input, x)
    seen: list[torch.Tensor] = []  # what the layer after the pruned one sees
    h = bad.net[5].register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
    for ratio in (0.25, 0.5, 0.9):
        keep = dormant_mask(activity, ratio)
        assert int((~keep).sum()) == round(ratio * 32)
        assert activity[~keep].max() <= activity[keep].min()  # the most dormant ones
        with pruned(module, on_input, keep):
            bad(x)
        after = seen[-1]
        assert torch.all(after[:, ~keep] == 0)
        assert torch.all(after[:, keep].abs().sum((0, 2, 3)) > 0)
    h.remove()
    # hooks are gone: the model is unchanged
    assert len(bad.net[4]._forward_hooks) == 0 and len(bad.net[5]._forward_pre_hooks) == 0

    opts = FinePruningOptions(layer="net.4", ratios=(0.5, 0.9), epochs=1, n_train=500,
                              n_rank=200, batch_size=32)
    before = {k: v.clone() for k, v in bad.state_dict().items()}
    out = fine_pruning(bad, inputs_of(data), opts, TrialContext(device="cpu"))
    assert set(out) == set(DEFENSES.get("fine_pruning").metric_names(opts))
    assert out["fp_channels"] == 32 and out["fp_pruned_r50"] == 16 and out["fp_pruned_r90"] == 29
    # pruning 90% of the last layer costs clean accuracy, fine-tuning wins some back
    # (measured, seeds 0-2: 0.88-0.91 -> 0.38-0.56 pruned -> higher after one epoch)
    assert out["fp_acc_pruned_r90"] < out["fp_acc_before"] - 0.1
    assert out["fp_acc_ft_r90"] > out["fp_acc_pruned_r90"]
    assert all(0 <= out[k] <= 1 for k in out if "_acc_" in k or "_asr_" in k)
    assert all(torch.equal(before[k], v) for k, v in bad.state_dict().items())  # on a copy


def test_fine_pruning_auto_layer_is_the_classifier_input(pair):
    _, bad, data = pair
    module, on_input = find_layer(bad, "auto", data.x_train[:4].float() / 255)
    assert module is bad.net[7] and on_input
    with pytest.raises(ValueError, match="no module"):
        find_layer(bad, "net.99", data.x_train[:4].float() / 255)


# -- the defense kind on a lineage ----------------------------------------------------------------
ARCH = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
BASE = dict(model="nats", model_kwargs={"arch": ARCH, "C": 4, "N": 1}, dataset="embedded",
            train=dict(epochs=1, batch_size=32, lr=0.05, augment="none",
                       eval_each_epoch=False), max_train_examples=128, max_test_examples=64)
BADNET = {"kind": "badnet", "epochs": 1, "fraction": 0.1, "target": 3}
#: a tiny config of each defense (a defense not listed runs with its defaults)
TINY_OPTIONS = {"neural_cleanse": {"steps": 5, "n_inputs": 32, "batch_size": 4},
                "strip": {"n_superimpose": 4, "pool": 32},
                "fine_pruning": {"ratios": [0.5], "epochs": 1, "n_rank": 32, "n_train": 32}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding the tiny lineage base + badnet (made once)."""
    from nasrisk.trials.victims import VictimSpec, ensure_victim

    root = tmp_path_factory.mktemp("defense-store")
    ensure_victim(VictimSpec(**BASE, steps=[BADNET]),
                  LocalContext(root / "make", device="cpu", store_root=root / "store"))
    return root / "store"


def config(defense: str, **kw) -> dict:
    return {"victim": {**BASE, "steps": [BADNET]}, "defense": defense,
            "defense_options": TINY_OPTIONS, "n_inputs": 32, **kw}


def test_every_defense_is_swept():
    assert set(TINY_OPTIONS) <= set(DEFENSES.names())


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_sweep(name, store, tmp_path):
    entry = DEFENSES.get(name)
    assert entry.source and entry.metrics
    defaults = entry.options()  # every option has a default
    assert set(entry.metric_names(defaults)) <= set(entry.metrics) or entry.metrics_for
    with pytest.raises(ValueError):
        entry.options.model_validate({"no_such_option": 1})
    kind = TRIAL_KINDS.get("defense")
    cfg = kind.validate(config(name))
    assert cfg.defense_options == {name: entry.options.model_validate(
        TINY_OPTIONS.get(name, {})).model_dump(mode="json")}  # only its own options kept
    out = kind(config(name), LocalContext(tmp_path / name, device="cpu", store_root=store))
    assert set(out) == set(kind.metric_names(cfg)) and set(out) <= set(kind.metric_names())
    assert all(isinstance(v, float) for v in out.values())
    assert out["model_trained"] == 0.0  # the lineage came from the store, not retrained
    assert 0 <= out["model_asr"] <= 1


def test_defense_kind_trigger_sources_and_errors(store, tmp_path):
    kind = TRIAL_KINDS.get("defense")
    # the trigger from the lineage is the badnet step's patch, with its target
    nc = kind(config("neural_cleanse"), LocalContext(tmp_path / "a", device="cpu",
                                                     store_root=store))
    assert nc["model_asr"] == nc["model_asr"]  # a trigger was known (not NaN)
    clean = {**config("neural_cleanse"), "victim": BASE}
    out = kind(clean, LocalContext(tmp_path / "b", device="cpu", store_root=store))
    assert math.isnan(out["model_asr"])  # a clean lineage has no trigger: NC runs blind
    with pytest.raises(ValueError, match="needs trigger inputs"):
        kind.validate({**config("strip"), "victim": BASE})
    patched = {**config("strip"), "victim": BASE,
               "trigger": {"source": "patch", "patch": {"target": 3}}}
    assert kind.validate(patched).trigger.patch.target == 3
    with pytest.raises(ValueError, match="takes one of"):  # the generator names its source
        kind.validate({**config("neural_cleanse"), "trigger": {"source": "generator"}})
    with pytest.raises(ValueError, match="unknown defense"):
        kind.validate(config("no_such_defense"))
    with pytest.raises(ValueError, match="defense_options.strip"):
        kind.validate({**config("neural_cleanse"), "defense_options": {"strip": {"bad": 1}}})
    # another defense's options change neither the config nor the trial key
    a = kind.validate({**config("strip"), "defense_options": {"strip": TINY_OPTIONS["strip"]}})
    assert a == kind.validate(config("strip"))
    params = kind.extra_params(a)
    assert params["lineage_key"] == a.victim.key() and params["defense"] == "strip"
    assert params["parent_key"] == a.victim.parent_key() != ""
