"""The kappa atlas report (issue 9 "Atlas"; PROTOCOLS 5 "Score kappa", "BatchNorm while
scoring"): the chunk tables of the ``kappa_atlas`` runs of one experiment assembled into one
atlas, the kappa distribution per BN mode and variant, the modes' rank agreement over the
whole atlas, and where the ``evas-kappa`` sample and ``evas-search``'s found archs fall in it.

Outputs in ``out_dir``: ``atlas.csv`` (one row per arch: ``index``, ``arch``, ``iso_key``,
``<mode>.kappa_<variant>``, ``<mode>.kappa_<variant>_flagged``), ``agreement.csv`` (per
variant and mode pair: Spearman and Kendall with percentile-bootstrap CIs, over the archs
where both kappas are finite), ``placed.csv`` (the sample's and the found archs' kappa and
percentile in the atlas), ``atlas.md``, ``kappa_hist.png`` (log-x histograms, modes x
variants), ``kappa_ecdf.png`` (the atlas's ECDF per mode, the sample's dashed, found archs as
triangles). With ``log_to_mlflow`` they go to the experiment's one summary run (as the
``evas`` report does).

The sample: the ``arch`` params of the finished trials of the experiment ``evas-kappa`` in the
same store when it has any, else ``sample_archs(900, seed=0)`` (the ``evas-kappa`` paper
profile's draw). Found archs: the ``found.json`` artifacts of the ``evas_search`` runs of the
experiment ``evas-search``, when present. An arch is placed by its string, or else by an
isomorphic arch of the atlas (an ``unique`` atlas holds one string per class).

Deviations: flagged kappas (+inf) are left out of the rank agreement (``n_dropped``), as
``analysis/stats.py`` does everywhere; percentiles rank them largest.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nasrisk.analysis.figures import save_figure, set_log_ticks, styled
from nasrisk.analysis.load import get_experiment_id, load_runs, param_col, tag_col
from nasrisk.analysis.reports.automl_data import _download
from nasrisk.analysis.reports.evas import summary_run_id, tag_summary_run
from nasrisk.analysis.stats import correlate, to_markdown
from nasrisk.study import tags

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402 - after the telemetry switch

KIND = "kappa_atlas"
SAMPLE_EXPERIMENT, SEARCH_EXPERIMENT, SEARCH_KIND = "evas-kappa", "evas-search", "evas_search"
SAMPLE_N, SAMPLE_SEED = 900, 0
_COL = re.compile(r"^(?P<mode>[a-z-]+)\.kappa_(?P<variant>[a-z]+)$")
_MODE_COLORS = {"eval": "tab:blue", "fixed-stats": "tab:orange", "coupled": "tab:green"}


@dataclass(frozen=True)
class EvasAtlasReport:
    """Where the report's files are and what it found."""

    atlas_csv: Path
    agreement_csv: Path
    placed_csv: Path
    table_md: Path
    hist: Path
    ecdf: Path
    atlas: pd.DataFrame
    agreement: pd.DataFrame
    n_chunks: int
    missing_chunks: list[int]
    summary_run_id: str | None

    def summary(self) -> str:
        return "\n".join([
            f"EVAS atlas report: {len(self.atlas)} archs from {self.n_chunks} chunks"
            + (f" (missing chunks: {self.missing_chunks})" if self.missing_chunks else ""),
            to_markdown(self.agreement[["variant", "modes", "method", "r", "ci_low",
                                        "ci_high", "n", "n_dropped"]], floatfmt=".3f"),
            f"table:  {self.table_md}", f"atlas:  {self.atlas_csv}",
            f"figures: {self.hist}, {self.ecdf}"])


def score_pairs(atlas: pd.DataFrame) -> list[tuple[str, str, str]]:
    """``(column, mode, variant)`` of every kappa column of the atlas, in column order."""
    return [(c, m["mode"], m["variant"]) for c in atlas.columns if (m := _COL.match(c))]


def percentile(values: np.ndarray, v: float) -> float:
    """Mid-rank percentile of ``v`` among ``values`` (+inf ranks largest; ties count half)."""
    return float(100 * ((values < v).sum() + 0.5 * (values == v).sum()) / len(values))


