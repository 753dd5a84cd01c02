"""Figures with their uncertainty, and verdicts that respect it (pure functions).

A benchmark cell is measured in n rounds; a figure is the median of its rounds with a
95% bootstrap interval of that median. A ratio between two paths measured in the same
rounds is paired (one ratio per round, the paths interleaved within a round, so the
machine's drifts fall on both); a ratio between cells measured at different times (c=8
against c=1) resamples each side on its own. A verdict is **met** only when the whole
interval clears the target, **missed** when the whole interval lies on the wrong side,
and **inconclusive** when the interval straddles it: a handful of noisy rounds does not
decide a target that sits inside its own noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4000
SEED = 0  # the same rounds always give the same interval

MET, MISSED, INCONCLUSIVE, NOT_MEASURED = "met", "missed", "inconclusive", "not measured"


@dataclass(frozen=True)
class Estimate:
    """The median of n values and the bootstrap interval of that median."""

    median: float
    low: float
    high: float
    n: int  # values behind the median (rounds, or per-round ratios)
    n_base: int = 0  # unpaired ratios: values behind the denominator's median

    @property
    def samples(self) -> str:
        return f"n={self.n}" + (f"/{self.n_base}" if self.n_base else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Estimate | None":
        return cls(**d) if d else None


def _clean(values: Sequence[float | None]) -> np.ndarray:
    return np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def _interval(medians: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def median_interval(values: Sequence[float | None]) -> Estimate | None:
    """Median of the rounds with a percentile-bootstrap interval; None without values.
    One value has a zero-width interval and n = 1 (shown, so nobody mistakes it for more)."""
    a = _clean(values)
    if a.size == 0:
        return None
    rng = np.random.default_rng(SEED)
    medians = np.median(rng.choice(a, size=(RESAMPLES, a.size), replace=True), axis=1)
    low, high = _interval(medians)
    return Estimate(float(np.median(a)), low, high, int(a.size))


def paired_ratio(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> Estimate | None:
    """Ratio of two paths measured round by round: the median of the per-round ratios.
    Rounds where either side is missing or the denominator is 0 are left out."""
    ratios = [a / b for a, b in zip(numerators, denominators)
              if a is not None and b is not None and b != 0]
    return median_interval(ratios)


def unpaired_ratio(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> Estimate | None:
    """Ratio of the medians of two independently measured sets, each resampled on its own."""
    a, b = _clean(numerators), _clean(denominators)
    if a.size == 0 or b.size == 0 or np.median(b) == 0:
        return None
    rng = np.random.default_rng(SEED)
    top = np.median(rng.choice(a, size=(RESAMPLES, a.size), replace=True), axis=1)
    bottom = np.median(rng.choice(b, size=(RESAMPLES, b.size), replace=True), axis=1)
    keep = bottom != 0
    low, high = _interval(top[keep] / bottom[keep])
    return Estimate(float(np.median(a) / np.median(b)), low, high, int(a.size), int(b.size))


def verdict(estimate: Estimate | None, target: float, higher_is_better: bool = True) -> str:
    """met / missed / inconclusive against `target` (>= target when higher is better,
    <= target otherwise); `not measured` without an estimate. A single value has no
    interval to speak of: inconclusive, whatever it is."""
    if estimate is None:
        return NOT_MEASURED
    if estimate.n + estimate.n_base < 2:
        return INCONCLUSIVE
    if higher_is_better:
        if estimate.low >= target:
            return MET
        if estimate.high < target:
            return MISSED
        return INCONCLUSIVE
    if estimate.high <= target:
        return MET
    if estimate.low > target:
        return MISSED
    return INCONCLUSIVE


def exact_verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    """A verdict on a figure without sampling noise (a count, a byte size measured once
    per run by the kernel): met or missed, or not measured."""
    if value is None:
        return NOT_MEASURED
    ok = value >= target if higher_is_better else value <= target
    return MET if ok else MISSED
