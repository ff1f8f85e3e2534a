"""Faults a user or a machine can cause mid-study (issue 13, section 3): a second driver on a
workdir, SIGINT / SIGTERM of the driver, a deleted or read-only store, corrupt checkpoints,
failing trials. The Ray tests use the trivial `calibrate` kind and share one long scenario
(each Ray start costs ~20 s on 2 cores); the harness is test_runner_integration.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from test_runner_integration import NASRISK, checkpoint_epoch, study_file, wait_for

HOLD = """
import sys, time
from nasrisk.study.lock import WorkdirLock
lock = WorkdirLock(sys.argv[1], command="nasrisk run probe-study").acquire()
print("held", flush=True)
time.sleep(120)
"""


# -- one driver per workdir (no Ray) -------------------------------------------------------------
def test_second_driver_is_refused_in_one_line_while_another_holds_the_workdir(tmp_path, run_cli):
    import ray

    from nasrisk.study.lock import WorkdirLock

    f = study_file(tmp_path, 2, 1, 0.0)
    wd = tmp_path / "wd"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(wd)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = run_cli("run", f, "--workdir", str(wd))
        assert code == 2, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "in use" in lines[0], err
        assert f"pid {holder.pid}" in lines[0] and "nasrisk run probe-study" in lines[0]
        assert "Traceback" not in out + err
        assert not (wd / "mlflow.db").exists()        # refused before MLflow ...
        assert not ray.is_initialized()                # ... and before Ray
        # resume of a recorded run is refused the same way
        rec = {"study": "probe-study", "spec_yaml": Path(f).read_text(),
               "options": {"max_failures": 0}, "tracking_uri": f"sqlite:///{wd}/mlflow.db",
               "address": None, "data_root": str(wd / "data"), "download": False}
        (wd / "studies" / "probe-study").mkdir(parents=True)
        (wd / "studies" / "probe-study" / "run.json").write_text(json.dumps(rec))
        code, out, err = run_cli("resume", "probe-study", "--workdir", str(wd))
        assert code == 2 and f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1, err
        assert not (wd / "mlflow.db").exists()
    finally:
        holder.kill()
        holder.wait(30)
    # the lock died with its holder: the workdir is free again (no stale lock)
    with WorkdirLock(wd):
        assert json.loads((wd / "driver.lock").read_text())["pid"] == os.getpid()


def test_a_second_driver_is_told_who_holds_the_workdir_even_if_the_store_looks_broken(
        tmp_path, run_cli):
    # The first driver may be half-way through creating its MLflow schema: the second must be
    # refused as "in use" by the lock, before its own store probe sees a half-written store.
    f = study_file(tmp_path, 2, 1, 0.0)
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "mlflow.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 84)  # a torn header
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(wd)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = run_cli("run", f, "--workdir", str(wd))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "in use" in lines[0], err
        assert f"pid {holder.pid}" in lines[0]
    finally:
        holder.kill()
        holder.wait(30)


def test_the_workdir_lock_is_reentrant_within_one_driver(tmp_path):
    from nasrisk.study.lock import WorkdirLock

    with WorkdirLock(tmp_path), WorkdirLock(tmp_path / "." ):  # the CLI, then run_study
        pass
    # released once the outer holder leaves: another process can take it
    out = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", ""),
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "held" in out.stdout, out.stderr


# -- checkpoints (no Ray) ------------------------------------------------------------------------
def _ckpt(root: Path, key: str, index: int, epoch: int, trial_dir: str = "x_00000") -> Path:
    from nasrisk.study.trainable import write_checkpoint
    d = root / "st.probe.1" / f"{key}_{trial_dir}" / f"checkpoint_{index:06d}"
    d.mkdir(parents=True)
    state = {"calibrate": {"epoch": epoch, "value": float(epoch)}, "__seq__": index + 1}
    write_checkpoint(d, state, run_id=f"run-{key}", key=key)
    return d


def test_newest_good_checkpoint_skips_corrupt_ones_with_one_line(tmp_path):
    from nasrisk.study.trainable import checkpoint_dirs, newest_good_checkpoint

    root = tmp_path / "tune"
    dirs = [_ckpt(root, "k1", i, i + 1) for i in range(3)]          # epochs 1, 2, 3
    (root / "st.probe.2").mkdir()                                     # a later experiment ...
    later = _ckpt(root, "k1", 3, 4, "y_00000")                        # ... with epoch 4
    other = _ckpt(root, "k2", 9, 10)                                  # another trial's
    found = checkpoint_dirs(root, "st", "probe", "k1")
    assert sorted(found) == sorted([*dirs, later]) and other not in found

    said: list[str] = []
    state, run_id = newest_good_checkpoint(found, "k1", "calibrate-00001", said.append)
    assert state["calibrate"]["epoch"] == 4 and run_id == "run-k1" and said == []

    raw = bytearray((later / "state.pt").read_bytes())               # same size, one bit off
    raw[len(raw) // 2] ^= 0x01
    (later / "state.pt").write_bytes(bytes(raw))
    shutil.rmtree(dirs[2])
    dirs[2].mkdir()                                                   # a half-copied folder
    (dirs[2] / "meta.json").write_text((dirs[1] / "meta.json").read_text()
                                       .replace('"epoch": 2', '"epoch": 3')
                                       .replace('"seq": 2', '"seq": 3'))
    state, _ = newest_good_checkpoint(checkpoint_dirs(root, "st", "probe", "k1"), "k1",
                                      "calibrate-00001", said.append)
    assert state["calibrate"]["epoch"] == 2
    assert len(said) == 1 and "\n" not in said[0]
    assert "calibrate-00001" in said[0] and "epoch 4" in said[0] and "epoch 3" in said[0]
    assert "SHA-256" in said[0] and "continuing from the checkpoint at epoch 2" in said[0]

    for d in dirs[:2]:
        (d / "state.pt").write_bytes(b"not a torch file")
        (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()),
                                                 "sha256": None}))
    said.clear()
    state, run_id = newest_good_checkpoint(checkpoint_dirs(root, "st", "probe", "k1"), "k1",
                                           "calibrate-00001", said.append)
    assert (state, run_id) == ({}, None)
    assert len(said) == 1 and "does not load" in said[0] and "starting from scratch" in said[0]


def test_failure_line_names_only_errors_that_mlflow_holds():
    from nasrisk.study.runner import StageOutcome, _failure_line

    with_runs = StageOutcome("probe", 4, 0, 2, ["t3", "t4"],
                             errors={"t3": "ValueError: boom", "t4": "KeyError: 'x'"})
    line = _failure_line(with_runs)
    assert line.startswith("2 trials failed (e.g. t3: ValueError: boom)")
    assert "2 of their MLflow runs hold the error" in line
    line = _failure_line(StageOutcome("probe", 4, 0, 2, ["t3", "t4"]))  # no run holds one
    assert "no MLflow run holds their error" in line and "hold the error" not in line


# -- a failing / stopped trial outside Ray: its run and its temporary folders ---------------------
class _Kinds:
    def __init__(self, fn):
        from nasrisk.trials.kinds.base import TrialKind
        from nasrisk.trials.kinds.calibrate import CalibrateConfig

        self.kind = TrialKind(fn=fn, config_model=CalibrateConfig)

    def get(self, name):
        return self.kind


def test_failed_or_stopped_trial_marks_its_run_rightly_and_leaves_no_temp_folder(
        tmp_path, monkeypatch):
    import tempfile

    import nasrisk.study.trainable as trainable
    from nasrisk.study.tracking import TrialRun, ensure_experiment
    from nasrisk.study.trainable import run_trial

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.delenv("NASRISK_KEEP_ARTIFACTS", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = ensure_experiment(uri, "faults", tmp_path / "art")
    runtime = {"tracking_uri": uri, "experiment_id": exp, "study": "faults", "profile": "smoke",
               "version": "0", "git_commit": "x", "params": "paper", "data_root": str(tmp_path),
               "download": False, "tune_root": str(tmp_path / "tune")}
    trial = {"trial": {"key": "k1", "name": "t1", "stage": "probe", "kind": "calibrate",
                       "config": {}}}

    def fails(config, ctx):
        (ctx.artifact_dir / "half.txt").write_text("written before the error")
        raise ValueError("boom")

    def stopped(config, ctx):
        raise SystemExit(0)  # what Tune raises inside a trial it stops

    def works(config, ctx):
        (ctx.artifact_dir / "a.txt").write_text("kept as an MLflow artifact")
        return {"value": 1.0}

    def run_tags():
        r = TrialRun(uri, exp, "k1").find()
        return r.info.status, r.data.tags

    monkeypatch.setattr(trainable, "TRIAL_KINDS", _Kinds(fails))
    with pytest.raises(ValueError, match="boom"):
        run_trial(trial, runtime)
    status, tags = run_tags()
    assert status == "FAILED" and tags["nasrisk.status"] == "failed"
    assert tags["nasrisk.error"].startswith("ValueError: boom")
    assert list(scratch.iterdir()) == []                # no nasrisk-art-* left behind

    monkeypatch.setattr(trainable, "TRIAL_KINDS", _Kinds(stopped))
    with pytest.raises(SystemExit):
        run_trial(trial, runtime)
    status, tags = run_tags()
    assert status == "KILLED" and tags["nasrisk.status"] == "stopped"

    monkeypatch.setattr(trainable, "TRIAL_KINDS", _Kinds(works))
    run_trial(trial, runtime)
    status, tags = run_tags()
    assert status == "FINISHED" and tags["nasrisk.status"] == "done"
    assert "nasrisk.error" not in tags                  # no stale error on a finished run
    assert list(scratch.iterdir()) == []
    c = mlflow.MlflowClient(uri)
    assert [a.path for a in c.list_artifacts(TrialRun(uri, exp, "k1").find().info.run_id)] == [
        "a.txt"]


# -- signals and a deleted store, each followed by resume (Ray) -----------------------------------
def _runs(wd, name, fresh=""):
    """Trial runs read through a new MLflow engine when ``fresh`` differs: after the store was
    deleted and written back, a pooled connection would still read the deleted file."""
    if not (Path(wd) / "studies" / name / "run.json").exists():
        return []
    c = mlflow.MlflowClient(f"sqlite:///{wd}/{fresh}mlflow.db")
    exp = c.get_experiment_by_name(name)
    return [] if exp is None else [r for r in c.search_runs([exp.experiment_id], max_results=1000)
                                   if r.data.tags.get("nasrisk.role") == "trial"]


def _epochs(wd):
    """trial key -> epochs of its checkpoints on disk (trial folders are ``<key>_<id>``)."""
    out: dict[str, list[int]] = {}
    for d in Path(wd, "tune").glob("*/*/checkpoint_*"):
        epoch = checkpoint_epoch(d)
        if epoch is not None:
            out.setdefault(d.parent.name.split("_")[0], []).append(epoch)
    return out


def _driver(args, wd):
    return subprocess.Popen(NASRISK + [*args, "--workdir", str(wd)], cwd=wd.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(drv, timeout=180):
    try:
        out, _ = drv.communicate(timeout=timeout)
    finally:
        if drv.poll() is None:
            drv.kill()
    return drv.returncode, out


def _no_traceback(out):
    for bad in ("Traceback", "SIGABRT", "core dumped", "*** ", "Fatal Python"):
        assert bad not in out, out[-3000:]


def test_sigint_sigterm_and_a_deleted_store_each_stop_cleanly_and_resume_finishes(tmp_path):
    """SIGINT, then (resumed) SIGTERM, then (resumed) ``mlflow.db`` deleted, then a resume
    that finishes: each stop exits 130 / 143 / 2 with one line saying how to resume, marks no
    run failed, keeps every finished run, and each resume continues trials from their
    checkpoints: in the end one MLflow run per trial, all done, none carrying an error."""
    name = "fault-study"
    f = study_file(tmp_path, 4, 5, 0.4, name=name)
    wd = tmp_path / "wd"
    from nasrisk.study.cli import shell_command  # the venv's path when it is not on PATH

    hint = f"`{shell_command('nasrisk')} resume {name} --workdir {wd}`"

    # 1. SIGINT once two trials have checkpointed
    drv = _driver(["run", f], wd)
    wait_for(lambda: len(_epochs(wd)) >= 2, 240, "two trials with checkpoints")
    t0 = time.time()
    drv.send_signal(signal.SIGINT)
    code, out = _finish(drv)
    stop_s = time.time() - t0
    assert code == 130, out[-3000:]
    said = (f"nasrisk: stopped by SIGINT: trials stopped, finished ones kept; {hint} "
            "continues where it stopped")
    assert said in out.splitlines(), out[-2000:]
    assert not re.search(r"[1-9]\d* (trials )?failed", out), out[-3000:]
    _no_traceback(out)
    runs = _runs(wd, name)
    assert runs and all("nasrisk.error" not in r.data.tags for r in runs)
    assert {r.data.tags["nasrisk.status"] for r in runs} <= {"stopped", "running", "done"}
    ckpt_1 = {k: max(v) for k, v in _epochs(wd).items()}

    # 2. resume, SIGTERM once a trial got further than its checkpoint
    drv = _driver(["resume", name], wd)
    wait_for(lambda: any(max(v) > ckpt_1.get(k, 0) for k, v in _epochs(wd).items()), 240,
             "progress after resume")
    drv.send_signal(signal.SIGTERM)
    code, out = _finish(drv)
    assert code == 143, out[-3000:]
    assert any(line.startswith("nasrisk: stopped by SIGTERM") and hint in line
               for line in out.splitlines()), out[-2000:]
    assert not re.search(r"[1-9]\d* (trials )?failed", out), out[-3000:]
    _no_traceback(out)
    assert all("nasrisk.error" not in r.data.tags for r in _runs(wd, name))

    # 3. resume, delete the store once one more trial is done
    def done_keys(fresh=""):
        return {r.data.tags["nasrisk.trial_key"]: r.info.end_time for r in _runs(wd, name, fresh)
                if r.data.tags.get("nasrisk.status") == "done"}
    n_done = len(done_keys())
    drv = _driver(["resume", name], wd)
    wait_for(lambda: len(done_keys()) > n_done, 240, "one more finished trial")
    finished = done_keys()
    (wd / "mlflow.db").unlink()
    code, out = _finish(drv)
    assert code == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("nasrisk: error:")]
    assert len(errors) == 1 and "was deleted while the study ran" in errors[0], out[-3000:]
    assert "wrote the store back" in errors[0] and hint in errors[0]
    assert "carry the error" not in out and "trials failed" not in out
    _no_traceback(out)
    kept = done_keys("./")
    assert {k: kept.get(k) for k in finished} == finished  # no finished run was lost

    # 4. resume to the end
    p = subprocess.run(NASRISK + ["resume", name, "--workdir", str(wd)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=400)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "4/4 done" in out, out[-3000:]
    _no_traceback(out)
    runs = _runs(wd, name, "././")
    assert len(runs) == 4 and len({r.data.tags["nasrisk.trial_key"] for r in runs}) == 4
    for r in runs:
        k = r.data.tags["nasrisk.trial_key"]
        assert r.data.tags["nasrisk.status"] == "done" and r.info.status == "FINISHED"
        assert "nasrisk.error" not in r.data.tags
        if k in finished:
            assert r.info.end_time == finished[k]             # not computed again
        elif k in ckpt_1:                                     # continued, not from epoch 0
            assert r.data.metrics["attempts"] >= 2 and r.data.metrics["resumed_from_epoch"] >= 1
    print(f"SIGINT to exit: {stop_s:.1f} s")


@pytest.mark.slow
def test_workdir_made_read_only_mid_run_stops_in_one_line_then_resume_recovers(tmp_path):
    """As root, permissions do not stop writes: the immutable flag (``chattr +i``) does."""
    name = "ro-study"
    f = study_file(tmp_path, 4, 4, 0.5, name=name)
    wd = tmp_path / "wd"
    if os.geteuid() == 0:
        wd.mkdir()
        probe = subprocess.run(["chattr", "+i", str(wd)], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("needs `chattr +i` (root on ext4/xfs) to make the workdir read-only")
        subprocess.run(["chattr", "-i", str(wd)], check=True)
        freeze, thaw = ["chattr", "-R", "+i", str(wd)], ["chattr", "-R", "-i", str(wd)]
    else:
        freeze, thaw = ["chmod", "-R", "a-w", str(wd)], ["chmod", "-R", "u+w", str(wd)]
    drv = _driver(["run", f], wd)
    try:
        wait_for(lambda: len([r for r in _runs(wd, name)
                              if r.data.tags.get("nasrisk.status") == "done"]) >= 1,
                 240, "a finished trial")
        subprocess.run(freeze, check=True)
        code, out = _finish(drv)
    finally:
        subprocess.run(thaw, check=True)
    assert code == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("nasrisk: error:")]
    assert len(errors) == 1 and "can no longer be written" in errors[0], out[-3000:]
    _no_traceback(out)
    p = subprocess.run(NASRISK + ["resume", name, "--workdir", str(wd)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0 and "4/4 done" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    runs = _runs(wd, name)
    assert len(runs) == 4 and all(r.data.tags["nasrisk.status"] == "done" for r in runs)