def _atlas_runs(tracking_uri: str, experiment: str, stage: str | None,
                notes: list[str]) -> pd.DataFrame:
    runs = load_runs(tracking_uri, experiment, role=tags.ROLE_TRIAL, stage=stage,
                     only_done=True)
    kind = tag_col(tags.KIND)
    if kind in runs:
        runs = runs[runs[kind] == KIND]
    if runs.empty:
        return runs
    # one atlas: the newest run's settings; an older atlas in the experiment (other sizes,
    # another profile) is left out, and a chunk run twice counts once (its newest run)
    cols = [param_col(c) for c in ("n_chunks", "unique", "limit", "dataset", "n_init", "C",
                                   "N", "batch_size", "seed", "order_seed") if param_col(c) in runs]
    newest = runs.iloc[-1]
    same = np.ones(len(runs), dtype=bool)
    for c in cols:
        same &= (runs[c].astype(str) == str(newest[c])).to_numpy()
    if (~same).any():
        notes.append(f"{int((~same).sum())} kappa_atlas run(s) with other settings "
                     "(an older atlas) left out.")
    keep = runs[same].groupby(param_col("chunk")).tail(1)
    if len(keep) < same.sum():
        notes.append(f"{int(same.sum() - len(keep))} older run(s) of a chunk run again left out.")
    return keep


def load_atlas(client, runs: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """The chunk CSVs of ``runs`` concatenated, sorted by atlas position."""
    frames = []
    with tempfile.TemporaryDirectory(prefix="nasrisk-atlas-") as tmp:
        for _, r in runs.iterrows():
            chunk = int(r[param_col("chunk")])
            path = _download(client, r["run_id"], f"atlas_chunk_{chunk}.csv",
                             Path(tmp) / r["run_id"])
            if path is None:
                notes.append(f"run {r['run_id']} (chunk {chunk}) has no atlas_chunk_{chunk}.csv.")
                continue
            frames.append(pd.read_csv(path))
    if not frames:
        return pd.DataFrame(columns=["index", "arch", "iso_key"])
    atlas = pd.concat(frames, ignore_index=True).sort_values("index", kind="stable")
    dup = int(atlas["index"].duplicated().sum())
    if dup:
        notes.append(f"{dup} arch position(s) held by two chunks: the first kept.")
        atlas = atlas.drop_duplicates("index")
    return atlas.reset_index(drop=True)


def agreement(atlas: pd.DataFrame, *, n_boot: int, ci: float, seed: int) -> pd.DataFrame:
    """Spearman and Kendall of every mode pair, per variant, with bootstrap CIs."""
    by_variant: dict[str, dict[str, str]] = {}
    for col, mode, variant in score_pairs(atlas):
        by_variant.setdefault(variant, {})[mode] = col
    rows = []
    for variant, modes in by_variant.items():
        for a, b in itertools.combinations(modes, 2):
            t = correlate(atlas[modes[a]].to_numpy(float), atlas[modes[b]].to_numpy(float),
                          methods=("spearman", "kendall"), n_boot=n_boot, ci=ci, seed=seed)
            t.insert(0, "modes", f"{a} vs {b}")
            t.insert(0, "variant", variant)
            rows.append(t)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["variant", "modes", "method", "r", "p", "ci_low", "ci_high", "n", "n_dropped"])


def _sample_archs(tracking_uri: str, notes: list[str]) -> tuple[list[str], str]:
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(SAMPLE_EXPERIMENT)
    if exp is not None and exp.lifecycle_stage == "active":
        runs = load_runs(tracking_uri, SAMPLE_EXPERIMENT)
        if param_col("arch") in runs and runs[param_col("arch")].notna().any():
            archs = sorted(set(runs[param_col("arch")].dropna().astype(str)))
            return archs, f"the {len(archs)} archs of the {SAMPLE_EXPERIMENT} runs in this store"
    from nasrisk.trials.models.nats.arch_string import sample_archs

    return (sample_archs(SAMPLE_N, seed=SAMPLE_SEED),
            f"sample_archs({SAMPLE_N}, seed={SAMPLE_SEED}) ({SAMPLE_EXPERIMENT}'s paper sample)")


