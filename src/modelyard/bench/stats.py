"""The bench's statistics, pure: the median of paired differences with its distribution-free confidence
interval, the stopping rule that decides when enough pairs have been measured, and the interval of a ratio.

"Added latency" is a difference between two noisy measurements, and on a shared 2-core machine the noise
(the child's own speed drifting from one second to the next) is larger than a millisecond. So the bench pairs
each request through a router with one direct to its child, adjacent in time, and summarises the per-pair
differences: their median, with the order-statistic interval for a median (the ranks that the binomial
distribution of "how many differences lie below the true median" puts outside the confidence level). It
assumes nothing about the shape of the differences, only that the pairs are independent."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A median and its confidence interval. `confidence` is the level reached, which is below the one asked
    for when there are too few values for any interval to reach it (5 values: 94%, at best)."""

    median: float
    low: float
    high: float
    confidence: float
    count: int

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _rank(count: int, confidence: float) -> tuple[int, float]:
    """The largest k (1-based) such that [x_(k), x_(n+1-k)] holds the median with at least `confidence`, and
    the coverage it reaches; with too few values for that, k = 1 and the coverage that [min, max] reaches."""
    # The binomial(n, 1/2) tail P(B <= k-1) = sum(C(n, i) for i < k) / 2^n, in exact integers: floats lose
    # it beyond about a thousand values (2^n overflows), and with it the choice of ranks.
    total = 1 << count
    alpha = Fraction(1 - confidence)
    k, tail, term = 1, 1, count  # tail = sum of C(n, i) for i < k, term = C(n, k)
    while k < (count + 1) // 2 and 2 * (tail + term) * alpha.denominator <= alpha.numerator * total:
        tail += term
        term = term * (count - k) // (k + 1)
        k += 1
    return k, 1 - 2 * tail / total


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The median of `values` and its distribution-free confidence interval (order statistics)."""
    if not values:
        raise ValueError("no values: a median needs at least one")
    ordered = sorted(values)
    count = len(ordered)
    k, reached = _rank(count, confidence)
    return Interval(statistics.median(ordered), ordered[k - 1], ordered[count - k], reached, count)


def differences(minuends: Sequence[float], subtrahends: Sequence[float]) -> list[float]:
    """Pairwise a - b of two equally long sequences (a request via a router minus its paired direct one)."""
    if len(minuends) != len(subtrahends):
        raise ValueError(f"{len(minuends)} values against {len(subtrahends)}: pairs need equal counts")
    return [a - b for a, b in zip(minuends, subtrahends, strict=True)]


def settled(intervals: Sequence[Interval], width: float, confidence: float = CONFIDENCE) -> bool:
    """Whether every interval reached the confidence level and is narrower than `width`: the pairs measured so
    far resolve a difference that large, and measuring more would only narrow what is already resolved."""
    return bool(intervals) and all(i.confidence >= confidence and i.width < width for i in intervals)


def ratio_bounds(ours: Interval, theirs: Interval) -> tuple[float, float] | None:
    """The range of ours / theirs over both intervals: each holds its median with 95%, so both do, and the
    ratio of the medians lies in this range, with at least 90% (Bonferroni). None when theirs reaches 0 or
    below (a ratio to an added latency that may be nothing says nothing)."""
    if theirs.low <= 0:
        return None
    corners = [a / b for a in (ours.low, ours.high) for b in (theirs.low, theirs.high)]
    return min(corners), max(corners)
