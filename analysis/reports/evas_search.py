"""The EVAS search report (PROTOCOLS 5, "Search (regularised evolution)"): each search's kappa
and best-so-far per iteration (evolution against the random baseline), the ACC and ASR of the
trajectory's archs against iteration, and a table per search: best kappa vs the initial and
final pool median vs the random baseline of the same seed, the cache hit rate, the found arch
with its ACC/ASR. Every number names its MLflow run (run ids in the CSVs).

Inputs: the trial runs of stages ``search`` (kind ``evas_search``), ``trajectory`` and
``found`` (kind ``evas``, tagged with the search run they were selected from). Outputs in
``out_dir``: ``search.md``, ``searches.csv``, ``trajectory.csv``, ``found.csv``,
``search_trajectories.png``, ``trajectory_acc_asr.png``; logged to the experiment's one
summary run (under ``report/``).

Deviations: a trajectory arch is placed at the first iteration its search scored it (a
revisited arch is trained once); ACC/ASR of an arch trained at several seeds is their median
(PROTOCOLS 5: "median of 3 seeds").
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nasrisk.analysis.figures import save_figure, set_log_ticks, styled
from nasrisk.analysis.load import get_experiment_id, load_runs, metric_history, param_col, tag_col
from nasrisk.analysis.reports.evas import summary_run_id, tag_summary_run
from nasrisk.analysis.stats import to_markdown
from nasrisk.study import tags

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402 - after the telemetry switch

SEARCH, TRAJECTORY, FOUND = "search", "trajectory", "found"
METHOD_COLOR = {"evolution": "tab:blue", "random": "tab:orange"}
LINESTYLES = ("-", "--", ":", "-.")
SEARCH_COLUMNS = ["method", "search_seed", "best_kappa", "initial_pool_median",
                  "final_pool_median", "random_best_kappa", "hit_rate", "evaluations",
                  "kappa_evaluations", "found_iteration", "found_arch", "found_acc",
                  "found_asr", "search_run_id", "found_run_ids"]


@dataclass(frozen=True)
class EvasSearchReport:
    """Where the report's files are and what it found."""

    table_md: Path
    searches_csv: Path
    trajectory_csv: Path
    found_csv: Path
    search_figure: Path
    trajectory_figure: Path
    searches: pd.DataFrame
    summary_run_id: str | None

    def summary(self) -> str:
        return "\n".join([
            f"EVAS search report: {len(self.searches)} searches",
            self.table_md.read_text().rstrip(),
            f"table:    {self.table_md}",
            f"csv:      {self.searches_csv}, {self.trajectory_csv}, {self.found_csv}",
            f"figures:  {self.search_figure}, {self.trajectory_figure}",
        ])


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([np.nan] * len(df), index=df.index)


def _trajectory_rows(client: mlflow.MlflowClient, run_id: str) -> list[dict]:
    """The search run's ``trajectory.json`` ([] when it has none)."""
    with tempfile.TemporaryDirectory(prefix="nasrisk-report-") as d:
        try:
            path = client.download_artifacts(run_id, "trajectory.json", d)
            rows = json.loads(Path(path).read_text())
        except Exception:  # noqa: BLE001 - a run without the artifact: no rows
            return []
    return rows if isinstance(rows, list) else []


def _curves(uri: str, run_id: str) -> pd.DataFrame:
    """score and best_so_far per iteration of one search (a step logged twice, by a
    resumed attempt, keeps its last value)."""
    out = {}
    for key in ("score", "best_so_far"):
        h = metric_history(uri, run_id, key)
        out[key] = h.drop_duplicates("step", keep="last").set_index("step")["value"]
    return pd.DataFrame(out).sort_index()


def _evas_table(runs: pd.DataFrame, first_iteration: dict[tuple[str, str], int]) -> pd.DataFrame:
    """One row per (source search, arch): median ACC/ASR over its trained seeds, run ids."""
    if runs.empty:
        return pd.DataFrame(columns=["search_run_id", "arch", "iteration", "acc", "asr",
                                     "clean_acc", "kappa_generator", "n_seeds", "run_ids"])
    frame = pd.DataFrame({
        "search_run_id": _col(runs, tag_col(tags.SOURCE_RUN_ID)).astype(str),
        "arch": _col(runs, param_col("arch")).astype(str),
        "acc": pd.to_numeric(_col(runs, "acc"), errors="coerce"),
        "asr": pd.to_numeric(_col(runs, "asr"), errors="coerce"),
        "clean_acc": pd.to_numeric(_col(runs, "clean_acc"), errors="coerce"),
        "kappa_generator": pd.to_numeric(_col(runs, "kappa_generator"), errors="coerce"),
        "run_id": runs["run_id"],
    })
    g = frame.groupby(["search_run_id", "arch"], sort=False)
    out = g.agg(acc=("acc", "median"), asr=("asr", "median"), clean_acc=("clean_acc", "median"),
                kappa_generator=("kappa_generator", "median"), n_seeds=("run_id", "size"),
                run_ids=("run_id", lambda s: ",".join(sorted(s)))).reset_index()
    out.insert(2, "iteration", [first_iteration.get((r, a), -1)
                                for r, a in zip(out["search_run_id"], out["arch"], strict=True)])
    return out.sort_values(["search_run_id", "iteration"], kind="stable").reset_index(drop=True)


