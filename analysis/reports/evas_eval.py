"""The EVAS evaluation report (EVAS, Pang et al., ICLR 2023, Tables 1-5, Figures 5-6; PROTOCOLS
5 "Evaluation"): ACC / ASR per model per dataset for (a) the clean model (Table 1), (b) after
fine-tuning (Table 2), (c) after re-training with another seed (Table 3); ASR against the
poisoning ratio of the trigger mix (Figure 6); the defense table (Tables 4-5); the landscape
around the found arch (Figure 5 / Table 8); the clean / trigger image pairs the table1 runs
logged. Every row names its MLflow run (``run_id`` in the CSVs).

Inputs: the trial runs of stages ``table1``, ``finetune``, ``retrain``, ``mix`` (kind
``evas_eval``), ``defenses`` (kind ``defense``) and ``neighbours`` (kind ``evas``). Outputs in
``out_dir``: ``eval.md``, ``table1.csv``, ``table2.csv``, ``table3.csv``, ``mix.csv``,
``defenses.csv``, ``neighbours.csv``, ``mix_ratio.png``, ``landscape_asr.png`` (the 5 x 5
ASR heat map of the two swept edges) and ``triggers/<run>.png``; logged to
the experiment's summary run (under ``report/``). A stage that has not run gives an empty table.

Deviations: a model is named by its arch string (NATS) or its model name; which NATS arch is
the found one is the study file's business (its ``found_arch`` anchor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nasrisk.analysis.figures import save_figure, styled
from nasrisk.analysis.load import get_experiment_id, load_runs, param_col, tag_col
from nasrisk.analysis.reports.evas import summary_run_id, tag_summary_run
from nasrisk.analysis.stats import to_markdown
from nasrisk.study import tags

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402 - after the telemetry switch
from matplotlib.figure import Figure  # noqa: E402

TABLES = {"table1": "Table 1: clean training + generator", "finetune": "Table 2: fine-tuning",
          "retrain": "Table 3: re-training with another seed"}
FILES = {"table1": "table1.csv", "finetune": "table2.csv", "retrain": "table3.csv"}
EVAL_COLUMNS = ["dataset", "model", "lineage", "acc", "asr", "generator_asr", "run_id"]


@dataclass
class EvasEvalReport:
    tables: dict[str, pd.DataFrame]
    mix: pd.DataFrame
    defenses: pd.DataFrame
    neighbours: pd.DataFrame
    paths: dict[str, Path]
    summary_run_id: str | None = None
    triggers: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        n = {k: len(v) for k, v in self.tables.items()}
        return "\n".join([
            f"evas-eval report: table1 {n['table1']}, finetune {n['finetune']}, retrain "
            f"{n['retrain']}, mix {len(self.mix)}, defenses {len(self.defenses)}, neighbours "
            f"{len(self.neighbours)} runs",
            f"markdown: {self.paths['table_md']}",
            "csv:      " + ", ".join(str(p) for k, p in self.paths.items() if k.endswith("csv")),
            f"figure:   {self.paths['mix_figure']}",
            f"triggers: {len(self.triggers)} image grids in {self.paths['table_md'].parent / 'triggers'}",
            f"mlflow summary run: {self.summary_run_id}",
        ])


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series([np.nan] * len(df), index=df.index,
                                                  dtype=object)


def _model_label(df: pd.DataFrame, arch_param: str = "arch") -> pd.Series:
    arch = _col(df, param_col(arch_param)).fillna("").astype(str)
    model = _col(df, param_col(tags.P_MODEL)).fillna("").astype(str)
    return arch.where(arch != "", model)


def _eval_table(runs: pd.DataFrame, *, mix: bool = False) -> pd.DataFrame:
    """One row per evas_eval run (sorted by model, dataset; with ``mix``, then by the
    trigger-mix ratio, in a ``ratio`` column)."""
    cols = [*EVAL_COLUMNS[:2], *(["ratio"] if mix else []), *EVAL_COLUMNS[2:]]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    ratio = {"ratio": pd.to_numeric(_col(runs, param_col("mix_ratio")), errors="coerce")} \
        if mix else {}
    out = pd.DataFrame({
        "dataset": _col(runs, param_col(tags.P_DATASET)).astype(str),
        "model": _model_label(runs), **ratio,
        "lineage": _col(runs, param_col(tags.P_LINEAGE)),
        "acc": pd.to_numeric(_col(runs, "acc"), errors="coerce"),
        "asr": pd.to_numeric(_col(runs, "asr"), errors="coerce"),
        "generator_asr": pd.to_numeric(_col(runs, "generator_asr"), errors="coerce"),
        "run_id": runs["run_id"]})
    return out.sort_values(["model", "dataset", *ratio], kind="stable").reset_index(drop=True)


def paper_shape(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model, columns ``<dataset> ACC`` / ``<dataset> ASR`` (the paper's shape;
    several runs of a cell: their mean)."""
    if table.empty:
        return pd.DataFrame(columns=["model"])
    wide = table.pivot_table(index="model", columns="dataset", values=["acc", "asr"],
                             aggfunc="mean", sort=True)
    cols = {}
    for ds in sorted(table["dataset"].unique()):
        for m in ("acc", "asr"):
            if (m, ds) in wide:
                cols[f"{ds} {m.upper()}"] = wide[(m, ds)]
    return pd.DataFrame(cols).reset_index()


