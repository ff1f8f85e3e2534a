"""The function Ray Tune runs for every trial (on a worker): it opens the trial's one MLflow
run, restores the trial's state from the Tune checkpoint, calls the plain trial kind with a
:class:`TuneContext`, and marks the run done."""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ray import tune

import nasrisk.trials  # noqa: F401  (registers every entry in this worker)
from nasrisk.trials.context import TrialContext
from nasrisk.trials.registry import TRIAL_KINDS

from .tracking import TAG_KIND, TAG_STAGE, TAG_STUDY, TrialRun

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class TuneContext(TrialContext):
    """Checkpoints through ``ray.tune.report`` (the run id travels inside the checkpoint) and
    logs metrics and artifacts to the trial's MLflow run."""

    def __init__(self, run: TrialRun, state: dict[str, Any], **kw: Any) -> None:
        super().__init__(**kw)
        self.run = run
        self._state = state
        self._saves = 0

    def _persist(self, metrics: Mapping[str, float]) -> None:
        self._saves += 1
        with tempfile.TemporaryDirectory(prefix="nasrisk-ckpt-") as d:
            torch.save(self._state, Path(d) / STATE_FILE)
            (Path(d) / META_FILE).write_text(json.dumps({"run_id": self.run.run_id}))
            report = {k: float(v) for k, v in metrics.items()}
            report["checkpoint_saves"] = self._saves
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log_metrics(metrics, step=step)


def _restore() -> tuple[dict[str, Any], str | None]:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return {}, None
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        meta = json.loads((Path(d) / META_FILE).read_text())
    return state, meta.get("run_id")


def run_trial(params: dict[str, Any], runtime: dict[str, Any]) -> None:
    """Tune entry point. ``params["trial"]`` is one planned trial; ``runtime`` holds what is the
    same for all trials of a study run (tracking URI, experiment id, paths, resources)."""
    t = params["trial"]
    torch.set_num_threads(max(1, int(runtime.get("cpus_per_trial", 1))))
    state, run_id = _restore()
    run = TrialRun(runtime["tracking_uri"], runtime["experiment_id"], t["key"])
    kind = TRIAL_KINDS.get(t["kind"])
    params_logged = {**t["config"], "profile": runtime["profile"], "stage": t["stage"],
                     "kind": t["kind"]}
    if hasattr(kind, "extra_params"):
        params_logged.update(kind.extra_params(kind.config_model.model_validate(t["config"])))
    run.open(run_id=run_id, name=t["name"], params=params_logged, tags={
        TAG_STUDY: runtime["study"], TAG_STAGE: t["stage"], TAG_KIND: t["kind"],
        "nasrisk.profile": runtime["profile"], "nasrisk.version": runtime["version"],
        "nasrisk.git_commit": runtime["git_commit"], "nasrisk.params": runtime["params"],
    })
    if run.is_done():  # finished in MLflow although Tune lost track: never recompute
        done = run.client.get_run(run.run_id).data.metrics
        tune.report({**done, "trial_done": 1.0})
        return
    if t["kind"] != "victim" and params_logged.get("victim_key"):
        run.link_victim(str(params_logged["victim_key"]))
    gpus = runtime.get("gpus_per_trial", 0)
    device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    artifacts = Path(tempfile.mkdtemp(prefix="nasrisk-art-"))
    ctx = TuneContext(run, state, device=device, artifact_dir=artifacts,
                      data_root=runtime["data_root"], download=runtime["download"],
                      store_root=runtime.get("store_root"))
    t0 = time.perf_counter()
    attempts = int(state.get("__attempts__", 0)) + 1
    ctx._state["__attempts__"] = attempts
    try:
        metrics = kind(t["config"], ctx)
    except BaseException as e:
        run.fail(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise
    metrics = {**metrics, "time_total_s": time.perf_counter() - t0, "attempts": attempts}
    run.log_artifacts(artifacts)
    run.finish(metrics)
    tune.report({k: float(v) for k, v in metrics.items()} | {"trial_done": 1.0})
    os.environ.get("NASRISK_KEEP_ARTIFACTS") or _rmtree(artifacts)


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
