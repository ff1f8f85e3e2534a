"""Ray Tune runs the trials of each stage; MLflow remembers which are finished.

* One Tune experiment per stage invocation (``<workdir>/tune/<study>.<stage>.<n>``) whose
  trials are the stage's planned trials that MLflow does not already hold as done, so a study
  whose Tune state is lost still never recomputes a finished trial.
* Per-trial resources (fractional GPUs allowed), ``FailureConfig(max_failures)``, trial
  checkpoints through Tune so a retried trial continues from its last epoch, and actor reuse
  so thousands of short trials do not each pay Ray's start-up.
* ``resume`` restores the latest Tune experiment of each stage (``Tuner.restore`` with
  errored trials resumed from their checkpoints), then runs whatever is still missing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from nasrisk.trials.errors import UserError

from .plan import RunOptions, StagePlan, StudyPlan
from .probes import check_trial_resources
from .spec import spec_to_yaml
from .tracking import default_tracking_uri, done_runs, ensure_experiment, git_commit
from .workdir import Workdir

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# trials checkpoint every epoch on purpose; Tune's warning about frequent snapshots is noise here
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# results live in MLflow, so Tune's per-trial result files are off and its reader would complain
logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


@dataclass
class StageOutcome:
    stage: str
    total: int
    skipped: int
    finished: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class StudyOutcome:
    study: str
    tracking_uri: str
    experiment_id: str
    stages: list[StageOutcome]

    @property
    def failed(self) -> int:
        return sum(len(s.failed) for s in self.stages)


def init_ray(address: str | None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` (a cluster, or a job's own), else start a
    local instance bound to 127.0.0.1 only (Ray listens on all interfaces unless told)."""
    import ray

    if ray.is_initialized():
        return
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    try:
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or None, **quiet)
        else:
            # Ray swaps 127.0.0.1 for the machine's public address unless multi-node support
            # is off (ray/_private/services.py resolve_ip_for_localhost): turn it off for this
            # single-node instance, in this process and in the ones Ray starts, so every Ray
            # port listens on loopback only.
            import ray._private.ray_constants as ray_constants

            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
    except ConnectionError as e:
        raise UserError(f"cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS')}: "
                        f"{e}") from None


def _runtime(plan: StudyPlan, stage: StagePlan, uri: str, exp_id: str, wd: Workdir,
             data_root: Path, download: bool) -> dict[str, Any]:
    return {
        "study": plan.spec.name, "profile": plan.profile, "params": plan.params,
        "tracking_uri": uri, "experiment_id": exp_id, "data_root": str(data_root),
        "download": download, "store_root": str(wd.store),
        "cpus_per_trial": stage.resources.cpu, "gpus_per_trial": stage.resources.gpu,
        "version": version("nasrisk"), "git_commit": git_commit(),
    }


def trial_name(trial: Any) -> str:
    return trial.config["trial"]["name"]


def _payload(stage: StagePlan, keys: list[str] | None) -> list[dict[str, Any]] | None:
    """What Tune's grid runs over: one entry per planned trial (``keys`` picks and orders)."""
    if keys is None:
        return None
    by_key = {t.key: t for t in stage.trials}
    return [{"key": t.key, "name": t.name, "stage": t.stage, "kind": t.kind, "config": t.config}
            for t in (by_key[k] for k in keys if k in by_key)]


def _restore_stage(path: Path, runtime: dict[str, Any], payload: list[dict[str, Any]] | None,
                   label: str) -> None:
    """Restore a stage's Tune experiment so unfinished trials continue from their checkpoints.

    Tune does not save the param space with the experiment, so a driver killed before Tune's
    first experiment snapshot leaves a state whose search algorithm would invent trials with
    an empty config; the grid is therefore passed again (the same trials, from the run record).
    Should the restore still fail, the unfinished trials start as a fresh experiment instead:
    nothing is lost but their last epochs, and their MLflow runs are found by trial key."""
    from ray import tune

    kw = {"param_space": {"trial": tune.grid_search(payload)}} if payload else {}
    try:
        tuner = tune.Tuner.restore(str(path), trainable=_trainable(runtime),
                                   resume_unfinished=True, resume_errored=True, **kw)
        tuner.fit()
    except Exception as e:  # noqa: BLE001 - trial errors never reach here, only Tune's own
        print(f"[{label}] could not restore {path.name} ({type(e).__name__}: {e}); "
              "running its unfinished trials as a new experiment", file=sys.stderr, flush=True)


def trial_dirname(trial: Any) -> str:
    return f"{trial.config['trial']['key']}_{trial.trial_id}"


def _trainable(runtime: dict[str, Any]):
    from ray import tune

    from .trainable import run_trial

    res = {"cpu": runtime["cpus_per_trial"], "gpu": runtime["gpus_per_trial"]}
    return tune.with_resources(tune.with_parameters(run_trial, runtime=runtime), res)


