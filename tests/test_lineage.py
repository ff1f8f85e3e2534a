"""Model lineage (issue 8 part 1): child keys, parents trained once, parent changes rebuild
children, pre-lineage keys migrate, stored objects, and a sweep over every step kind."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from nasrisk.trials.context import LocalContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.lineage import StepSpec
from nasrisk.trials.poison.label_flip import flip_labels
from nasrisk.trials.registry import STEP_KINDS
from nasrisk.trials.store import Store, check_payload, ensure_object, object_key
from nasrisk.trials.train import TrainConfig, train
from nasrisk.trials.victims import VictimSpec, build_victim, ensure_victim

ARCH = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|skip_connect~1|nor_conv_3x3~2|"
TINY_TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.05, amp=False, augment="none",
                         eval_each_epoch=False)
#: a tiny config of each step kind (a kind not listed is tried with its defaults)
TINY_STEPS = {"label_flip": {"fraction": 0.5}, "fine_tune": {"epochs": 1, "lr": 0.05},
              "trigger_mix": {"generator": {"config": {"mask_epochs": 1, "pattern_epochs": 1,
                                                        "batch_size": 32, "channels": [4, 8, 8]}}}}


def tiny(**kw) -> VictimSpec:
    base = dict(model="nats", model_kwargs={"arch": ARCH, "C": 4, "N": 1}, dataset="embedded",
                train=TINY_TRAIN, max_train_examples=64, max_test_examples=32)
    return VictimSpec(**{**base, **kw})


def ft(lr: float = 0.05, **kw) -> dict:
    return {"kind": "fine_tune", "epochs": 1, "lr": lr, **kw}


class Ctx(LocalContext):
    """A LocalContext that keeps its progress lines and the model runs asked of it."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, device="cpu", **kw)
        self.messages: list[str] = []
        self.runs: list[tuple[str, str, str]] = []
        self.used: list[tuple[str, str | None]] = []

    def progress(self, message: str) -> None:
        self.messages.append(message)

    def model_run(self, key, *, name, parent_key, step_kind, params, metrics,
                  parent_run_id=None):
        self.runs.append((key, parent_key, step_kind))
        return f"run-{key}"

    def model_used(self, key, run_id):
        self.used.append((key, run_id))


def trained_here(ctx: Ctx, spec: VictimSpec) -> bool:
    """Whether ``ctx`` trained the base of ``spec`` (its progress line says so)."""
    return any(m.startswith(f"model {spec.base().key()}: training") for m in ctx.messages)


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


# -- keys ---------------------------------------------------------------------------------------
def test_child_key_changes_when_any_ancestor_changes():
    base = tiny()
    child = tiny(steps=[ft(0.05)])
    grandchild = tiny(steps=[ft(0.05), ft(0.01)])
    assert child.parent() == base and grandchild.parent() == child
    assert grandchild.parent_key() == child.key() and child.parent_key() == base.key()
    assert base.parent() is None and base.parent_key() == ""
    assert grandchild.base() == base
    assert len({base.key(), child.key(), grandchild.key()}) == 3
    # the dump holds every resolved field: the defaults spelled out hash the same
    spelled = tiny(steps=[ft(0.05, batch_size=None, seed=None), ft(0.01)])
    assert spelled.key() == grandchild.key()
    assert VictimSpec.model_validate(grandchild.model_dump(mode="json")).key() == grandchild.key()

    # every ancestor's config reaches the leaf's key: the base seed, the first step's lr
    assert tiny(seed=1, steps=[ft(0.05), ft(0.01)]).key() != grandchild.key()
    assert tiny(seed=1, steps=[ft(0.05)]).key() != child.key()
    moved = tiny(steps=[ft(0.1), ft(0.01)])
    assert moved.key() != grandchild.key() and moved.parent_key() != child.key()
    assert tiny(steps=[ft(0.05), ft(0.02)]).key() != grandchild.key()
    assert tiny(steps=[ft(0.05)]).key() == child.key()  # the same lineage: the same key

    assert grandchild.describe() == ("nats@embedded -> fine_tune(epochs=1, lr=0.05) -> "
                                     "fine_tune(epochs=1, lr=0.01)")
    assert [d.get("kind") for d in grandchild.lineage()] == [None, "fine_tune", "fine_tune"]


