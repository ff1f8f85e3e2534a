"""The EVAS correlation report (PROTOCOLS section 5, "Correlation study"): kappa variants vs
ASR and vs ACC — Pearson, Spearman and Kendall with bootstrap confidence intervals — and the
scatter figure, from the trial runs of one MLflow experiment.

Outputs in ``out_dir``: ``correlations.md``, ``correlations.csv``, ``kappa_vs_asr_acc.png``,
``trials.csv``; with ``log_to_mlflow`` they are also logged (under ``report/``) to the one
summary run of the experiment (tag :data:`~nasrisk.study.tags.ROLE` = ``summary``, run name
``summary``), created on
the first report and reused afterwards so reports never multiply runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nasrisk.analysis.figures import scatter_grid
from nasrisk.analysis.load import get_experiment_id, load_runs, param_col, tag_col
from nasrisk.analysis.stats import correlation_table, to_markdown
from nasrisk.study import tags

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402 - after the telemetry switch

#: scores correlated against the targets, in table order (section 5: the `generator` set of
#: Eq. 6, the `arch` set the published search scored, the bare arch, and TE-NAS)
SCORES = ("kappa_generator", "kappa_arch", "kappa_bare", "te_nas")
TARGETS = ("asr", "acc")
SUMMARY_RUN_NAME = "summary"
MIN_USABLE = 3
#: axis labels of the figure, with units
FIGURE_LABELS = {
    "kappa_generator": "kappa, generator set (log scale)",
    "kappa_arch": "kappa, arch set (log scale)",
    "kappa_bare": "kappa, bare arch (log scale)",
    "te_nas": "TE-NAS score (log scale)",
    "asr": "attack success rate\n(fraction of trigger inputs\nclassified as target)",
    "acc": "clean accuracy\n(fraction of clean test\ninputs correct)",
}


@dataclass(frozen=True)
class EvasReport:
    """Where the report's files are and what it found."""

    table_md: Path
    csv: Path
    figure: Path
    trials_csv: Path
    correlations: pd.DataFrame
    n_trials: int
    summary_run_id: str | None

    def summary(self) -> str:
        """What `nasrisk run` / `nasrisk report` print at the end."""
        return "\n".join([
            f"EVAS report: {self.n_trials} trials",
            self.table_md.read_text().rstrip(),
            f"table:  {self.table_md}",
            f"csv:    {self.csv}",
            f"figure: {self.figure}",
            f"trials: {self.trials_csv}",
        ])


def summary_run_id(client: mlflow.MlflowClient, experiment_id: str, *,
                   study: str) -> str:
    """The experiment's summary run: the oldest run tagged ``nasrisk.role=summary`` if there
    is one, else a new one (run name ``summary``)."""
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.\"{tags.ROLE}\" = '{tags.ROLE_SUMMARY}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=SUMMARY_RUN_NAME,
                            tags={tags.ROLE: tags.ROLE_SUMMARY, tags.STUDY: study})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


#: MLflow's limit on a run tag's value (mlflow/utils/validation.py MAX_TAG_VAL_LENGTH)
MAX_TAG_VALUE = 8000


def tag_summary_run(client: mlflow.MlflowClient, run_id: str, trials: pd.DataFrame) -> None:
    """Say what the summary run summarises: the package version and git commit of this
    report, the trials' profile(s), and their trial keys — as the tag ``nasrisk.trial_keys``
    (comma-separated, sorted) when it fits MLflow's tag limit, and always as the artifact
    ``report/trial_keys.json``."""
    import json
    import tempfile
    from importlib.metadata import version

    from nasrisk.study.tracking import git_commit

    def values(col: str) -> list[str]:
        return sorted(map(str, trials[col].dropna().unique())) if col in trials else []

    keys = values(tag_col(tags.TRIAL_KEY))
    summary = {tags.VERSION: version("nasrisk"), tags.GIT_COMMIT: git_commit(),
               tags.PROFILE: ",".join(values(param_col(tags.P_PROFILE))) or "unknown",
               tags.TRIAL_COUNT: str(len(keys))}
    joined = ",".join(keys)
    if len(joined) <= MAX_TAG_VALUE:
        summary[tags.TRIAL_KEYS] = joined
    client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in summary.items()])
    with tempfile.TemporaryDirectory(prefix="nasrisk-summary-") as d:
        path = Path(d) / "trial_keys.json"
        path.write_text(json.dumps(keys, indent=1) + "\n")
        client.log_artifact(run_id, str(path), artifact_path="report")


