"""Ray Tune runs the trials of each stage; MLflow remembers which are finished.

* One Tune experiment per stage invocation (``<workdir>/tune/<study>.<stage>.<n>``) whose
  trials are the stage's planned trials that MLflow does not already hold as done, so a study
  whose Tune state is lost still never recomputes a finished trial.
* Per-trial resources (fractional GPUs allowed), ``FailureConfig(max_failures)``, trial
  checkpoints through Tune so a retried trial continues from its last epoch, and actor reuse
  so thousands of short trials do not each pay Ray's start-up.
* ``resume`` (and a second ``run``) starts a new Tune experiment of the trials not done; each
  continues from its newest good checkpoint in any of the stage's experiments (see
  :mod:`nasrisk.study.trainable`). Restoring Tune's own experiment snapshot instead would lose
  the checkpoints written after its last snapshot, and fail on ones it has since deleted.
* One driver per workdir (:mod:`nasrisk.study.lock`); SIGINT / SIGTERM and a store that
  vanishes or turns read-only stop the study cleanly (:mod:`nasrisk.study.guard`).
* A stage runs once every stage it ``needs`` (or derives ``from``) is complete, every trial
  done; otherwise it is skipped with one line, and stages that do not need the incomplete one
  still run. A derived stage gets its trials when it is reached: the runner turns its source
  stage's finished runs into items (:mod:`nasrisk.study.selectors`; configs from the plan,
  metrics and artifacts from MLflow), the selector picks some, and
  :func:`~nasrisk.study.plan.derive_trials` keys them, so ``resume`` selects the same trials.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from nasrisk.trials.errors import UserError

from .commands import shell_command
from .guard import StudyGuard, StudyInterrupted, tune_stopper
from .lock import WorkdirLock
from .plan import RunOptions, StagePlan, StudyPlan, derive_trials
from .probes import check_trial_resources, sqlite_path
from .selectors import SELECTORS
from .spec import StageSpec, spec_to_yaml
from .tracking import (
    client,
    default_tracking_uri,
    done_runs,
    ensure_experiment,
    failed_runs,
    git_commit,
)
from .workdir import Workdir

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# SIGINT is the study guard's (it stops the trials and says how to resume), not Tune's
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# a derived stage fetches one artifact per source run: no progress bar for each
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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
    #: trial name -> first line of the error its MLflow run holds (failed trials with a run)
    errors: dict[str, str] = field(default_factory=dict)
    #: why the stage did not run ("needs victims (3 trials failed)"); None when it ran
    blocked: str | None = None


@dataclass
class StudyOutcome:
    study: str
    tracking_uri: str
    experiment_id: str
    stages: list[StageOutcome]

    @property
    def failed(self) -> int:
        return sum(len(s.failed) for s in self.stages)

    @property
    def skipped(self) -> list[str]:
        """Stages that did not run because a stage they need is incomplete (so some trial
        failed too: ``failed`` > 0 whenever this is not empty)."""
        return [s.stage for s in self.stages if s.blocked is not None]


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
        "download": download, "store_root": str(wd.store), "tune_root": str(wd.tune),
        "cpus_per_trial": stage.resources.cpu, "gpus_per_trial": stage.resources.gpu,
        "version": version("nasrisk"), "git_commit": git_commit(),
    }


def trial_name(trial: Any) -> str:
    return trial.config["trial"]["name"]


def _payload(trials: list[Any]) -> list[dict[str, Any]]:
    """What Tune's grid runs over: one entry per trial to run."""
    return [{"key": t.key, "name": t.name, "stage": t.stage, "kind": t.kind, "config": t.config,
             **({"source_run_id": t.source_run_id} if t.source_run_id else {})}
            for t in trials]


def trial_dirname(trial: Any) -> str:
    return f"{trial.config['trial']['key']}_{trial.trial_id}"


def _trainable(runtime: dict[str, Any]):
    from ray import tune

    from .trainable import run_trial

    res = {"cpu": runtime["cpus_per_trial"], "gpu": runtime["gpus_per_trial"]}
    return tune.with_resources(tune.with_parameters(run_trial, runtime=runtime), res)


