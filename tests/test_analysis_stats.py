"""Correlations with bootstrap CIs, family comparison and the markdown formatter, on
constructed data with known answers."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from nasrisk.analysis.stats import (
    bootstrap_distribution,
    correlate,
    correlation_table,
    family_comparison,
    resample_indices,
    to_markdown,
)
from nasrisk.trials.errors import UserError


def _rows(df: pd.DataFrame) -> dict[str, pd.Series]:
    return {r["method"]: r for _, r in df.iterrows()}


def test_monotone_nonlinear_ranks_are_perfect_pearson_is_not():
    x = np.linspace(0.1, 5.0, 60)
    rows = _rows(correlate(x, np.exp(x), n_boot=300))
    assert rows["spearman"]["r"] == pytest.approx(1.0)
    assert rows["kendall"]["r"] == pytest.approx(1.0)
    assert rows["pearson"]["r"] < 0.95
    # every resample of a monotone relation is monotone: rank CIs collapse onto 1
    for m in ("spearman", "kendall"):
        assert rows[m]["ci_low"] == pytest.approx(1.0)
        assert rows[m]["ci_high"] == pytest.approx(1.0)
    # decreasing relation: -1
    assert _rows(correlate(x, -x**3, n_boot=0))["kendall"]["r"] == pytest.approx(-1.0)


def test_transform_x_linearises_for_pearson_only():
    x = np.logspace(0, 6, 40)
    y = 2.0 * np.log10(x) + 1.0
    raw = _rows(correlate(x, y, n_boot=0))
    logged = _rows(correlate(x, y, n_boot=0, transform_x=np.log10))
    assert raw["pearson"]["r"] < 0.9
    assert logged["pearson"]["r"] == pytest.approx(1.0)
    assert logged["spearman"]["r"] == pytest.approx(raw["spearman"]["r"])


def test_point_estimates_match_scipy_and_corrcoef():
    rng = np.random.default_rng(3)
    x = rng.normal(size=80)
    y = 0.5 * x + rng.normal(size=80)
    rows = _rows(correlate(x, y, n_boot=0))
    assert rows["pearson"]["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert rows["spearman"]["p"] == pytest.approx(sps.spearmanr(x, y).pvalue)
    assert rows["kendall"]["r"] == pytest.approx(sps.kendalltau(x, y).statistic)
    assert math.isnan(rows["pearson"]["ci_low"])  # n_boot=0: no interval


def test_independent_data_ci_contains_zero():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.normal(size=200)
    for _, row in correlate(x, y, n_boot=1000, seed=1).iterrows():
        assert row["ci_low"] < 0 < row["ci_high"], row["method"]
        assert row["p"] > 0.05


def test_ci_contains_estimate_excludes_zero_and_shrinks_with_n():
    rng = np.random.default_rng(5)
    widths = []
    for n in (30, 600):
        x = rng.normal(size=n)
        y = 0.6 * x + rng.normal(size=n)
        t = correlate(x, y, n_boot=800, seed=2)
        for _, row in t.iterrows():
            assert row["ci_low"] <= row["r"] <= row["ci_high"], (n, row["method"])
        widths.append((t["ci_high"] - t["ci_low"]).to_numpy())
    assert (widths[1] < widths[0] / 2).all()  # width ~ 1/sqrt(n): 20x the data, ~4.5x narrower
    assert (t["ci_low"] > 0).all()


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=50), rng.normal(size=50)
    a = correlate(x, y, n_boot=200, seed=4)
    pd.testing.assert_frame_equal(a, correlate(x, y, n_boot=200, seed=4))
    assert not a["ci_low"].equals(correlate(x, y, n_boot=200, seed=5)["ci_low"])


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # n=3 resamples
@pytest.mark.parametrize("n", [3, 25, 200])
@pytest.mark.parametrize("method", ["pearson", "spearman", "kendall"])
def test_vectorised_bootstrap_matches_scipy_loop(method, n):
    rng = np.random.default_rng(11)
    x = np.round(rng.normal(size=n), 1)  # rounding creates ties
    y = np.round(x + rng.normal(size=n), 1)
    idx = resample_indices(n, 40, seed=0)
    fast = bootstrap_distribution(x, y, idx, method=method)
    ref = {"pearson": sps.pearsonr, "spearman": sps.spearmanr, "kendall": sps.kendalltau}[method]
    slow = np.array([ref(x[i], y[i]).statistic for i in idx])
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-12)


def test_kendall_large_n_path_matches_quadratic_form_path(monkeypatch):
    from nasrisk.analysis import stats

    rng = np.random.default_rng(12)
    x = np.round(rng.normal(size=60), 1)
    y = np.round(x + rng.normal(size=60), 1)
    idx = resample_indices(60, 30, seed=1)
    fast = bootstrap_distribution(x, y, idx, method="kendall")
    monkeypatch.setattr(stats, "_KENDALL_VECTOR_MAX_N", 10)  # force the scipy loop
    np.testing.assert_allclose(bootstrap_distribution(x, y, idx, method="kendall"), fast,
                               rtol=1e-12)


def test_non_finite_pairs_are_dropped_and_counted():
    rng = np.random.default_rng(2)
    x = rng.lognormal(size=40)
    y = -np.log(x) + 0.3 * rng.normal(size=40)
    xd, yd = x.copy(), y.copy()
    xd[[3, 7]] = np.inf  # flagged kappa
    yd[11] = np.nan
    xd[20] = -1.0  # log10 of a negative: dropped after the transform
    got = correlate(xd, yd, n_boot=100, transform_x=np.log10)
    keep = np.ones(40, bool)
    keep[[3, 7, 11, 20]] = False
    ref = correlate(x[keep], y[keep], n_boot=100, transform_x=np.log10)
    assert (got["n_dropped"] == 4).all() and (got["n"] == 36).all()
    pd.testing.assert_frame_equal(got.drop(columns="n_dropped"), ref.drop(columns="n_dropped"))


def test_too_few_or_constant_gives_nan_rows():
    t = correlate([1.0, 2.0], [3.0, 4.0])
    assert len(t) == 3 and t["r"].isna().all() and t["ci_low"].isna().all()
    assert correlate([1.0, 2.0, 3.0, 4.0], [5.0] * 4)["r"].isna().all()
    with pytest.raises(UserError, match="pair up"):
        correlate([1.0, 2.0], [1.0])
    with pytest.raises(UserError, match="valid"):
        correlate([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], methods=("cosine",))


def test_correlation_table_every_pair():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"k1": rng.lognormal(size=30), "k2": rng.lognormal(size=30)})
    df["asr"] = -np.log(df["k1"])
    df["acc"] = rng.uniform(size=30)
    t = correlation_table(df, ["k1", "k2"], ["asr", "acc"], n_boot=50)
    assert len(t) == 2 * 2 * 3
    assert list(t[["x", "y"]].drop_duplicates().itertuples(index=False, name=None)) == [
        ("k1", "asr"), ("k1", "acc"), ("k2", "asr"), ("k2", "acc")]
    row = t[(t.x == "k1") & (t.y == "asr") & (t.method == "pearson")].iloc[0]
    assert row["r"] == pytest.approx(-1.0)  # log_x: -log(k1) is linear in log10(k1)
    with pytest.raises(UserError, match="nope"):
        correlation_table(df, ["nope"], ["asr"])


def test_family_comparison_known_shift():
    rng = np.random.default_rng(7)
    df = pd.DataFrame({
        "asr": np.r_[rng.normal(0.6, 0.05, 40), rng.normal(0.5, 0.05, 30), [np.inf]],
        "family": ["nas"] * 40 + ["manual"] * 31,
        "dataset": (["c10", "c100"] * 20) + (["c10", "c100"] * 15) + ["c10"],
    })
    row = family_comparison(df, "asr", "family", n_boot=1000).iloc[0]
    nas = df.asr[:40]
    manual = df.asr[40:70]
    assert (row["n_a"], row["n_b"]) == (40, 30)  # the inf is left out
    assert row["mean_a"] == pytest.approx(nas.mean())
    assert row["std_b"] == pytest.approx(manual.std(ddof=1))
    assert row["diff"] == pytest.approx(nas.mean() - manual.mean())
    assert row["ci_low"] < row["diff"] < row["ci_high"]
    # the bootstrap CI of a difference of means has about the normal-theory width
    se = math.sqrt(nas.var(ddof=1) / 40 + manual.var(ddof=1) / 30)
    assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert abs(row["diff"] - 0.1) < 4 * se
    assert row["p_welch"] < 1e-6 and row["p_mannwhitney"] < 1e-6
    per = family_comparison(df, "asr", "family", by="dataset", n_boot=200)
    assert list(per["dataset"]) == ["c10", "c100"]
    assert per["n_a"].sum() == 40


def test_family_comparison_same_distribution_not_significant():
    rng = np.random.default_rng(8)
    df = pd.DataFrame({"m": rng.normal(size=60), "f": ["nas", "manual"] * 30})
    row = family_comparison(df, "m", "f", n_boot=1000).iloc[0]
    assert row["ci_low"] < 0 < row["ci_high"]
    assert row["p_welch"] > 0.05


def test_to_markdown_shape_and_escaping():
    df = pd.DataFrame({"name": ["a|b", "c"], "r": [0.123456, np.nan], "n": [3, 10]})
    md = to_markdown(df)
    lines = md.strip().split("\n")
    assert len(lines) == 4
    assert lines[0].split("|")[1].strip() == "name"
    assert set(lines[1]) <= {"|", "-", ":"} and lines[1].count(":") == 2  # two numeric cols
    assert "a\\|b" in lines[2] and "0.123" in lines[2] and "0.1235" not in lines[2]
    assert "nan" in lines[3]
    # every row has as many cells as the header
    assert len({ln.replace("\\|", "").count("|") for ln in lines}) == 1
