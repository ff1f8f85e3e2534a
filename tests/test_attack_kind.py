"""The ``attack`` trial kind (PROTOCOLS 4): every attack through the kind with a LocalContext,
victims trained once through the store, overlap indices shared across models, ``params``
switching the PGD/NES settings, and resume from saved parts."""

import numpy as np
import pytest
import torch

from nasrisk.trials import victims
from nasrisk.trials.attacks import pgd as pgd_module
from nasrisk.trials.attacks.entry import fixed_indices
from nasrisk.trials.attacks.pgd import pgd, pgd_params, pgd_targeted_case
from nasrisk.trials.attacks.targets import select_correct
from nasrisk.trials.context import LocalContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.kinds import attack as attack_kind
from nasrisk.trials.registry import TRIAL_KINDS
from nasrisk.trials.train import TrainConfig
from nasrisk.trials.victims import VictimSpec, ensure_victim, victim_data

# a cheap NATS cell (two convs) that learns MNIST digits above chance in 2 short epochs
ARCH = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"
TRAIN = TrainConfig(epochs=2, batch_size=32, lr=0.1, nesterov=True, augment="none", amp=False,
                    eval_each_epoch=False)
VICTIM = {"model": "nats", "model_kwargs": {"arch": ARCH, "C": 8, "N": 1},
          "dataset": "embedded", "train": TRAIN.model_dump(), "seed": 0,
          "max_train_examples": 1000, "max_test_examples": 200}
# an untrained DARTS-space victim: a second model of the same dataset, at no training cost
OTHER = {"model": "darts", "model_kwargs": {"C": 4, "layers": 3}, "dataset": "embedded",
         "train": {"epochs": 0, "amp": False}, "max_train_examples": 100,
         "max_test_examples": 200}
NES_SMALL = {"nes_queries_per_estimate": 20}
# most queries one input can cost (most-/least-likely): NES 1 clean + 3 / 7 iterations x
# (20 + 1 check); PGD `paper` 1 clean + 5 restarts x (3 / 7 iterations + 1)
MAX_QUERIES = {"nes": {"m": 1 + 3 * 21, "l": 1 + 7 * 21},
               "pgd_targeted": {"m": 1 + 5 * 4, "l": 1 + 5 * 8}}

run_attack = TRIAL_KINDS.get("attack")


def ctx_for(path, store):
    return LocalContext(path, device="cpu", store_root=store)


def count_training(monkeypatch) -> list:
    calls = []
    real = victims.train

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(victims, "train", counting)
    return calls


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The first attack trial on a fresh store: it has to train the victim."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("attack")
    store = root / "store"
    ctx = ctx_for(root / "t0", store)
    out = run_attack({"victim": VICTIM, "attack": "pgd_targeted", "n_inputs": 16}, ctx)
    return store, root, ctx, out


@pytest.mark.outcome
def test_first_trial_trains_victim_and_victim_stage_loads_it(first, monkeypatch):
    store, root, ctx, out = first
    assert out["victim_trained"] == 1.0
    # chance is 0.1: the victim learnt something. Measured (victim seeds 0-4 x native AVX512 /
    # ATEN_CPU_CAPABILITY=default): 0.22-0.66, seed 0 (this test) 0.54 / 0.60. The spread is
    # BatchNorm running statistics lagging the weights after 2 short epochs; a 4-epoch lr-0.05
    # victim gives 0.93-0.96 but then PGD `paper` fools as few as 1 of 16 inputs, which the
    # artifact-vs-paper test below needs > 0: this setup keeps both margins.
    assert out["victim_acc"] > 0.2
    key = VictimSpec(**VICTIM).key()
    assert (store / f"{key}.pt").exists()
    calls = count_training(monkeypatch)
    model, record = ensure_victim(VictimSpec(**VICTIM), ctx_for(root / "victim-stage", store))
    assert calls == [] and record["source"] == "store"
    assert record["acc"] == pytest.approx(out["victim_acc"])
    assert attack_kind.extra_params(attack_kind.AttackConfig(victim=VICTIM,
                                                             attack="nes"))["lineage_key"] == key


