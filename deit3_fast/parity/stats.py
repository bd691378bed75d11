"""Seed statistics for `deit3-fast parity`: given a few seeds per variant, does a variant's top-1 differ from the
reference's, and by how much?

Pure functions, no torch (numpy only for the bootstrap's resampling): the parity command's table and its `--json`
both come from `compare_variants`. Accuracies are top-1 in percent, so every difference is in percentage points.

Which interval. Welch's t interval is the default: it does not assume that two variants have the same seed-to-seed
spread, and its t quantile at the Welch–Satterthwaite degrees of freedom (about 2 to 4 with 3 seeds per side)
widens the interval for how little 3 seeds say about that spread. The percentile bootstrap is offered for many seeds
or skewed results, not for few: with 3 seeds per side each side has only 10 distinct resampled means and the
bootstrap sees the spread with ddof=0 and near-normal tails, so its "95%" interval is much too narrow (it covered the
true difference in about 80% of simulated 3-vs-3 experiments; tests/deit3_fast/test_parity_stats.py measures it).

The t quantile is computed here (scipy is not a dependency): the t distribution's tail is a regularised incomplete
beta function, evaluated by its continued fraction (Lentz's method), and inverted by safeguarded Newton steps. Checked
against closed forms (1 and 2 degrees of freedom), the normal limit and tabulated critical values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METHODS = ("welch", "bootstrap")
DEFAULT_TOLERANCE = 0.5  # top-1 points: a difference below this is not worth a user's attention (see verdict())
DEFAULT_HINT = "look at the storage (convert at --short-side 448) and the crop/interpolation settings"
HIGHER_HINT = (
    "unexpected for the same recipe: check that both evaluate the same validation images with the same eval crop"
)


# ---------------------------------------------------------------------------------------------------------------
# Summaries


@dataclass(frozen=True)
class Summary:
    mean: float  # nan when n == 0
    std: float  # sample standard deviation (ddof=1); nan when n < 2
    n: int


def _values(values: Iterable[float], what: str = "values") -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{what}: {v!r} is not a number")
        if not math.isfinite(v):
            raise ValueError(
                f"{what}: {v!r} is not finite (a diverged or unfinished run must be left out or counted "
                "by the caller, not averaged)"
            )
        out.append(float(v))
    return out


def summarize(values: Iterable[float]) -> Summary:
    """Mean, sample standard deviation (ddof=1) and count of one variant's per-seed results."""
    v = _values(values)
    n = len(v)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    if max(v) == min(v):  # exactly no spread (a float mean of equal values can be off by one ulp)
        return Summary(v[0], 0.0 if n > 1 else math.nan, n)
    mean = math.fsum(v) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    return Summary(mean, std, n)


# ---------------------------------------------------------------------------------------------------------------
# The t distribution


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4). Converges fast
    for x < (a + 1) / (a + b + 2), which the caller ensures."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    # O(sqrt(max(a, b))) terms are needed: a = df / 2 < 500 from t_quantile (larger df use its series).
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b  # the symmetry I_x(a, b) = 1 - I_{1-x}(b, a)


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (df > 0, not necessarily an integer)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if t == 0:
        return 0.5
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(|T| > |t|) = I_{df/(df+t²)}(df/2, 1/2)
    return tail if t > 0 else 1.0 - tail


def _t_pdf(t: float, df: float) -> float:
    return math.exp(
        math.lgamma((df + 1) / 2)
        - math.lgamma(df / 2)
        - 0.5 * math.log(df * math.pi)
        - (df + 1) / 2 * math.log1p(t * t / df)
    )