def test_poison_fraction_is_a_label_flip_step():
    spec = tiny(poison_fraction=0.25)
    assert [s.dump() for s in spec.steps] == [{"kind": "label_flip", "fraction": 0.25}]
    assert spec == tiny(steps=[{"kind": "label_flip", "fraction": 0.25}])
    assert spec.poison_fraction == 0.25 and tiny().poison_fraction == 0.0
    assert tiny(poison_fraction=0.0) == tiny() and not tiny(poison_fraction=0.0).steps
    assert spec.parent_key() == tiny().key()
    assert spec.describe() == "nats@embedded -> label_flip(fraction=0.25)"
    assert "poison_fraction" not in VictimSpec.model_fields
    # the shorthand is also how such a spec dumps: trial keys of existing studies are kept
    assert spec.model_dump()["poison_fraction"] == 0.25 and "steps" not in spec.model_dump()
    assert tiny().model_dump()["poison_fraction"] == 0.0
    deeper = tiny(poison_fraction=0.25, steps=[ft()])
    assert [s.kind for s in deeper.steps] == ["label_flip", "fine_tune"]
    assert "poison_fraction" not in deeper.model_dump() and deeper.poison_fraction == 0.25
    assert VictimSpec.model_validate(deeper.model_dump()) == deeper


# -- the store walk ----------------------------------------------------------------------------
def test_label_flip_child_has_the_weights_of_a_poisoned_victim(tmp_path):
    """The step trains what the pre-lineage poisoned victim trained: the base network, the base
    recipe and seed, labels flipped by flip_labels seeded by the base seed."""
    spec = tiny(poison_fraction=0.25, seed=2)
    ctx = Ctx(tmp_path / "t", store_root=tmp_path / "s")
    model, record = ensure_victim(spec, ctx)
    assert not trained_here(ctx, spec)  # label_flip needs no trained parent
    assert Store(tmp_path / "s").keys() == [spec.key()]
    data = load_dataset("embedded").subset(64, 32)
    ref = build_victim(spec.base())
    labels = flip_labels(data.y_train, fraction=0.25, num_classes=10, seed=2)
    train(ref, data, TINY_TRAIN, seed=2, ctx=LocalContext(tmp_path / "r", device="cpu"),
          labels=labels)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert record["metrics"]["n_flipped"] == 16 and record["step_kind"] == "label_flip"
    assert record["parent_key"] == spec.base().key() and record["run_id"] == f"run-{spec.key()}"


def test_runs_and_records_along_a_lineage(tmp_path):
    leaf = tiny(steps=[ft(0.05), ft(0.01)])
    ctx = Ctx(tmp_path / "t", store_root=tmp_path / "s")
    _, record = ensure_victim(leaf, ctx)
    b, c = leaf.base().key(), leaf.parent().key()
    # one model run per entry made, parents first, each naming its parent
    assert ctx.runs == [(b, "", "base"), (c, b, "fine_tune"), (leaf.key(), c, "fine_tune")]
    assert ctx.used == [(leaf.key(), f"run-{leaf.key()}")]
    store = Store(tmp_path / "s")
    assert sorted(store.keys()) == sorted([b, c, leaf.key()])
    assert record["parent_sha256"] == store.sha256(c)
    assert store.record(c)["parent_sha256"] == store.sha256(b)
    assert record["lineage"] == leaf.lineage() and record["describe"] == leaf.describe()
    assert set(record["metrics"]) == {"acc_before", "acc_after"}
    assert record["acc"] == record["metrics"]["acc_after"]
    assert record["metrics"]["acc_before"] == pytest.approx(store.record(c)["acc"])
    again = Ctx(tmp_path / "t2", store_root=tmp_path / "s")
    _, r2 = ensure_victim(leaf, again)
    assert again.runs == [] and r2["source"] == "store" and r2["acc"] == record["acc"]


def _child_in_process(store: str, workdir: str, lr: float, out: str) -> None:
    torch.set_num_threads(1)
    spec = tiny(steps=[ft(lr)])
    ctx = Ctx(workdir, store_root=store)
    # both processes reach the parent's lock together: the loser must wait for the winner
    _, rec = ensure_victim(spec, ctx)
    Path(out).write_text(f"{int(trained_here(ctx, spec))} {rec['source']} {rec['parent_sha256']}")


