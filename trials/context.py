"""What a trial may ask of whoever runs it.

A trial is a plain function ``config -> metrics``; the runner hands it a :class:`TrialContext`
for everything that is not pure computation: the device, resumable state (checkpoints), metric
and artifact logging, progress, and warnings. :class:`LocalContext` is the Ray-free
implementation used by tests and notebooks; ``nasrisk.study`` supplies one that checkpoints
through Ray Tune and logs to MLflow.

State is one dict per trial, saved whole on every :meth:`TrialContext.save_state` so a retried
trial resumes from the last call (e.g. the last finished epoch). Values must be what
``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, lists, dicts.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


class TrialContext:
    """Base context: keeps state in memory and drops logs. Subclasses persist them."""

    def __init__(self, *, device: str | torch.device | None = None,
                 artifact_dir: str | Path | None = None, verbose: bool = False,
                 data_root: str | Path = "data", download: bool = False,
                 store_root: str | Path | None = None) -> None:
        #: where datasets live (``--download`` fetches there when allowed)
        self.data_root = Path(data_root)
        self.download = download
        #: the content-addressed store shared by a study's stages (None: the trial makes none)
        self.store_root = Path(store_root) if store_root else None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._state: dict[str, Any] = {}
        self._artifact_dir = Path(artifact_dir) if artifact_dir else None
        self.verbose = verbose
        self.metrics_log: list[tuple[dict[str, float], int | None]] = []
        #: what :meth:`warn` was told, in order
        self.warnings: list[str] = []

    # -- resumable state -------------------------------------------------------------------
    def load_state(self, key: str) -> Any | None:
        """The object last saved under ``key`` (in this or an earlier attempt), else None."""
        return self._state.get(key)

    def save_state(self, key: str, value: Any, metrics: Mapping[str, float] | None = None) -> None:
        """Save ``value`` under ``key`` and checkpoint the trial's whole state."""
        self._state[key] = value
        self._persist(metrics or {})

    def _persist(self, metrics: Mapping[str, float]) -> None:  # noqa: B027 - optional hook
        pass

    # -- logging ----------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics_log.append((dict(metrics), step))

    @property
    def artifact_dir(self) -> Path:
        """A folder whose files are kept as the trial's artifacts (MLflow under the runner)."""
        if self._artifact_dir is None:
            self._artifact_dir = Path(tempfile.mkdtemp(prefix="nasrisk-artifacts-"))
        self._artifact_dir.mkdir(parents=True, exist_ok=True)
        return self._artifact_dir

    # -- stored models and objects ---------------------------------------------------------
    def model_run(self, key: str, *, name: str, parent_key: str, step_kind: str,
                  params: Mapping[str, Any], metrics: Mapping[str, float],
                  parent_run_id: str | None = None) -> str | None:
        """Record the store entry ``key`` that this trial is about to commit (a base model, one
        lineage step, or an object) as its own tracked run, linked to its parent's run, and
        return the run's id (kept in the entry's record), or None when nothing tracks runs
        (this base class). Called once per entry made, before the entry is saved; a retried
        trial calling it again for the same key must get the same run back."""
        return None

    def model_used(self, key: str, run_id: str | None) -> None:  # noqa: B027 - optional hook
        """The trial used the stored model ``key`` (made under the run ``run_id``, if known):
        the runner tags the trial's run with it. The base class does nothing."""

    def progress(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        """Something the user should hear of although the trial goes on (a corrupt stored
        victim retrained, say): one line, always shown (the runner also shows it on the
        driver's console and keeps it on the trial's MLflow run)."""
        self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


class LocalContext(TrialContext):
    """Checkpoints to ``<directory>/state.pt`` (atomic rename), for runs without Ray."""

    def __init__(self, directory: str | Path, **kw: Any) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        kw.setdefault("artifact_dir", self.directory / "artifacts")
        super().__init__(**kw)
        path = self.directory / "state.pt"
        if path.exists():
            self._state = torch.load(path, map_location="cpu", weights_only=True)

    def _persist(self, metrics: Mapping[str, float]) -> None:
        save_atomic(self._state, self.directory / "state.pt")


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a reader never
    sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
