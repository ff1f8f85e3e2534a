"""Where a study's files live. Everything a study produces is under the workdir:

    <workdir>/mlflow.db            MLflow store (SQLite) unless --tracking-uri says otherwise
    <workdir>/mlartifacts/<study>/ MLflow artifacts of a local store
    <workdir>/tune/<study>.<stage>.<n>/   Ray Tune experiments (trial checkpoints inside)
    <workdir>/studies/<study>/run.json    how the study was run (for `resume`)
    <workdir>/reports/<study>/     tables and figures of `report`
    <workdir>/store/               content-addressed store shared by stages (victims, ...)
    <workdir>/data/                datasets (default --data-root)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from nasrisk.trials.errors import UserError


class RunRecord(BaseModel):
    """The fields of ``run.json`` that ``resume`` and the runner read (others are kept)."""

    model_config = ConfigDict(extra="allow")
    study: str
    spec_yaml: str
    options: dict[str, Any]
    tracking_uri: str
    address: str | None = None
    data_root: str
    download: bool
    tune_experiments: dict[str, list[str]] = {}
    tune_trials: dict[str, list[str]] = {}


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def at(cls, path: str | Path | None) -> Workdir:
        return cls(Path(path or os.environ.get("NASRISK_WORKDIR", "nasrisk-runs")).resolve())

    def prepare(self) -> Workdir:
        """Create the workdir if needed and check this user can write in it; UserError in one
        line otherwise (a file in the way, a parent that is a file, no permission)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise UserError(f"workdir {root} is a file, not a folder; pass another --workdir")
        for parent in root.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UserError(f"cannot create workdir {root}: {parent} is a file")
                break
        try:
            root.mkdir(parents=True, exist_ok=True)
            # a real write: os.access says yes on read-only mounts and to root
            fd, probe = tempfile.mkstemp(dir=root, prefix=".nasrisk-write-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"cannot write in workdir {root}: {e.strerror or e}") from None
        return self

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def study_dir(self, study: str) -> Path:
        return self.root / "studies" / study

    def report_dir(self, study: str) -> Path:
        return self.root / "reports" / study

    def run_record(self, study: str) -> dict[str, Any]:
        path = self.study_dir(study) / "run.json"
        if not path.exists():
            raise UserError(f"no run of study {study!r} in {self.root} (missing {path}); start "
                            f"one with `nasrisk run {study} --workdir {self.root}`")
        fix = (f"move it away and start again with `nasrisk run {study}` (finished trials are "
               "kept in MLflow and not rerun)")
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            why = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise UserError(f"{path} cannot be read as a run record ({why}); {fix}") from None
        try:
            RunRecord.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise UserError(f"{path} is not a valid run record ({loc}: {first['msg']}); "
                            f"{fix}") from None
        return raw

    def save_run_record(self, study: str, record: dict[str, Any]) -> None:
        d = self.study_dir(study)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "run.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, d / "run.json")