@pytest.mark.parametrize("attack, keys", [
    ("pgd_targeted", ["asr_m", "asr_l", "pgd_queries_m", "pgd_queries_l"]),
    ("pgd_sweep", [f"asr_eps_{e}" for e in (1, 2, 4, 8, 16)]),
    ("nes", ["nes_asr_m", "nes_asr_l", "nes_queries_m", "nes_queries_l"]),
    ("pgd_overlap", ["overlap_fooled"]),
])
def test_every_attack_runs_through_the_kind(first, attack, keys, tmp_path, monkeypatch):
    store, _, _, _ = first
    calls = count_training(monkeypatch)
    ctx = ctx_for(tmp_path, store)
    cfg = {"victim": VICTIM, "attack": attack, "n_inputs": 8, **NES_SMALL}
    out = run_attack(cfg, ctx)
    assert calls == [] and out["victim_trained"] == 0.0  # loaded, never retrained
    assert 0 < out["victim_acc"] <= 1
    for k in keys:
        assert k in out
    for k in keys:
        if "queries" in k:
            assert 1 < out[k] <= MAX_QUERIES[attack][k[-1]]
        else:
            assert 0.0 <= out[k] <= 1.0
    if attack == "pgd_sweep":  # the same start for every eps: a bigger ball fools more
        asr = [out[f"asr_eps_{e}"] for e in (1, 2, 4, 8, 16)]
        assert asr[-1] >= asr[0] and asr[-1] > 0
    name = "overlap.npz" if attack == "pgd_overlap" else f"{attack}.npz"
    with np.load(ctx.artifact_dir / name) as z:
        assert len(z["indices"]) == out["n_attacked"] or attack == "pgd_overlap"
        if attack in MAX_QUERIES:  # the per-input counts are in the artifact
            q, ok = z["queries_m"], z["success_m"]
            assert (q <= MAX_QUERIES[attack]["m"]).all() and (q >= 2).all()
            assert (q[~ok] == MAX_QUERIES[attack]["m"]).all()  # failures spent the budget
            metric = "pgd_queries_m" if attack == "pgd_targeted" else "nes_queries_m"
            assert out[metric] == pytest.approx(q.mean())
        if attack == "nes":  # 1 clean query + whole iterations (estimate + success check)
            assert ((z["queries_m"] - 1) % 21 == 0).all()
    cfg_model = run_attack.config_model.model_validate(cfg)
    assert run_attack.trial_name(cfg_model) == f"{attack} nats@embedded"
    assert run_attack.extra_params(cfg_model)["family"] == "nats"


def test_overlap_same_indices_across_models(first, tmp_path):
    store, _, _, _ = first
    masks = {}
    for name, victim in (("nats", VICTIM), ("darts", OTHER)):
        ctx = ctx_for(tmp_path / name, store)
        out = run_attack({"victim": victim, "attack": "pgd_overlap", "n_inputs": 24, "seed": 3},
                         ctx)
        with np.load(ctx.artifact_dir / "overlap.npz") as z:
            masks[name] = {k: z[k] for k in z.files}
        m = masks[name]
        assert len(m["indices"]) == 24 and len(np.unique(m["indices"])) == 24
        assert not (m["fooled"] & ~m["correct"]).any()  # a misclassified input is not fooled
        assert out["overlap_fooled"] == pytest.approx(m["fooled"].mean())
        assert out["overlap_clean_acc"] == pytest.approx(m["correct"].mean())
        # the clean verdicts are the model's own on those test indices
        model, _ = ensure_victim(VictimSpec(**victim), ctx)
        data = victim_data(VictimSpec(**victim), ctx, load_dataset("embedded"))
        pred = model(data.x_test[m["indices"]].float() / 255).argmax(1)
        assert np.array_equal(pred.eq(data.y_test[m["indices"]]).numpy(), m["correct"])
    np.testing.assert_array_equal(masks["nats"]["indices"], masks["darts"]["indices"])
    assert not np.array_equal(masks["nats"]["correct"], masks["darts"]["correct"])


