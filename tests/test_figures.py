"""The report figures' content, read from the matplotlib artists (no image comparison): where
the correlation annotation sits, how many log ticks are labelled, the trend line against an
independent fit, axis labels, the flagged points at the edge, and the one shared style."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from scipy import stats as sps

from nasrisk.analysis import figures
from nasrisk.analysis.figures import (
    STYLE,
    log_tick_label,
    scatter_figure,
    styled,
)
from nasrisk.analysis.reports import automl_figures
from nasrisk.analysis.reports.evas import FIGURE_LABELS
from nasrisk.analysis.stats import correlation_table


def _frame(n=30, seed=0):
    rng = np.random.default_rng(seed)
    k = 10 ** rng.uniform(1.3, 2.5, n)  # 20..300: one power of ten inside the range
    asr = 1 - np.log10(k) / 4 + 0.05 * rng.normal(size=n)
    kb = k * 3
    kb[[2, 7]] = np.inf
    return pd.DataFrame({"kappa": k, "kappa_bare": kb, "asr": asr,
                         "acc": rng.uniform(0.8, 0.9, n)})


def _drawn(fig):
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig


def _visible_labels(ax):
    lo, hi = ax.get_xlim()
    return [t.get_text() for t, v in zip(ax.get_xticklabels(), ax.get_xticks(), strict=True)
            if t.get_text() and lo <= v <= hi]


def test_panel_title_carries_rho_and_ci_from_the_table_and_nothing_sits_inside_the_axes():
    df = _frame()
    corr = correlation_table(df, ["kappa"], ["asr"], n_boot=200, seed=3)
    fig = _drawn(scatter_figure(df, ["kappa"], ["asr"], corr=corr, title="t"))
    ax = fig.axes[0]
    row = corr[corr["method"] == "spearman"].iloc[0]
    assert ax.get_title(loc="left") == (f"Spearman ρ = {row['r']:.2f} "
                                        f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}], n = 30")
    assert row["ci_low"] < row["r"] < row["ci_high"]
    # no annotation box or legend over the data: text and legend live outside the axes
    assert not ax.texts and ax.get_legend() is None
    assert len(fig.legends) == 1
    legend_box = fig.legends[0].get_window_extent()
    assert not legend_box.overlaps(ax.get_window_extent())


def test_log_axis_labels_several_ticks_on_a_short_range():
    fig = _drawn(scatter_figure(_frame(), ["kappa"], ["asr"], n_boot=0))
    labels = _visible_labels(fig.axes[0])
    # matplotlib's default labels only 100 on 20..300
    assert len(labels) >= 3, labels
    assert {"50", "100", "200"} <= set(labels)


@pytest.mark.parametrize(("v", "text"), [(20.0, "20"), (0.05, "0.05"), (1000.0, "1000"),
                                         (1e5, "$10^{5}$"), (3e4, "$3\\times10^{4}$"),
                                         (0.0, ""), (np.inf, "")])
def test_log_tick_label(v, text):
    assert log_tick_label(v) == text


def test_trend_line_is_least_squares_of_y_on_log10_x_over_the_data_range():
    df = _frame()
    fig = scatter_figure(df, ["kappa"], ["asr"], n_boot=0)
    (line,) = fig.axes[0].lines
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    fit = sps.linregress(np.log10(df["kappa"].to_numpy(np.float64)), df["asr"].to_numpy())
    np.testing.assert_allclose(y, fit.slope * np.log10(x) + fit.intercept, rtol=0, atol=1e-8)
    assert x.min() == pytest.approx(df["kappa"].min()) and x.max() == pytest.approx(
        df["kappa"].max())


def test_axis_labels_with_units_on_the_outer_panels():
    df = _frame().rename(columns={"kappa": "kappa_generator"})
    fig = scatter_figure(df, ["kappa_generator", "kappa_bare"], ["asr", "acc"], n_boot=0,
                         labels=FIGURE_LABELS)
    (a00, a01), (a10, a11) = np.asarray(fig.axes).reshape(2, 2)
    assert "attack success rate" in a00.get_ylabel() and "target" in a00.get_ylabel()
    assert a10.get_ylabel().startswith("clean accuracy")
    assert a10.get_xlabel() == "kappa, generator set (log scale)"
    assert a11.get_xlabel() == "kappa, bare arch (log scale)"
    assert a01.get_ylabel() == "" and a00.get_xlabel() == ""


def test_flagged_points_are_drawn_at_the_right_edge_not_dropped():
    df = _frame()
    fig = scatter_figure(df, ["kappa_bare"], ["asr"], n_boot=0)
    ax = fig.axes[0]
    edge = [c for c in ax.collections if len(c.get_offsets()) == 2]
    assert len(edge) == 1
    off = np.asarray(edge[0].get_offsets())
    np.testing.assert_allclose(off[:, 0], 1.04)  # axes fraction: just right of the axis
    np.testing.assert_allclose(np.sort(off[:, 1]), np.sort(df["asr"].to_numpy()[[2, 7]]))
    assert ax.get_title(loc="left").endswith("n = 28")
    assert "flagged" in " ".join(t.get_text() for t in fig.legends[0].get_texts())


def test_every_report_figure_function_uses_the_shared_style(monkeypatch, tmp_path):
    for mod, names in ((figures, ("scatter_grid", "strip_by_family", "bar_before_after",
                                  "curves")),
                       (automl_figures, ("cad_curves", "overlap_histogram_figure",
                                         "contour_grid", "strip_grid"))):
        for name in names:
            assert getattr(getattr(mod, name), "__wrapped__", None) is not None, name
    seen = []
    monkeypatch.setattr(automl_figures, "save_figure", lambda fig, path: seen.append(fig))
    cad = pd.DataFrame({"model": ["a", "a", "b", "b"], "family": ["nas", "nas", "manual", "manual"],
                        "poison": [0.0, 0.1, 0.0, 0.1], "cad": [0.0, 0.05, 0.0, 0.02]})
    automl_figures.cad_curves(cad, path=tmp_path / "c.png")
    ax = seen[0].axes[0]
    assert not ax.spines["top"].get_visible()
    assert ax.xaxis.label.get_fontsize() == STYLE["axes.labelsize"]
    assert ax.get_xticklabels()[0].get_fontsize() == STYLE["xtick.labelsize"]
    assert styled(lambda: 1)() == 1


def test_strip_panel_spanning_two_decades_gets_a_log_axis(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(automl_figures, "save_figure", lambda fig, path: seen.append(fig))
    df = pd.DataFrame({"family": ["nas", "nas", "manual", "manual"],
                       "grad_var": [1e-4, 3e-3, 2e-2, 5e-4], "acc": [0.8, 0.9, 0.85, 0.7]})
    automl_figures.strip_grid(df, ["grad_var", "acc"], path=tmp_path / "s.png")
    a, b = seen[0].axes[:2]
    assert a.get_yscale() == "log" and a.get_title() == "grad_var (log scale)"
    assert b.get_yscale() == "linear" and b.get_title() == "acc"
