"""Real Ray, real MLflow: one run per trial, resume after the driver is SIGKILLed, a killed
worker retried from its last epoch. Uses the trivial `calibrate` kind so the runner, not the
models, is what is tested (the EVAS study runs end to end in test_evas_study.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import torch
import yaml

NASRISK = [sys.executable, "-m", "nasrisk.study.cli"]


def study_file(tmp_path, n, epochs, seconds, name="probe-study"):
    d = {"name": name, "default_profile": "smoke",
         "stages": [{"name": "probe", "kind": "calibrate",
                     "config": {"epochs": epochs, "size": 16, "seconds_per_epoch": seconds},
                     "grid": {"index": list(range(n))}}],
         "profiles": {"smoke": {}}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def trial_runs(wd, name):
    # run.json is written after the driver created the store: reading earlier would race the
    # driver's schema migration
    if not (Path(wd) / "studies" / name / "run.json").exists():
        return []
    c = mlflow.MlflowClient(f"sqlite:///{wd}/mlflow.db")
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return []
    return [r for r in c.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("nasrisk.role") == "trial"]


def wait_for(cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def run(args, cwd, timeout=400):
    p = subprocess.run(NASRISK + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def checkpoint_epoch(d):
    """The calibrate epoch a checkpoint folder holds (None while it is being written)."""
    try:
        return torch.load(Path(d) / "state.pt", weights_only=True)["calibrate"]["epoch"]
    except Exception:  # noqa: BLE001 - half-copied by Tune: not a checkpoint yet
        return None


def checkpoints(wd, key):
    """epoch -> checkpoint folder of trial ``key``, over all Tune experiments of the workdir."""
    out = {}
    for d in Path(wd, "tune").glob(f"*/{key}_*/checkpoint_*"):
        epoch = checkpoint_epoch(d)
        if epoch is not None:
            out[epoch] = d
    return out


def test_driver_sigkill_then_resume(tmp_path):
    """The driver is SIGKILLed once two trials are done and another has checkpointed: resume
    gives one MLflow run per trial, never reruns a finished one, continues the others from
    their newest checkpoint on disk (Tune's experiment snapshot lags it), and skips a corrupt
    checkpoint with one line naming the trial and epoch."""
    f = study_file(tmp_path, 6, 4, 0.6, name="killed-study")
    wd = tmp_path / "wd"
    drv = subprocess.Popen(NASRISK + ["run", f, "--workdir", str(wd)], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def unfinished_with_checkpoints():
        return {r.data.tags["nasrisk.trial_key"]: r.info.run_name
                for r in trial_runs(wd, "killed-study")
                if r.data.tags.get("nasrisk.status") != "done"
                and len(checkpoints(wd, r.data.tags["nasrisk.trial_key"])) >= 2}

    def ready():
        done = [r for r in trial_runs(wd, "killed-study")
                if r.data.tags.get("nasrisk.status") == "done"]
        return len(done) >= 2 and unfinished_with_checkpoints()
    try:
        wait_for(ready, 240, "two finished trials and one with checkpoints")
        os.kill(drv.pid, signal.SIGKILL)
        drv.wait(30)
    finally:
        if drv.poll() is None:
            drv.kill()
    # the orphaned workers may still write a checkpoint or two before Ray notices
    last = None
    for _ in range(20):
        now = {k: sorted(checkpoints(wd, k)) for k in unfinished_with_checkpoints()}
        if now == last:
            break
        last = now
        time.sleep(1.0)
    before = {r.data.tags["nasrisk.trial_key"]: r.info.end_time
              for r in trial_runs(wd, "killed-study") if r.data.tags.get("nasrisk.status") == "done"}
    assert 2 <= len(before) < 6
    names = unfinished_with_checkpoints()
    newest = {k: max(checkpoints(wd, k)) for k in names}
    bad_key = next(iter(names))                             # its newest checkpoint is damaged
    bad = checkpoints(wd, bad_key)[newest[bad_key]] / "state.pt"
    bad.write_bytes(bad.read_bytes()[:200])
    p = subprocess.run(NASRISK + ["resume", "killed-study", "--workdir", str(wd)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=400)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "6/6 done" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    warned = [line for line in out.splitlines() if "corrupt" in line]
    assert len(warned) == 1, out[-3000:]
    assert names[bad_key] in warned[0] and f"epoch {newest[bad_key]}" in warned[0]
    runs = trial_runs(wd, "killed-study")
    keys = [r.data.tags["nasrisk.trial_key"] for r in runs]
    assert len(runs) == 6 and len(set(keys)) == 6          # exactly one MLflow run per trial
    for r in runs:
        assert r.data.tags["nasrisk.status"] == "done"
        k = r.data.tags["nasrisk.trial_key"]
        m = r.data.metrics
        if k in before:                                     # finished trials were not rerun
            assert r.info.end_time == before[k]
            assert m["attempts"] == 1
        elif k == bad_key:                                  # the next older checkpoint
            older = max(e for e in checkpoints(wd, k) if e < newest[k])
            assert m["resumed_from_epoch"] == older and m["epochs_run"] == 4 - older
        elif k in newest:                                   # its newest checkpoint
            assert m["resumed_from_epoch"] == newest[k] and m["epochs_run"] == 4 - newest[k]


def test_killed_worker_is_retried_from_its_last_epoch(tmp_path):
    f = study_file(tmp_path, 1, 6, 2.0, name="worker-kill")
    wd = tmp_path / "wd"
    drv = subprocess.Popen(NASRISK + ["run", f, "--workdir", str(wd), "--max-failures", "2"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # epoch k's metric is logged just before its checkpoint is reported, and the driver
        # learns of a checkpoint a moment later: wait for epoch 3's metric, so the epoch-2
        # checkpoint has been known to the driver for about one epoch (2 s) at the kill
        def at_epoch_3():
            for r in trial_runs(wd, "worker-kill"):
                c = mlflow.MlflowClient(f"sqlite:///{wd}/mlflow.db")
                steps = [m.step for m in c.get_metric_history(r.info.run_id, "value")]
                if steps and max(steps) >= 3:
                    return r
            return None
        r = wait_for(at_epoch_3, 240, "epoch 3 of the trial")
        os.kill(int(r.data.tags["nasrisk.pid"]), signal.SIGKILL)
        out, _ = drv.communicate(timeout=300)
    finally:
        if drv.poll() is None:
            drv.kill()
    assert drv.returncode == 0, out[-3000:]
    runs = trial_runs(wd, "worker-kill")
    assert len(runs) == 1                                   # the retry reopened the same run
    m = runs[0].data.metrics
    assert m["attempts"] == 2
    assert m["resumed_from_epoch"] >= 2                     # continued from its checkpoint ...
    assert m["epochs_run"] == 6 - m["resumed_from_epoch"]   # ... and did only the rest
    assert runs[0].data.tags["nasrisk.status"] == "done"


def test_early_driver_death_resume_one_run_per_trial_then_rerun_skips_done(tmp_path):
    """The driver dies right after creating the stage's Tune experiment (only ``tuner.pkl``
    exists, which holds no param space): resume runs the planned trials (not trials with an
    empty config), one MLflow run each; running the study again finds them all done."""
    f = study_file(tmp_path, 4, 2, 0.0)
    wd = tmp_path / "wd"
    die = ("import os, ray.tune as t; t.Tuner.fit = lambda self: os._exit(9); "
           "from nasrisk.study.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", die, "run", f, "--workdir", str(wd)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 9, p.stdout[-2000:] + p.stderr[-2000:]
    exp_dir = wd / "tune" / "probe-study.probe.1"
    assert (exp_dir / "tuner.pkl").exists()
    assert not list(exp_dir.glob("experiment_state*.json"))
    p = subprocess.run(NASRISK + ["resume", "probe-study", "--workdir", str(wd)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "could not restore" not in p.stderr, p.stderr[-2000:]
    assert "4/4 done" in p.stdout and "mlflow ui --backend-store-uri" in p.stdout, p.stdout
    runs = trial_runs(wd, "probe-study")
    assert len(runs) == 4
    assert len({r.data.tags["nasrisk.trial_key"] for r in runs}) == 4
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["nasrisk.status"] == "done"
        assert r.data.metrics["epochs_run"] == 2 and r.data.params["kind"] == "calibrate"
    out = run(["run", f, "--workdir", str(wd)], tmp_path)
    assert "4 of 4 trials already done in MLflow" in out
    assert len(trial_runs(wd, "probe-study")) == 4


def test_derived_stage_killed_then_resumed_selects_the_same_trials(tmp_path):
    """Issue 8: stage 2 (`top`) takes the top 2 of stage 1's `value`; the driver is SIGKILLed
    while stage 2 runs. `resume`: one MLflow run per trial, stage 1 not rerun (same runs,
    same times), stage 2 derives the same trials (same keys) and finishes them."""
    name = "derived-study"
    d = {"name": name, "default_profile": "smoke",
         "stages": [
             {"name": "score", "kind": "calibrate", "config": {"epochs": 1, "size": 8},
              "grid": {"index": [0, 1, 2, 3]}},
             {"name": "top", "kind": "calibrate", "from": "score",
              "select": {"selector": "top_k", "k": 2, "metric": "value", "mode": "max"},
              "take": {"index": "config.index"},
              "config": {"epochs": 5, "size": 8, "seconds_per_epoch": 1.0}}],
         "profiles": {"smoke": {}}}
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(d))
    wd = tmp_path / "wd"
    drv = subprocess.Popen(NASRISK + ["run", str(f), "--workdir", str(wd)], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stage_runs(stage):
        return [r for r in trial_runs(wd, name) if r.data.tags.get("nasrisk.stage") == stage]

    try:
        wait_for(lambda: len(stage_runs("top")) == 2, 240, "both stage-2 trials started")
        os.kill(drv.pid, signal.SIGKILL)
        drv.wait(30)
    finally:
        if drv.poll() is None:
            drv.kill()
    first = stage_runs("score")
    assert len(first) == 4 and all(r.data.tags["nasrisk.status"] == "done" for r in first)
    score = {r.info.run_id: (r.info.start_time, r.info.end_time) for r in first}
    top_keys = {r.data.tags["nasrisk.trial_key"] for r in stage_runs("top")}
    assert not all(r.data.tags["nasrisk.status"] == "done" for r in stage_runs("top"))
    p = subprocess.run(NASRISK + ["resume", name, "--workdir", str(wd)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "4 of 4 trials already done" in out and "stage top: 2/2 done" in out, out[-3000:]
    assert f"[{name}/top] derived 2 trials from score: 2 of 4 results selected by top_k" in out
    runs = trial_runs(wd, name)
    keys = [r.data.tags["nasrisk.trial_key"] for r in runs]
    assert len(runs) == 6 and len(set(keys)) == 6          # exactly one MLflow run per trial
    assert all(r.data.tags["nasrisk.status"] == "done" for r in runs)
    assert {r.info.run_id: (r.info.start_time, r.info.end_time)
            for r in stage_runs("score")} == score         # stage 1 was not rerun
    assert {r.data.tags["nasrisk.trial_key"] for r in stage_runs("top")} == top_keys
    best = sorted(stage_runs("score"), key=lambda r: -r.data.metrics["value"])[:2]
    assert sorted(int(r.data.params["index"]) for r in stage_runs("top")) == sorted(
        int(r.data.params["index"]) for r in best)
    assert all(r.data.metrics["epochs_run"] >= 1 for r in stage_runs("top"))
    # each derived trial's run names the run it was selected from (tag nasrisk.source_run_id)
    by_id = {r.info.run_id: r for r in best}
    for r in stage_runs("top"):
        src = by_id[r.data.tags["nasrisk.source_run_id"]]
        assert src.data.params["index"] == r.data.params["index"]
