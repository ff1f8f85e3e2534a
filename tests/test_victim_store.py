"""The victim store and ensure_victim: keys, atomic checked files, locking, train-once."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from nasrisk.trials.context import LocalContext
from nasrisk.trials.kinds.victim import VictimConfig
from nasrisk.trials.store import VictimStore
from nasrisk.trials.train import DARTS_ARTIFACT, DARTS_PAPER, TrainConfig
from nasrisk.trials.victims import VictimSpec, ensure_victim

ARCH = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|skip_connect~1|nor_conv_3x3~2|"
TINY_TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.05, amp=False, augment="none",
                         eval_each_epoch=False)


def tiny_spec(**kw) -> VictimSpec:
    base = dict(model="nats", model_kwargs={"arch": ARCH, "C": 4, "N": 1}, dataset="embedded",
                train=TINY_TRAIN, max_train_examples=128, max_test_examples=64)
    return VictimSpec(**{**base, **kw})


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the machine running the tests has two cores for everything."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingContext(LocalContext):
    """A LocalContext that keeps its progress messages."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, device="cpu", **kw)
        self.messages: list[str] = []

    def progress(self, message: str) -> None:
        self.messages.append(message)


# -- keys --------------------------------------------------------------------------------------
def test_key_is_stable_and_changes_with_every_weight_determining_field():
    spec = tiny_spec()
    key = spec.key()
    assert len(key) == 16 and int(key, 16) >= 0
    assert tiny_spec().key() == key
    assert VictimSpec.model_validate(spec.model_dump(mode="json")).key() == key
    assert tiny_spec(model_kwargs={"N": 1, "C": 4, "arch": ARCH}).key() == key  # order-free

    changed = {
        "model": dict(model="darts", model_kwargs={"C": 4, "layers": 3}),
        "model_kwargs": dict(model_kwargs={"arch": ARCH, "C": 8, "N": 1}),
        "dataset": dict(dataset="cifar10"),
        "params": dict(params="artifact"),
        "train": dict(train=TINY_TRAIN.model_copy(update={"lr": 0.1})),
        "steps": dict(poison_fraction=0.1),
        "seed": dict(seed=1),
        "max_train_examples": dict(max_train_examples=256),
        "amp": dict(amp="bf16"),
    }
    keys = {name: tiny_spec(**kw).key() for name, kw in changed.items()}
    assert key not in keys.values()
    assert len(set(keys.values())) == len(keys)
    assert set(changed) | {"max_test_examples"} == set(VictimSpec.model_fields)

    # the test subset and the measurement options never touch the weights
    assert tiny_spec(max_test_examples=10).key() == key
    cfg = VictimConfig(**spec.model_dump(), measure_grad_var=False, contours=False)
    assert cfg.key() == key and cfg.spec() == spec

    # a base's key is the victim key from before lineages (70b4e12's VictimSpec.key()), so
    # stored clean victims are reused without retraining; likewise the pre-lineage key of a
    # poisoned victim, from which the store migrates it
    assert key == "699042888b370ce5"
    assert VictimSpec(model="darts").key() == "b6f435f84a55396c"
    assert tiny_spec(poison_fraction=0.25).legacy_key() == "5184e5a629c929fa"
    assert VictimSpec(model="darts", poison_fraction=0.1).legacy_key() == "f01f307b62f7bdfc"
    assert spec.legacy_key() is None

    # train=None resolves to the parameter set's recipe
    assert tiny_spec(train=None).key() == tiny_spec(train=DARTS_PAPER).key()
    assert tiny_spec(train=None, params="artifact").resolved_train() == DARTS_ARTIFACT
    assert tiny_spec(train=None).key() != tiny_spec(train=DARTS_ARTIFACT).key()


def test_spec_validation():
    with pytest.raises(ValidationError, match="unknown model"):
        tiny_spec(model="nope")
    with pytest.raises(ValidationError, match="unknown dataset"):
        tiny_spec(dataset="nope")
    with pytest.raises(ValidationError, match="takes no"):
        tiny_spec(model="resnet18", model_kwargs={"C": 4})
    with pytest.raises(ValidationError, match="may not set"):
        tiny_spec(model="darts", model_kwargs={"params": "paper"})
    with pytest.raises(ValidationError, match="poison_fraction"):
        tiny_spec(poison_fraction=1.0)
    with pytest.raises(ValidationError, match="unknown step kind 'nope'"):
        tiny_spec(steps=[{"kind": "nope"}])
    with pytest.raises(ValidationError, match="step fine_tune: lrr"):
        tiny_spec(steps=[{"kind": "fine_tune", "lrr": 0.1}])
    with pytest.raises(ValidationError, match="only be the first step"):
        tiny_spec(steps=[{"kind": "fine_tune"}, {"kind": "label_flip", "fraction": 0.1}])
    with pytest.raises(ValidationError):
        tiny_spec(extra_field=1)


# -- the store on its own ----------------------------------------------------------------------
def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 64, generator=g), "n": torch.tensor(3)}