def _run_stage(plan: StudyPlan, stage: StagePlan, *, uri: str, exp_id: str, wd: Workdir,
               data_root: Path, download: bool, record: dict[str, Any],
               restore: bool, address: str | None) -> StageOutcome:
    from ray import tune

    t0 = time.time()
    name = stage.spec.name
    label = f"{plan.spec.name}/{name}"
    runtime = _runtime(plan, stage, uri, exp_id, wd, data_root, download)
    keys = {t.key for t in stage.trials}
    done = set(done_runs(uri, exp_id, name)) & keys
    exps: list[str] = record.setdefault("tune_experiments", {}).setdefault(name, [])
    # 1. a previous Tune experiment of this stage: restore it (resume only)
    if restore and exps:
        path = wd.tune / exps[-1]
        if tune.Tuner.can_restore(str(path)):
            todo = len(keys - done)
            print(f"[{label}] restoring Tune experiment {path} ({todo} trials not done)",
                  flush=True)
            if todo:
                init_ray(address)
                check_trial_resources(stage, plan.options, address)
                _restore_stage(path, runtime, _payload(stage, record.get("tune_trials", {})
                                                       .get(exps[-1])), label)
            done = set(done_runs(uri, exp_id, name)) & keys
    # 2. whatever MLflow does not hold as done: a fresh Tune experiment
    todo = [t for t in stage.trials if t.key not in done]
    skipped = len(stage.trials) - len(todo)
    if skipped:
        print(f"[{label}] {skipped} of {len(stage.trials)} trials already done in MLflow; "
              "not rerunning them", flush=True)
    if todo:
        init_ray(address)
        check_trial_resources(stage, plan.options, address)
        exp_name = f"{plan.spec.name}.{name}.{len(exps) + 1}"
        exps.append(exp_name)
        record.setdefault("tune_trials", {})[exp_name] = [t.key for t in todo]
        wd.save_run_record(plan.spec.name, record)
        payload = _payload(stage, [t.key for t in todo])
        tuner = tune.Tuner(
            _trainable(runtime),
            param_space={"trial": tune.grid_search(payload)},
            tune_config=tune.TuneConfig(reuse_actors=_reuse_actors(), trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=exp_name, storage_path=str(wd.tune), verbose=0,
                failure_config=tune.FailureConfig(max_failures=plan.options.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[_progress(label, len(stage.trials), skipped)],
            ),
        )
        tuner.fit()
    now_done = set(done_runs(uri, exp_id, name)) & keys
    failed = [t.name for t in stage.trials if t.key not in now_done]
    return StageOutcome(name, len(stage.trials), skipped, len(now_done) - skipped, failed,
                        time.time() - t0)


def _reuse_actors() -> bool:
    """Actor reuse saves Ray's per-trial start-up (bench/bench_runner.py measures it);
    NASRISK_REUSE_ACTORS=0 turns it off, e.g. to isolate a leaking trial kind."""
    return os.environ.get("NASRISK_REUSE_ACTORS", "1") != "0"


def _progress(label: str, total: int, skipped: int):
    from .progress import ProgressPrinter

    return ProgressPrinter(label, total, skipped)


def run_study(plan: StudyPlan, *, workdir: str | Path | None = None,
              tracking_uri: str | None = None, address: str | None = None,
              data_root: str | Path | None = None, download: bool = False,
              restore: bool = False) -> StudyOutcome:
    """Run (or, with ``restore``, resume) every stage of a planned study."""
    wd = Workdir.at(workdir)
    wd.root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(wd.root)
    data = Path(data_root).resolve() if data_root else wd.data
    exp_id = ensure_experiment(uri, plan.spec.name, wd.artifacts)
    try:
        record = wd.run_record(plan.spec.name) if restore else {}
    except UserError:
        record = {}
    if not restore and (wd.study_dir(plan.spec.name) / "run.json").is_file():
        record = {"tune_experiments": wd.run_record(plan.spec.name).get("tune_experiments", {})}
    record.update({
        "study": plan.spec.name, "spec_yaml": spec_to_yaml(plan.spec),
        "options": plan.options.__dict__, "tracking_uri": uri, "address": address,
        "data_root": str(data), "download": download,
    })
    wd.save_run_record(plan.spec.name, record)
    outcomes = []
    for stage in plan.stages:
        out = _run_stage(plan, stage, uri=uri, exp_id=exp_id, wd=wd, data_root=data,
                         download=download, record=record, restore=restore,
                         address=address)
        wd.save_run_record(plan.spec.name, record)
        outcomes.append(out)
        if out.failed:
            print(f"[{plan.spec.name}/{stage.spec.name}] {len(out.failed)} trials failed "
                  f"(e.g. {out.failed[0]}); their MLflow runs carry the error "
                  "(tag nasrisk.error); `nasrisk resume` retries them", file=sys.stderr)
            if stage is not plan.stages[-1]:
                print("later stages need this one complete: stopping here", file=sys.stderr)
                break
    return StudyOutcome(plan.spec.name, uri, exp_id, outcomes)


def options_from_record(record: dict[str, Any]) -> RunOptions:
    return RunOptions(**record["options"])