def norm_quantile(p: float) -> float:
    """The standard normal quantile, by Newton steps on erfc (exact to ~1e-15 on 1e-300 < p < 1 - 1e-16)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -norm_quantile(1.0 - p)
    q = 1.0 - p
    # Start: the first Abramowitz & Stegun 26.2.23 rational approximation (error < 4.5e-4), then Newton on the tail.
    s = math.sqrt(-2.0 * math.log(q))
    z = s - (2.515517 + 0.802853 * s + 0.010328 * s * s) / (1 + 1.432788 * s + 0.189269 * s * s + 0.001308 * s**3)
    for _ in range(50):
        f = 0.5 * math.erfc(z / math.sqrt(2.0)) - q
        step = f / (math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi))
        z += step
        if abs(step) <= 1e-15 * max(1.0, abs(z)):
            break
    return z


def _t_quantile_series(p: float, df: float) -> float:
    """Cornish–Fisher expansion of the t quantile in 1/df (Abramowitz & Stegun 26.7.5): error O(df^-5), below 1e-12
    for df >= 1000 at the levels used here."""
    z = norm_quantile(p)
    z2 = z * z
    g1 = (z2 + 1) * z / 4
    g2 = ((5 * z2 + 16) * z2 + 3) * z / 96
    g3 = (((3 * z2 + 19) * z2 + 17) * z2 - 15) * z / 384
    g4 = ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) * z / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


LARGE_DF = 1000.0


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (df > 0, real; math.inf: the normal quantile).
    `t_quantile(0.975, 3)` = 3.182446...: the critical value of a two-sided 95% interval."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    if math.isinf(df):
        return norm_quantile(p)
    if df >= LARGE_DF:
        return _t_quantile_series(p, df)
    return _t_quantile_numeric(p, df)


def _t_quantile_numeric(p: float, df: float) -> float:
    """t_quantile for 0.5 < p < 1 by inverting t_sf (any df > 0; used below LARGE_DF)."""
    q = 1.0 - p
    # Bracket [lo, hi] with sf(lo) >= q > sf(hi), then Newton steps that fall back to bisection when they leave it.
    lo, hi = 0.0, max(1.0, abs(_t_quantile_series(p, df)))
    while t_sf(hi, df) >= q:
        lo, hi = hi, hi * 2.0
    t = 0.5 * (lo + hi)
    for _ in range(200):
        f = t_sf(t, df) - q
        if f > 0:
            lo = t
        else:
            hi = t
        new = t + f / _t_pdf(t, df)  # d sf / dt = -pdf
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - t) <= 1e-14 * max(1.0, t) or hi - lo <= 1e-14 * max(1.0, t):
            return new
        t = new
    return t


# ---------------------------------------------------------------------------------------------------------------
# Intervals for the difference of means


@dataclass(frozen=True)
class Interval:
    """mean(a) - mean(b) and its confidence interval. low/high/df are None when either side has fewer than 2 values
    (no spread to estimate: no interval); df is None for the bootstrap and when neither side has any spread."""

    delta: float
    low: float | None
    high: float | None
    df: float | None
    level: float = 0.95
    method: str = "welch"
    n_a: int = 0
    n_b: int = 0
    spread: bool = True  # False: every value of a equal and every value of b equal (the interval is the point)

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2.0

    def contains(self, x: float) -> bool:
        return self.low is not None and self.low <= x <= self.high


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (0.95 for a 95% interval), got {level}")


def _sides(a, b) -> tuple[Summary, Summary]:
    sa, sb = summarize(a), summarize(b)
    if sa.n == 0 or sb.n == 0:
        raise ValueError(f"an interval needs at least one value on each side, got {sa.n} and {sb.n}")
    return sa, sb


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Welch's t interval for mean(a) - mean(b): standard error sqrt(s_a²/n_a + s_b²/n_b), Welch–Satterthwaite
    degrees of freedom. Fewer than 2 values on a side: no interval (low/high None). No spread on either side: the
    interval is the point (df None)."""
    _check_level(level)
    sa, sb = _sides(a, b)
    delta = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Interval(delta, None, None, None, level, "welch", sa.n, sb.n)
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    if va + vb == 0.0:
        return Interval(delta, delta, delta, None, level, "welch", sa.n, sb.n, spread=False)
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    h = t_quantile(0.5 + level / 2.0, df) * math.sqrt(va + vb)
    return Interval(delta, delta - h, delta + h, df, level, "welch", sa.n, sb.n)


def bootstrap_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 10000, seed: int = 0
) -> Interval:
    """Percentile bootstrap of mean(a) - mean(b): each side resampled with replacement on its own, `resamples`
    times, from numpy's default generator seeded with `seed` (the same inputs and seed give the same interval).
    Too narrow for 3 seeds per side (module docstring); fewer than 2 values on a side: no interval."""
    _check_level(level)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    sa, sb = _sides(a, b)
    delta = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Interval(delta, None, None, None, level, "bootstrap", sa.n, sb.n)
    if sa.std == 0 and sb.std == 0:
        return Interval(delta, delta, delta, None, level, "bootstrap", sa.n, sb.n, spread=False)
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(_values(a)), np.asarray(_values(b))
    diffs = xa[rng.integers(0, sa.n, size=(resamples, sa.n))].mean(axis=1) - xb[
        rng.integers(0, sb.n, size=(resamples, sb.n))
    ].mean(axis=1)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return Interval(delta, float(low), float(high), None, level, "bootstrap", sa.n, sb.n)


# ---------------------------------------------------------------------------------------------------------------
# The verdict: one line a user can act on


def _num(x: float, digits: int, sign: bool = True) -> str:
    x = round(x, digits)
    if x == 0:
        x = 0.0  # no "−0.00"
    text = f"{x:+.{digits}f}" if sign else f"{abs(x):.{digits}f}"
    return text.replace("-", "\u2212")  # a typographic minus, as in the table


def _seeds(iv: Interval) -> str:
    """'3 seeds each', or the variant's count first: '1 seed vs 3'."""
    if iv.n_a == iv.n_b:
        return "one seed each" if iv.n_a == 1 else f"{iv.n_a} seeds each"
    return f"{iv.n_a} seed{'s' * (iv.n_a != 1)} vs {iv.n_b}"


