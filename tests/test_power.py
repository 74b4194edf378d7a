"""What a paired comparison can detect: power figures against statsmodels and a simulation, the
zero-variance flag, Holm and Bonferroni, the annotated paired table and `oisd-lab power`."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest

from oisd_lab import collect as C
from oisd_lab import power as P
from oisd_lab.analysis import sizing
from oisd_lab.analysis import tables as T
from oisd_lab.errors import ConfigError

statsmodels_power = pytest.importorskip("statsmodels.stats.power")
multitest = pytest.importorskip("statsmodels.stats.multitest")


@pytest.mark.parametrize("n", [2, 3, 5, 12, 40])
def test_minimum_detectable_effect_matches_statsmodels(n):
    std = 1.47
    ref = statsmodels_power.TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8) * std
    assert P.mde(std, n) == pytest.approx(ref, rel=1e-6)
    assert P.power_at(P.mde(std, n), std, n) == pytest.approx(0.8, abs=1e-8)


@pytest.mark.parametrize("effect,std,n", [(0.5, 1.0, 12), (2.0, 1.47, 7), (1.0, 3.0, 30), (0.1, 0.05, 3)])
def test_power_matches_statsmodels(effect, std, n):
    ref = statsmodels_power.TTestPower().power(effect_size=effect / std, nobs=n, alpha=0.05)
    assert P.power_at(effect, std, n) == pytest.approx(ref, abs=1e-7)


def test_power_where_the_noncentral_t_returns_nan_is_still_a_probability():
    # scipy's noncentral t (and so statsmodels) gives NaN at df 1 around nc 11; the integral fallback
    # must sit between its finite neighbours and rise with the effect
    std = 0.0441941738
    values = [P.power_at(k * std, std, 2) for k in (4, 8, 11.549888, 16, 32)]
    assert all(0 < v < 1 for v in values)
    assert values == sorted(values)
    assert values[2] == pytest.approx(0.8, abs=1e-4)


def test_power_agrees_with_a_simulation():
    rng = random.Random(0)
    effect, std, n, trials = 1.0, 1.5, 10, 4000
    hits = 0
    for _ in range(trials):
        xs = [rng.gauss(effect, std) for _ in range(n)]
        s = P.mean_ci(xs)
        hits += s["ci95_low"] > 0 or s["ci95_high"] < 0
    se = math.sqrt(0.25 / trials)
    assert hits / trials == pytest.approx(P.power_at(effect, std, n), abs=4 * se)


def test_seeds_needed_is_the_first_n_with_enough_power():
    ref = statsmodels_power.TTestPower().solve_power(effect_size=2 / 1.47, alpha=0.05, power=0.8)
    n = P.seeds_needed(2.0, 1.47)
    assert n == math.ceil(ref) == 7
    assert P.power_at(2.0, 1.47, n) >= 0.8 > P.power_at(2.0, 1.47, n - 1)
    with pytest.raises(ValueError, match="effect"):
        P.seeds_needed(0.0, 1.0)


def test_interval_and_p_value_are_the_paired_t_test():
    xs = [0.3, -0.1, 0.8, 0.4, 0.1]
    s = P.mean_ci(xs)
    from scipy import stats

    res = stats.ttest_1samp(xs, 0.0)
    lo, hi = res.confidence_interval(0.95)
    assert (s["ci95_low"], s["ci95_high"]) == pytest.approx((lo, hi), rel=1e-9)
    assert P.comparison(s["mean"], s["std"], s["n"])["p"] == pytest.approx(res.pvalue, rel=1e-9)


def test_identical_differences_are_flagged_not_given_a_zero_width_interval():
    s = P.mean_ci([0.01, 0.01, 0.01])
    assert s["flag"] == "zero variance" and math.isnan(s["ci95_low"]) and math.isnan(s["ci95_high"])
    c = P.comparison(0.01, 0.0, 3)
    assert c["flag"] == "zero variance" and math.isnan(c["p"]) and math.isnan(c["mde80"])
    assert P.mean_ci([1.0])["flag"] == "n<2"
    assert P.mean_ci([0.0, 1.0])["flag"] == ""


def test_holm_matches_statsmodels_and_keeps_order_and_nans():
    ps = [0.01, 0.04, 0.03, 0.2, 0.001]
    ref = multitest.multipletests(ps, method="holm")[1]
    assert P.holm(ps) == pytest.approx(list(ref), abs=1e-12)
    out = P.holm([0.02, math.nan, 0.01])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_bonferroni_level_widens_each_interval():
    assert P.bonferroni_level(5) == pytest.approx(0.99)
    narrow = P.interval(0.0, 1.0, 5, 0.95)
    wide = P.interval(0.0, 1.0, 5, P.bonferroni_level(5))
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


def _tables():
    """A paired table with three comparisons of avg_at_k and their aggregate (grpo gains 0.03)."""
    paired = pd.DataFrame({
        "method": ["a", "b", "c"], "task": ["arith"] * 3, "metric": ["avg_at_k"] * 3, "baseline": ["grpo"] * 3,
        "mean_diff": [0.01, 0.002, 0.05], "std": [0.0, 0.004, 0.01], "ci95_low": [0.01, -0.008, 0.025],
        "ci95_high": [0.01, 0.012, 0.075], "n_pairs": [3, 3, 3]})
    aggregate = pd.DataFrame({"method": ["grpo", "grpo"], "task": ["arith"] * 2,
                              "metric": ["avg_at_k", "avg_at_k_before"], "mean": [0.53, 0.50]})
    return paired, aggregate


def test_annotate_flags_corrects_and_labels_non_results():
    paired, aggregate = _tables()
    out = C.annotate(paired, aggregate)
    a, b, c = (out.iloc[i] for i in range(3))
    assert a["flag"] == "zero variance" and math.isnan(a["ci95_low"]) and math.isnan(a["p_holm"])
    assert b["mde80"] == pytest.approx(P.mde(0.004, 3)) and c["mde80"] == pytest.approx(P.mde(0.01, 3))
    ref = multitest.multipletests([b["p"], c["p"]], method="holm")[1]
    assert [b["p_holm"], c["p_holm"]] == pytest.approx(list(ref))
    assert (b["bonf_low"], b["bonf_high"]) == pytest.approx(P.interval(0.002, 0.004, 3, 1 - 0.05 / 3))
    assert b["reference_gain"] == pytest.approx(0.03)
    assert not b["non_result"] and c["non_result"]  # MDE 0.013 < 0.03 < MDE 0.032
    assert "zero variance" in T.paired_cell(a, 100, 1) and "[" not in T.paired_cell(a, 100, 1)
    assert T.paired_cell(c, 100, 1).endswith("(non-result)")
    sentences = T.summary_sentences(out)
    assert "zero variance" in sentences[0] and "non-result" in sentences[2]


def test_sizing_gives_seeds_for_a_quarter_of_the_reference_gain_by_default():
    paired, aggregate = _tables()
    table = sizing.size(C.annotate(paired, aggregate), "avg_at_k", seeds=12)
    target = 0.25 * 3.0
    assert table["target effect"].iloc[0] == pytest.approx(target)
    c = table.loc["arith: c"]
    assert c["seeds needed"] == P.seeds_needed(target, 1.0)
    assert c["MDE80 at 12 seeds"] == pytest.approx(P.mde(1.0, 12))
    pooled = table.iloc[-1]
    assert pooled["std"] == pytest.approx(100 * math.sqrt((0.0**2 + 0.004**2 + 0.01**2) / 3))  # df-weighted, equal n
    with pytest.raises(ConfigError, match="--metric"):
        sizing.size(paired, "nope")
