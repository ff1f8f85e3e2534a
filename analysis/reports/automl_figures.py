"""Figures of the AutoML-risks report that the shared :mod:`nasrisk.analysis.figures` does not
have, in the shapes of Pang et al., "On the Security Risks of AutoML" (USENIX Security 2022):
CAD vs poisoning budget per model and family (its label-flip figure), the PGD-overlap
histogram (inputs fooled by k NAS vs k manual models) and a grid of loss contours (its
Fig. 10). matplotlib object API only (no pyplot), in the shared module's figure style
(:data:`nasrisk.analysis.figures.STYLE`, applied by :func:`~nasrisk.analysis.figures.styled`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nasrisk.analysis.figures import save_figure, set_log_ticks, styled

#: strip panels whose positive values span this factor get a log y axis
LOG_SPAN = 100.0
FAMILY_COLORS = {"nas": "tab:red", "manual": "tab:blue", "variant": "tab:green"}


def _grid_kw(cols: int, height: float, title: str | None) -> dict:
    return {"wspace": 0.45, "hspace": 0.75, "left": 0.35 / cols + 0.03, "right": 0.97,
            "bottom": 0.45 / height, "top": 1 - (0.75 if title else 0.4) / height}


@styled
def cad_curves(cad: pd.DataFrame, *, path: str | Path, title: str | None = None) -> Path:
    """CAD vs poison fraction: a thin line per model (mean over seeds), coloured by family,
    and a thick line per family (mean over its models). ``cad`` has columns ``model``,
    ``family``, ``poison``, ``cad`` (:func:`~nasrisk.analysis.reports.automl_data.cad_table`
    of one setting, clean victims included at CAD 0)."""
    fig = Figure(figsize=(4.8, 3.4), layout="constrained")
    ax = fig.subplots()
    per_model = cad.groupby(["family", "model", "poison"], as_index=False)["cad"].mean()
    for (family, _), sub in per_model.groupby(["family", "model"]):
        sub = sub.sort_values("poison")
        ax.plot(100 * sub["poison"], 100 * sub["cad"], color=FAMILY_COLORS.get(family, "gray"),
                linewidth=0.7, alpha=0.45)
    for family, sub in per_model.groupby("family"):
        mean = sub.groupby("poison")["cad"].mean().sort_index()
        n = sub["model"].nunique()
        ax.plot(100 * mean.index, 100 * mean.to_numpy(), color=FAMILY_COLORS.get(family, "gray"),
                linewidth=2.2, marker="o", markersize=3, label=f"{family} mean (n={n})")
    ax.set_xlabel("poisoning fraction (%)")
    ax.set_ylabel("CAD (accuracy drop, %)")
    if not per_model.empty:  # beside the axes: inside, it hid the curves of small budgets
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=7)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


@styled
def overlap_histogram_figure(hist: pd.DataFrame, *, path: str | Path,
                             title: str | None = None) -> Path:
    """Paired bars: number of inputs fooled by exactly k NAS models and by exactly k manual
    models, for each k (``hist``: columns ``k``, ``inputs_nas``, ``inputs_manual`` of one
    setting)."""
    fig = Figure(figsize=(max(4.2, 1.5 + 0.45 * len(hist)), 3.2), layout="constrained")
    ax = fig.subplots()
    k = hist["k"].to_numpy(int)
    ax.bar(k - 0.2, hist["inputs_nas"], width=0.4, color=FAMILY_COLORS["nas"], label="NAS")
    ax.bar(k + 0.2, hist["inputs_manual"], width=0.4, color=FAMILY_COLORS["manual"],
           label="manual")
    ax.set_xticks(k)
    ax.set_xlabel("number of models fooled by the input")
    ax.set_ylabel("number of inputs")
    ax.legend()
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


@styled
def contour_grid(grids: Mapping[str, Mapping[str, np.ndarray]], *, path: str | Path,
                 title: str | None = None, ncols: int = 5) -> Path:
    """One filled contour panel per named loss grid (``alphas``, ``betas``, ``losses`` with
    ``losses[i, j]`` at ``(alphas[i], betas[j])``, as ``trials/metrics/contours.py`` saves
    it); each panel has its own colour scale (losses of different models differ by orders of
    magnitude), its range written under the name."""
    n = max(len(grids), 1)
    cols = min(ncols, n)
    rows = -(-n // cols)
    height = 2.4 * rows + (0.4 if title else 0)
    # fixed margins: constrained layout cost seconds per figure on a grid of panels
    fig = Figure(figsize=(2.4 * cols, height))
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=_grid_kw(cols, height, title))
    axes = axes.ravel()
    for ax, (name, g) in zip(axes, grids.items(), strict=False):
        losses = np.asarray(g["losses"], dtype=float)
        ax.contourf(np.asarray(g["alphas"]), np.asarray(g["betas"]), losses.T, levels=15,
                    cmap="viridis")
        lo, hi = np.nanmin(losses), np.nanmax(losses)
        ax.set_title(f"{name}\nloss {lo:.3g}..{hi:.3g}")
        ax.set_xlabel("α (direction 1)", labelpad=1)
        ax.set_ylabel("β (direction 2)", labelpad=1)
        ax.tick_params(labelsize=6)
    for ax in axes[len(grids):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


#: the y-axis unit of a strip panel, by metric-name prefix (first match wins)
UNITS = (("asr", "success rate (fraction)"), ("overlap_asr", "success rate (fraction)"),
         ("overlap_fooled", "fraction of inputs"), ("nes_asr", "success rate (fraction)"),
         ("nes_queries", "queries per input"),
         ("pgd_queries", "queries per input"), ("victim_acc", "accuracy (fraction)"),
         ("acc", "accuracy (fraction)"), ("cad", "accuracy drop (fraction)"),
         ("grad_var", "gradient variance"), ("param_count", "parameters"),
         ("cell_width", "units of c"), ("cell_depth", "cells"), ("skip_count", "skip connects"),
         ("contour", "loss"))


def unit_of(metric: str) -> str:
    """The unit a strip panel's y axis is labelled with ('' when none is known)."""
    return next((u for prefix, u in UNITS if metric.startswith(prefix)), "")


