"""Correlations with bootstrap confidence intervals, family comparisons, markdown tables.

Used by every study's report: EVAS (PROTOCOLS section 5, "Pearson, Spearman and Kendall of
kappa vs ASR and kappa vs ACC with confidence intervals") and the AutoML study (section 4,
"every metric NAS vs manual"; "correlations of gradient variance and kappa against each
attack metric").

Confidence intervals are percentile bootstraps (Efron & Tibshirani 1993, ch. 13): resample
the n (x, y) *pairs* with replacement ``n_boot`` times, recompute the statistic, take the
(1-ci)/2 and (1+ci)/2 quantiles. One set of resampling indices (seeded) is shared by all
methods of a call, so their intervals are comparable. Resamples on which the statistic is
undefined (all x or all y equal) are left out of the quantiles.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from nasrisk.trials.errors import UserError

METHODS = ("pearson", "spearman", "kendall")
CORRELATION_COLUMNS = ("method", "r", "p", "ci_low", "ci_high", "n", "n_dropped")


def resample_indices(n: int, n_boot: int, *, seed: int = 0) -> np.ndarray:
    """``(n_boot, n)`` indices of bootstrap resamples of n pairs (numpy PCG64, ``seed``)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / den
    r[den == 0] = np.nan
    return np.clip(r, -1.0, 1.0)


_KENDALL_VECTOR_MAX_N = 4096  # above: the n x n sign matrices would not fit comfortably


def _resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """``(n_boot, n)`` multiplicity of each original pair in each resample."""
    flat = (idx + n * np.arange(len(idx))[:, None]).ravel()
    return np.bincount(flat, minlength=len(idx) * n).reshape(len(idx), n).astype(float)


