"""The benchmark's verdict logic (mixtral_triton.bench.uncertainty): pure functions, no server."""

import math

import pytest

from mixtral_triton.bench.uncertainty import (INCONCLUSIVE, MET, MISSED, NOT_MEASURED, Estimate, exact_verdict,
                                              median_interval, paired_ratio, unpaired_ratio, verdict)


def test_median_interval_holds_the_median_and_lies_within_the_values():
    values = [10.0, 12.0, 11.0, 30.0, 9.0]
    e = median_interval(values)
    assert e.median == 11.0 and e.n == 5
    assert min(values) <= e.low <= e.median <= e.high <= max(values)


def test_median_interval_is_reproducible_and_skips_missing_values():
    values = [1.0, None, 2.0, float("nan"), 3.0, 4.0]
    assert median_interval(values) == median_interval(values)
    assert median_interval(values).n == 4
    assert median_interval([]) is None and median_interval([None]) is None


def test_a_tight_sample_has_a_tighter_interval_than_a_spread_one():
    tight = median_interval([100.0, 101.0, 99.0, 100.5, 99.5, 100.2])
    loose = median_interval([60.0, 140.0, 90.0, 120.0, 80.0, 100.0])
    assert tight.high - tight.low < loose.high - loose.low


def test_paired_ratio_takes_one_ratio_per_round():
    # the machine got twice as slow in round 2: the per-round ratio stays 0.9
    ours = [90.0, 45.0, 90.0]
    base = [100.0, 50.0, 100.0]
    e = paired_ratio(ours, base)
    assert e.median == pytest.approx(0.9) and e.low == pytest.approx(0.9) and e.high == pytest.approx(0.9)
    assert e.n == 3


def test_paired_ratio_leaves_out_rounds_missing_a_side_or_with_a_zero_base():
    e = paired_ratio([1.0, 2.0, None, 4.0], [1.0, 0.0, 3.0, 2.0])
    assert e.n == 2 and e.median == pytest.approx(1.5)


def test_unpaired_ratio_is_the_ratio_of_medians_with_both_counts():
    e = unpaired_ratio([300.0, 310.0, 290.0], [100.0, 101.0, 99.0, 100.0])
    assert e.median == pytest.approx(3.0)
    assert e.n == 3 and e.n_base == 4 and e.samples == "n=3/4"
    assert e.low <= 3.0 <= e.high
    assert unpaired_ratio([1.0], []) is None and unpaired_ratio([1.0], [0.0]) is None


@pytest.mark.parametrize("low, high, expected", [
    (0.91, 0.99, MET),            # the whole interval at or above 0.9
    (0.90, 0.95, MET),            # touching the target counts
    (0.80, 0.89, MISSED),         # the whole interval below
    (0.85, 0.95, INCONCLUSIVE),   # straddles it
])
def test_verdict_higher_is_better(low, high, expected):
    assert verdict(Estimate((low + high) / 2, low, high, 5), 0.9) == expected


@pytest.mark.parametrize("low, high, expected", [
    (0.95, 1.08, MET),            # TTFT within +10%: the whole interval at or below 1.10
    (1.12, 1.30, MISSED),
    (1.05, 1.15, INCONCLUSIVE),
])
def test_verdict_lower_is_better(low, high, expected):
    assert verdict(Estimate((low + high) / 2, low, high, 5), 1.10, higher_is_better=False) == expected


def test_a_median_past_the_target_is_not_enough():
    # the old rule (0.903 >= 0.9: met) on a noisy cell: now inconclusive
    assert verdict(Estimate(0.903, 0.80, 1.02, 3), 0.9) == INCONCLUSIVE


def test_a_single_value_is_never_a_verdict():
    one = median_interval([0.95])
    assert one.n == 1 and one.low == one.high == 0.95
    assert verdict(one, 0.9) == INCONCLUSIVE


def test_nothing_measured():
    assert verdict(None, 0.9) == NOT_MEASURED
    assert exact_verdict(None, 1.0) == NOT_MEASURED


def test_exact_verdict_for_counts_and_peaks():
    assert exact_verdict(0, 0) == MET
    assert exact_verdict(-1, 0) == MISSED  # one failed stream against "none failed"
    assert exact_verdict(1.9e9, 2e9, higher_is_better=False) == MET
    assert exact_verdict(2.1e9, 2e9, higher_is_better=False) == MISSED


def test_estimates_round_trip_through_the_results_file():
    e = unpaired_ratio([3.0, 3.2], [1.0, 1.1])
    assert Estimate.from_dict(e.to_dict()) == e
    assert Estimate.from_dict(None) is None
    assert all(math.isfinite(x) for x in (e.median, e.low, e.high))