def _finite_min_max(values: list[np.ndarray]) -> tuple[float, float] | None:
    v = np.concatenate([x[np.isfinite(x) & (x > 0)] for x in values]) if values else np.array([])
    return (float(v.min()), float(v.max())) if v.size else None


@styled
def search_figure(curves: dict[str, pd.DataFrame], labels: dict[str, str],
                  methods: dict[str, str], *, path: Path, title: str) -> Path:
    """Two panels: each search's kappa per iteration (points) and best so far (lines),
    coloured by method."""
    fig = Figure(figsize=(8.0, 3.4), layout="constrained")
    ax_s, ax_b = fig.subplots(1, 2, sharey=True)
    nth: dict[str, int] = {}
    for run_id, c in curves.items():
        color = METHOD_COLOR.get(methods[run_id], "tab:gray")
        k = nth[methods[run_id]] = nth.get(methods[run_id], -1) + 1  # seeds: line styles
        ax_s.plot(c.index, c["score"], ".", ms=2.5, color=color, alpha=0.6,
                  label=labels[run_id])
        ax_b.plot(c.index, c["best_so_far"], color=color, label=labels[run_id],
                  linestyle=LINESTYLES[k % len(LINESTYLES)])
    span = _finite_min_max([c[k].to_numpy(float) for c in curves.values()
                            for k in ("score", "best_so_far")])
    for ax, what in ((ax_s, "kappa of the arch scored"), (ax_b, "best kappa so far")):
        ax.set_xlabel("iteration (0: the initial pool's best)")
        ax.set_title(what)
        if span is not None:
            ax.set_yscale("log")
            set_log_ticks(ax.yaxis, *span)
    ax_s.set_ylabel("kappa, generator set (log scale)")
    if curves:
        ax_b.legend(loc="upper right")
    fig.suptitle(title)
    return save_figure(fig, path)


