"""Shared plotting for the study reports, and the one figure style every report uses.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``, rendered by the
Agg canvas), never through ``pyplot``: no global figure state, no display needed, safe in
Ray workers and tests. Every function writes one file and returns its path. Every figure
function of every report (this module and ``reports/automl_figures.py``) is wrapped in
:func:`styled`, so they share :data:`STYLE` (font sizes, no top/right spines, no legend
frame, resolution).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory

from nasrisk.analysis.stats import correlate
from nasrisk.trials.errors import UserError

#: the one style of every report figure (matplotlib rcParams, applied by :func:`styled`)
STYLE: dict[str, object] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "figure.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "lines.linewidth": 1.2,
    "savefig.dpi": 150,
}
POINT_COLOR = "tab:blue"
FIT_COLOR = "black"
_FLAG_COLOR = "tab:red"


def styled(fn: Callable) -> Callable:
    """Run a figure function under :data:`STYLE` (rcParams are read when artists are made
    and when the file is written, so the whole function runs inside the context)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def save_figure(fig: Figure, path: str | Path, *, dpi: int | None = None) -> Path:
    """Render ``fig`` (object API, no pyplot state) to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with mpl.rc_context(STYLE):
        fig.savefig(path, dpi=dpi or STYLE["savefig.dpi"])
    return path


def _numeric(df: pd.DataFrame, col: str) -> np.ndarray:
    if col not in df.columns:
        raise UserError(f"column {col!r} not in the table; available: "
                        f"{', '.join(map(str, df.columns))}")
    return pd.to_numeric(df[col], errors="coerce").to_numpy(float)


def log_tick_label(v: float, _pos: object = None) -> str:
    """A log-axis tick label a reader can read: plain numbers from 0.01 to 1000 ("20",
    "500", "0.05"), powers of ten as 10^k and other values as m×10^k beyond."""
    if not np.isfinite(v) or v <= 0:
        return ""
    if 1e-2 <= v <= 1e3:
        return f"{v:g}"
    k = math.floor(math.log10(v) + 1e-9)
    m = v / 10 ** k
    if abs(m - round(m)) > 1e-6:
        return f"{v:.2g}"
    return f"$10^{{{k}}}$" if round(m) == 1 else f"${round(m)}\\times10^{{{k}}}$"


def set_log_ticks(axis, lo: float, hi: float) -> None:
    """Log ticks with several labels whatever the span: 1-2-5 steps when the data spans
    fewer than 2 decades, 1-3 within 3 decades, powers of ten beyond (matplotlib's default
    labels only powers of ten, i.e. one label on the short ranges scores often span)."""
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    if decades < 1:
        subs: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    elif decades < 2:
        subs = (1.0, 2.0, 5.0)
    elif decades < 3:
        subs = (1.0, 3.0)
    else:
        subs = (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    axis.set_major_formatter(FuncFormatter(log_tick_label))
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10), numticks=12))
    axis.set_minor_formatter(NullFormatter())


def least_squares_fit(x: np.ndarray, y: np.ndarray, *, log_x: bool) -> tuple[float, float] | None:
    """Slope and intercept of y on log10(x) (or on x), least squares over finite pairs;
    None with fewer than 3 pairs or a constant x."""
    u = np.log10(x) if log_x else x
    if u.size < 3 or np.ptp(u) == 0:
        return None
    slope, intercept = np.polyfit(u, y, 1)
    return float(slope), float(intercept)


def _panel_title(row: Mapping | None, n: int) -> str:
    if row is None or not np.isfinite(row["r"]):
        return f"Spearman ρ = n/a, n = {n}"
    ci = ""
    if np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"]):
        ci = f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
    return f"Spearman ρ = {row['r']:.2f}{ci}, n = {int(row['n'])}"


def _scatter_panel(ax, x: np.ndarray, y: np.ndarray, *, log_x: bool,
                   rho: Mapping | None) -> int:
    """Draw one panel; returns the number of flagged points drawn at the edge."""
    y_ok = np.isfinite(y)
    x_ok = np.isfinite(x) & (x > 0 if log_x else True)
    ok = x_ok & y_ok
    ax.scatter(x[ok], y[ok], s=12, alpha=0.75, color=POINT_COLOR, linewidths=0, zorder=2)
    if log_x:
        ax.set_xscale("log")
        if ok.any():
            set_log_ticks(ax.xaxis, float(x[ok].min()), float(x[ok].max()))
    fit = least_squares_fit(x[ok], y[ok], log_x=log_x)
    if fit is not None:
        lo, hi = float(x[ok].min()), float(x[ok].max())
        grid = np.geomspace(lo, hi, 50) if log_x else np.linspace(lo, hi, 50)
        u = np.log10(grid) if log_x else grid
        ax.plot(grid, fit[0] * u + fit[1], color=FIT_COLOR, linewidth=1.0, zorder=3)
    # Flagged scores (+inf, or no log) are drawn just outside the right edge of the axis, in
    # red, so they are visible rather than silently missing.
    flagged = ~x_ok & y_ok
    if flagged.any():
        edge = blended_transform_factory(ax.transAxes, ax.transData)
        ax.scatter(np.full(flagged.sum(), 1.04), y[flagged], transform=edge, marker=">",
                   s=18, color=_FLAG_COLOR, clip_on=False, zorder=3)
    ax.set_title(_panel_title(rho, int(ok.sum())), loc="left")
    return int(flagged.sum())


def _rho_row(corr: pd.DataFrame | None, xc: str, yc: str, x: np.ndarray, y: np.ndarray,
             *, log_x: bool, n_boot: int, seed: int) -> Mapping | None:
    if corr is not None and {"x", "y", "method"} <= set(corr.columns):
        hit = corr[(corr["x"] == xc) & (corr["y"] == yc) & (corr["method"] == "spearman")]
        if len(hit):
            return hit.iloc[0].to_dict()
    return correlate(x, y, methods=("spearman",), n_boot=n_boot, seed=seed,
                     transform_x=np.log10 if log_x else None).iloc[0].to_dict()


@styled
def scatter_figure(df: pd.DataFrame, xs: Sequence[str], ys: Sequence[str], *,
                   log_x: bool = True, title: str | None = None,
                   labels: Mapping[str, str] | None = None, corr: pd.DataFrame | None = None,
                   n_boot: int = 1000, seed: int = 0, panel_size: float = 2.8) -> Figure:
    """The figure of :func:`scatter_grid`, not yet written (tests inspect its artists)."""
    if not xs or not ys:
        raise UserError("scatter_grid needs at least one x and one y column")
    labels = dict(labels or {})
    cols, rows = len(xs), len(ys)
    width, height = panel_size * cols + 1.05, panel_size * rows + 0.5 + (0.45 if title else 0)
    fig = Figure(figsize=(width, height))
    # fixed margins rather than constrained layout: its tight-bbox pass over log-axis ticks
    # cost most of the rendering time of a 2 x 4 grid
    axes = fig.subplots(rows, cols, squeeze=False, sharex="col", sharey="row",
                        gridspec_kw={"wspace": 0.18, "hspace": 0.35,
                                     "left": 1.0 / width, "right": 1 - 0.2 / width,
                                     "bottom": 0.95 / height,
                                     "top": 1 - (0.75 if title else 0.3) / height})
    n_flagged = 0
    for i, yc in enumerate(ys):
        y = _numeric(df, yc)
        for j, xc in enumerate(xs):
            ax = axes[i][j]
            x = _numeric(df, xc)
            rho = _rho_row(corr, xc, yc, x, y, log_x=log_x, n_boot=n_boot, seed=seed)
            n_flagged += _scatter_panel(ax, x, y, log_x=log_x, rho=rho)
            if i == rows - 1:
                ax.set_xlabel(labels.get(xc, xc + (" (log scale)" if log_x else "")))
            if j == 0:
                ax.set_ylabel(labels.get(yc, yc))
    handles = [Line2D([], [], linestyle="", marker="o", markersize=4, color=POINT_COLOR,
                      label="trial"),
               Line2D([], [], color=FIT_COLOR, linewidth=1.0,
                      label="least-squares fit of y on log10 x" if log_x
                      else "least-squares fit")]
    if n_flagged:
        handles.append(Line2D([], [], linestyle="", marker=">", markersize=4, color=_FLAG_COLOR,
                              label="flagged (score +inf), drawn at the right edge"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles),
               bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title + "\npanel titles: Spearman ρ [bootstrap CI] and n finite pairs",
                     fontsize=STYLE["figure.titlesize"], linespacing=1.3)
    return fig


@styled
def scatter_grid(df: pd.DataFrame, xs: Sequence[str], ys: Sequence[str], *,
                 path: str | Path, log_x: bool = True, title: str | None = None,
                 labels: Mapping[str, str] | None = None, corr: pd.DataFrame | None = None,
                 n_boot: int = 1000, seed: int = 0, panel_size: float = 2.8) -> Path:
    """A grid of scatter plots, one panel per (y row, x column) — for EVAS, kappa variants
    (log axis) vs ASR and vs ACC, the paper's correlation figure (PROTOCOLS section 5).

    Each panel's title (outside the data) gives Spearman's rho with its bootstrap CI and n
    (finite pairs), taken from ``corr`` (a :func:`~nasrisk.analysis.stats.correlation_table`)
    when it has the pair, else computed (``n_boot`` resamples, ``seed``); a black line is the
    least-squares fit of y on log10(x) over the finite points' range. ``labels`` maps column
    names to axis labels. Points whose x is not finite (a flagged kappa of +inf) or not
    positive on a log axis are drawn as red triangles just outside the right edge of the
    axis. Points with a non-finite y cannot be placed and are left out (they are also
    excluded from n).

    Deviations: the trend line is a visual guide (ordinary least squares on log10 x), not
    one of the paper's statistics.
    """
    fig = scatter_figure(df, xs, ys, log_x=log_x, title=title, labels=labels, corr=corr,
                         n_boot=n_boot, seed=seed, panel_size=panel_size)
    return save_figure(fig, path)


@styled
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
    ax.set_xticks(range(len(groups)), labels)
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


@styled
def bar_before_after(df: pd.DataFrame, label_col: str, before: str, after: str, *,
                     path: str | Path, title: str | None = None,
                     names: tuple[str, str] = ("before", "after"), ylabel: str = "",
                     log_y: bool = False) -> Path:
    """Paired bars per row of ``df`` (e.g. ASR before/after a defense or fine-tuning,
    PROTOCOLS section 5 evaluation (b)-(e)); ``log_y`` for values spanning decades (e.g.
    gradient variance)."""
    b, a = _numeric(df, before), _numeric(df, after)
    labels = df[label_col].astype(str).tolist()
    pos = np.arange(len(labels))
    fig = Figure(figsize=(1.5 + 0.8 * len(labels), 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(pos - 0.2, b, width=0.4, label=names[0])
    ax.bar(pos + 0.2, a, width=0.4, label=names[1])
    ax.set_xticks(pos, labels, rotation=30, ha="right")
    v = np.r_[b, a]
    v = v[np.isfinite(v) & (v > 0)]
    if log_y and v.size:
        ax.set_yscale("log")
        set_log_ticks(ax.yaxis, float(v.min()), float(v.max()))
    ax.set_ylabel(ylabel)
    ax.legend()
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


@styled
def curves(series: Mapping[str, pd.DataFrame], *, path: str | Path, x: str = "step",
           y: str = "value", title: str | None = None, xlabel: str = "epoch",
           ylabel: str = "") -> Path:
    """One line per named curve (e.g. per-epoch accuracy from
    :func:`nasrisk.analysis.load.metric_history`, whose columns are the defaults)."""
    fig = Figure(figsize=(4.5, 3.2), layout="constrained")
    ax = fig.subplots()
    for name, frame in series.items():
        ax.plot(_numeric(frame, x), _numeric(frame, y), label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if series:
        ax.legend()
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