@styled
def mix_figure(mix: pd.DataFrame, *, path: Path, title: str) -> Path:
    """ASR (solid) and ACC (dashed) against the poisoning ratio, one colour per model and
    dataset; ratio 0 (plain fine-tuning) drawn at the left edge of a symlog axis."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for (model, ds), g in mix.groupby(["model", "dataset"], sort=True):
        g = g.sort_values("ratio")
        line, = ax.plot(g["ratio"], g["asr"], marker="o", label=f"{model[:32]} {ds}")
        ax.plot(g["ratio"], g["acc"], ls="--", color=line.get_color())
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_xlabel("trigger-mix ratio")
    ax.set_ylabel("ASR (solid), ACC (dashed)")
    ax.set_title(title)
    if len(mix):
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def landscape_grid(neighbours: pd.DataFrame, value: str = "asr") -> pd.DataFrame | None:
    """The 5 x 5 landscape (Figure 5): ``value`` by the ops of the two edges on which the
    archs take all 5 ops (the selector's ``edges``), over the archs whose other edges hold
    their most common op (the centre's); None when no two edges take all 5 ops."""
    from nasrisk.trials.models.nats.arch_string import OPS, parse_arch

    if neighbours.empty:
        return None
    ops = pd.DataFrame([parse_arch(a) for a in neighbours["arch"]])
    full = [e for e in ops.columns if ops[e].nunique() == len(OPS)]
    if len(full) != 2:
        return None
    a, b = full
    rest = [e for e in ops.columns if e not in full]
    keep = (ops[rest] == ops[rest].mode().iloc[0]).all(axis=1) if rest else ops[a] == ops[a]
    df = pd.DataFrame({f"edge {a}": ops[a], f"edge {b}": ops[b],
                       value: pd.to_numeric(neighbours[value], errors="coerce").to_numpy()}
                      )[keep.to_numpy()]
    grid = df.pivot_table(index=f"edge {a}", columns=f"edge {b}", values=value,
                          aggfunc="mean").reindex(index=list(OPS), columns=list(OPS))
    grid.index.name, grid.columns.name = f"edge {a}", f"edge {b}"
    return grid


@styled
def landscape_figure(grid: pd.DataFrame, *, path: Path, title: str) -> Path:
    fig = Figure(figsize=(5.6, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(grid.columns)), [c.replace("nor_", "") for c in grid.columns],
                  rotation=30)
    ax.set_yticks(range(len(grid.index)), [c.replace("nor_", "") for c in grid.index])
    ax.set_xlabel(grid.columns.name)
    ax.set_ylabel(grid.index.name)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="ASR")
    fig.subplots_adjust(left=0.24, bottom=0.2)
    return save_figure(fig, path)


def _triggers(client: mlflow.MlflowClient, runs: pd.DataFrame, out: Path) -> list[Path]:
    got = []
    for rid in runs["run_id"]:
        if any(a.path == "triggers.png" for a in client.list_artifacts(rid)):
            dest = out / "triggers"
            dest.mkdir(parents=True, exist_ok=True)
            local = Path(client.download_artifacts(rid, "triggers.png", str(dest)))
            target = dest / f"{rid}.png"
            local.replace(target)
            got.append(target)
    return got


def build_evas_eval_report(tracking_uri: str, experiment: str, out_dir: str | Path, *,
                           log_to_mlflow: bool = True) -> EvasEvalReport:
    """Every table and figure of the module docstring from the finished runs of
    ``experiment``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = load_runs(tracking_uri, experiment, role=tags.ROLE_TRIAL, only_done=True)
    stage = _col(runs, tag_col(tags.STAGE))
    tables = {s: _eval_table(runs[stage == s]) for s in TABLES}
    mix = _eval_table(runs[stage == "mix"], mix=True)
    d = runs[stage == "defenses"]
    metric_cols = [c for c in d.columns if c.startswith(("model_", "nc_", "strip_", "fp_"))
                   and not c.startswith("param.")]
    defenses = pd.DataFrame({"dataset": _col(d, param_col(tags.P_DATASET)),
                             "model": _model_label(d, "victim.model_kwargs.arch"),
                             "defense": _col(d, param_col("defense")),
                             **{c: d[c] for c in sorted(metric_cols)}, "run_id": d["run_id"]})
    nb = runs[stage == "neighbours"]
    neighbours = pd.DataFrame({"arch": _col(nb, param_col("arch")),
                               "dataset": _col(nb, param_col("dataset")),
                               **{c: pd.to_numeric(_col(nb, c), errors="coerce")
                                  for c in ("kappa_generator", "kappa_arch", "acc", "asr")},
                               "run_id": nb["run_id"]})
    paths = {"table_md": out / "eval.md", **{f"{s}_csv": out / f for s, f in FILES.items()},
             "mix_csv": out / "mix.csv", "defenses_csv": out / "defenses.csv",
             "neighbours_csv": out / "neighbours.csv", "mix_figure": out / "mix_ratio.png"}
    for s in TABLES:
        tables[s].to_csv(paths[f"{s}_csv"], index=False)
    mix.to_csv(paths["mix_csv"], index=False)
    defenses.to_csv(paths["defenses_csv"], index=False)
    neighbours.to_csv(paths["neighbours_csv"], index=False)
    mix_figure(mix, path=paths["mix_figure"],
               title=f"{experiment}: ASR vs trigger-mix ratio (Figure 6)")
    lines = [f"# EVAS evaluation — experiment `{experiment}`", ""]
    for s, title in TABLES.items():
        lines += [f"## {title}", "", to_markdown(paper_shape(tables[s])) if len(tables[s])
                  else "(no finished runs)", ""]
    lines += ["## Figure 6: trigger-mix ratio", "",
              to_markdown(mix.drop(columns=["lineage"])) if len(mix) else "(no finished runs)",
              "", "## Tables 4-5: defenses", ""]
    for name, g in defenses.groupby("defense", sort=True):
        g = g.dropna(axis=1, how="all")  # each defense's own metrics
        lines += [f"### {name}", "", to_markdown(g.drop(columns=["defense"])), ""]
    if defenses.empty:
        lines += ["(no finished runs)", ""]
    lines += ["## Figure 5: the landscape around the found arch", "",
              to_markdown(neighbours) if len(neighbours) else "(no finished runs)", ""]
    paths["table_md"].write_text("\n".join(lines))
    grid = landscape_grid(neighbours)
    if grid is not None:
        paths["landscape_figure"] = landscape_figure(
            grid, path=out / "landscape_asr.png",
            title=f"{experiment}: ASR around the found arch (Figure 5)")
        paths["table_md"].write_text(paths["table_md"].read_text() + "\n### ASR by the ops "
                                     "of the two edges\n\n" + to_markdown(grid, index=True)
                                     + "\n")
    triggers = _triggers(client, runs[stage == "table1"], out)
    run_id = None
    if log_to_mlflow:
        exp_id = get_experiment_id(client, experiment)
        run_id = summary_run_id(client, exp_id, study="evas-eval")
        for p in [*paths.values(), *triggers]:
            client.log_artifact(run_id, str(p), artifact_path="report")
        tag_summary_run(client, run_id, runs)
    return EvasEvalReport(tables=tables, mix=mix, defenses=defenses, neighbours=neighbours,
                          paths=paths, summary_run_id=run_id, triggers=triggers)