@styled
def trajectory_figure(traj: pd.DataFrame, labels: dict[str, str], *, path: Path,
                      title: str) -> Path:
    """ACC and ASR of each trajectory's trained archs against the iteration they were scored."""
    fig = Figure(figsize=(8.0, 3.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, col, what in ((axes[0], "acc", "clean accuracy"),
                          (axes[1], "asr", "attack success rate")):
        for run_id, g in traj.groupby("search_run_id", sort=False):
            ax.plot(g["iteration"], g[col], "o-", ms=3, label=labels.get(run_id, run_id))
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{what} (fraction)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(what)
    if not traj.empty:
        axes[1].legend(loc="lower right")
    fig.suptitle(title)
    return save_figure(fig, path)


def build_evas_search_report(tracking_uri: str, experiment: str, out_dir: str | Path, *,
                             log_to_mlflow: bool = True) -> EvasSearchReport:
    """Every table and figure of the module docstring from the finished runs of
    ``experiment``; a study run without its derived stages still reports the searches."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = load_runs(tracking_uri, experiment, role=tags.ROLE_TRIAL, only_done=True)
    stage = _col(runs, tag_col(tags.STAGE))
    search = runs[stage == SEARCH].reset_index(drop=True)
    if {param_col("method"), param_col("search_seed")} <= set(search.columns):
        search = search.sort_values([param_col("method"), param_col("search_seed")],
                                    kind="stable").reset_index(drop=True)
    methods = {r: str(m) for r, m in zip(search["run_id"], _col(search, param_col("method")),
                                         strict=True)}
    # the param column is float when other stages' runs lack it: seeds are integers
    seeds = {r: int(s) if isinstance(s, (int, float)) and math.isfinite(s) else s
             for r, s in zip(search["run_id"], _col(search, param_col("search_seed")),
                             strict=True)}
    labels = {r: f"{methods[r]} seed {seeds[r]}" for r in search["run_id"]}
    curves = {r: _curves(tracking_uri, r) for r in search["run_id"]}
    first: dict[tuple[str, str], int] = {}
    found_arch: dict[str, str] = {}
    for r in search["run_id"]:
        rows = _trajectory_rows(client, r)
        for row in rows:
            first.setdefault((r, str(row.get("arch"))), int(row.get("iteration", -1)))
        scored = [row for row in rows if isinstance(row.get("score"), (int, float))]
        if scored:  # the found stage's pick: the best row, the earliest of equals
            found_arch[r] = str(min(scored, key=lambda row: row["score"])["arch"])
    traj = _evas_table(runs[stage == TRAJECTORY], first)
    found = _evas_table(runs[stage == FOUND], first)
    # two searches that found the same arch share one found trial (the plan deduplicates
    # it under the first search's run): look the arch up, whichever search it came from
    found_by_arch = found.drop_duplicates("arch").set_index("arch")

    rows = []
    for _, s in search.iterrows():
        rid = s["run_id"]
        rand = search[(_col(search, param_col("method")) == "random")
                      & (_col(search, param_col("search_seed")) == seeds[rid])]
        arch = found_arch.get(rid)
        f = found_by_arch.loc[[arch]].reset_index() if arch in found_by_arch.index \
            else found.iloc[:0]
        rows.append({
            "method": methods[rid], "search_seed": seeds[rid],
            "best_kappa": s.get("best_score", np.nan),
            "initial_pool_median": s.get("initial_pool_median", np.nan),
            "final_pool_median": s.get("pool_median_score", np.nan),
            "random_best_kappa": rand["best_score"].iloc[0] if len(rand) and
            "best_score" in rand else np.nan,
            "hit_rate": s.get("hit_rate", np.nan), "evaluations": s.get("evaluations", np.nan),
            "kappa_evaluations": s.get("kappa_evaluations", np.nan),
            "found_iteration": s.get("found_iteration", np.nan),
            "found_arch": arch or "",
            "found_acc": f["acc"].iloc[0] if len(f) else np.nan,
            "found_asr": f["asr"].iloc[0] if len(f) else np.nan,
            "search_run_id": rid, "found_run_ids": f["run_ids"].iloc[0] if len(f) else "",
        })
    table = pd.DataFrame(rows, columns=SEARCH_COLUMNS)
    paths = {"table_md": out / "search.md", "searches_csv": out / "searches.csv",
             "trajectory_csv": out / "trajectory.csv", "found_csv": out / "found.csv",
             "search_figure": out / "search_trajectories.png",
             "trajectory_figure": out / "trajectory_acc_asr.png"}
    table.to_csv(paths["searches_csv"], index=False)
    traj.to_csv(paths["trajectory_csv"], index=False)
    found.to_csv(paths["found_csv"], index=False)
    search_figure(curves, labels, methods, path=paths["search_figure"],
                  title=f"{experiment}: kappa per iteration, evolution vs random")
    trajectory_figure(traj, labels, path=paths["trajectory_figure"],
                      title=f"{experiment}: ACC / ASR of the trajectory's archs")
    paths["table_md"].write_text(_markdown(experiment, table, traj))
    run_id = None
    if log_to_mlflow:
        run_id = _log_summary(client, experiment, runs, table, paths)
    return EvasSearchReport(searches=table, summary_run_id=run_id, **paths)


def _mean(table: pd.DataFrame, method: str, col: str) -> float:
    v = pd.to_numeric(table.loc[table["method"] == method, col], errors="coerce")
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def _markdown(experiment: str, table: pd.DataFrame, traj: pd.DataFrame) -> str:
    lines = [f"# EVAS search — experiment `{experiment}`", ""]
    if table.empty:
        return "\n".join([*lines, "No finished search runs.", ""])
    evo_best, rnd_best = _mean(table, "evolution", "best_kappa"), _mean(table, "random",
                                                                         "best_kappa")
    lines.append(f"- mean best kappa: evolution {evo_best:.4g}, random {rnd_best:.4g} (same "
                 "number of score evaluations per search; lower is the search's goal)")
    lines.append(f"- mean ASR of the found arch: evolution "
                 f"{_mean(table, 'evolution', 'found_asr'):.3g}, random "
                 f"{_mean(table, 'random', 'found_asr'):.3g}")
    lines.append(f"- cache hit rate (mean): evolution {_mean(table, 'evolution', 'hit_rate'):.3g}"
                 f", random {_mean(table, 'random', 'hit_rate'):.3g}")
    lines.append(f"- trajectory archs trained: {len(traj)} (ACC/ASR vs iteration in "
                 "trajectory.csv and trajectory_acc_asr.png)")
    lines += ["", to_markdown(table.drop(columns=["found_run_ids"]))]
    return "\n".join(lines)


def _log_summary(client: mlflow.MlflowClient, experiment: str, runs: pd.DataFrame,
                 table: pd.DataFrame, paths: dict[str, Path]) -> str:
    exp_id = get_experiment_id(client, experiment)
    studies = _col(runs, tag_col(tags.STUDY)).dropna().unique()
    run_id = summary_run_id(client, exp_id, study=str(studies[0]) if len(studies) == 1
                            else experiment)
    for path in paths.values():
        client.log_artifact(run_id, str(path), artifact_path="report")
    tag_summary_run(client, run_id, runs)
    return run_id