def _notes(df: pd.DataFrame, corr: pd.DataFrame, scores: list[str]) -> list[str]:
    notes = []
    if corr.empty or corr["n"].max() < MIN_USABLE:
        notes.append(f"**Too few usable trials** (fewer than {MIN_USABLE} with a finite score "
                     "and target): correlations are NaN.")
    missing = [s for s in SCORES if s not in df.columns]
    if missing:
        notes.append(f"Scores not recorded by these trials: {', '.join(missing)}"
                     + (" (NaN rows)." if len(missing) == len(SCORES) else "."))
    for t in TARGETS:
        if t not in df.columns:
            notes.append(f"Target `{t}` was not recorded by any trial: its rows are NaN.")
    for s in scores:
        if s in df.columns:
            flagged = int(np.isposinf(pd.to_numeric(df[s], errors="coerce")).sum())
            if flagged:
                notes.append(f"`{s}`: {flagged} trial(s) flagged (kappa = +inf: non-positive or "
                             "non-finite lambda_min) are left out of the correlations "
                             "(`n_dropped`) and drawn at the figure's right edge.")
    for col, what in ((param_col("params"), "parameter set"),
                      (param_col(tags.P_PROFILE), "profile"), (param_col(tags.P_DATASET), "dataset")):
        if col in df.columns:
            values = sorted(map(str, df[col].dropna().unique()))
            notes.append(f"{what}: {', '.join(values) if values else '(none)'}")
    return notes


def build_evas_report(tracking_uri: str, experiment: str, out_dir: str | Path, *,
                      log_to_mlflow: bool = True, stage: str | None = None,
                      n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> EvasReport:
    """Correlate every score in :data:`SCORES` that the trials recorded with ASR and ACC
    (section 5: "Pearson, Spearman and Kendall of kappa vs ASR and kappa vs ACC with
    confidence intervals; the scatter figure") over the finished trial runs of
    ``experiment`` (optionally one ``stage``), write the files, and log them to the
    experiment's single summary run.

    Pearson is computed on log10(score) (kappa spans decades); rank correlations do not
    depend on it. With fewer than 3 usable trials the files are still written, with NaN
    rows and a note. If no score was recorded at all, every score of :data:`SCORES` gets a
    NaN row, so the table always has a row per score x target x method.

    Deviations: flagged scores (+inf) are dropped from the correlations and counted
    (``n_dropped``) instead of being mapped to 1e5 as the EVAS reference did.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = load_runs(tracking_uri, experiment, role=tags.ROLE_TRIAL, stage=stage,
                       only_done=True)
    scores = [s for s in SCORES if s in trials.columns] or list(SCORES)
    frame = trials.copy()
    for col in [*scores, *TARGETS]:
        if col not in frame.columns:
            frame[col] = np.nan
    corr = correlation_table(frame, scores, list(TARGETS), log_x=True, n_boot=n_boot, ci=ci,
                             seed=seed)
    paths = {
        "table_md": out / "correlations.md",
        "csv": out / "correlations.csv",
        "figure": out / "kappa_vs_asr_acc.png",
        "trials_csv": out / "trials.csv",
    }
    corr.to_csv(paths["csv"], index=False)
    trials.to_csv(paths["trials_csv"], index=False)
    header = [
        f"# EVAS: score vs ASR / ACC — experiment `{experiment}`",
        "",
        f"Trials: {len(trials)} finished" + (f" (stage `{stage}`)" if stage else "") + ". "
        f"r and p from scipy; {ci:.0%} percentile-bootstrap CI over trials ({n_boot} "
        f"resamples, seed {seed}); Pearson on log10(score).",
        "",
    ]
    notes = [f"- {n}" for n in _notes(trials, corr, scores)]
    paths["table_md"].write_text("\n".join(header + notes + ["", to_markdown(corr)]))
    scatter_grid(frame, scores, list(TARGETS), path=paths["figure"], log_x=True,
                 labels=FIGURE_LABELS, corr=corr,
                 title=f"{experiment}: score vs ASR / ACC (n={len(trials)})")
    run_id = _log_summary(tracking_uri, experiment, trials, corr, paths) if log_to_mlflow else None
    return EvasReport(correlations=corr, n_trials=len(trials), summary_run_id=run_id, **paths)


def _log_summary(tracking_uri: str, experiment: str, trials: pd.DataFrame, corr: pd.DataFrame,
                 paths: dict[str, Path]) -> str:
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp_id = get_experiment_id(client, experiment)
    study_col = tag_col(tags.STUDY)
    studies = trials[study_col].dropna().unique() if study_col in trials else []
    run_id = summary_run_id(client, exp_id, study=str(studies[0]) if len(studies) == 1
                            else experiment)
    for path in paths.values():
        client.log_artifact(run_id, str(path), artifact_path="report")
    tag_summary_run(client, run_id, trials)
    metrics = {"n_trials": float(len(trials))}
    for row in corr.itertuples(index=False):
        if np.isfinite(row.r):
            metrics[f"{row.method}.{row.x}.{row.y}"] = float(row.r)
    client.log_batch(run_id, metrics=[
        mlflow.entities.Metric(k, v, int(pd.Timestamp.now(tz="UTC").timestamp() * 1000), 0)
        for k, v in metrics.items()
    ])
    return run_id
