"""MLflow -> pandas: one row per run, and metric curves.

Column convention of :func:`load_runs` (one row per run):

- ``run_id``, ``run_name``, ``status`` (MLflow's FINISHED/RUNNING/FAILED/KILLED),
  ``start_time``, ``end_time`` (UTC timestamps);
- every *metric* under its bare name (``kappa_generator``, ``asr``, ...) holding the latest
  value, so analysis code reads ``df["asr"]``; a metric whose name collides with one of the
  columns above is stored as ``metric.<name>``;
- every *param* as ``param.<name>`` (``param.arch``, ``param.seed``); a param column whose
  every value parses as a number is converted to a numeric dtype (integers stay integers);
- every *tag* as ``tag.<name>`` (``tag.nasrisk.role``, ``tag.mlflow.runName``).

The names come from :mod:`nasrisk.study.tags` (the one home of what the runner writes): read
them as ``tag_col(tags.STAGE)``, ``param_col(tags.P_LINEAGE_KEY)``. Store keys
(``lineage_key``, ``parent_key``, ``victim_key``) always stay strings: a 16-hex-digit key made
only of digits would otherwise become a number.

Infinities: SQL tracking stores cannot hold inf, so MLflow stores +-inf as the largest float
(+-1.797e308). They are mapped back to +-inf here, so a flagged kappa (PROTOCOLS section 5:
"scored as +inf") reads back as ``inf`` whatever the backend.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from nasrisk.study import tags
from nasrisk.trials.errors import UserError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402 - after the telemetry switch

_BASE_COLUMNS = ("run_id", "run_name", "status", "start_time", "end_time")
#: params that are store keys (hex strings): never converted to numbers
KEY_PARAMS = (tags.P_LINEAGE_KEY, tags.P_PARENT_KEY, "victim_key")
_FLOAT_MAX = float(np.finfo(np.float64).max)


def tag_col(name: str) -> str:
    """The :func:`load_runs` column of tag ``name`` (a :mod:`nasrisk.study.tags` constant)."""
    return f"tag.{name}"


def param_col(name: str) -> str:
    """The :func:`load_runs` column of param ``name`` (a ``tags.P_*`` constant or a config
    field, dotted for nested ones: ``victim.model``)."""
    return f"param.{name}"


def _client(tracking_uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def get_experiment_id(client: mlflow.MlflowClient, experiment: str) -> str:
    """The id of the active experiment named ``experiment``; a :class:`UserError` naming the
    existing experiments if there is none."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(
            f"no MLflow experiment named {experiment!r} at {client.tracking_uri}; "
            f"existing experiments: {', '.join(names) if names else '(none)'}"
        )
    return exp.experiment_id


def _unsentinel(value: float) -> float:
    # MLflow's SQL store writes +-inf as +-float max (sqlalchemy_store.sanitize_metric_value)
    if value >= _FLOAT_MAX:
        return float("inf")
    if value <= -_FLOAT_MAX:
        return float("-inf")
    return float(value)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _filter_string(role: str | None, stage: str | None, only_done: bool) -> str:
    clauses = []
    if role is not None:
        clauses.append(f'tags."{tags.ROLE}" = {_quote(role)}')
    if stage is not None:
        clauses.append(f'tags."{tags.STAGE}" = {_quote(stage)}')
    if only_done:
        clauses.append(f'tags."{tags.STATUS}" = \'done\'')
    return " and ".join(clauses)


def _numeric_params(df: pd.DataFrame) -> pd.DataFrame:
    keys = {param_col(k) for k in KEY_PARAMS}
    for col in [c for c in df.columns if c.startswith("param.") and c not in keys]:
        values = df[col]
        present = values.dropna()
        if present.empty:
            continue
        try:
            converted = pd.to_numeric(present)
        except (ValueError, TypeError):
            continue
        if values.isna().any() or not pd.api.types.is_integer_dtype(converted):
            df[col] = pd.to_numeric(values).astype("float64")
        else:
            df[col] = converted.astype("int64")
    return df


def load_runs(tracking_uri: str, experiment: str, *, role: str | None = tags.ROLE_TRIAL,
              stage: str | None = None, only_done: bool = True,
              page_size: int = 1000) -> pd.DataFrame:
    """Every run of ``experiment`` as one row (column convention in the module docstring).

    ``role`` filters on the :data:`~nasrisk.study.tags.ROLE` tag ("trial", "summary"; None:
    every run), ``stage`` on :data:`~nasrisk.study.tags.STAGE`, ``only_done`` keeps runs whose
    :data:`~nasrisk.study.tags.STATUS` is ``done``.
    Pages through ``search_runs`` ``page_size`` runs at a time, so studies of thousands of
    trials load whole. Rows are ordered by start time (then run id) for reproducible output.
    """
    client = _client(tracking_uri)
    exp_id = get_experiment_id(client, experiment)
    filter_string = _filter_string(role, stage, only_done)
    rows: list[dict] = []
    token: str | None = None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string,
                                  max_results=page_size, page_token=token)
        for run in page:
            row: dict = {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "start_time": run.info.start_time,
                "end_time": run.info.end_time,
            }
            for key, value in run.data.metrics.items():
                row[f"metric.{key}" if key in _BASE_COLUMNS else key] = _unsentinel(value)
            for key, value in run.data.params.items():
                row[f"param.{key}"] = value
            for key, value in run.data.tags.items():
                row[f"tag.{key}"] = value
            rows.append(row)
        token = page.token
        if not token:
            break
    if not rows:
        return pd.DataFrame(columns=list(_BASE_COLUMNS))
    df = pd.DataFrame(rows)
    for col in ("start_time", "end_time"):
        df[col] = pd.to_datetime(df[col], unit="ms", utc=True)
    df = df.sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)
    return _numeric_params(df)


def metric_history(tracking_uri: str, run_id: str, key: str) -> pd.DataFrame:
    """Every logged value of metric ``key`` of one run (e.g. a per-epoch curve), as columns
    ``step``, ``timestamp`` (UTC), ``value``, ordered by step then time."""
    history = _client(tracking_uri).get_metric_history(run_id, key)
    df = pd.DataFrame(
        {
            "step": [m.step for m in history],
            "timestamp": pd.to_datetime([m.timestamp for m in history], unit="ms", utc=True),
            "value": [_unsentinel(m.value) for m in history],
        }
    )
    return df.sort_values(["step", "timestamp"], kind="stable").reset_index(drop=True)