def test_two_children_in_two_processes_train_their_parent_once(tmp_path):
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [ctx.Process(target=_child_in_process,
                         args=(str(tmp_path / "s"), str(tmp_path / f"t{i}"), lr, str(outs[i])))
             for i, lr in enumerate((0.05, 0.01))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [o.read_text().split() for o in outs]
    assert sorted(r[0] for r in results) == ["0", "1"]  # the parent was trained once
    assert [r[1] for r in results] == ["trained", "trained"]  # two different children
    store = Store(tmp_path / "s")
    base = tiny().key()
    assert results[0][2] == results[1][2] == store.sha256(base)
    assert sorted(store.keys()) == sorted([base, tiny(steps=[ft(0.05)]).key(),
                                           tiny(steps=[ft(0.01)]).key()])


def test_corrupt_or_changed_parent_never_carries_an_old_child(tmp_path):
    child = tiny(steps=[ft(0.05)], seed=4)
    store = Store(tmp_path / "s")
    _, first = ensure_victim(child, Ctx(tmp_path / "t1", store_root=store.root))
    base = child.base().key()

    # a corrupt parent is deleted and retrained; the child is only reused on top of the
    # very bytes it was made from (deterministic retraining gives them back here)
    _flip_byte(store.path(base))
    ctx = Ctx(tmp_path / "t2", store_root=store.root)
    _, second = ensure_victim(child, ctx)
    assert any("corrupt" in w and base in w for w in ctx.warnings)
    assert trained_here(ctx, child)
    assert second["parent_sha256"] == store.sha256(base)
    assert store.problem(base) is None

    # the parent's stored weights are now other weights (retrained elsewhere, on another
    # kernel): the child made from the old ones is rebuilt, not silently reused
    old_child = store.load(child.key())["state_dict"]
    parent = store.load(base)
    other = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in parent["state_dict"].items()}
    store.save(base, other, parent["record"])
    ctx = Ctx(tmp_path / "t3", store_root=store.root)
    model, third = ensure_victim(child, ctx)
    assert third["source"] == "trained"
    assert any("parent_sha256 differs" in w and child.key() in w for w in ctx.warnings)
    assert third["parent_sha256"] == store.sha256(base) != first["parent_sha256"]
    assert not trained_here(ctx, child)  # the (valid) parent was not retrained
    changed = [k for k, v in model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, old_child[k])]
    assert changed


