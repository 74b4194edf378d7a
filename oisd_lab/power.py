"""What a paired comparison over seeds can and cannot detect.

Every comparison in the workbench is paired by seed: the difference `method - reference` of one
metric, one value per seed. For such a list of differences:

- `mean_ci`: n, mean, standard deviation (ddof 1) and the two-sided t-interval (95% unless told).
  A list whose differences are all equal has no variance to estimate: the interval is not
  computed and `flag` says `zero variance` (three identical differences are not certainty, they
  are too few seeds on a coarse metric). Fewer than two values: `flag` is `n<2`.
- `comparison`: the two-sided paired t-test p-value, and `mde80`, the minimum detectable effect:
  the smallest true mean difference that a two-sided test at alpha 0.05 detects with 80% power,
  given n and the observed standard deviation (the noncentral t distribution, as statsmodels'
  `TTestPower`).
- `seeds_needed`: the smallest number of seeds whose paired test detects `effect` with 80% power,
  for a standard deviation taken from a pilot grid.
- `holm`: Holm's step-down adjusted p-values for a family of comparisons (controls the
  family-wise error rate at alpha without assuming independence); `bonferroni_level`: the
  per-comparison confidence level of simultaneous intervals for a family of m.
- `non_result`: a comparison is a non-result when its detectable effect exceeds the reference's
  own gain (e.g. GRPO's gain over the warm start): the design could not have seen an effect of
  the size that matters.

Background and the reading of each figure: docs/statistics.md.
"""

from __future__ import annotations

import math

ALPHA = 0.05
POWER = 0.8


def _clean(values) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _flag(mean: float, std: float, n: int) -> str:
    """'n<2', 'zero variance' (all values equal, up to rounding) or '' for a usable interval."""
    if n < 2:
        return "n<2"
    if math.isnan(std) or std <= 1e-9 * max(1.0, abs(mean)):
        return "zero variance"
    return ""


def mean_ci(values, level: float = 0.95) -> dict:
    """n, mean, std and the two-sided t-interval at `level` of a list of paired differences.

    Keys: `n, mean, std, ci95_low, ci95_high, flag` (the interval keys keep their names at any
    level). `flag` is '' for a usable interval, 'zero variance' or 'n<2' otherwise (then the
    interval is NaN)."""
    xs = _clean(values)
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    flag = _flag(mean, std, n)
    low, high = (math.nan, math.nan) if flag else interval(mean, std, n, level)
    return {"n": n, "mean": mean, "std": std, "ci95_low": low, "ci95_high": high, "flag": flag}


def interval(mean: float, std: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The two-sided t-interval at `level` around `mean` for n values of standard deviation `std`."""
    from scipy import stats

    if n < 2 or not std >= 0:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def power_at(effect: float, std: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with n pairs to detect a true mean difference
    `effect` when the differences have standard deviation `std`."""
    from scipy import stats

    if n < 2 or not std > 0:
        return math.nan
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = abs(effect) / std * math.sqrt(n)
    value = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if math.isfinite(value):
        return value
    # scipy's noncentral t returns NaN in some corners (df 1, moderate nc): the same probability
    # as an integral over the chi-square variable of the t statistic's denominator
    from scipy import integrate

    def given(v: float) -> float:
        s = crit * math.sqrt(v / df)
        return (stats.norm.sf(s - nc) + stats.norm.cdf(-s - nc)) * stats.chi2.pdf(v, df)

    return float(integrate.quad(given, 0, math.inf, limit=200)[0])


def mde(std: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect (same unit as `std`) of the two-sided paired t-test, n pairs."""
    from scipy import optimize

    if n < 2 or not std > 0:
        return math.nan
    hi = std
    while power_at(hi, std, n, alpha) < power:
        hi *= 2
    return float(optimize.brentq(lambda d: power_at(d, std, n, alpha) - power, 0.0, hi, xtol=1e-10 * std))


def p_value(mean: float, std: float, n: int) -> float:
    """Two-sided p-value of the paired t-test of mean 0 (NaN when the variance is 0 or n < 2)."""
    from scipy import stats

    if n < 2 or not std > 0:
        return math.nan
    t = mean / (std / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def comparison(mean: float, std: float, n: int, alpha: float = ALPHA, power: float = POWER) -> dict:
    """`p`, `mde80` and `flag` of a paired comparison summarised by mean, std and n."""
    flag = _flag(mean, std, n)
    if flag:
        return {"p": math.nan, "mde80": math.nan, "flag": flag}
    return {"p": p_value(mean, std, n), "mde80": mde(std, n, alpha, power), "flag": flag}


def seeds_needed(effect: float, std: float, alpha: float = ALPHA, power: float = POWER,
                 max_seeds: int = 10_000) -> int:
    """The smallest number of seeds (pairs) whose two-sided paired t-test detects a true mean
    difference `effect` with the given power, for differences of standard deviation `std`."""
    if not effect or not std > 0:
        raise ValueError("seeds_needed: give a nonzero effect and a positive standard deviation")
    n = 2
    while power_at(effect, std, n, alpha) < power:
        n += 1
        if n > max_seeds:
            raise ValueError(f"seeds_needed: more than {max_seeds} seeds; the effect is too small for this variance")
    return n


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN and is not counted)."""
    ps = [float(p) for p in pvalues]
    finite = sorted((p, i) for i, p in enumerate(ps) if not math.isnan(p))
    m = len(finite)
    out = [math.nan] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def bonferroni_level(m: int, level: float = 0.95) -> float:
    """Per-comparison confidence level of Bonferroni-simultaneous intervals for a family of m."""
    return 1 - (1 - level) / max(1, m)


def non_result(mde80: float, reference_gain: float) -> bool:
    """True when the design's detectable effect exceeds the reference's own gain (or is unknown)."""
    if math.isnan(mde80) or math.isnan(reference_gain):
        return True
    return mde80 > abs(reference_gain)
