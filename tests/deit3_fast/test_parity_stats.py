"""deit3_fast.parity.stats on constructed inputs: the t quantile against closed forms and tabulated critical values,
a known difference found, equal pairs called indistinguishable, the Welch interval's coverage by simulation, the
degenerate cases (no spread, one seed), the bootstrap's determinism, and the rows the table and --json are made of."""

import json
import math
import re

import numpy as np
import pytest

from deit3_fast.parity import stats
from deit3_fast.parity.stats import (
    DEFAULT_HINT,
    Interval,
    betainc,
    bootstrap_interval,
    compare_variants,
    summarize,
    t_quantile,
    t_sf,
    verdict,
    welch_interval,
)

# Two-sided 95% critical values t(0.975, df) as printed, to 3 decimals, in the NIST/SEMATECH e-Handbook of
# Statistical Methods, section 1.3.6.7.2 "Critical Values of the Student's t Distribution" (column 0.025 upper tail);
# the last row is the normal limit.
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042, math.inf: 1.960}


# --- summarize ------------------------------------------------------------------------------------------------


def test_summarize_mean_sample_std_and_n():
    s = summarize([76.0, 76.5, 77.0])
    assert (s.mean, s.n) == (76.5, 3)
    assert s.std == pytest.approx(0.5, abs=1e-12)  # ddof=1: sqrt((0.25 + 0 + 0.25) / 2)
    assert s.std == pytest.approx(float(np.std([76.0, 76.5, 77.0], ddof=1)), abs=1e-12)


def test_summarize_degenerate_inputs():
    one = summarize([81.4])
    assert one.mean == 81.4 and one.n == 1 and math.isnan(one.std)
    none = summarize([])
    assert none.n == 0 and math.isnan(none.mean) and math.isnan(none.std)
    same = summarize([76.1] * 3)  # no spread: exactly 0, and the mean is the value itself (no ulp error)
    assert same == stats.Summary(76.1, 0.0, 3)


@pytest.mark.parametrize(
    "bad, error",
    [
        ([76.0, float("nan")], ValueError),
        ([float("inf")], ValueError),
        ([76.0, None], TypeError),
        ([76.0, "76"], TypeError),
    ],
)
def test_summarize_rejects_what_is_not_a_result(bad, error):
    with pytest.raises(error):
        summarize(bad)


# --- the t distribution ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("df, expected", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_the_tabulated_critical_values(df, expected):
    assert abs(t_quantile(0.975, df) - expected) <= 1e-3
    assert round(t_quantile(0.975, df), 3) == expected  # the table's own rounding


def test_t_quantile_large_df_tends_to_the_normal_quantile():
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959963984540054, abs=1e-12)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959963984540054, abs=1e-5)
    assert abs(t_quantile(0.975, 1e4) - 1.960) <= 1e-3


@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.975, 0.995, 0.9995])
def test_t_quantile_closed_forms(p):
    # df = 1 (Cauchy): tan(pi (p - 1/2)); df = 2: (2p - 1) / sqrt(2 p (1 - p)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert t_quantile(1 - p, 3) == -t_quantile(p, 3)  # symmetry
    assert t_quantile(0.5, 3.7) == 0.0


@pytest.mark.parametrize("df", [1.3, 2.5, 2.94, 7.0, 53.2, 999.0])
@pytest.mark.parametrize("p", [0.9, 0.975, 0.999])
def test_t_quantile_inverts_the_tail(df, p):
    """Welch's df is not an integer: the quantile is the exact inverse of the tail at any real df."""
    assert t_sf(t_quantile(p, df), df) == pytest.approx(1 - p, rel=1e-10)


def test_t_quantile_series_and_numeric_inverse_agree_where_they_meet():
    for p in (0.9, 0.975, 0.9995):
        assert stats._t_quantile_series(p, stats.LARGE_DF) == pytest.approx(
            stats._t_quantile_numeric(p, stats.LARGE_DF), abs=1e-9
        )


def test_incomplete_beta_identities():
    for x in (0.01, 0.3, 0.5, 0.77, 0.999):
        assert betainc(2.5, 1.0, x) == pytest.approx(x**2.5, rel=1e-12)
        assert betainc(1.0, 3.0, x) == pytest.approx(1 - (1 - x) ** 3, rel=1e-12)
        assert betainc(1.5, 0.5, x) == pytest.approx(1 - betainc(0.5, 1.5, 1 - x), abs=1e-14)
    assert (betainc(2, 3, 0.0), betainc(2, 3, 1.0)) == (0.0, 1.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: t_quantile(1.0, 3),
        lambda: t_quantile(0.0, 3),
        lambda: t_quantile(0.9, 0),
        lambda: betainc(0, 1, 0.5),
        lambda: betainc(1, 1, 1.5),
    ],
)
def test_t_functions_reject_impossible_arguments(call):
    with pytest.raises(ValueError):
        call()