def _run_stage(plan: StudyPlan, stage: StagePlan, *, uri: str, exp_id: str, wd: Workdir,
               data_root: Path, download: bool, record: dict[str, Any],
               address: str | None, guard: StudyGuard) -> StageOutcome:
    from ray import tune

    t0 = time.time()
    name = stage.spec.name
    label = f"{plan.spec.name}/{name}"
    runtime = _runtime(plan, stage, uri, exp_id, wd, data_root, download)
    keys = {t.key for t in stage.trials}
    done = set(done_runs(uri, exp_id, name)) & keys
    exps: list[str] = record.setdefault("tune_experiments", {}).setdefault(name, [])
    # whatever MLflow does not hold as done: a fresh Tune experiment, each trial continuing
    # from its newest good checkpoint in the stage's earlier experiments
    todo = [t for t in stage.trials if t.key not in done]
    skipped = len(stage.trials) - len(todo)
    if skipped:
        print(f"[{label}] {skipped} of {len(stage.trials)} trials already done in MLflow; "
              "not rerunning them", flush=True)
    if todo and exps:
        print(f"[{label}] {len(todo)} trials not done: each continues from its last "
              f"checkpoint in {wd.tune} (if any)", flush=True)
    if todo:
        init_ray(address)
        guard.install()  # again: ray.init sets its own SIGTERM handler
        check_trial_resources(stage, plan.options, address)
        guard.raise_if_stopped()
        exp_name = f"{plan.spec.name}.{name}.{len(exps) + 1}"
        exps.append(exp_name)
        wd.save_run_record(plan.spec.name, record)
        payload = _payload(todo)
        tuner = tune.Tuner(
            _trainable(runtime),
            param_space={"trial": tune.grid_search(payload)},
            tune_config=tune.TuneConfig(reuse_actors=_reuse_actors(), trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=exp_name, storage_path=str(wd.tune), verbose=0, stop=tune_stopper(),
                failure_config=tune.FailureConfig(max_failures=plan.options.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[_progress(label, len(stage.trials), skipped)],
            ),
        )
        try:
            tuner.fit()
        except KeyboardInterrupt:  # a second signal: Tune did not get to stop the trials
            raise StudyInterrupted(guard.signum or 2, guard.resume_hint) from None
        except Exception:
            guard.raise_if_stopped()  # Tune failing because the store went away
            raise
        guard.raise_if_stopped()
    now_done = set(done_runs(uri, exp_id, name)) & keys
    failed = [t.name for t in stage.trials if t.key not in now_done]
    errors = failed_runs(uri, exp_id, name) if failed else {}
    by_key = {t.key: t.name for t in stage.trials}
    return StageOutcome(name, len(stage.trials), skipped, len(now_done) - skipped, failed,
                        time.time() - t0,
                        {by_key[k]: e for k, e in errors.items() if k in by_key and k not in now_done})


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
    """Run (or, with ``restore``, resume) every stage of a planned study. Holds the workdir
    (:class:`~nasrisk.study.lock.WorkdirLock`) throughout; raises
    :class:`~nasrisk.study.guard.StudyInterrupted` when a signal stopped it and
    :class:`~nasrisk.study.guard.StoreLost` when its store failed mid-run."""
    wd = Workdir.at(workdir)
    with WorkdirLock(wd.root):
        uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or default_tracking_uri(wd.root))
        hint = f"{shell_command('nasrisk')} resume {plan.spec.name} --workdir {wd.root}"
        with StudyGuard(resume_hint=hint, db=sqlite_path(uri),
                        writable=[wd.root, wd.tune]) as guard:
            return _run_study(plan, wd, uri, address, data_root, download, restore, guard)


def _run_study(plan: StudyPlan, wd: Workdir, uri: str, address: str | None,
               data_root: str | Path | None, download: bool, restore: bool,
               guard: StudyGuard) -> StudyOutcome:
    data = Path(data_root).resolve() if data_root else wd.data
    exp_id = ensure_experiment(uri, plan.spec.name, wd.artifacts)
    guard.watch_store()
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

    def run_one(stage: StagePlan) -> StageOutcome:
        if stage.derived is not None:
            _check_datasets(stage, data, download)
        out = _run_stage(plan, stage, uri=uri, exp_id=exp_id, wd=wd, data_root=data,
                         download=download, record=record, address=address, guard=guard)
        wd.save_run_record(plan.spec.name, record)
        return out

    outcomes = run_stages(plan, run_one, lambda st: source_items(plan, st, uri, exp_id),
                          guard.resume_hint)
    return StudyOutcome(plan.spec.name, uri, exp_id, outcomes)


def _check_datasets(stage: StagePlan, root: Path, download: bool) -> None:
    """The datasets of a derived stage's trials, known once it is derived: a missing one is
    one line (as `run` says of the planned stages' before Ray starts), not a failure of every
    trial."""
    from nasrisk.trials.data import load_dataset

    for n in sorted({t.config.get("dataset") for t in stage.trials} - {None, "embedded"}):
        load_dataset(n, root=root, download=download)


