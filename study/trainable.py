"""The function Ray Tune runs for every trial (on a worker): it opens the trial's one MLflow
run, restores the trial's state from its newest good checkpoint, calls the plain trial kind
with a :class:`TuneContext`, and marks the run done.

Checkpoints. A trial's checkpoints live in its Tune trial folders,
``<workdir>/tune/<study>.<stage>.<n>/<trial key>_<trial id>/checkpoint_*`` (``state.pt`` plus
``meta.json``: run id, key, a sequence number that grows over every attempt, the epoch, and
the SHA-256 of ``state.pt``). A trial starts from the newest good one among *all* of its
key's folders in the stage's experiments, not only from the one Tune hands it: Tune's
experiment snapshot lags its trials' checkpoints by seconds (a driver killed in between would
restart trials from an older checkpoint, or from scratch), and a later experiment of the
stage (``resume``) knows nothing of an earlier one's checkpoints. A checkpoint that is
missing a file, fails its checksum or does not load is skipped with one warning line naming
the trial and epoch, and the next older one is used (or none: from scratch).

Warnings a trial raises (:meth:`TuneContext.warn`) reach the driver's console through a Tune
result (key :data:`WARNING_KEY`) and are kept on the run as tag ``nasrisk.warning``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ray import tune

import nasrisk.trials  # noqa: F401  (registries import their entries on first lookup, in this worker too)
from nasrisk.trials.context import TrialContext
from nasrisk.trials.registry import TRIAL_KINDS
from nasrisk.trials.store import sha256_file

from . import tags
from .progress import EPOCH_KEY, EPOCHS_TOTAL_KEY, WARNING_KEY
from .tracking import TAG_KIND, TAG_STAGE, TAG_STUDY, ModelRun, TrialRun, find_model_run

STATE_FILE = "state.pt"
META_FILE = "meta.json"
TAG_WARNING = tags.WARNING
#: a progress message's "epoch 3/200", "iteration 7/50", "arch 12/100"
_STEPS = re.compile(r"(?:epoch|iteration|arch) (\d+)/(\d+)\b")


def state_epoch(state: Mapping[str, Any]) -> int | None:
    """The furthest ``epoch`` among the state's parts (training loops save one), if any."""
    epochs = [v["epoch"] for v in state.values()
              if isinstance(v, Mapping) and isinstance(v.get("epoch"), int)]
    return max(epochs) if epochs else None


def _report_warning(message: str) -> None:
    print(f"nasrisk warning: {message}", file=sys.stderr, flush=True)
    tune.report({WARNING_KEY: message})