# --- Welch's interval -----------------------------------------------------------------------------------------


def test_welch_interval_by_hand():
    """a: variance 1, b: variance 4, 3 values each: se² = 1/3 + 4/3, df = (5/3)² / ((1/3)²/2 + (4/3)²/2) = 50/17."""
    iv = welch_interval([0.0, 1.0, 2.0], [0.0, 2.0, 4.0])
    assert iv.delta == -1.0 and iv.df == pytest.approx(50 / 17, rel=1e-12)
    h = t_quantile(0.975, 50 / 17) * math.sqrt(5 / 3)
    assert (iv.low, iv.high) == (pytest.approx(-1 - h, rel=1e-12), pytest.approx(-1 + h, rel=1e-12))
    assert iv.half_width == pytest.approx(h, rel=1e-12) and (iv.n_a, iv.n_b, iv.method) == (3, 3, "welch")
    wider = welch_interval([0.0, 1.0, 2.0], [0.0, 2.0, 4.0], level=0.99)
    assert wider.low < iv.low and wider.high > iv.high


def _noisy(center: float, sd: float, n: int, seed: int) -> list[float]:
    return list(center + sd * np.random.default_rng(seed).standard_normal(n))


def test_a_known_difference_is_found():
    """Reference at 76 %, the variant at 74 %, seed-to-seed sd 0.2, 5 seeds: 'lower by 2.0', the interval excludes 0
    and holds the true -2.0, and the verdict points at what to look at."""
    ref, fast = _noisy(76.0, 0.2, 5, seed=1), _noisy(74.0, 0.2, 5, seed=2)
    iv = welch_interval(fast, ref)
    assert not iv.contains(0.0) and iv.contains(-2.0) and iv.high < 0
    line = verdict(iv, "ffcv")
    shown = re.match(r"ffcv: lower by (\d+\.\d+) \u00b1 (\d+\.\d+) points than reference \(95% interval ", line)
    assert shown and abs(float(shown[1]) - 2.0) <= float(shown[2]), line  # as printed: 2.10 +- 0.38
    assert line.endswith(f"Welch, 5 seeds each): {DEFAULT_HINT}") and "\n" not in line
    higher = verdict(welch_interval(ref, fast), "ffcv")
    assert higher.startswith(f"ffcv: higher by {shown[1]}") and higher.endswith(stats.HIGHER_HINT)


# Per-seed top-1 sets with the same centre by construction (permuted, mirrored noise, a shift far below the
# spread, unequal seed counts): each pair must be called indistinguishable.
EQUAL_PAIRS = [
    ([75.9, 76.3, 76.1], [76.1, 75.9, 76.3]),  # the same values, another order
    ([76.0 - 0.2, 76.0 + 0.05, 76.0 + 0.15], [76.0 + 0.2, 76.0 - 0.05, 76.0 - 0.15]),  # mirrored noise, mean 76
    ([75.6, 76.4, 76.0], [75.8, 76.5, 75.9]),  # Δ -0.07 against a spread of 0.4
    ([76.2, 75.7, 76.1, 75.8, 76.2], [76.0, 75.9, 76.1]),  # 5 and 3 seeds
]


@pytest.mark.parametrize("a, b", EQUAL_PAIRS)
def test_an_equal_pair_is_indistinguishable(a, b):
    iv = welch_interval(a, b)
    assert iv.contains(0.0)
    line = verdict(iv, "nvjpeg")
    assert line.startswith("nvjpeg: indistinguishable from reference at this budget: \u0394 ")
    assert "95% interval" in line and "\n" not in line
    assert bootstrap_interval(a, b).contains(0.0)


def test_indistinguishable_but_wide_says_what_is_not_ruled_out():
    a, b = [74.0, 77.0, 75.5], [76.5, 74.5, 75.0]  # spread ~1.5 points: the interval reaches several points
    line = verdict(welch_interval(a, b), "dali", tolerance=0.5)
    assert "indistinguishable" in line and "are not ruled out: add seeds" in line
    tight = verdict(welch_interval([76.0, 76.1, 76.05], [76.02, 76.08, 76.06]), "dali", tolerance=0.5)
    assert "indistinguishable" in tight and "not ruled out" not in tight
    assert "not ruled out" not in verdict(welch_interval(a, b), "dali", tolerance=None)


