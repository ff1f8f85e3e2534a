"""The AutoML-risks report (PROTOCOLS section 4, "Analysis"; Pang et al., "On the Security Risks
of AutoML", USENIX Security 2022), built from MLflow alone: the trial runs of stage
``victims`` (kind ``victim``) and stage ``attacks`` (kind ``attack``) of one experiment.

Outputs in ``out_dir`` (tables as ``.csv`` and inside ``report.md``):

* ``accuracy.csv`` — clean-victim accuracy, models x settings (``dataset/params``);
* ``per_model.csv`` — every metric per model and setting (mean over seeds);
* ``comparisons.csv`` — NAS vs manual for every metric present (family means, spreads,
  NAS minus manual with a bootstrap CI, Welch and Mann-Whitney p), per setting;
  ``strips_<setting>.png`` — a panel per metric, one strip per family (variants as a third
  column);
* ``cad.csv`` and ``cad_vs_poison_<setting>.png`` — CAD = acc(p=0) - acc(p) per victim, and
  the curves per model and family;
* ``overlap_counts.csv``, ``overlap_hist.csv``, ``overlap_hist_<setting>.png`` — per input,
  how many NAS and how many manual models fool it (from the ``overlap.npz`` artifacts);
* ``grad_var_<setting>.png`` (paper Eq. 14) and ``grad_var_artifact_<setting>.png`` —
  gradient variance at Kaiming initialisation and after training, per model;
* ``contours_params_<setting>.png``, ``contours_input_<setting>.png`` — the victims' loss
  contours (their ``contour_*.npz`` artifacts) as one grid;
* ``arch_stats.csv`` — cell depth, cell width, skip count of the DARTS-space models;
* ``correlations.csv`` — gradient variance (trained) vs each attack metric and CAD across
  the models of a setting (Pearson on log10 of the variance, Spearman, Kendall, bootstrap CI).

Missing stages, metrics or artifacts give notes in ``report.md`` (and empty tables), never an
error. With ``log_to_mlflow`` the files go (under ``report/``) to the experiment's one
summary run (:func:`nasrisk.analysis.reports.evas.summary_run_id`), reused by later reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nasrisk.analysis.figures import bar_before_after
from nasrisk.analysis.load import get_experiment_id, load_runs, tag_col
from nasrisk.analysis.reports import automl_data as data
from nasrisk.analysis.reports.automl_figures import (
    cad_curves,
    contour_grid,
    overlap_histogram_figure,
    strip_grid,
)
from nasrisk.analysis.reports.evas import summary_run_id, tag_summary_run
from nasrisk.analysis.stats import correlation_table, family_comparison, to_markdown
from nasrisk.study import tags

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402 - after the telemetry switch

VICTIM_STAGE = "victims"
ATTACK_STAGE = "attacks"
GROUPS = ("nas", "manual")


@dataclass(frozen=True)
class AutomlReport:
    """Where the report's files are and the tables it computed."""

    out_dir: Path
    report_md: Path
    files: dict[str, Path]
    accuracy: pd.DataFrame
    per_model: pd.DataFrame
    cad: pd.DataFrame
    comparisons: pd.DataFrame
    overlap_hist: pd.DataFrame
    arch_stats: pd.DataFrame
    correlations: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    n_victims: int = 0
    n_attacks: int = 0
    summary_run_id: str | None = None

    def summary(self) -> str:
        """What `nasrisk run` / `nasrisk report` print at the end: the accuracy table, NAS
        minus manual per metric, the notes and every file."""
        lines = [f"AutoML-risks report: {self.n_victims} victim runs, "
                 f"{self.n_attacks} attack runs", "", "Clean accuracy:"]
        lines.append(to_markdown(self.accuracy) if not self.accuracy.empty else "(no victims)\n")
        lines.append("NAS minus manual (mean over models; bootstrap CI):")
        if self.comparisons.empty:
            lines.append("(nothing to compare)\n")
        else:
            cols = ["metric", "setting", "n_a", "n_b", "mean_a", "mean_b", "diff", "ci_low",
                    "ci_high"]
            lines.append(to_markdown(self.comparisons[cols]))
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"report: {self.report_md}")
        lines += [f"{name}: {path}" for name, path in self.files.items()
                  if name != "report_md"]
        return "\n".join(lines)


def _slug(setting: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in setting)


