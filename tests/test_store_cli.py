"""`nasrisk store ls|verify` on a real tiny store, and the model runs (role ``model``) that
link a lineage in MLflow."""

from __future__ import annotations

import re

import pytest
import torch

from nasrisk.trials.context import LocalContext
from nasrisk.trials.store import Store, ensure_object
from nasrisk.trials.train import TrainConfig
from nasrisk.trials.victims import VictimSpec, ensure_victim

ARCH = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|+|skip_connect~0|skip_connect~1|nor_conv_3x3~2|"
TINY_TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.05, amp=False, augment="none",
                         eval_each_epoch=False)
LINE = re.compile(r"^(?P<key>[0-9a-f]{8})  (?P<kind>\S+)\s+(?P<size>[\d.]+ (?:B|KiB|MiB|GiB))  "
                  r"(?P<indent> *)(?P<words>.+?)(?:  acc (?P<acc>[\d.]+))?  run (?P<run>\S+)$")


def tiny(**kw) -> VictimSpec:
    base = dict(model="nats", model_kwargs={"arch": ARCH, "C": 4, "N": 1}, dataset="embedded",
                train=TINY_TRAIN, max_train_examples=64, max_test_examples=32)
    return VictimSpec(**{**base, **kw})


FT = {"kind": "fine_tune", "epochs": 1, "lr": 0.05}
LEAF = dict(steps=[FT, {**FT, "lr": 0.01}])


class RunsContext(LocalContext):
    def model_run(self, key, **kw):
        return f"run{key[:6]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir whose store holds a base, a fine-tuned child and grandchild, a label-flip
    child, another base, and a stored object."""
    wd = tmp_path_factory.mktemp("wd")
    store = wd / "store"
    ctx = RunsContext(wd / "t", store_root=store, device="cpu")
    ensure_victim(tiny(**LEAF), ctx)
    ensure_victim(tiny(poison_fraction=0.5), ctx)
    ensure_victim(tiny(seed=1), ctx)
    ensure_object(store, {"budget": 0.1}, "poison_set", lambda: {"x": torch.zeros(4)}, ctx,
                  describe="poison_set rlf budget=0.1")
    return wd


def test_store_ls_prints_lineages(run_cli, workdir):
    code, out, err = run_cli("store", "ls", "--workdir", str(workdir))
    assert code == 0, err
    lines = out.splitlines()
    assert re.match(r"^store .*store: 5 models, 1 objects, [\d.]+ (KiB|MiB)$", lines[0]), lines[0]
    body = [ln for ln in lines[1:] if ln]
    parsed = [LINE.match(ln) for ln in body if ln != "objects:"]
    assert all(parsed), body
    leaf, base = tiny(**LEAF), tiny()
    keys = [m["key"] for m in parsed]
    # block of the base: itself, its children indented under it, the grandchild further
    i = keys.index(base.key()[:8])
    block = parsed[i:i + 4]
    assert [len(m["indent"]) for m in block] == [0, 4, 8, 4]
    assert block[0]["words"] == "nats@embedded"
    assert block[1]["key"] == leaf.parent().key()[:8]
    assert block[1]["words"] == "-> fine_tune(epochs=1, lr=0.05)"
    assert block[2]["key"] == leaf.key()[:8]
    assert block[2]["words"] == "-> fine_tune(epochs=1, lr=0.01)"
    assert block[3]["words"] == "-> label_flip(fraction=0.5)"
    assert block[2]["run"] == f"run{leaf.key()[:6]}" and all(m["kind"] == "model" for m in block)
    assert all(0 <= float(m["acc"]) <= 1 for m in block)
    assert tiny(seed=1).key()[:8] in keys  # the other base: its own block
    assert lines[lines.index("objects:") - 1] == ""
    obj = parsed[-1]
    assert obj["kind"] == "poison_set" and obj["words"] == "poison_set rlf budget=0.1"
    assert obj["acc"] is None
    # one block per base: a blank line before each
    assert out.count("\n\n") == 3


def test_store_verify_finds_a_flipped_byte(run_cli, workdir, tmp_path):
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(workdir, wd)
    code, out, _ = run_cli("store", "verify", "--workdir", str(wd))
    assert code == 0 and "6 entries checked, 0 corrupt, all good" in out
    key = tiny(**LEAF).parent().key()
    pt = Store(wd / "store").path(key)
    raw = bytearray(pt.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    pt.write_bytes(bytes(raw))
    code, out, _ = run_cli("store", "verify", "--workdir", str(wd))
    bad = [ln for ln in out.splitlines() if ln.startswith("corrupt")]
    assert code == 1 and bad == [f"corrupt {key}: {key}.pt does not match its SHA-256"]
    assert pt.exists()  # verify deletes nothing
    Store(wd / "store").meta_path(tiny(seed=1).key()).unlink()  # a writer died uncommitted
    code, out, _ = run_cli("store", "verify", "--workdir", str(wd))
    assert code == 1 and len([ln for ln in out.splitlines() if ln.startswith("corrupt")]) == 2
    assert "before committing" in out


@pytest.mark.parametrize("cmd", ["ls", "verify"])
def test_store_commands_without_a_store(run_cli, tmp_path, cmd):
    code, out, err = run_cli("store", cmd, "--workdir", str(tmp_path / "nope"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "no workdir at" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("store", cmd, "--workdir", str(tmp_path / "empty"))
    assert code == 2 and "has no store" in err and len(err.strip().splitlines()) == 1


def test_store_help_reads_as_written(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli("store", "--help")
    commands = out.split("Commands:", 1)[1]
    assert code == 0 and "ls" in commands and "verify" in commands and "..." not in commands


# -- model runs in MLflow ------------------------------------------------------------------------
def test_model_runs_link_a_lineage(tmp_path):
    from nasrisk.study import tags
    from nasrisk.study.tracking import ModelRun, client, lineage_runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = client(uri).create_experiment("e")
    mr = ModelRun(uri, exp)
    base = mr.ensure("aaaa", name="nats@embedded", parent_key="", step_kind="base",
                     params={"lineage": "nats@embedded"}, metrics={"acc": 0.5}, made_by="t1")
    child = mr.ensure("bbbb", name="-> fine_tune", parent_key="aaaa", step_kind="fine_tune",
                      params={"step": {"kind": "fine_tune", "lr": 0.1}},
                      metrics={"acc_before": 0.5, "acc_after": 0.6}, made_by="t2")
    # a retried trial asks again: the same run, never a second one
    again = mr.ensure("bbbb", name="-> fine_tune", parent_key="aaaa", step_kind="fine_tune",
                      params={}, metrics={"acc_before": 0.5, "acc_after": 0.61}, made_by="t3")
    assert again == child != base
    c = client(uri)
    runs = c.search_runs([exp])
    assert len(runs) == 2 and {r.data.tags[tags.ROLE] for r in runs} == {tags.ROLE_MODEL}
    r = c.get_run(child)
    assert r.data.tags[tags.PARENT_RUN_ID] == base and r.data.tags[tags.PARENT_KEY] == "aaaa"
    assert r.data.tags[tags.STEP_KIND] == "fine_tune" and r.data.tags[tags.STATUS] == "done"
    assert r.data.tags[tags.MADE_BY_RUN_ID] == "t3" and r.data.metrics["acc_after"] == 0.61
    assert r.data.params["step.lr"] == "0.1" and not r.data.tags.get(tags.STAGE)
    assert [x.info.run_id for x in lineage_runs(uri, exp, "bbbb")] == [base, child]
    assert lineage_runs(uri, exp, "nope") == []