def test_a_small_real_difference_within_the_tolerance():
    iv = welch_interval([75.80, 75.82, 75.81, 75.79, 75.80], [76.0, 76.01, 75.99, 76.0, 76.02])
    assert iv.high < 0 and iv.low > -0.5
    line = verdict(iv, "ffcv", tolerance=0.5)
    assert line.startswith("ffcv: lower by 0.20 \u00b1 0.0") and "within the 0.5-point tolerance" in line
    assert DEFAULT_HINT not in line


def test_welch_interval_coverage_by_simulation():
    """2,000 experiments of 3 vs 3 seeds from two normals with equal means: the 95% interval must cover 0 in
    95% +- 1.5% of them. This checks the t quantile and the Welch-Satterthwaite df together: with the normal
    quantile instead it covers ~85%, with the pooled df (4) ~93%, with the conservative df (2) ~98%.

    The spreads differ (sd 1 and 3), which is the case Welch's interval is for. With equal spreads and 3 seeds a
    side it is conservative, a known property of the Welch-Satterthwaite df: ~96.6% over 40,000 experiments, so
    that case gets its own bound below."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, (2000, 3)), rng.normal(0.0, 3.0, (2000, 3))
    covered = np.mean([welch_interval(x, y).contains(0.0) for x, y in zip(a, b)])
    assert abs(covered - 0.95) <= 0.015, covered
    a, b = rng.normal(0.0, 1.0, (2000, 3)), rng.normal(0.0, 1.0, (2000, 3))
    covered_equal = np.mean([welch_interval(x, y).contains(0.0) for x, y in zip(a, b)])
    assert 0.95 <= covered_equal <= 0.98, covered_equal


def test_no_spread_on_either_side():
    same = welch_interval([76.0] * 3, [76.0] * 3)
    assert (same.delta, same.low, same.high, same.df, same.spread) == (0.0, 0.0, 0.0, None, False)
    line = verdict(same, "ffcv")
    assert "indistinguishable" in line and "check that the seeds change the runs" in line
    apart = welch_interval([75.5] * 3, [76.0] * 3)
    assert (apart.low, apart.high) == (-0.5, -0.5)
    assert verdict(apart, "ffcv").startswith("ffcv: lower by 0.50 \u00b1 0.00 points than reference (no spread")


def test_no_spread_on_one_side_leaves_the_other_sides_df():
    iv = welch_interval([76.0, 76.0, 76.0], [75.0, 75.5, 76.5, 76.0])
    assert iv.df == pytest.approx(3.0, rel=1e-12) and iv.spread


@pytest.mark.parametrize("method", [welch_interval, bootstrap_interval])
def test_one_seed_gives_no_interval_and_says_so(method):
    iv = method([75.7], [76.0])
    assert (iv.low, iv.high, iv.half_width) == (None, None, None) and not iv.contains(0.0)
    assert iv.delta == pytest.approx(-0.3)
    line = verdict(iv, "ffcv")
    assert (
        line == "ffcv: one seed each: \u0394 \u22120.30 points against reference (no interval; run --seeds 3 "
        "for a verdict)"
    )
    assert "1 seed vs 3" in verdict(method([75.7], [76.0, 76.2, 75.9]), "ffcv")


def test_intervals_need_a_value_and_a_level():
    with pytest.raises(ValueError):
        welch_interval([], [76.0, 76.1])
    with pytest.raises(ValueError):
        welch_interval([76.0, 76.1], [76.0, 76.1], level=95)
    with pytest.raises(ValueError):
        bootstrap_interval([76.0, 76.1], [76.0, 76.1], resamples=0)


# --- the bootstrap --------------------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_with_its_seed():
    a, b = _noisy(76.0, 0.3, 5, seed=3), _noisy(75.5, 0.3, 5, seed=4)
    first, again = bootstrap_interval(a, b, seed=7), bootstrap_interval(a, b, seed=7)
    assert first == again and first.method == "bootstrap" and first.df is None
    other = bootstrap_interval(a, b, seed=8)
    assert (other.low, other.high) != (first.low, first.high)
    assert first.delta == welch_interval(a, b).delta  # the point estimate does not depend on the method
    assert first.low < first.delta < first.high


def test_bootstrap_finds_a_known_difference():
    iv = bootstrap_interval(_noisy(74.0, 0.2, 5, seed=2), _noisy(76.0, 0.2, 5, seed=1))
    assert iv.high < 0 and iv.contains(-2.0)
    assert "bootstrap, 5 seeds each" in verdict(iv, "ffcv")


def test_bootstrap_is_too_narrow_for_three_seeds():
    """Why Welch is the default: with 3 seeds a side the percentile bootstrap's 95% interval covers the true
    difference far less often (~80%; each side has only 10 distinct resampled means)."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.0, 1.0, (400, 3)), rng.normal(0.0, 1.0, (400, 3))
    covered = np.mean(
        [bootstrap_interval(x, y, resamples=1000, seed=i).contains(0.0) for i, (x, y) in enumerate(zip(a, b))]
    )
    assert covered < 0.9, covered