def blocked_by(spec: StageSpec, incomplete: dict[str, str]) -> str | None:
    """Why ``spec`` cannot run: the stages it needs or derives from that are not complete
    (``incomplete``: stage -> why), or None."""
    needs = list(dict.fromkeys([*spec.needs, *([spec.from_] if spec.from_ else [])]))
    missing = [f"{n} ({incomplete[n]})" for n in needs if n in incomplete]
    return f"needs {', '.join(missing)}" if missing else None


def run_stages(plan: StudyPlan, run_stage: Callable[[StagePlan], StageOutcome],
               items_of: Callable[[StagePlan], list[dict[str, Any]]],
               resume_hint: str) -> list[StageOutcome]:
    """Every stage in order: skipped (one line) when a stage it needs is incomplete; a derived
    stage first gets its trials from ``items_of`` (its source's finished results) and its
    selector. ``run_stage`` runs one stage's trials."""
    incomplete: dict[str, str] = {}
    outcomes = []
    for stage in plan.stages:
        name = stage.spec.name
        label = f"{plan.spec.name}/{name}"
        why = blocked_by(stage.spec, incomplete)
        if why is not None:
            print(f"[{label}] skipped: {why}", file=sys.stderr, flush=True)
            incomplete[name] = "skipped"
            outcomes.append(StageOutcome(name, len(stage.trials), 0, 0, blocked=why))
            continue
        if stage.derived is not None:
            _derive(plan, stage, items_of(stage), label)
        out = run_stage(stage)
        outcomes.append(out)
        if out.failed:
            print(f"[{label}] {_failure_line(out)}; `{resume_hint}` retries them",
                  file=sys.stderr, flush=True)
            incomplete[name] = f"{len(out.failed)} trials failed"
    return outcomes


def _derive(plan: StudyPlan, stage: StagePlan, items: list[dict[str, Any]], label: str) -> None:
    d = stage.derived
    assert d is not None
    chosen = SELECTORS.get(d.selector).select(items, d.select)
    stage.trials = derive_trials(plan, stage, chosen)
    what = "rows" if SELECTORS.get(d.selector).artifact(d.select) else "results"
    print(f"[{label}] derived {len(stage.trials)} trials from {d.source}: {len(chosen)} of "
          f"{len(items)} {what} selected by {d.describe()}", flush=True)


def source_items(plan: StudyPlan, stage: StagePlan, uri: str,
                 exp_id: str) -> list[dict[str, Any]]:
    """The items a derived stage selects from (:mod:`nasrisk.study.selectors`): its source
    stage's finished trials in plan order (config from the plan, metrics from MLflow), or the
    rows of the artifact the selector reads, fetched from each of their runs."""
    d = stage.derived
    assert d is not None
    src = plan.stage(d.source)
    runs = done_runs(uri, exp_id, d.source)
    artifact = SELECTORS.get(d.selector).artifact(d.select)
    items: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nasrisk-select-") as tmp:
        for i, t in enumerate(src.trials):
            r = runs.get(t.key)
            if r is None:  # not done: the stage would have been skipped
                continue
            item = {"key": t.key, "run_id": r.info.run_id, "name": t.name, "index": i,
                    "config": t.config, "metrics": dict(r.data.metrics)}
            if artifact is None:
                items.append(item)
                continue
            rows = _artifact_rows(uri, r.info.run_id, artifact, Path(tmp) / str(i),
                                  f"stage {stage.spec.name}: {d.source} trial {t.name} (run "
                                  f"{r.info.run_id})")
            items.extend({**item, "row": row, "row_index": j} for j, row in enumerate(rows))
    return items


def _artifact_rows(uri: str, run_id: str, artifact: str, dst: Path,
                   where: str) -> list[dict[str, Any]]:
    """The rows (a JSON list of objects) of one run's artifact; UserError when it is missing
    or holds something else."""
    dst.mkdir(parents=True)
    try:
        path = client(uri).download_artifacts(run_id, artifact, str(dst))
        rows = json.loads(Path(path).read_text())
    except Exception as e:  # noqa: BLE001 - missing, unreadable or not JSON: one line
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{where}: cannot read its artifact {artifact} ({first})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{where}: artifact {artifact} is not a JSON list of objects (rows)")
    return rows


def _failure_line(out: StageOutcome) -> str:
    """How many trials failed and what their MLflow runs say (only what they do say)."""
    line = f"{len(out.failed)} trials failed"
    if out.errors:
        name, err = next(iter(out.errors.items()))
        line += (f" (e.g. {name}: {err[:200]}); {len(out.errors)} of their MLflow runs hold "
                 "the error (tag nasrisk.error)")
    else:
        line += f" (e.g. {out.failed[0]}); no MLflow run holds their error"
    return line


def options_from_record(record: dict[str, Any]) -> RunOptions:
    return RunOptions(**record["options"])