def _bootstrap_kendall(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    # Kendall's tau-b of a resample, sum_{a<b} sx_ab sy_ab / sqrt(#{a<b: sx_ab != 0}
    # #{a<b: sy_ab != 0}) over resampled positions a, b, depends only on how often each
    # original pair occurs (w): every term is a quadratic form w^T M w with M the original
    # pairs' sign products (zero diagonal: copies of one pair are tied, as in scipy's tau-b).
    # Ordered pairs count each unordered pair twice, which cancels in the ratio.
    sx = np.sign(x[None, :] - x[:, None])
    sy = np.sign(y[None, :] - y[:, None])
    w = _resample_counts(idx, x.size)
    num = ((w @ (sx * sy)) * w).sum(axis=1)
    den = np.sqrt(((w @ np.abs(sx)) * w).sum(axis=1) * ((w @ np.abs(sy)) * w).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def bootstrap_distribution(x: np.ndarray, y: np.ndarray, idx: np.ndarray, *,
                           method: str) -> np.ndarray:
    """The statistic ``method`` on every resample ``x[idx[b]], y[idx[b]]`` (NaN where undefined).

    Pearson and Spearman are vectorised over resamples (Spearman = Pearson of average ranks,
    ties included); Kendall's tau-b as quadratic forms of the resample counts with the
    original pairs' sign matrices (one matrix product for all resamples) up to n = 4096, and
    above that (the matrices would take gigabytes) a loop over scipy's O(n log n) routine.
    """
    xb, yb = np.asarray(x, float)[idx], np.asarray(y, float)[idx]
    if method == "pearson":
        return _rowwise_pearson(xb, yb)
    if method == "spearman":
        return _rowwise_pearson(sps.rankdata(xb, axis=1), sps.rankdata(yb, axis=1))
    if method == "kendall":
        if xb.shape[1] <= _KENDALL_VECTOR_MAX_N:
            return _bootstrap_kendall(np.asarray(x, float), np.asarray(y, float), idx)
        out = np.empty(len(idx))
        with warnings.catch_warnings():
            # a resample with a constant side has no tau; it becomes NaN and is left out
            warnings.simplefilter("ignore")
            for b in range(len(idx)):
                out[b] = sps.kendalltau(xb[b], yb[b]).statistic
        return out
    raise UserError(f"unknown correlation method {method!r}; valid: {', '.join(METHODS)}")


def _point(x: np.ndarray, y: np.ndarray, method: str) -> tuple[float, float]:
    fn = {"pearson": sps.pearsonr, "spearman": sps.spearmanr, "kendall": sps.kendalltau}
    if method not in fn:
        raise UserError(f"unknown correlation method {method!r}; valid: {', '.join(METHODS)}")
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    res = fn[method](x, y)
    return float(res.statistic), float(res.pvalue)


def correlate(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *,
              methods: Sequence[str] = METHODS, n_boot: int = 2000, ci: float = 0.95,
              seed: int = 0,
              transform_x: Callable[[np.ndarray], np.ndarray] | None = None) -> pd.DataFrame:
    """Correlation of paired samples, one row per method.

    Columns: ``method``, ``r`` and ``p`` (scipy's pearsonr/spearmanr/kendalltau, tau-b;
    two-sided), ``ci_low``/``ci_high`` (percentile bootstrap over pairs, module docstring),
    ``n`` (pairs used), ``n_dropped`` (pairs dropped because x — after ``transform_x`` — or y
    is not finite, e.g. a flagged kappa of +inf, or log of a non-positive value).
    With fewer than 3 usable pairs or a constant side, r, p and the CI are NaN; ``n_boot=0``
    skips the bootstrap (NaN CI).

    Deviations: flagged (+inf) scores are dropped and counted rather than ranked last; the
    EVAS reference mapped them to 1e5, which ranks them last but puts an arbitrary number
    into Pearson's r. The figure shows them at the axis edge instead (``figures.scatter_grid``).
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise UserError(f"x and y must pair up: {x.size} x values vs {y.size} y values")
    if not 0 < ci < 1:
        raise UserError(f"ci must be in (0, 1), got {ci}")
    if transform_x is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.asarray(transform_x(x), dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n, n_dropped = int(keep.sum()), int((~keep).sum())
    usable = n >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
    idx = resample_indices(n, n_boot, seed=seed) if usable and n_boot > 0 else None
    q = [(1 - ci) / 2, (1 + ci) / 2]
    rows = []
    for method in methods:
        r, p = _point(x, y, method)
        lo = hi = math.nan
        if idx is not None:
            dist = bootstrap_distribution(x, y, idx, method=method)
            dist = dist[np.isfinite(dist)]
            if dist.size:
                lo, hi = (float(v) for v in np.quantile(dist, q))
        rows.append({"method": method, "r": r, "p": p, "ci_low": lo, "ci_high": hi,
                     "n": n, "n_dropped": n_dropped})
    return pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))


def _require_columns(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"column(s) {', '.join(missing)} not in the table; "
                        f"available: {', '.join(map(str, df.columns))}")


def correlation_table(df: pd.DataFrame, xs: Sequence[str], ys: Sequence[str], *,
                      log_x: bool = True, methods: Sequence[str] = METHODS,
                      n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """:func:`correlate` for every (x, y) pair of columns of ``df``: columns ``x``, ``y``
    followed by :func:`correlate`'s, one row per x, y, method (in that nesting order).

    ``log_x`` correlates log10(x) (scores such as kappa span decades; only Pearson changes,
    rank correlations are invariant). Every pair uses the same ``seed``.
    """
    _require_columns(df, [*xs, *ys])
    tables = []
    for xc in xs:
        for yc in ys:
            t = correlate(pd.to_numeric(df[xc], errors="coerce").to_numpy(float),
                          pd.to_numeric(df[yc], errors="coerce").to_numpy(float),
                          methods=methods, n_boot=n_boot, ci=ci, seed=seed,
                          transform_x=np.log10 if log_x else None)
            t.insert(0, "y", yc)
            t.insert(0, "x", xc)
            tables.append(t)
    if not tables:
        return pd.DataFrame(columns=["x", "y", *CORRELATION_COLUMNS])
    return pd.concat(tables, ignore_index=True)


def _finite(values: pd.Series) -> np.ndarray:
    v = pd.to_numeric(values, errors="coerce").to_numpy(float)
    return v[np.isfinite(v)]


def _compare(a: np.ndarray, b: np.ndarray, *, n_boot: int, ci: float,
             seed: int) -> dict[str, float]:
    out = {"n_a": a.size, "n_b": b.size,
           "mean_a": a.mean() if a.size else math.nan,
           "std_a": a.std(ddof=1) if a.size > 1 else math.nan,
           "mean_b": b.mean() if b.size else math.nan,
           "std_b": b.std(ddof=1) if b.size > 1 else math.nan}
    out["diff"] = out["mean_a"] - out["mean_b"]
    out["ci_low"] = out["ci_high"] = out["p_welch"] = out["p_mannwhitney"] = math.nan
    if a.size >= 2 and b.size >= 2:
        _compare_tests(a, b, out, n_boot=n_boot, ci=ci, seed=seed)
    return {k: int(v) if k in ("n_a", "n_b") else float(v) for k, v in out.items()}


def _compare_tests(a: np.ndarray, b: np.ndarray, out: dict, *, n_boot: int, ci: float,
                   seed: int) -> None:
    if n_boot > 0:
        # stratified bootstrap: each family resampled on its own, keeping its size
        rng = np.random.default_rng(seed)
        da = a[rng.integers(0, a.size, (n_boot, a.size))].mean(axis=1)
        db = b[rng.integers(0, b.size, (n_boot, b.size))].mean(axis=1)
        out["ci_low"], out["ci_high"] = np.quantile(da - db, [(1 - ci) / 2, (1 + ci) / 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant groups: scipy warns and returns NaN
        out["p_welch"] = sps.ttest_ind(a, b, equal_var=False).pvalue
        out["p_mannwhitney"] = sps.mannwhitneyu(a, b, alternative="two-sided").pvalue


def family_comparison(df: pd.DataFrame, metric: str, family_col: str,
                      groups: tuple[str, str] = ("nas", "manual"), *, by: str | None = None,
                      n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Family A vs family B on one metric (PROTOCOLS section 4: "every metric NAS vs manual
    (family means, spreads, per dataset)"; the artifact appendix reports NAS minus manual).

    One row (or one per level of ``by``, e.g. ``param.dataset``) with columns ``metric``,
    [``by`` value], ``group_a``, ``group_b``, ``n_a``, ``n_b``, ``mean_a``, ``std_a``
    (ddof=1), ``mean_b``, ``std_b``, ``diff`` = mean_a - mean_b, ``ci_low``/``ci_high``
    (percentile bootstrap of the difference, each family resampled separately),
    ``p_welch`` (Welch's t-test) and ``p_mannwhitney`` (two-sided Mann-Whitney U).
    Non-finite values are left out.
    """
    _require_columns(df, [metric, family_col, *([by] if by else [])])
    ga, gb = groups
    levels = [None] if by is None else sorted(df[by].dropna().unique().tolist(), key=str)
    rows = []
    for level in levels:
        sub = df if level is None else df[df[by] == level]
        a = _finite(sub.loc[sub[family_col] == ga, metric])
        b = _finite(sub.loc[sub[family_col] == gb, metric])
        row: dict = {"metric": metric}
        if by is not None:
            row[by] = level
        row |= {"group_a": ga, "group_b": gb}
        row |= _compare(a, b, n_boot=n_boot, ci=ci, seed=seed)
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(value: object, floatfmt: str) -> str:
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return format(float(value), floatfmt)
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame, *, floatfmt: str = ".3g", index: bool = False) -> str:
    """A GitHub-flavoured markdown table of ``df`` (no dependency on ``tabulate``, which
    pandas' own ``to_markdown`` needs). Numbers are right-aligned, floats use ``floatfmt``,
    NaN prints as ``nan``, pipes inside cells are escaped."""
    frame = df.reset_index() if index else df
    headers = [str(c) for c in frame.columns]
    body = [[_cell(v, floatfmt) for v in row] for row in frame.itertuples(index=False)]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    widths = [max([len(h), 3, *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(cells, widths, numeric, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in body)]) + "\n"