@styled
def strip_grid(df: pd.DataFrame, metrics: list[str], *, path: str | Path,
               family_col: str = "family", groups: list[str] | None = None,
               title: str | None = None, ncols: int = 5, seed: int = 0) -> Path:
    """One panel per metric, each a jittered column of points per family with the family
    mean as a black bar (the per-metric strips of :func:`nasrisk.analysis.figures.
    strip_by_family`, gathered into one figure: a study has ~20 metrics per setting and one
    file per metric cost a second of rendering each). Non-finite values are left out and
    counted in the tick labels. A metric whose values are all positive and span at least
    :data:`LOG_SPAN` (a factor of 100, e.g. gradient variance) gets a log axis, said in its
    panel title."""
    fam = df[family_col].astype(str).to_numpy()
    groups = list(groups) if groups is not None else sorted(set(fam))
    n = max(len(metrics), 1)
    cols = min(ncols, n)
    rows = -(-n // cols)
    height = 2.3 * rows + (0.4 if title else 0)
    fig = Figure(figsize=(0.6 + (0.7 + 0.5 * len(groups)) * cols, height))
    axes = fig.subplots(rows, cols, squeeze=False,
                        gridspec_kw=_grid_kw(cols, height, title)).ravel()
    rng = np.random.default_rng(seed)
    for ax, metric in zip(axes, metrics, strict=False):
        y = pd.to_numeric(df[metric], errors="coerce").to_numpy(float)
        labels = []
        for k, g in enumerate(groups):
            v = y[(fam == g) & np.isfinite(y)]
            ax.scatter(k + rng.uniform(-0.15, 0.15, v.size), v, s=10, alpha=0.7,
                       color=FAMILY_COLORS.get(g, "gray"), linewidths=0)
            if v.size:
                ax.hlines(v.mean(), k - 0.25, k + 0.25, color="black", linewidth=1.5)
            labels.append(f"{g}\n({v.size})")
        ax.set_xticks(range(len(groups)), labels)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        pos = y[np.isfinite(y)]
        if pos.size and pos.min() > 0 and pos.max() / pos.min() >= LOG_SPAN:
            ax.set_yscale("log")
            set_log_ticks(ax.yaxis, float(pos.min()), float(pos.max()))
            ax.set_title(f"{metric} (log scale)")
        else:
            ax.set_title(metric)
        ax.tick_params(axis="y", labelsize=6)
        if unit_of(metric):
            ax.set_ylabel(unit_of(metric), fontsize=6)
    for ax in axes[len(metrics):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
