"""automl-risks end to end at a tiny size: victims -> poisoning -> attacks through Ray Tune +
MLflow, the report, and a kill + resume that retrains nothing that finished."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import yaml

from nasrisk.study.spec import load_spec, spec_to_yaml

NASRISK = [sys.executable, "-m", "nasrisk.study.cli"]
TRAIN = {"epochs": 1, "batch_size": 64, "lr": 0.025, "weight_decay": 0.0003, "grad_clip": 5.0}
SIZES = {"max_train_examples": 300, "max_test_examples": 100}
MODELS = [{"model": "darts", "model_kwargs": {"C": 4, "layers": 3}},
          {"model": "resnet18"}]


def tiny_study(tmp_path, name):
    """The built-in study with its smoke profile shrunk further (2 models, 1 epoch)."""
    d = yaml.safe_load(spec_to_yaml(load_spec("automl-risks")))
    d["name"] = name
    sm = d["profiles"]["smoke"]["stages"]
    sm["victims"].update(cases=MODELS, config={"train": TRAIN, **SIZES, "grad_var_samples": 16,
                                               "contour_steps": 5, "contour_examples": 16})
    sm["poisoning"].update(cases=MODELS, config={"train": TRAIN, **SIZES})
    sm["attacks"].update(cases=[{"victim": m} for m in MODELS],
                         config={"n_inputs": 8, "nes_queries_per_estimate": 20,
                                 "victim": {"train": TRAIN, **SIZES}})
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


def runs(wd, name):
    c = mlflow.MlflowClient(f"sqlite:///{wd}/mlflow.db")
    exp = c.get_experiment_by_name(name)
    return [r for r in c.search_runs([exp.experiment_id], max_results=1000)]


def test_automl_smoke_runs_reports_and_resumes_without_retraining(tmp_path):
    f = tiny_study(tmp_path, "automl-tiny")
    wd = tmp_path / "wd"
    drv = subprocess.Popen(NASRISK + ["run", str(f), "--workdir", str(wd)], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill the driver once the first stage is done and the second has started
        t0 = time.time()
        while time.time() - t0 < 600:
            rec = wd / "studies" / "automl-tiny" / "run.json"
            if rec.exists() and "poisoning" in json.loads(rec.read_text()).get("tune_experiments", {}):
                break
            assert drv.poll() is None, "the study ended before it could be killed"
            time.sleep(1)
        os.kill(drv.pid, signal.SIGKILL)
        drv.wait(30)
    finally:
        if drv.poll() is None:
            drv.kill()
    victims_before = {r.data.tags["nasrisk.trial_key"]: r.info.end_time for r in runs(wd, "automl-tiny")
                      if r.data.tags.get("nasrisk.stage") == "victims"}
    assert len(victims_before) == 2
    # committed entries only (a .json beside the weights): a write may be in flight at the kill
    store_before = {p.name: p.stat().st_mtime_ns for p in (wd / "store").rglob("*.pt")
                    if p.with_suffix(".json").exists()}
    p = subprocess.run(NASRISK + ["resume", "automl-tiny", "--workdir", str(wd)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    all_runs = [r for r in runs(wd, "automl-tiny") if r.data.tags["nasrisk.role"] == "trial"]
    by_stage = {}
    for r in all_runs:
        by_stage.setdefault(r.data.tags["nasrisk.stage"], []).append(r)
    assert {k: len(v) for k, v in by_stage.items()} == {"victims": 2, "poisoning": 4, "attacks": 8}
    assert all(r.data.tags["nasrisk.status"] == "done" for r in all_runs)
    for r in by_stage["victims"]:   # finished before the kill: untouched
        assert r.info.end_time == victims_before[r.data.tags["nasrisk.trial_key"]]
    for name, mtime in store_before.items():   # stored victims were not retrained
        assert next((wd / "store").rglob(name)).stat().st_mtime_ns == mtime
    for r in by_stage["attacks"]:   # attacks loaded their victims and link to their runs
        assert r.data.metrics["victim_trained"] == 0
        assert r.data.tags.get("nasrisk.victim_run_id")
    assert "asr_m" in {k for r in by_stage["attacks"] for k in r.data.metrics}
    rep = wd / "reports" / "automl-tiny"
    assert (rep / "report.md").exists() and (rep / "accuracy.csv").exists()
    assert any(rep.glob("cad_vs_poison_*.png")) and any(rep.glob("overlap_hist_*.png"))