def test_pre_lineage_poisoned_victim_moves_to_its_label_flip_key(tmp_path, monkeypatch):
    import nasrisk.trials.steps.label_flip as step
    import nasrisk.trials.victims as victims

    spec = tiny(poison_fraction=0.25)
    legacy = spec.legacy_key()
    assert legacy is not None and legacy != spec.key()  # pinned in test_victim_store.py
    # an entry as the code before lineages stored it: old key, old record
    net = build_victim(spec.base())
    store = Store(tmp_path / "s")
    old_record = {"key": legacy, "acc": 0.123, "seconds": 1.0, "train_loss": 2.0, "epochs": 1,
                  "n_train": 64, "n_test": 32, "param_count": 1,
                  "spec": spec.model_dump(mode="json"), "trained_at": 0.0}
    store.save(legacy, net.state_dict(), old_record)

    def no_training(*a, **kw):
        raise AssertionError("the migrated victim must not be retrained")

    monkeypatch.setattr(victims, "train", no_training)
    monkeypatch.setattr(step, "train", no_training)
    ctx = Ctx(tmp_path / "t", store_root=store.root)
    model, record = ensure_victim(spec, ctx)
    assert record["source"] == "store" and record["acc"] == 0.123
    assert record["key"] == spec.key() and record["legacy_key"] == legacy
    assert record["parent_key"] == tiny().key() and record["describe"].endswith("(fraction=0.25)")
    assert store.keys() == [spec.key()] and not store.path(legacy).exists()
    assert store.meta(spec.key())["key"] == spec.key() and store.problem(spec.key()) is None
    for (k, a), b in zip(model.state_dict().items(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    _, again = ensure_victim(spec, Ctx(tmp_path / "t2", store_root=store.root))
    assert again["acc"] == 0.123 and store.keys() == [spec.key()]


# -- objects -----------------------------------------------------------------------------------
def _compute_poison_set(counter: str) -> dict:
    with open(counter, "a") as f:
        f.write("computed\n")
    time.sleep(1.0)  # long enough for the other process to reach the lock
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(8, 3, generator=g), "idx": [1, 2, 3], "budget": 0.1, "name": "rlf",
            "nested": {"y": torch.arange(4)}}


def _object_in_process(store: str, counter: str, out: str) -> None:
    torch.set_num_threads(1)
    ctx = Ctx(Path(out).parent / Path(out).name.replace("out", "t"))
    payload, rec = ensure_object(store, {"budget": 0.1, "seed": 0}, "poison_set",
                                 lambda: _compute_poison_set(counter), ctx)
    Path(out).write_text(f"{rec['source']} {float(payload['x'].sum()):.6f}")


def test_ensure_object_computes_once_across_processes_and_recomputes_corrupt(tmp_path):
    ctx = mp.get_context("spawn")
    counter = tmp_path / "counter"
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [ctx.Process(target=_object_in_process, args=(str(tmp_path / "s"), str(counter),
                                                          str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert counter.read_text().count("computed") == 1
    results = [o.read_text().split() for o in outs]
    assert sorted(r[0] for r in results) == ["computed", "store"]
    assert results[0][1] == results[1][1]

    key = object_key("poison_set", {"budget": 0.1, "seed": 0})
    store = Store(tmp_path / "s")
    assert store.keys() == [key] and store.meta(key)["kind"] == "poison_set"
    assert object_key("poison_set", {"seed": 0, "budget": 0.1}) == key  # order-free
    assert object_key("generator", {"budget": 0.1, "seed": 0}) != key
    assert object_key("poison_set", {"budget": 0.2, "seed": 0}) != key

    _flip_byte(store.path(key))
    c = Ctx(tmp_path / "t9", store_root=store.root)
    payload, rec = ensure_object(store.root, {"budget": 0.1, "seed": 0}, "poison_set",
                                 lambda: _compute_poison_set(str(counter)), c)
    assert rec["source"] == "computed" and counter.read_text().count("computed") == 2
    assert any("corrupt" in w and key in w for w in c.warnings)
    assert torch.equal(payload["nested"]["y"], torch.arange(4))
    assert c.runs == [(key, "", "poison_set")]
    assert store.problem(key) is None


def test_objects_hold_only_what_a_weights_only_load_reads():
    check_payload({"a": [torch.zeros(2), 1, 2.0, "s", None, {"b": (1, 2)}]})
    with pytest.raises(TypeError, match="set"):
        check_payload({"a": {1, 2}})
    with pytest.raises(TypeError, match="keys must be strings"):
        check_payload({1: 2})
    with pytest.raises(TypeError, match="Linear"):
        check_payload([nn.Linear(2, 2)])


# -- every step kind ---------------------------------------------------------------------------
def test_every_step_kind_is_tested():
    assert set(TINY_STEPS) <= set(STEP_KINDS.names())


@pytest.mark.parametrize("name", STEP_KINDS.names())
def test_step_kind_sweep(name, tmp_path):
    sk = STEP_KINDS.get(name)
    assert sk.acc_metric in sk.metrics and sk.version
    step = StepSpec.model_validate({"kind": name, **TINY_STEPS.get(name, {})})
    assert step.dump() == StepSpec.model_validate(step.dump()).dump()  # canonical
    with pytest.raises(ValueError, match="no_such_field"):
        StepSpec.model_validate({"kind": name, **TINY_STEPS.get(name, {}), "no_such_field": 1})
    spec = tiny(steps=[step])
    ctx = Ctx(tmp_path / "t", store_root=tmp_path / "s")
    model, record = ensure_victim(spec, ctx)
    assert isinstance(model, nn.Module) and not model.training
    assert set(record["metrics"]) == set(sk.metrics)
    assert record["acc"] == record["metrics"][sk.acc_metric]
    assert 0.0 <= record["acc"] <= 1.0
    assert record["parent_sha256"] == (Store(tmp_path / "s").sha256(spec.base().key())
                                       if sk.uses_parent else None)
    assert spec.key() in Store(tmp_path / "s").keys()
    assert record["describe"] == f"nats@embedded -> {step.describe()}"