def _found_archs(tracking_uri: str, notes: list[str]) -> list[tuple[str, str]]:
    """``(run name, arch)`` of every evas-search run's found.json in the store."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(SEARCH_EXPERIMENT)
    if exp is None or exp.lifecycle_stage != "active":
        return []
    runs = load_runs(tracking_uri, SEARCH_EXPERIMENT)
    if tag_col(tags.KIND) in runs:
        runs = runs[runs[tag_col(tags.KIND)] == SEARCH_KIND]
    out = []
    with tempfile.TemporaryDirectory(prefix="nasrisk-found-") as tmp:
        for _, r in runs.iterrows():
            path = _download(client, r["run_id"], "found.json", Path(tmp) / r["run_id"])
            if path is None:
                continue
            for row in json.loads(path.read_text()):
                if isinstance(row, dict) and isinstance(row.get("arch"), str):
                    out.append((str(r["run_name"]), row["arch"]))
    return out


def place(atlas: pd.DataFrame, archs: list[tuple[str, str]], group: str) -> pd.DataFrame:
    """Each ``(label, arch)``'s kappa and percentile in the atlas, per mode x variant; matched
    by string, else by isomorphism class (``matched_by``); unmatched archs are left out."""
    from nasrisk.trials.models.nats.arch_string import isomorphism_key

    by_arch = {a: i for i, a in enumerate(atlas["arch"])}
    by_iso: dict[str, int] = {}
    for i, k in enumerate(atlas["iso_key"]):
        by_iso.setdefault(k, i)
    pairs = score_pairs(atlas)
    values = {c: atlas[c].to_numpy(float) for c, _, _ in pairs}
    rows = []
    for label, arch in archs:
        if arch in by_arch:
            i, how = by_arch[arch], "string"
        elif isomorphism_key(arch) in by_iso:
            i, how = by_iso[isomorphism_key(arch)], "isomorphism"
        else:
            continue
        row = {"group": group, "label": label, "arch": arch, "matched_by": how,
               "atlas_arch": atlas["arch"].iat[i]}
        for c, _, _ in pairs:
            row[c] = values[c][i]
            row[f"{c}.pct"] = percentile(values[c], values[c][i])
        rows.append(row)
    return pd.DataFrame(rows)


def _log_bins(v: np.ndarray, n: int = 30) -> np.ndarray:
    lo, hi = v.min(), v.max()
    if hi <= lo:
        lo, hi = lo / 2, hi * 2
    return np.logspace(math.log10(lo), math.log10(hi), n + 1)


def _grid(atlas: pd.DataFrame) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    pairs = score_pairs(atlas)
    modes = list(dict.fromkeys(m for _, m, _ in pairs))
    variants = list(dict.fromkeys(v for _, _, v in pairs))
    return modes, variants, {(m, v): c for c, m, v in pairs}


@styled
def hist_figure(atlas: pd.DataFrame, path: Path, title: str) -> Path:
    """Log-x histograms of kappa: one panel per mode (rows) x variant (columns)."""
    modes, variants, cols = _grid(atlas)
    fig = Figure(figsize=(2.6 * len(variants), 1.9 * len(modes)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(modes), len(variants), squeeze=False))
    for (i, m), (j, v) in itertools.product(enumerate(modes), enumerate(variants)):
        ax, raw = axes[i, j], atlas[cols[m, v]].to_numpy(float)
        fin = raw[np.isfinite(raw) & (raw > 0)]
        if fin.size:
            ax.hist(fin, bins=_log_bins(fin), color=_MODE_COLORS.get(m, "tab:blue"))
            ax.set_xscale("log")
            set_log_ticks(ax.xaxis, fin.min(), fin.max())
            ax.axvline(np.median(fin), color="black", linewidth=0.8)
        ax.set_title(f"{m}, {v}\nmedian {np.median(raw):.3g}, "
                     f"flagged {int((~np.isfinite(raw)).sum())}/{raw.size}")
        ax.set_xlabel(f"kappa ({v} set), log scale")
        ax.set_ylabel("archs")
    fig.suptitle(title)
    return save_figure(fig, path)


@styled
def ecdf_figure(atlas: pd.DataFrame, placed: pd.DataFrame, path: Path, title: str) -> Path:
    """Per variant: the atlas's ECDF of kappa per mode (solid), the sample's (dashed), found
    archs as triangles at their (kappa, percentile)."""
    modes, variants, cols = _grid(atlas)
    fig = Figure(figsize=(3.2 * len(variants), 2.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(variants), squeeze=False)[0])
    for ax, v in zip(axes, variants, strict=True):
        lo, hi = math.inf, 0.0
        for m in modes:
            raw = atlas[cols[m, v]].to_numpy(float)
            fin = np.sort(raw[np.isfinite(raw) & (raw > 0)])
            if not fin.size:
                continue
            lo, hi = min(lo, fin[0]), max(hi, fin[-1])
            color = _MODE_COLORS.get(m, "tab:blue")
            ax.step(fin, np.arange(1, fin.size + 1) / raw.size, where="post", color=color,
                    label=m)
            for group, style in (("sample", "--"), ("found", None)):
                sub = placed[placed["group"] == group] if len(placed) else placed
                if not len(sub):
                    continue
                k = sub[cols[m, v]].to_numpy(float)
                if style:
                    ks = np.sort(k[np.isfinite(k) & (k > 0)])
                    ax.step(ks, np.arange(1, ks.size + 1) / k.size, where="post",
                            color=color, linestyle=style, linewidth=0.8)
                else:
                    ok = np.isfinite(k) & (k > 0)
                    ax.scatter(k[ok], sub[f"{cols[m, v]}.pct"].to_numpy(float)[ok] / 100,
                               marker="v", color=color, edgecolor="black", zorder=3, s=25)
        if hi > 0:
            ax.set_xscale("log")
            set_log_ticks(ax.xaxis, lo, hi)
        ax.set_xlabel(f"kappa ({v} set), log scale")
        ax.set_ylabel("fraction of archs with kappa <= x")
        ax.set_title(f"{v}: atlas solid, sample dashed, found v")
        ax.legend(loc="lower right")
    fig.suptitle(title)
    return save_figure(fig, path)


def build_evas_atlas_report(tracking_uri: str, experiment: str, out_dir: str | Path, *,
                            log_to_mlflow: bool = True, stage: str | None = None,
                            n_boot: int = 1000, ci: float = 0.95,
                            seed: int = 0) -> EvasAtlasReport:
    """Assemble the atlas from the finished ``kappa_atlas`` runs of ``experiment`` and write
    the files of the module docstring (``n_boot`` resamples for the rank-agreement CIs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = _atlas_runs(tracking_uri, experiment, stage, notes)
    atlas = load_atlas(client, runs, notes)
    n_chunks = int(runs[param_col("n_chunks")].iloc[0]) if len(runs) else 0
    have = set(runs[param_col("chunk")].astype(int)) if len(runs) else set()
    missing = sorted(set(range(n_chunks)) - have)
    if missing:
        notes.append(f"chunks not finished (or not run): {missing}; the atlas is partial.")
    if len(runs) and param_col("atlas_size") in runs:
        size = int(runs[param_col("atlas_size")].iloc[0])
        notes.append(f"{len(atlas)} of the atlas's {size:,} archs scored.")
    if len(runs) and "compute_s" in runs:
        wall = (runs["end_time"] - runs["start_time"]).dt.total_seconds().sum()
        if wall > 0:
            notes.append(f"scoring took {runs['compute_s'].sum():,.0f} s of the chunk runs' "
                         f"{wall:,.0f} s (MLflow run wall): runner and trial overhead "
                         f"{100 * (1 - runs['compute_s'].sum() / wall):.1f}%; "
                         f"{runs['seconds_per_arch'].mean():.2f} s per arch.")
    agree = agreement(atlas, n_boot=n_boot, ci=ci, seed=seed)
    sample, sample_what = _sample_archs(tracking_uri, notes)
    placed = pd.concat([place(atlas, [(a, a) for a in sample], "sample"),
                        place(atlas, _found_archs(tracking_uri, notes), "found")],
                       ignore_index=True)
    paths = {"atlas_csv": out / "atlas.csv", "agreement_csv": out / "agreement.csv",
             "placed_csv": out / "placed.csv", "table_md": out / "atlas.md",
             "hist": out / "kappa_hist.png", "ecdf": out / "kappa_ecdf.png"}
    atlas.to_csv(paths["atlas_csv"], index=False)
    agree.to_csv(paths["agreement_csv"], index=False)
    placed.to_csv(paths["placed_csv"], index=False)
    title = f"{experiment}: kappa over {len(atlas):,} NATS archs"
    hist_figure(atlas, paths["hist"], title)
    ecdf_figure(atlas, placed, paths["ecdf"], title)
    paths["table_md"].write_text(_markdown(experiment, atlas, agree, placed, notes, sample_what,
                                           len(sample), n_boot=n_boot, ci=ci, seed=seed))
    run_id = None
    if log_to_mlflow:
        run_id = summary_run_id(client, get_experiment_id(client, experiment), study=experiment)
        for p in paths.values():
            client.log_artifact(run_id, str(p), artifact_path="report")
        tag_summary_run(client, run_id, runs if len(runs) else pd.DataFrame())
        ts = int(pd.Timestamp.now(tz="UTC").timestamp() * 1000)
        metrics = {"n_archs": float(len(atlas))}
        for row in agree.itertuples(index=False):
            if np.isfinite(row.r):
                metrics[f"{row.method}.{row.variant}.{row.modes.replace(' vs ', '-vs-')}"] = row.r
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), ts, 0)
                                          for k, v in metrics.items()])
    return EvasAtlasReport(atlas=atlas, agreement=agree, n_chunks=n_chunks,
                           missing_chunks=missing, summary_run_id=run_id, **paths)