def verdict(
    interval: Interval,
    name: str,
    reference: str = "reference",
    tolerance: float | None = DEFAULT_TOLERANCE,
    hint: str | None = None,
) -> str:
    """One line on `name` against `reference` from the interval of mean(name) - mean(reference), in top-1 points.

    - the interval contains 0: indistinguishable at this budget; when it also reaches beyond ±tolerance, the line
      says how large a difference is not ruled out (more seeds would narrow it);
    - it lies below 0: lower by |Δ| ± h, with `hint` (what to look at; default: the storage and the
      crop/interpolation settings), or
      "within the tolerance" when the whole interval is within ±tolerance;
    - above 0: higher by |Δ| ± h, which for the same recipe is also a sign that the two paths differ;
    - fewer than 2 seeds on a side: Δ without an interval, and how to get one.
    `tolerance` None: no tolerance clauses."""
    iv = interval
    ref = reference
    if iv.low is None:
        return (
            f"{name}: {_seeds(iv)}: \u0394 {_num(iv.delta, 2)} points against {ref} "
            "(no interval; run --seeds 3 for a verdict)"
        )
    h = iv.half_width
    # Two decimals unless the uncertainty is a point or more: a tenth must not hide where the tolerance lies.
    digits = 1 if h >= 1.0 else 2
    level = f"{iv.level * 100:g}%"
    if not iv.spread:
        detail = f"no spread over seeds on either side, {_seeds(iv)}: check that the seeds change the runs"
    else:
        method = "Welch" if iv.method == "welch" else "bootstrap"
        detail = f"{level} interval {_num(iv.low, digits)} to {_num(iv.high, digits)}, {method}, {_seeds(iv)}"
    within = tolerance is not None and -tolerance <= iv.low and iv.high <= tolerance
    if iv.contains(0.0):
        line = (
            f"{name}: indistinguishable from {ref} at this budget: \u0394 {_num(iv.delta, digits)} "
            f"\u00b1 {_num(h, digits, sign=False)} points ({detail})"
        )
        if tolerance is not None and not within:
            reach = max(-iv.low, iv.high)
            line += f", but differences up to {_num(reach, digits, sign=False)} points are not ruled out: add seeds"
        return line
    word = "lower" if iv.delta < 0 else "higher"
    line = (
        f"{name}: {word} by {_num(iv.delta, digits, sign=False)} \u00b1 {_num(h, digits, sign=False)} points "
        f"than {ref} ({detail})"
    )
    if within:
        return line + f": a real difference, but within the {tolerance:g}-point tolerance"
    return line + ": " + ((hint or DEFAULT_HINT) if word == "lower" else HIGHER_HINT)


# ---------------------------------------------------------------------------------------------------------------
# The table and --json


def _plain(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def compare_variants(
    results: Mapping[str, Sequence[float | None]],
    reference: str = "reference",
    method: str = "welch",
    level: float = 0.95,
    tolerance: float | None = DEFAULT_TOLERANCE,
    resamples: int = 10000,
    seed: int = 0,
    hints: Mapping[str, str] | None = None,
) -> list[dict]:
    """One row per variant other than `reference`, in the order of `results` ({variant: per-seed top-1}): its mean,
    std and n, the reference's, Δ = mean(variant) - mean(reference) with the interval (`method`: welch | bootstrap),
    and the verdict line. None entries (runs without a result) are left out and show in n. Every value is a plain
    float, int, str or None: the rows go to the table and, as they are, to --json."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if reference not in results:
        raise ValueError(f"no results for the reference variant {reference!r} (variants: {', '.join(results)})")
    finished = {k: [v for v in vals if v is not None] for k, vals in results.items()}
    ref = summarize(finished[reference])
    rows = []
    for name, vals in finished.items():
        if name == reference:
            continue
        s = summarize(vals)
        row = {
            "variant": name,
            "n": s.n,
            "mean": _plain(s.mean),
            "std": _plain(s.std),
            "reference": reference,
            "reference_n": ref.n,
            "reference_mean": _plain(ref.mean),
            "reference_std": _plain(ref.std),
            "delta": None,
            "low": None,
            "high": None,
            "half_width": None,
            "df": None,
            "level": level,
            "method": method,
        }
        if s.n == 0 or ref.n == 0:
            missing = name if s.n == 0 else reference
            row["verdict"] = f"{name}: no finished runs of {missing}: nothing to compare"
            rows.append(row)
            continue
        if method == "welch":
            iv = welch_interval(vals, finished[reference], level)
        else:
            iv = bootstrap_interval(vals, finished[reference], level, resamples, seed)
        row.update(
            delta=iv.delta,
            low=iv.low,
            high=iv.high,
            half_width=iv.half_width,
            df=iv.df,
            verdict=verdict(iv, name, reference, tolerance, (hints or {}).get(name)),
        )
        rows.append(row)
    return rows