@pytest.mark.outcome
def test_artifact_params_change_pgd_and_nes(first, tmp_path):
    store, root, _, paper = first
    ctx = ctx_for(tmp_path / "pgd", store)
    art = run_attack({"victim": VICTIM, "attack": "pgd_targeted", "n_inputs": 16,
                      "params": "artifact"}, ctx)
    # reference on the same inputs: the artifact settings without the 0.99 criterion
    model, _ = ensure_victim(VictimSpec(**VICTIM), ctx)
    data = victim_data(VictimSpec(**VICTIM), ctx, load_dataset("embedded"))
    x, y, _ = select_correct(model, data.x_test, data.y_test, 16, 0)
    with np.load(ctx.artifact_dir / "pgd_targeted.npz") as z:
        ok_art, targets = torch.as_tensor(z["success_m"]), torch.as_tensor(z["targets_m"])
    ref = pgd_targeted_case(model, x, y, case="most", params="artifact")
    assert torch.equal(ok_art, ref.success)
    p = pgd_params("most", "artifact")
    loose = pgd(model, x, y, eps=p.eps, step=p.step, iters=p.iters, targeted=True,
                targets=targets, random_start=False)
    assert not (ok_art & ~loose.success).any()  # the 0.99 criterion only removes successes
    # measured over victim seeds 0-4 x native / default kernels: artifact (7 its, p > 0.99)
    # fooled 0 of 16, the same iterates without the 0.99 criterion 3-9, paper ASR(M) 0.125-0.56
    assert ok_art.sum() < loose.success.sum()
    assert art["asr_m"] < paper["asr_m"]
    # NES: `paper` 3 / 7 iterations of 400 queries, `artifact` 7 of 100 (+1 check each, +1
    # clean query per input)
    for params, per, iters in (("paper", 400, {"m": 3, "l": 7}),
                               ("artifact", 100, {"m": 7, "l": 7})):
        c = ctx_for(tmp_path / f"nes-{params}", store)
        run_attack({"victim": VICTIM, "attack": "nes", "params": params, "n_inputs": 2}, c)
        with np.load(c.artifact_dir / "nes.npz") as z:
            for tag, k in iters.items():
                q, ok = z[f"queries_{tag}"], z[f"success_{tag}"]
                assert set(q.tolist()) <= {1 + j * (per + 1) for j in range(1, k + 1)}
                assert (q[~ok] == 1 + k * (per + 1)).all()


def test_params_default_to_the_victims():
    cfg = attack_kind.AttackConfig.model_validate(
        {"victim": {**VICTIM, "params": "artifact"}, "attack": "pgd_targeted"})
    assert cfg.params == "artifact"
    with pytest.raises(ValueError):
        attack_kind.AttackConfig.model_validate({"victim": VICTIM, "attack": "fgsm"})
    with pytest.raises(ValueError):
        attack_kind.AttackConfig.model_validate({"victim": VICTIM, "attack": "nes",
                                                 "nes_queries_per_estimate": 21})