def _markdown(experiment: str, atlas: pd.DataFrame, agree: pd.DataFrame, placed: pd.DataFrame,
              notes: list[str], sample_what: str, n_sample: int, *, n_boot: int, ci: float,
              seed: int) -> str:
    buf = io.StringIO()
    w = buf.write
    w(f"# kappa atlas — experiment `{experiment}`\n\n{len(atlas):,} archs. Rank agreement of "
      f"the BN modes per variant over the archs where both kappas are finite; {ci:.0%} "
      f"percentile-bootstrap CI over archs ({n_boot} resamples, seed {seed}).\n\n")
    for n in notes:
        w(f"- {n}\n")
    w("\n## Mode vs mode\n\n" + to_markdown(agree, floatfmt=".3f") + "\n\n")
    w("## Distribution\n\n| mode | variant | median kappa | flagged |\n|---|---|---|---|\n")
    for c, m, v in score_pairs(atlas):
        raw = atlas[c].to_numpy(float)
        w(f"| {m} | {v} | {np.median(raw):.4g} | {int((~np.isfinite(raw)).sum())}/{raw.size} |\n")
    w(f"\n## Where the sample and the found archs fall\n\nSample: {sample_what}.\n\n")
    if not len(placed):
        w("No sample or found arch is in this atlas.\n")
        return buf.getvalue()
    w("| group | archs placed | by string | mode | variant | median percentile |\n"
      "|---|---|---|---|---|---|\n")
    for group, sub in placed.groupby("group", sort=False):
        n_str = int((sub["matched_by"] == "string").sum())
        for c, m, v in score_pairs(atlas):
            w(f"| {group} | {len(sub)}{f' of {n_sample}' if group == 'sample' else ''} | "
              f"{n_str} | {m} | {v} | {sub[f'{c}.pct'].median():.1f} |\n")
    found = placed[placed["group"] == "found"]
    if len(found):
        w("\nFound archs (percentile per mode x variant):\n\n")
        cols = ["label", "arch", *(f"{c}.pct" for c, _, _ in score_pairs(atlas))]
        w(to_markdown(found[cols], floatfmt=".1f") + "\n")
    return buf.getvalue()
