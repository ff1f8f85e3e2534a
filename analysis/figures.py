"""Shared plotting for the study reports.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``, rendered by the
Agg canvas), never through ``pyplot``: no global figure state, no display needed, safe in
Ray workers and tests. Every function writes one file and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from matplotlib.transforms import blended_transform_factory

from nasrisk.analysis.stats import correlate
from nasrisk.trials.errors import UserError

_FLAG_COLOR = "tab:red"


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Render ``fig`` (object API, no pyplot state) to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def _numeric(df: pd.DataFrame, col: str) -> np.ndarray:
    if col not in df.columns:
        raise UserError(f"column {col!r} not in the table; available: "
                        f"{', '.join(map(str, df.columns))}")
    return pd.to_numeric(df[col], errors="coerce").to_numpy(float)


def _scatter_panel(ax, x: np.ndarray, y: np.ndarray, *, log_x: bool) -> None:
    y_ok = np.isfinite(y)
    x_ok = np.isfinite(x) & (x > 0 if log_x else True)
    ok = x_ok & y_ok
    ax.scatter(x[ok], y[ok], s=10, alpha=0.7, color="tab:blue", linewidths=0)
    if log_x and ok.any():
        ax.set_xscale("log")
        # minor-tick labels (2x10^1, 3x10^1, ...) overlap on the short log ranges scores span
        ax.xaxis.set_minor_formatter(NullFormatter())
    # Flagged scores (+inf, or no log) are drawn at the right edge of the axis, in red,
    # so they are visible rather than silently missing.
    flagged = ~x_ok & y_ok
    if flagged.any():
        edge = blended_transform_factory(ax.transAxes, ax.transData)
        ax.scatter(np.full(flagged.sum(), 1.03), y[flagged], transform=edge, marker=">",
                   s=18, color=_FLAG_COLOR, clip_on=False,
                   label=f"flagged / inf (n={int(flagged.sum())})")
        ax.legend(loc="lower left", fontsize=6, frameon=False)
    rho = correlate(x, y, methods=("spearman",), n_boot=0).iloc[0]
    ax.text(0.02, 0.98, f"Spearman ρ = {rho['r']:.3f}\nn = {int(rho['n'])}",
            transform=ax.transAxes, va="top", ha="left", fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})


def scatter_grid(df: pd.DataFrame, xs: Sequence[str], ys: Sequence[str], *,
                 path: str | Path, log_x: bool = True, title: str | None = None,
                 panel_size: float = 2.8) -> Path:
    """A grid of scatter plots, one panel per (y row, x column) — for EVAS, kappa variants
    (log axis) vs ASR and vs ACC, the paper's correlation figure (PROTOCOLS section 5).

    Each panel is annotated with Spearman's rho and n (finite pairs); points whose x is not
    finite (a flagged kappa of +inf) or not positive on a log axis are drawn as red
    triangles just outside the right edge of the axis. Points with a non-finite y cannot be placed and are left out
    (they are also excluded from n).
    """
    if not xs or not ys:
        raise UserError("scatter_grid needs at least one x and one y column")
    fig = Figure(figsize=(panel_size * len(xs), panel_size * len(ys) + (0.4 if title else 0)))
    # fixed margins rather than constrained layout: its tight-bbox pass over log-axis ticks
    # cost most of the rendering time of a 2 x 4 grid
    axes = fig.subplots(len(ys), len(xs), squeeze=False,
                        gridspec_kw={"wspace": 0.4, "hspace": 0.35, "left": 0.6 / (
                            panel_size * len(xs)) + 0.02, "right": 1 - 0.3 / (panel_size * len(xs)),
                            "bottom": 0.1,
                            "top": 0.9 if title else 0.97})
    for i, yc in enumerate(ys):
        y = _numeric(df, yc)
        for j, xc in enumerate(xs):
            ax = axes[i][j]
            _scatter_panel(ax, _numeric(df, xc), y, log_x=log_x)
            ax.set_xlabel(xc + (" (log)" if log_x else ""), fontsize=8)
            ax.set_ylabel(yc, fontsize=8)
            ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def strip_by_family(df: pd.DataFrame, metric: str, family_col: str, *, path: str | Path,
                    groups: Sequence[str] | None = None, title: str | None = None,
                    seed: int = 0) -> Path:
    """One jittered column of points per family (e.g. NAS vs manual, PROTOCOLS section 4),
    with the family mean as a black bar; non-finite values are left out and counted in the
    tick label."""
    y = _numeric(df, metric)
    fam = df[family_col].astype(str).to_numpy() if family_col in df.columns else None
    if fam is None:
        raise UserError(f"column {family_col!r} not in the table")
    groups = list(groups) if groups is not None else sorted(set(fam))
    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(1.2 + 1.1 * len(groups), 3.2), layout="constrained")
    ax = fig.subplots()
    labels = []
    for k, g in enumerate(groups):
        v = y[(fam == g) & np.isfinite(y)]
        ax.scatter(k + rng.uniform(-0.15, 0.15, v.size), v, s=12, alpha=0.7)
        if v.size:
            ax.hlines(v.mean(), k - 0.25, k + 0.25, color="black", linewidth=2)
        labels.append(f"{g}\n(n={v.size})")
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def bar_before_after(df: pd.DataFrame, label_col: str, before: str, after: str, *,
                     path: str | Path, title: str | None = None,
                     names: tuple[str, str] = ("before", "after")) -> Path:
    """Paired bars per row of ``df`` (e.g. ASR before/after a defense or fine-tuning,
    PROTOCOLS section 5 evaluation (b)-(e))."""
    b, a = _numeric(df, before), _numeric(df, after)
    labels = df[label_col].astype(str).tolist()
    pos = np.arange(len(labels))
    fig = Figure(figsize=(1.5 + 0.8 * len(labels), 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(pos - 0.2, b, width=0.4, label=names[0])
    ax.bar(pos + 0.2, a, width=0.4, label=names[1])
    ax.set_xticks(pos, labels, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def curves(series: Mapping[str, pd.DataFrame], *, path: str | Path, x: str = "step",
           y: str = "value", title: str | None = None, xlabel: str = "epoch",
           ylabel: str = "") -> Path:
    """One line per named curve (e.g. per-epoch accuracy from
    :func:`nasrisk.analysis.load.metric_history`, whose columns are the defaults)."""
    fig = Figure(figsize=(4.5, 3.2), layout="constrained")
    ax = fig.subplots()
    for name, frame in series.items():
        ax.plot(_numeric(frame, x), _numeric(frame, y), label=name, linewidth=1.2)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if series:
        ax.legend(fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
