"""Paired hot-path measurements: the latency each router adds over calling its own child, measured so that a
fraction of a millisecond shows on a noisy machine.

At concurrency 1 every step is a quad: for each router, one request direct to its child and one through the
router, back to back, so that both see the same moment of the machine; the router order alternates every step
and the direct/via order every two, so that neither side is always first. Each target keeps its own
kept-alive connection pool of one connection (the same policy on all four). Steps go on until every router's
interval is narrower than the target width, or the time budget is spent (past the minimum count).

At a higher concurrency single requests cannot be paired (32 in flight finish in any order), so the unit is a
round: `count` requests at that concurrency against one target, on a fresh pool, its p50 the figure; each
router's direct and via rounds are adjacent, in alternating order, and the paired difference is that of their
p50s. The interval is then over rounds, a few of them, so its confidence is the one their count reaches."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from modelyard.bench.stats import differences, median_interval, settled

DIRECT, VIA = "direct", "via router"
CHECK_EVERY = 16  # steps between two looks at the intervals (sorting every step would cost more than the step)

# One request against one target: its latency in seconds, None when it failed. With `count` and
# `concurrency`: a round's latencies.
Probe = Callable[[], Awaitable[float | None]]
Round = Callable[[], Awaitable[list[float]]]


def step_order(step: int, kinds: Sequence[str]) -> list[tuple[str, str]]:
    """Which (router, route) goes when in one step: routers in turn, reversed every other step; direct then
    via, swapped every two steps. Over four steps every position is taken equally by each side."""
    routers = list(kinds) if step % 2 == 0 else list(reversed(kinds))
    routes = (DIRECT, VIA) if (step // 2) % 2 == 0 else (VIA, DIRECT)
    return [(kind, route) for kind in routers for route in routes]


@dataclass
class Paired:
    """What one endpoint's paired run measured: per router, the direct and via figures of each kept step
    (requests, or rounds' p50s), in step order, so that index i of each list is the same moment."""

    unit: str  # "pairs" or "rounds"
    direct: dict[str, list[float]] = field(default_factory=dict)
    via: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0

    def added(self, kind: str) -> list[float]:
        return differences(self.via[kind], self.direct[kind])

    def between(self, ours: str, theirs: str) -> list[float]:
        """Per step, what `ours` adds minus what `theirs` adds: the two routers compared at the same moment."""
        return differences(self.added(ours), self.added(theirs))


def finished(kept: int, errors: int, elapsed: float, minimum: int, budget_s: float, narrow: bool) -> bool:
    """Whether a paired run stops: not before `minimum` kept steps; then once the intervals are narrow enough
    or the budget is spent. A target that mostly fails stops it at once (10 failed steps, more than kept):
    the report then shows the errors instead of the run going on for ever."""
    if errors >= 10 and errors > kept:
        return True
    if kept < minimum:
        return False
    return narrow or elapsed >= budget_s


def _narrow(result: Paired, kinds: Sequence[str], minimum: int, width: float) -> bool:
    """Every router's interval, and that of their difference, narrower than `width` (after `minimum` steps)."""
    if len(result.direct[kinds[0]]) < minimum:
        return False
    added = [result.added(kind) for kind in kinds]
    between = [result.between(kinds[0], other) for other in kinds[1:]]
    return settled([median_interval(values) for values in (*added, *between)], width)


async def paired_requests(probes: dict[str, dict[str, Probe]], minimum: int, budget_s: float,
                          width: float) -> Paired:
    """Steps of one request per (router, route) (`probes[kind][route]`), as `step_order` says, until
    `finished`: every interval (each router's added latency, and the routers' difference) narrower than
    `width`, or `budget_s` spent, and at least `minimum` steps. A step in which any request failed is dropped
    whole (its pairs would not be pairs)."""
    kinds = list(probes)
    result = Paired("pairs", {k: [] for k in kinds}, {k: [] for k in kinds})
    for kind, route in step_order(0, kinds):  # opens each pool's connection: not part of any figure
        await probes[kind][route]()
    started = time.perf_counter()
    step = 0
    while True:
        figures = {(kind, route): await probes[kind][route]() for kind, route in step_order(step, kinds)}
        step += 1
        _keep(result, kinds, figures)
        # The intervals are looked at every CHECK_EVERY steps only: sorting every step would cost more than it.
        narrow = step % CHECK_EVERY == 0 and _narrow(result, kinds, minimum, width)
        if finished(len(result.direct[kinds[0]]), result.errors, time.perf_counter() - started, minimum, budget_s,
                    narrow):
            break
    result.elapsed = time.perf_counter() - started
    return result


async def paired_rounds(rounds: dict[str, dict[str, Round]], minimum: int, budget_s: float,
                        width: float) -> tuple[Paired, dict[tuple[str, str], list[float]]]:
    """Rounds per (router, route) (`rounds[kind][route]`), adjacent per router as `step_order` says, until
    `finished` as `paired_requests`: each round's p50 (in `Paired`), and every latency measured, per
    (router, route)."""
    kinds = list(rounds)
    result = Paired("rounds", {k: [] for k in kinds}, {k: [] for k in kinds})
    latencies: dict[tuple[str, str], list[float]] = {}
    started = time.perf_counter()
    step = 0
    while True:
        medians: dict[tuple[str, str], float | None] = {}
        for kind, route in step_order(step, kinds):
            measured = await rounds[kind][route]()
            latencies.setdefault((kind, route), []).extend(measured)
            medians[(kind, route)] = statistics.median(measured) if measured else None
        step += 1
        _keep(result, kinds, medians)
        if finished(len(result.direct[kinds[0]]), result.errors, time.perf_counter() - started, minimum, budget_s,
                    _narrow(result, kinds, minimum, width)):
            break
    result.elapsed = time.perf_counter() - started
    return result, latencies


def _keep(result: Paired, kinds: Sequence[str], figures: dict[tuple[str, str], float | None]) -> None:
    """One step's figures into `result`, or one more failed step if any is missing."""
    direct = [figures[(kind, DIRECT)] for kind in kinds]
    via = [figures[(kind, VIA)] for kind in kinds]
    if any(v is None for v in (*direct, *via)):
        result.errors += 1
        return
    for kind, d, v in zip(kinds, direct, via, strict=True):
        result.direct[kind].append(d or 0.0)
        result.via[kind].append(v or 0.0)