def _present(df: pd.DataFrame, metrics: list[str]) -> list[str]:
    return [m for m in metrics if m in df.columns
            and np.isfinite(pd.to_numeric(df[m], errors="coerce")).any()]


def _comparisons(per_model: pd.DataFrame, metrics: list[str], out: Path, files: dict,
                 *, n_boot: int, ci: float, seed: int) -> pd.DataFrame:
    tables = []
    for m in metrics:
        tables.append(family_comparison(per_model, m, "family", GROUPS, by="setting",
                                        n_boot=n_boot, ci=ci, seed=seed))
    for setting, sub in per_model.groupby("setting"):
        groups = [g for g in data.FAMILIES if (sub["family"] == g).any()]
        shown = _present(sub, metrics)
        if shown:
            files[f"strips {setting}"] = strip_grid(
                sub, shown, path=out / f"strips_{_slug(setting)}.png", groups=groups,
                title=f"per model, by family — {setting}", seed=seed)
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True)
    # a metric a setting never recorded (e.g. the eps sweep outside CIFAR10) has no row there
    return table[(table["n_a"] + table["n_b"]) > 0].reset_index(drop=True)


def _overlap(client, attacks: pd.DataFrame, out: Path, files: dict,
             notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = attacks[(attacks["attack"] == "pgd_overlap") & (attacks["victim_poison"] == 0)]
    runs, dropped = data.latest_per_model(runs)
    if runs.empty:
        notes.append("No pgd_overlap attack runs: no overlap histogram.")
    if dropped:
        notes.append(f"Overlap: {dropped} older pgd_overlap run(s) of a model already counted "
                     "were left out (the latest run per model and setting is used).")
    counts, more = data.overlap_counts(runs, data.load_npz_artifacts(client, runs, "overlap.npz"))
    notes.extend(more)
    hist = data.overlap_histogram(counts)
    for setting, sub in hist.groupby("setting"):
        files[f"overlap {setting}"] = overlap_histogram_figure(
            sub, path=out / f"overlap_hist_{_slug(setting)}.png",
            title=f"PGD overlap — {setting}\n(eps 4/255, least likely)")
    return counts, hist


def _contours(client, victims: pd.DataFrame, out: Path, files: dict,
              notes: list[str]) -> None:
    clean, _ = data.latest_per_model(victims[victims["poison"] == 0])
    for space in ("params", "input"):
        arrays = data.load_npz_artifacts(client, clean, f"contour_{space}.npz")
        if not arrays:
            notes.append(f"No victim has a contour_{space}.npz artifact: no {space} contours.")
            continue
        for setting, sub in data.order_families(clean).groupby("setting", sort=True):
            grids = {f"{r.model} ({r.family})": arrays[r.run_id]
                     for r in sub.itertuples() if r.run_id in arrays}
            if grids:
                files[f"contours {space} {setting}"] = contour_grid(
                    grids, path=out / f"contours_{space}_{_slug(setting)}.png",
                    title=f"loss contours, {space} space — {setting}")


def _grad_var_bars(per_model: pd.DataFrame, out: Path, files: dict, notes: list[str]) -> None:
    for suffix, label in (("", "paper Eq. 14"), ("_artifact", "artifact")):
        before, after = f"grad_var_init{suffix}", f"grad_var_trained{suffix}"
        if len(_present(per_model, [before, after])) < 2:
            notes.append(f"`{before}`/`{after}` not recorded: no {label} gradient-variance bars.")
            continue
        for setting, sub in per_model.groupby("setting"):
            files[f"grad_var{suffix} {setting}"] = bar_before_after(
                sub, "model", before, after, names=("Kaiming init", "trained"),
                path=out / f"grad_var{suffix}_{_slug(setting)}.png",
                title=f"gradient variance ({label}) — {setting}")


def _correlations(per_model: pd.DataFrame, ys: list[str], *, n_boot: int, ci: float,
                  seed: int) -> pd.DataFrame:
    xs = _present(per_model, ["grad_var_trained", "grad_var_trained_artifact"])
    if not xs or not ys:
        return pd.DataFrame()
    tables = []
    for setting, sub in per_model.groupby("setting"):
        here_x, here_y = _present(sub, xs), _present(sub, ys)
        if here_x and here_y:
            t = correlation_table(sub, here_x, here_y, log_x=True, n_boot=n_boot, ci=ci,
                                  seed=seed)
            t.insert(0, "setting", setting)
            tables.append(t)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _write(df: pd.DataFrame, path: Path, files: dict, name: str) -> None:
    df.to_csv(path, index=False)
    files[name] = path


def _section(title: str, df: pd.DataFrame, empty: str) -> list[str]:
    return [f"## {title}", "", to_markdown(df) if not df.empty else f"_{empty}_\n"]


def build_automl_report(tracking_uri: str, experiment: str, out_dir: str | Path, *,
                        log_to_mlflow: bool = True, n_boot: int = 2000, ci: float = 0.95,
                        seed: int = 0) -> AutomlReport:
    """Every table and figure of the AutoML-risks analysis (PROTOCOLS section 4: "every
    metric NAS vs manual (family means, spreads, per dataset); architecture-statistics
    table; correlations of gradient variance ... against each attack metric"; the accuracy
    table, CAD curves, overlap histogram, gradient-variance bars and loss contours of the
    paper) from the finished trial runs of ``experiment``; writes them to ``out_dir`` and,
    with ``log_to_mlflow``, logs them to the experiment's summary run.

    Comparisons count models: each model's runs in a setting are averaged first. NAS vs
    manual uses :func:`~nasrisk.analysis.stats.family_comparison` (diff = NAS minus manual,
    stratified bootstrap CI with ``n_boot`` resamples); mitigation variants appear in the
    tables and strips but in neither family.

    Deviations: the protocol also correlates kappa (section 5's scorer) with the attack
    metrics; no trial kind of this study records kappa, so only gradient variance is
    correlated. The mitigation table (darts vs -i/-ii/-iii) is the per-model table's variant
    rows; backdoor, stealing and membership metrics are not produced by this study's kinds.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    files: dict[str, Path] = {}
    # victims come from every stage of kind `victim`: stage `victims` trains the attacked models,
    # stage `poisoning` retrains them on flipped labels (with its own p=0 reference for CAD)
    all_runs = load_runs(tracking_uri, experiment, role=tags.ROLE_TRIAL)
    kind = all_runs.get(tag_col(tags.KIND))
    stage = all_runs.get(tag_col(tags.STAGE))
    v_all = all_runs[kind == "victim"] if kind is not None else all_runs.iloc[:0]
    v_runs = v_all[stage[v_all.index] == VICTIM_STAGE] if stage is not None else v_all
    a_runs = all_runs[stage == ATTACK_STAGE] if stage is not None else all_runs.iloc[:0]
    # one load holds both kinds: drop the other kind's (empty) param columns
    v_all, v_runs, a_runs = (f.dropna(axis=1, how="all") for f in (v_all, v_runs, a_runs))
    for runs, name in ((v_runs, VICTIM_STAGE), (a_runs, ATTACK_STAGE)):
        if runs.empty:
            notes.append(f"No finished trial runs in stage `{name}`.")
    victims, d_v = data.latest_per_trial(data.victim_frame(v_runs), data.VICTIM_TRIAL)
    attacks, d_a = data.latest_per_trial(data.attack_frame(a_runs), data.ATTACK_TRIAL)
    all_victims, _ = data.latest_per_trial(data.victim_frame(v_all), data.VICTIM_TRIAL)
    if d_v or d_a:
        notes.append(f"{d_v} victim and {d_a} attack run(s) superseded by a later run of the "
                     "same model, setting, seed and attack (e.g. after a study's settings "
                     "changed) were left out.")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)

    accuracy = data.accuracy_table(victims)
    _write(accuracy, out / "accuracy.csv", files, "accuracy")
    cad, cad_notes = data.cad_table(all_victims)
    notes.extend(cad_notes)
    _write(cad, out / "cad.csv", files, "cad")
    for setting, sub in cad.groupby("setting"):
        if (sub["poison"] > 0).any():
            files[f"cad {setting}"] = cad_curves(sub, path=out / f"cad_vs_poison_{_slug(setting)}.png",
                                                 title=f"label-flip poisoning — {setting}")
    if not (cad["poison"] > 0).any():
        notes.append("No poisoned victims (poison_fraction > 0): no CAD.")

    per_model = data.per_model_table(victims, attacks, cad)
    _write(per_model, out / "per_model.csv", files, "per_model")
    cad_cols = sorted((c for c in per_model.columns if c.startswith("cad_p")),
                      key=lambda c: float(c[5:].replace("_", ".")))
    wanted = [*data.VICTIM_METRICS, *data.ATTACK_METRICS, *cad_cols]
    metrics = _present(per_model, wanted)
    missing = [m for m in (*data.VICTIM_METRICS, *data.ATTACK_METRICS) if m not in metrics]
    if missing:
        notes.append(f"Metrics not recorded by any run: {', '.join(missing)}.")
    comparisons = _comparisons(per_model, metrics, out, files, n_boot=n_boot, ci=ci, seed=seed)
    _write(comparisons, out / "comparisons.csv", files, "comparisons")

    counts, hist = _overlap(client, attacks, out, files, notes)
    _write(counts, out / "overlap_counts.csv", files, "overlap_counts")
    _write(hist, out / "overlap_hist.csv", files, "overlap_hist")
    _grad_var_bars(per_model, out, files, notes)
    _contours(client, victims, out, files, notes)

    arch = data.arch_stats_table(per_model)
    _write(arch, out / "arch_stats.csv", files, "arch_stats")
    ys = _present(per_model, [*data.ATTACK_METRICS, *cad_cols])
    corr = _correlations(per_model, ys, n_boot=n_boot, ci=ci, seed=seed)
    if corr.empty:
        notes.append("Gradient variance or attack metrics missing: no correlations.")
    _write(corr, out / "correlations.csv", files, "correlations")

    report_md = out / "report.md"
    body = [f"# AutoML security risks — experiment `{experiment}`", "",
            f"{len(victims)} victim runs, {len(attacks)} attack runs. "
            "Settings are `dataset/params`; model rows average a model's runs (seeds); "
            f"NAS minus manual with {ci:.0%} stratified-bootstrap CIs ({n_boot} resamples, "
            f"seed {seed}). CAD = acc(p=0) - acc(p).", ""]
    body += [f"- {n}" for n in notes] + [""]
    body += _section("Clean accuracy", accuracy, "no clean victims")
    body += _section("NAS vs manual", comparisons, "nothing to compare")
    body += _section("CAD per victim", cad, "no CAD")
    body += _section("Overlap histogram (inputs fooled by exactly k models)", hist,
                     "no overlap runs")
    body += _section("Architecture statistics (normal cell)", arch, "no DARTS-space victims")
    body += _section("Gradient variance vs attack metrics", corr, "no correlations")
    body += _section("Per model", per_model, "no models")
    body += ["## Figures", "", *[f"- {k}: `{p.relative_to(out)}`" for k, p in files.items()
                                 if p.suffix == ".png"]]
    report_md.write_text("\n".join(body) + "\n")
    files = {"report_md": report_md, **files}

    run_id = (_log_summary(client, experiment, out, files, comparisons, v_runs, a_runs)
              if log_to_mlflow else None)
    return AutomlReport(out_dir=out, report_md=report_md, files=files, accuracy=accuracy,
                        per_model=per_model, cad=cad, comparisons=comparisons,
                        overlap_hist=hist, arch_stats=arch, correlations=corr, notes=notes,
                        n_victims=len(victims), n_attacks=len(attacks), summary_run_id=run_id)


def _log_summary(client: mlflow.MlflowClient, experiment: str, out: Path,
                 files: dict[str, Path], comparisons: pd.DataFrame, v_runs: pd.DataFrame,
                 a_runs: pd.DataFrame) -> str:
    exp_id = get_experiment_id(client, experiment)
    studies = pd.concat([r.get(tag_col(tags.STUDY), pd.Series(dtype=object))
                         for r in (v_runs, a_runs)]).dropna().unique()
    run_id = summary_run_id(client, exp_id,
                            study=str(studies[0]) if len(studies) == 1 else experiment)
    for path in files.values():
        sub = path.parent.relative_to(out)
        client.log_artifact(run_id, str(path),
                            artifact_path="report" + ("" if sub == Path(".") else f"/{sub}"))
    tag_summary_run(client, run_id, pd.concat([v_runs, a_runs], ignore_index=True))
    now = int(pd.Timestamp.now(tz="UTC").timestamp() * 1000)
    metrics = {"n_victim_runs": float(len(v_runs)), "n_attack_runs": float(len(a_runs))}
    for row in comparisons.itertuples(index=False):
        if np.isfinite(row.diff):
            metrics[f"nas_minus_manual.{row.metric}.{row.setting}"] = float(row.diff)
    items = [mlflow.entities.Metric(k, v, now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])
    return run_id
