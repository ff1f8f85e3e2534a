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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nasrisk.trials.errors import UserError


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def at(cls, path: str | Path | None) -> Workdir:
        return cls(Path(path or os.environ.get("NASRISK_WORKDIR", "nasrisk-runs")).resolve())

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
        if not path.is_file():
            raise UserError(f"no run of study {study!r} in {self.root} (missing {path}); start "
                            f"one with `nasrisk run {study} --workdir {self.root}`")
        return json.loads(path.read_text())

    def save_run_record(self, study: str, record: dict[str, Any]) -> None:
        d = self.study_dir(study)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "run.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, d / "run.json")