def test_store_round_trip(tmp_path):
    store = VictimStore(tmp_path)
    assert store.load("abc") is None and "abc" not in store
    store.save("abc", _state(), {"acc": 0.5})
    assert "abc" in store and store.keys() == ["abc"]
    got = store.load("abc")
    assert got["record"] == {"acc": 0.5}
    assert torch.equal(got["state_dict"]["w"], _state()["w"])
    assert store.record("abc") == {"acc": 0.5}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(ValueError):
        store.path("../escape")


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "uncommitted", "no_weights",
                                    "weights_are_a_folder", "marker_is_a_folder"])
def test_store_detects_corruption(tmp_path, damage):
    store = VictimStore(tmp_path)
    store.save("abc", _state(), {"acc": 0.5})
    pt = store.path("abc")
    if damage == "truncate":
        pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
        reason = "bytes"
    elif damage == "bitflip":  # same size, different content
        raw = bytearray(pt.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        pt.write_bytes(bytes(raw))
        reason = "SHA-256"
    elif damage == "uncommitted":
        store.meta_path("abc").unlink()
        reason = "before committing"
    elif damage == "no_weights":
        pt.unlink()
        reason = "missing"
    else:  # something put a folder where a file belongs
        p = pt if damage == "weights_are_a_folder" else store.meta_path("abc")
        p.unlink()
        (p / "inner").mkdir(parents=True)
        reason = "not a regular file"
    said: list[str] = []
    assert store.load("abc", report=said.append) is None
    assert len(said) == 1 and "corrupt" in said[0] and reason in said[0]
    assert not pt.exists() and not store.meta_path("abc").exists()
    assert store.load("abc", report=said.append) is None and len(said) == 1  # now just absent


def _hold_then_report(root: str, waiting: str, acquired: str) -> None:
    store = VictimStore(root)
    with store.lock("abc", on_wait=lambda msg: Path(waiting).write_text(msg)):
        Path(acquired).write_text("yes")


def test_lock_excludes_another_process(tmp_path):
    store = VictimStore(tmp_path)
    waiting, acquired = tmp_path / "waiting", tmp_path / "acquired"
    ctx = mp.get_context("spawn")
    with store.lock("abc"):
        child = ctx.Process(target=_hold_then_report,
                            args=(str(tmp_path), str(waiting), str(acquired)))
        child.start()
        deadline = time.monotonic() + 60
        while not waiting.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.exists(), "the child never reported waiting for the lock"
        assert not acquired.exists()  # it cannot get the lock while we hold it
    child.join(60)
    assert child.exitcode == 0 and acquired.read_text() == "yes"


# -- ensure_victim -----------------------------------------------------------------------------
def test_ensure_victim_trains_once_then_loads(tmp_path, monkeypatch):
    import nasrisk.trials.victims as victims

    calls = []
    real_train = victims.train
    monkeypatch.setattr(victims, "train", lambda *a, **kw: calls.append(1) or real_train(*a, **kw))
    spec = tiny_spec()
    m1, r1 = ensure_victim(spec, RecordingContext(tmp_path / "t1", store_root=tmp_path / "s"))
    m2, r2 = ensure_victim(spec, RecordingContext(tmp_path / "t2", store_root=tmp_path / "s"))
    assert len(calls) == 1
    assert (r1["source"], r2["source"]) == ("trained", "store")
    assert r1["key"] == r2["key"] == spec.key() and r1["acc"] == r2["acc"]
    assert not m2.training
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # a smaller test subset: same weights from the store, accuracy measured on that subset
    _, r3 = ensure_victim(tiny_spec(max_test_examples=16),
                          RecordingContext(tmp_path / "t3", store_root=tmp_path / "s"))
    assert len(calls) == 1 and r3["source"] == "store" and r3["n_test"] == 16


def _ensure_in_child(store: str, workdir: str, out: str) -> None:
    torch.set_num_threads(1)
    _, rec = ensure_victim(tiny_spec(), LocalContext(workdir, store_root=store, device="cpu"))
    Path(out).write_text(f"{rec['source']} {rec['acc']}")


def test_concurrent_processes_train_once(tmp_path):
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [ctx.Process(target=_ensure_in_child,
                         args=(str(tmp_path / "s"), str(tmp_path / f"t{i}"), str(outs[i])))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [o.read_text().split() for o in outs]
    assert sorted(r[0] for r in results) == ["store", "trained"]
    assert results[0][1] == results[1][1]  # the loader got the trainer's victim
    assert VictimStore(tmp_path / "s").keys() == [tiny_spec().key()]


def test_truncated_store_file_is_reported_and_retrained(tmp_path):
    spec = tiny_spec(seed=3)
    _, r1 = ensure_victim(spec, RecordingContext(tmp_path / "t1", store_root=tmp_path / "s"))
    pt = VictimStore(tmp_path / "s").path(spec.key())
    pt.write_bytes(pt.read_bytes()[:100])
    ctx = RecordingContext(tmp_path / "t2", store_root=tmp_path / "s")
    _, r2 = ensure_victim(spec, ctx)
    assert r2["source"] == "trained"
    # said as a warning (shown on the driver's console under the runner), in one line
    corrupt = [m for m in ctx.warnings if "corrupt" in m]
    assert len(corrupt) == 1 and spec.key() in corrupt[0] and "\n" not in corrupt[0]
    assert r2["acc"] == pytest.approx(r1["acc"])  # deterministic retraining, same victim
    assert VictimStore(tmp_path / "s").load(spec.key()) is not None  # a valid entry again
