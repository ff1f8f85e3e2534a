"""MLflow run identity: exactly one run per trial, always.

Ray's ``MLflowLoggerCallback`` and ``setup_mlflow`` open a new run on every retry or restore,
so trials log through :class:`mlflow.MlflowClient` themselves. A trial's run carries the tag
``nasrisk.trial_key`` (a hash of its config); its id is kept in the trial checkpoint and reused
on retry/resume, with a tag search as the fallback when the checkpoint predates the run. A run
tagged ``nasrisk.status=done`` is finished: the runner never computes that trial again.

The driver creates the database and the experiment before any trial starts (concurrent first
use of a fresh SQLite store races in alembic).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from nasrisk.trials.errors import UserError  # noqa: E402

from . import tags  # noqa: E402

TAG_KEY = tags.TRIAL_KEY
TAG_STATUS = tags.STATUS
TAG_ROLE = tags.ROLE
TAG_STUDY = tags.STUDY
TAG_STAGE = tags.STAGE
TAG_KIND = tags.KIND
TAG_ERROR = tags.ERROR
TAG_HOST = tags.HOST  # TrialRun.open's `tags` argument hides the module there
TAG_PID = tags.PID
# MLflow 3's UI opens an experiment on its runs table only when this experiment tag says the
# work is model training (values from mlflow/server/js: genai_development,
# custom_model_development, ...); untagged experiments open on the GenAI overview.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def default_tracking_uri(workdir: Path) -> str:
    from .probes import sqlite_uri  # quotes `?` and `%`, which SQLAlchemy would misread

    return sqlite_uri(Path(workdir) / "mlflow.db")


def client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """Create (or find) the study's experiment from the driver; returns its id. The experiment
    is tagged as model training (``mlflow.experimentKind``) so the UI opens on its runs; an
    existing experiment the user tagged otherwise keeps its tag."""
    c = client(uri)
    try:
        exp = c.get_experiment_by_name(name)
    except MlflowException as e:
        raise UserError(f"cannot reach the MLflow tracking store {uri}: {e.message.splitlines()[0]}") from None
    except Exception as e:  # connection refused and the like, from the REST client
        raise UserError(f"cannot reach the MLflow tracking store {uri}: {e}") from None
    if exp is not None:
        if TAG_EXPERIMENT_KIND not in exp.tags:  # created by an older nasrisk
            c.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return exp.experiment_id
    loc = None
    if artifact_root is not None and not uri.startswith(("http://", "https://")):
        loc = (Path(artifact_root).resolve() / name).as_uri()
    return c.create_experiment(name, artifact_location=loc,
                               tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})


def done_runs(uri: str, experiment_id: str, stage: str | None = None) -> dict[str, Any]:
    """trial key -> finished run, for every trial run tagged done."""
    c = client(uri)
    filt = f"tags.`{TAG_STATUS}` = 'done' and tags.`{TAG_ROLE}` = 'trial'"
    if stage:
        filt += f" and tags.`{TAG_STAGE}` = '{stage}'"
    out, token = {}, None
    while True:
        page = c.search_runs([experiment_id], filter_string=filt, max_results=1000,
                             page_token=token)
        for r in page:
            out[r.data.tags[TAG_KEY]] = r
        token = page.token
        if not token:
            return out


def failed_runs(uri: str, experiment_id: str, stage: str | None = None) -> dict[str, str]:
    """trial key -> the first line of its error, for every trial run tagged failed."""
    filt = f"tags.`{TAG_STATUS}` = 'failed' and tags.`{TAG_ROLE}` = 'trial'"
    if stage:
        filt += f" and tags.`{TAG_STAGE}` = '{stage}'"
    runs = client(uri).search_runs([experiment_id], filter_string=filt, max_results=1000)
    return {r.data.tags[TAG_KEY]: (r.data.tags.get(TAG_ERROR) or "?").splitlines()[0]
            for r in runs}


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


class TrialRun:
    """The one MLflow run of one trial: found by id or tag, created only if neither exists."""

    def __init__(self, uri: str, experiment_id: str, key: str) -> None:
        self.uri, self.experiment_id, self.key = uri, experiment_id, key
        self.client = client(uri)
        self.run_id: str | None = None

    def find(self) -> Any | None:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`{TAG_KEY}` = '{self.key}'",
                                       max_results=5)
        trial_runs = [r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"]
        return min(trial_runs, key=lambda r: r.info.start_time) if trial_runs else None

    def open(self, *, run_id: str | None, name: str, tags: Mapping[str, str],
             params: Mapping[str, Any]) -> str:
        """Reopen ``run_id`` (from the checkpoint) or the run tagged with the key; else create."""
        run = None
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                run = None
        if run is None:
            run = self.find()
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={**tags, TAG_KEY: self.key, TAG_ROLE: "trial",
                                               TAG_STATUS: "running"})
            flat = flatten(params)
            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        self.run_id = run.info.run_id
        if run.data.tags.get(TAG_STATUS) == "done":
            return self.run_id  # finished: leave it exactly as it is
        self.client.update_run(self.run_id, status="RUNNING")
        self.set_tags({TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
                       TAG_STATUS: "running"})
        return self.run_id

    def link_victim(self, lineage_key: str) -> str | None:
        """Tag this run with the MLflow run of the victim it attacks (the victim stage's trial
        run whose param ``lineage_key`` matches), so the UI can jump from an attack to its
        victim."""
        runs = self.client.search_runs(
            [self.experiment_id], max_results=5,
            filter_string=(f"params.{tags.P_LINEAGE_KEY} = '{_q(lineage_key)}' and "
                           f"tags.`{TAG_ROLE}` = 'trial'"),
        )
        victims = [r for r in runs if r.info.run_id != self.run_id
                   and r.data.tags.get(TAG_KIND) == "victim"]
        if not victims:
            return None
        vid = victims[0].info.run_id
        self.set_tags({tags.VICTIM_RUN_ID: vid})
        return vid

    def is_done(self) -> bool:
        assert self.run_id
        return self.client.get_run(self.run_id).data.tags.get(TAG_STATUS) == "done"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if _is_number(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_dataset(self, config: Mapping[str, Any], data_root: str | Path) -> bool:
        """Log the trial's dataset as an MLflow dataset input (the runs table's Dataset
        column): :func:`dataset_input` of its config; False when the config names none."""
        d = dataset_input(config, data_root)
        if d is None:
            return False
        self.client.log_inputs(self.run_id, datasets=[d])  # the store skips a repeated one
        return True

    def log_artifacts(self, directory: Path) -> None:
        if Path(directory).is_dir() and any(Path(directory).iterdir()):
            self.client.log_artifacts(self.run_id, str(directory))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, metrics: Mapping[str, float]) -> None:
        self.log_metrics(metrics)
        self.set_tags({TAG_STATUS: "done"})
        # an earlier attempt's error no longer describes this run
        if TAG_ERROR in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, TAG_ERROR)
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self, message: str) -> None:
        self.set_tags({TAG_STATUS: "failed", TAG_ERROR: message[:4000]})
        self.client.set_terminated(self.run_id, status="FAILED")

    def stop(self) -> None:
        """The study was stopped (a signal, a store fault): not done, and not a failure."""
        self.set_tags({TAG_STATUS: "stopped"})
        self.client.set_terminated(self.run_id, status="KILLED")


#: where the embedded digits come from (shipped in the package, not under the data root)
EMBEDDED_SOURCE = "python-package:nasrisk.trials.data.embedded"


def dataset_input(config: Mapping[str, Any], data_root: str | Path) -> Any | None:
    """The dataset a trial of ``config`` uses, as an MLflow ``DatasetInput``: name = the
    config's ``dataset`` (an attack's or defense's: its victim's), the profile = the train/test
    image caps (``max_train_examples`` / ``max_test_examples``, "all" when uncapped), the digest
    = SHA-256 of both (so a capped subset is its own dataset), the source = the data root's folder of it (the package, for the embedded digits);
    context tag ``train``. None when the config names no dataset."""
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    where = config if "dataset" in config else config.get("victim")
    if not isinstance(where, Mapping) or not where.get("dataset"):
        return None
    name = str(where["dataset"])
    profile = {"train_images": where.get("max_train_examples") or "all",
               "test_images": where.get("max_test_examples") or "all"}
    digest = hashlib.sha256(json.dumps({"name": name, **profile}, sort_keys=True).encode()
                            ).hexdigest()[:16]
    ds = Dataset(name=name, digest=digest, source_type="local",
                 source=json.dumps({"uri": EMBEDDED_SOURCE if name == "embedded"
                                    else str(Path(data_root).resolve() / name)}),
                 profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", "train")])


def _is_number(v: Any) -> bool:
    """Numbers and numeric scalars (numpy, 0-d tensors); not bools or strings."""
    if isinstance(v, (bool, str)):
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _q(value: str) -> str:
    """``value`` inside a single-quoted MLflow filter string."""
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


# -- model runs: one per stored lineage entry (or object) a trial made -----------------------
def find_model_run(c: mlflow.MlflowClient, experiment_ids: list[str], key: str) -> Any | None:
    """The oldest run tagged role ``model`` with lineage key ``key`` in the experiments."""
    runs = c.search_runs(experiment_ids, max_results=10, filter_string=(
        f"tags.`{tags.LINEAGE_KEY}` = '{_q(key)}' and tags.`{TAG_ROLE}` = '{tags.ROLE_MODEL}'"))
    return min(runs, key=lambda r: r.info.start_time) if runs else None


class ModelRun:
    """The one MLflow run of one store entry (a base model, a lineage step, an object): found
    by its lineage key (tag ``nasrisk.lineage_key``, role ``model``) before one is created, so
    a retried trial never makes a second. Tags: the parent's key and run (looked up by the
    parent's key in the experiment, else the hint the parent's store record gives), the trial
    run that made it, the step kind; status ``done``; the step's metrics."""

    def __init__(self, uri: str, experiment_id: str) -> None:
        self.uri, self.experiment_id = uri, experiment_id
        self.client = client(uri)

    def ensure(self, key: str, *, name: str, parent_key: str, step_kind: str,
               params: Mapping[str, Any], metrics: Mapping[str, float],
               made_by: str | None = None, parent_run_id: str | None = None,
               extra_tags: Mapping[str, str] | None = None) -> str:
        run = find_model_run(self.client, [self.experiment_id], key)
        parent = ""
        if parent_key:
            found = find_model_run(self.client, [self.experiment_id], parent_key)
            parent = found.info.run_id if found is not None else (parent_run_id or "")
        run_tags = {TAG_ROLE: tags.ROLE_MODEL, tags.LINEAGE_KEY: key,
                    tags.PARENT_KEY: parent_key, tags.PARENT_RUN_ID: parent,
                    tags.STEP_KIND: step_kind, TAG_STATUS: "done", **(extra_tags or {})}
        if made_by:
            run_tags[tags.MADE_BY_RUN_ID] = made_by
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={k: str(v) for k, v in run_tags.items()})
            items = [Param(k, v) for k, v in flatten(params).items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        else:  # a retried trial made it again: same run, refreshed tags and metrics
            self.client.log_batch(run.info.run_id,
                                  tags=[RunTag(k, str(v)) for k, v in run_tags.items()])
        run_id = run.info.run_id
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if _is_number(v)]
        if items:
            self.client.log_batch(run_id, metrics=items)
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id


def lineage_runs(uri: str, experiment_id: str, key: str) -> list[Any]:
    """The model runs of the lineage ending in ``key``, base first: from the leaf's run up
    its ``nasrisk.parent_run_id`` tags (else its parent's key) to a run without a parent.
    Empty when ``key`` has no model run in the experiment; it stops at a parent that has none
    (made under another experiment or tracking store)."""
    c = client(uri)
    out: list[Any] = []
    run = find_model_run(c, [experiment_id], key)
    seen: set[str] = set()
    while run is not None and run.info.run_id not in seen:
        seen.add(run.info.run_id)
        out.append(run)
        parent_key = run.data.tags.get(tags.PARENT_KEY, "")
        if not parent_key:
            break
        parent_id = run.data.tags.get(tags.PARENT_RUN_ID, "")
        run = None
        if parent_id:
            try:
                run = c.get_run(parent_id)
            except MlflowException:
                run = None
        if run is None:
            run = find_model_run(c, [experiment_id], parent_key)
    return out[::-1]