def test_attack_options_are_the_entrys_and_only_the_trials_own_are_kept():
    validate = attack_kind.AttackConfig.model_validate
    stage = {"victim": VICTIM, "attack_options": {"nes": {"queries_per_estimate": 20}}}
    nes_cfg, pgd_cfg = validate({**stage, "attack": "nes"}), validate({**stage, "attack": "pgd_sweep"})
    assert nes_cfg.options().queries_per_estimate == 20
    # a stage-wide NES option is not part of a PGD trial's config (key, MLflow params)
    assert pgd_cfg.model_dump() == validate({"victim": VICTIM, "attack": "pgd_sweep"}).model_dump()
    assert pgd_cfg.attack_options == {"pgd_sweep": {}}
    # the four attacks of before attack_options dump as then (existing workdirs' trial keys)
    assert set(nes_cfg.model_dump()) == {"victim", "attack", "n_inputs", "params", "seed",
                                         "batch_size", "nes_queries_per_estimate"}
    assert nes_cfg.model_dump()["nes_queries_per_estimate"] == 20
    assert pgd_cfg.model_dump()["nes_queries_per_estimate"] is None
    # the flat field of older study files is the same option (and wins over attack_options)
    sugar = validate({"victim": VICTIM, "attack": "nes", "nes_queries_per_estimate": 20})
    assert sugar.model_dump() == nes_cfg.model_dump()
    assert validate({**stage, "attack": "nes", "nes_queries_per_estimate": 40}
                    ).options().queries_per_estimate == 40
    assert validate(nes_cfg.model_dump()) == nes_cfg  # the dumped config validates back
    # every attack's options are checked, in every trial: a typo fails the PGD trials too
    for bad, says in (({"nes": {"queries": 20}}, "attack_options.nes: queries"),
                      ({"nes": {"queries_per_estimate": 21}}, "even"),
                      ({"fgsm": {}}, "unknown attack 'fgsm'; valid: nes, pgd_overlap")):
        with pytest.raises(ValueError, match=says):
            validate({"victim": VICTIM, "attack": "pgd_targeted", "attack_options": bad})
    with pytest.raises(ValueError, match="valid: nes, pgd_overlap, pgd_sweep, pgd_targeted"):
        validate({"victim": VICTIM, "attack": "fgsm"})


def test_metric_names_and_params_come_from_the_entry():
    from nasrisk.study import tags
    from nasrisk.trials.registry import ATTACKS

    for name in ("pgd_targeted", "pgd_sweep", "nes", "pgd_overlap"):
        cfg = attack_kind.AttackConfig.model_validate({"victim": VICTIM, "attack": name})
        assert run_attack.metric_names(cfg) == (
            "victim_acc", "victim_trained", "n_attacked", *ATTACKS.get(name).metrics)
        assert set(run_attack.metric_names(cfg)) <= set(run_attack.metric_names())
        params = run_attack.extra_params(cfg)
        assert params[tags.P_LINEAGE_KEY] == VictimSpec(**VICTIM).key()
        assert params[tags.P_PARENT_KEY] == "" and params[tags.P_POISON_FRACTION] == 0.0
        assert params[tags.P_LINEAGE] == "nats@embedded" and params[tags.P_ATTACK] == name
    poisoned = attack_kind.AttackConfig.model_validate(
        {"victim": {**VICTIM, "poison_fraction": 0.2}, "attack": "nes"})
    params = run_attack.extra_params(poisoned)
    assert params[tags.P_POISON_FRACTION] == 0.2
    assert params[tags.P_LINEAGE] == "nats@embedded -> label_flip(fraction=0.2)"
    assert params[tags.P_LINEAGE_KEY] == VictimSpec(**VICTIM, poison_fraction=0.2).key()
    assert params[tags.P_PARENT_KEY] == VictimSpec(**VICTIM).key()


def test_retried_trial_reuses_finished_parts(first, monkeypatch):
    store, root, ctx, out = first

    def boom(*a, **kw):
        raise AssertionError("a finished part was recomputed")

    monkeypatch.setattr(pgd_module, "pgd_targeted_case", boom)
    again = run_attack({"victim": VICTIM, "attack": "pgd_targeted", "n_inputs": 16},
                       ctx_for(root / "t0", store))
    assert again["asr_m"] == out["asr_m"] and again["asr_l"] == out["asr_l"]


def test_overlap_indices_do_not_depend_on_the_model():
    a = fixed_indices(200, 24, 3)
    assert torch.equal(a, fixed_indices(200, 24, 3))
    assert not torch.equal(a, fixed_indices(200, 24, 4))
    assert torch.equal(a, a.sort().values) and len(a.unique()) == 24