class TuneContext(TrialContext):
    """Checkpoints through ``ray.tune.report`` (the run id travels inside the checkpoint) and
    logs metrics, artifacts and warnings to the trial's MLflow run."""

    def __init__(self, run: TrialRun, state: dict[str, Any], *, key: str,
                 model_tags: Mapping[str, str] | None = None, epochs_total: int | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        #: the config's ``epochs``, if it has one (calibrate): the total behind a bare epoch
        self.epochs_total = epochs_total
        self.run = run
        self.key = key
        self._state = state
        self._saves = 0
        #: (done, total) of the latest "epoch i/N" / "iteration i/N" progress message, reported
        #: with the next checkpoint as the trial's progress (the driver's ETA, progress.py)
        self.steps: tuple[int, int] | None = None
        #: tags every model run this trial makes also gets (study, version, commit)
        self.model_tags = dict(model_tags or {})

    def model_run(self, key: str, *, name: str, parent_key: str, step_kind: str,
                  params: Mapping[str, Any], metrics: Mapping[str, float],
                  parent_run_id: str | None = None) -> str | None:
        """Find or create the model run of the store entry ``key`` (study/tracking.py
        :class:`ModelRun`), made by this trial's run."""
        return ModelRun(self.run.uri, self.run.experiment_id).ensure(
            key, name=name, parent_key=parent_key, step_kind=step_kind, params=params,
            metrics=metrics, made_by=self.run.run_id, parent_run_id=parent_run_id,
            extra_tags=self.model_tags)

    def model_used(self, key: str, run_id: str | None) -> None:
        """Tag the trial's run with the model run of the model it used (the store record's,
        else the one found by its lineage key in this experiment)."""
        if not run_id:
            found = find_model_run(self.run.client, [self.run.experiment_id], key)
            run_id = found.info.run_id if found is not None else None
        if run_id:
            self.run.set_tags({tags.MODEL_RUN_ID: run_id})

    def _persist(self, metrics: Mapping[str, float]) -> None:
        self._saves += 1
        seq = int(self._state.get("__seq__", 0)) + 1
        self._state["__seq__"] = seq
        with tempfile.TemporaryDirectory(prefix="nasrisk-ckpt-") as d:
            write_checkpoint(Path(d), self._state, run_id=self.run.run_id, key=self.key)
            report = {k: float(v) for k, v in metrics.items()}
            report["checkpoint_saves"] = self._saves
            report.update(self.progress_keys())
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log_metrics(metrics, step=step)

    def progress(self, message: str) -> None:
        super().progress(message)
        m = _STEPS.search(message)
        if m and int(m.group(2)) > 0:
            self.steps = (int(m.group(1)), int(m.group(2)))

    def progress_keys(self) -> dict[str, float]:
        """``epoch`` / ``epochs_total`` for the driver's ETA: the latest progress message's
        "epoch i/N" when there was one, else the state's furthest epoch (of ``epochs``
        from the trial's config, when it has that key)."""
        if self.steps is not None:
            return {EPOCH_KEY: float(self.steps[0]), EPOCHS_TOTAL_KEY: float(self.steps[1])}
        epoch = state_epoch(self._state)
        if epoch is None:
            return {}
        out = {EPOCH_KEY: float(epoch)}
        if isinstance(self.epochs_total, int) and self.epochs_total > 0:
            out[EPOCHS_TOTAL_KEY] = float(self.epochs_total)
        return out

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.run.set_tags({TAG_WARNING: " | ".join(self.warnings)[-4000:]})
        _report_warning(message)


# -- checkpoints -----------------------------------------------------------------------------
class CorruptCheckpoint(Exception):
    """A checkpoint folder that cannot be used; the message says why."""


def checkpoint_dirs(tune_root: str | Path, study: str, stage: str, key: str) -> list[Path]:
    """Every checkpoint folder of trial ``key`` in the stage's Tune experiments."""
    pattern = (f"{glob.escape(study)}.{glob.escape(stage)}.*/{glob.escape(key)}_*/"
               "checkpoint_*")
    return [p for p in Path(tune_root).glob(pattern) if p.is_dir()]


def write_checkpoint(d: Path, state: dict[str, Any], *, run_id: str | None, key: str) -> None:
    """``state.pt`` and ``meta.json`` of one checkpoint into the folder ``d``."""
    torch.save(state, d / STATE_FILE)
    meta = {"run_id": run_id, "key": key, "seq": int(state.get("__seq__", 0)),
            "epoch": state_epoch(state), "time": time.time(), "sha256": sha256_file(d / STATE_FILE)}
    (d / META_FILE).write_text(json.dumps(meta))


def _meta(d: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def load_checkpoint(d: Path, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of the checkpoint folder ``d``, or :class:`CorruptCheckpoint`."""
    meta = _meta(d)
    if meta is None:
        raise CorruptCheckpoint(f"{META_FILE} is missing or unreadable")
    if meta.get("key") not in (None, key):
        raise CorruptCheckpoint(f"it belongs to trial {meta.get('key')}")
    pt = d / STATE_FILE
    if not pt.is_file():
        raise CorruptCheckpoint(f"{STATE_FILE} is missing")
    try:
        if meta.get("sha256") and sha256_file(pt) != meta["sha256"]:
            raise CorruptCheckpoint(f"{STATE_FILE} does not match its SHA-256")
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except CorruptCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001 - whatever does not load is corrupt
        raise CorruptCheckpoint(f"{STATE_FILE} does not load ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{STATE_FILE} holds no state dict")
    return state, meta


def _order(d: Path) -> tuple[int, float]:
    meta = _meta(d) or {}
    try:
        mtime = d.stat().st_mtime
    except OSError:
        mtime = 0.0
    seq = meta.get("seq")
    return (seq if isinstance(seq, int) else -1, mtime)


def _where(d: Path, meta: Mapping[str, Any] | None) -> str:
    epoch = (meta or {}).get("epoch")
    at = f"at epoch {epoch}" if isinstance(epoch, int) else "(epoch unknown)"
    return f"checkpoint {at} ({d.parent.parent.name}/{d.parent.name}/{d.name})"


def newest_good_checkpoint(dirs: list[Path], key: str, name: str,
                           warn: Callable[[str], None]) -> tuple[dict[str, Any], str | None]:
    """(state, run id) of the newest checkpoint among ``dirs`` that loads; corrupt newer ones
    are named in one ``warn`` line. ({}, None) when there is none: start from scratch."""
    bad: list[str] = []
    for d in sorted(set(dirs), key=_order, reverse=True):
        try:
            state, meta = load_checkpoint(d, key)
        except CorruptCheckpoint as e:
            bad.append(f"{_where(d, _meta(d))} is corrupt ({e})")
            continue
        if bad:
            epoch = meta.get("epoch")
            warn(f"trial {name}: {'; '.join(bad)}: continuing from the "
                 f"{'checkpoint at epoch ' + str(epoch) if isinstance(epoch, int) else 'previous checkpoint'}")
        return state, meta.get("run_id")
    if bad:
        warn(f"trial {name}: {'; '.join(bad)}: starting from scratch")
    return {}, None


def _restore(t: Mapping[str, Any], runtime: Mapping[str, Any],
             warn: Callable[[str], None]) -> tuple[dict[str, Any], str | None]:
    dirs: list[Path] = []
    if runtime.get("tune_root"):
        dirs = checkpoint_dirs(runtime["tune_root"], runtime["study"], t["stage"], t["key"])
    ckpt = tune.get_checkpoint()
    if ckpt is not None and Path(ckpt.path).is_dir():  # the one Tune knows (a retry)
        dirs.append(Path(ckpt.path))
    return newest_good_checkpoint(dirs, t["key"], t["name"], warn)


# -- the trial -------------------------------------------------------------------------------
def run_trial(params: dict[str, Any], runtime: dict[str, Any]) -> None:
    """Tune entry point. ``params["trial"]`` is one planned trial; ``runtime`` holds what is the
    same for all trials of a study run (tracking URI, experiment id, paths, resources)."""
    t = params["trial"]
    torch.set_num_threads(max(1, int(runtime.get("cpus_per_trial", 1))))
    early: list[str] = []

    def warn_early(message: str) -> None:
        early.append(message)
        _report_warning(message)

    state, run_id = _restore(t, runtime, warn_early)
    run = TrialRun(runtime["tracking_uri"], runtime["experiment_id"], t["key"])
    kind = TRIAL_KINDS.get(t["kind"])
    params_logged = {**t["config"], "profile": runtime["profile"], "stage": t["stage"],
                     "kind": t["kind"]}
    params_logged.update(kind.extra_params(kind.validate(t["config"])))
    run.open(run_id=run_id, name=t["name"], params=params_logged, tags={
        TAG_STUDY: runtime["study"], TAG_STAGE: t["stage"], TAG_KIND: t["kind"],
        tags.PROFILE: runtime["profile"], tags.VERSION: runtime["version"],
        tags.GIT_COMMIT: runtime["git_commit"], tags.PARAMS: runtime["params"],
    })
    if run.is_done():  # finished in MLflow although Tune lost track: never recompute
        done = run.client.get_run(run.run_id).data.metrics
        tune.report({**done, "trial_done": 1.0})
        return
    run.log_dataset(t["config"], runtime["data_root"])  # the runs table's Dataset column
    if early:
        run.set_tags({TAG_WARNING: " | ".join(early)[-4000:]})
    if t.get("source_run_id"):  # a derived stage's trial: the earlier trial it was selected from
        run.set_tags({tags.SOURCE_RUN_ID: str(t["source_run_id"])})
    lineage_key = params_logged.get(tags.P_LINEAGE_KEY) or params_logged.get("victim_key")
    if t["kind"] != "victim" and lineage_key:
        run.link_victim(str(lineage_key))
    gpus = runtime.get("gpus_per_trial", 0)
    device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    # created only if the trial writes an artifact (TrialContext.artifact_dir makes it)
    artifacts = Path(tempfile.gettempdir()) / f"nasrisk-art-{uuid.uuid4().hex[:12]}"
    ctx = TuneContext(run, state, key=t["key"], device=device, artifact_dir=artifacts,
                      data_root=runtime["data_root"], download=runtime["download"],
                      store_root=runtime.get("store_root"),
                      epochs_total=t["config"].get("epochs"),
                      model_tags={TAG_STUDY: runtime["study"], tags.VERSION: runtime["version"],
                                  tags.GIT_COMMIT: runtime["git_commit"]})
    ctx.warnings.extend(early)
    t0 = time.perf_counter()
    attempts = int(state.get("__attempts__", 0)) + 1
    ctx._state["__attempts__"] = attempts
    try:
        try:
            metrics = kind(t["config"], ctx)
        except (KeyboardInterrupt, SystemExit) as e:
            # Tune stopping the trial (the study is being stopped) is not a failure
            if isinstance(e, SystemExit) and e.code not in (0, None):
                exit_message = f"SystemExit: {e.code}"
                _quietly(lambda: run.fail(exit_message))
            else:
                _quietly(run.stop)
            raise
        except BaseException as e:
            message = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            _quietly(lambda: run.fail(message))  # a broken store must not hide the error
            raise
        metrics = {**metrics, "time_total_s": time.perf_counter() - t0, "attempts": attempts}
        run.log_artifacts(artifacts)
        run.finish(metrics)
        tune.report({k: float(v) for k, v in metrics.items()} | {"trial_done": 1.0})
    finally:
        if not os.environ.get("NASRISK_KEEP_ARTIFACTS"):
            shutil.rmtree(artifacts, ignore_errors=True)
        release_memory()


def release_memory() -> None:
    """Give a finished trial's freed memory back to the system: ``gc`` then glibc's
    ``malloc_trim`` (freed heap pages stay with the process otherwise, so a reused worker
    idles at its last trial's peak; bench/bench_worker_memory.py measures it). No-op where
    glibc is not the allocator."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - best effort while the trial ends anyway
        pass