# --- rows for the table and --json ----------------------------------------------------------------------------


def test_compare_variants_rows():
    results = {
        "reference": [76.1, 75.9, 76.2],
        "ffcv": [74.0, 74.3, 73.9],
        "nvjpeg": [76.0, 76.3, 75.8],
        "dali": [None, None, None],
    }
    rows = compare_variants(results)
    assert [r["variant"] for r in rows] == ["ffcv", "nvjpeg", "dali"]
    ffcv, nvjpeg, dali = rows
    assert set(ffcv) == {
        "variant",
        "n",
        "mean",
        "std",
        "reference",
        "reference_n",
        "reference_mean",
        "reference_std",
        "delta",
        "low",
        "high",
        "half_width",
        "df",
        "level",
        "method",
        "verdict",
    }
    assert (ffcv["n"], ffcv["reference_n"], ffcv["method"], ffcv["level"]) == (3, 3, "welch", 0.95)
    assert ffcv["delta"] == pytest.approx(np.mean(results["ffcv"]) - np.mean(results["reference"]))
    assert ffcv["high"] < 0 and ffcv["verdict"].startswith("ffcv: lower by 2.0")
    assert nvjpeg["low"] < 0 < nvjpeg["high"] and "indistinguishable" in nvjpeg["verdict"]
    assert (
        dali["n"] == 0
        and dali["delta"] is None
        and dali["verdict"] == ("dali: no finished runs of dali: nothing to compare")
    )
    json.dumps(rows, allow_nan=False)  # --json: plain values, no NaN


def test_compare_variants_options():
    results = {"ref": [76.1, 75.9, 76.2], "ffcv@max256": [74.0, 74.3, 73.9], "ffcv@short448": [75.9]}
    rows = compare_variants(
        results, reference="ref", method="bootstrap", seed=3, hints={"ffcv@max256": "convert at --short-side 448"}
    )
    assert rows == compare_variants(
        results, reference="ref", method="bootstrap", seed=3, hints={"ffcv@max256": "convert at --short-side 448"}
    )
    assert rows[0]["method"] == "bootstrap" and rows[0]["df"] is None
    assert rows[0]["verdict"].startswith("ffcv@max256: lower by 2.0") and "than ref (" in rows[0]["verdict"]
    assert rows[0]["verdict"].endswith("bootstrap, 3 seeds each): convert at --short-side 448")
    assert rows[1]["std"] is None and rows[1]["low"] is None and "one seed each" not in rows[1]["verdict"]
    assert "1 seed vs 3" in rows[1]["verdict"]
    with pytest.raises(ValueError, match="reference"):
        compare_variants({"ffcv": [76.0]})
    with pytest.raises(ValueError, match="method"):
        compare_variants(results, reference="ref", method="t")
    empty_ref = compare_variants({"reference": [], "ffcv": [76.0, 76.1]})
    assert empty_ref[0]["verdict"] == "ffcv: no finished runs of reference: nothing to compare"


def test_verdict_is_one_line_for_every_case():
    cases = [
        welch_interval([76.0, 76.2, 75.9], [76.1, 76.0, 75.8]),
        welch_interval([74.0, 74.1], [76.0, 76.2]),
        welch_interval([78.0, 78.1], [76.0, 76.2]),
        welch_interval([76.0], [76.0]),
        welch_interval([76.0] * 2, [76.0] * 2),
        Interval(-0.004, -0.2, 0.19, 4.0, n_a=3, n_b=3),
    ]
    for iv in cases:
        line = verdict(iv, "ffcv")
        assert line.startswith("ffcv: ") and "\n" not in line and "\u2212\u0030.00 " not in line
    assert "\u0394 +0.00" in verdict(cases[-1], "ffcv")  # -0.004 rounds to 0.00, not "−0.00"
