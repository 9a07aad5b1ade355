"""The bench's pure parts: the median's confidence interval, the pairing order and stopping rule, and a swap's
phases from its marks and the child's log stamps."""

from __future__ import annotations

import random
import statistics

import pytest

from modelyard.bench.paired import CHECK_EVERY, DIRECT, VIA, Paired, finished, paired_requests, step_order
from modelyard.bench.phases import PHASES, START, child_marks, stamp, swap_phases
from modelyard.bench.report import phase_medians
from modelyard.bench.stats import Interval, differences, median_interval, ratio_bounds, settled

# -- the median's interval ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "low_rank", "confidence"), [
    (1, 1, 0.0),  # one value: the interval is that value, and says nothing
    (5, 1, 0.9375),  # too few for 95%: [min, max], with what it reaches
    (6, 1, 0.96875),
    (8, 1, 0.9921875),  # k = 2 would reach only 93%
    (9, 2, 0.9609375),
    (20, 6, 0.9586105346679688),  # the textbook table: x(6) to x(15)
    (100, 40, 0.9647997997822952),  # x(40) to x(61)
])
def test_the_interval_is_the_order_statistics_the_binomial_allows(count: int, low_rank: int,
                                                                    confidence: float) -> None:
    values = [float(v) for v in range(1, count + 1)]  # x(k) = k
    interval = median_interval(list(reversed(values)))
    assert (interval.low, interval.high) == (low_rank, count + 1 - low_rank)
    assert interval.confidence == pytest.approx(confidence)
    assert interval.median == statistics.median(values) and interval.count == count


def test_the_interval_holds_the_true_median_as_often_as_it_says() -> None:
    # 2,000 samples of 30 from an exponential (skewed: the interval assumes no shape); n = 30 gives 95.7%.
    rng = random.Random(12)
    true_median = 0.6931471805599453  # ln 2, for rate 1
    intervals = [median_interval([rng.expovariate(1.0) for _ in range(30)]) for _ in range(2000)]
    held = sum(i.contains(true_median) for i in intervals) / len(intervals)
    assert intervals[0].confidence == pytest.approx(0.9572, abs=1e-4)
    assert 0.94 <= held <= 0.975


def test_the_interval_narrows_as_the_square_root_of_the_count() -> None:
    # Evenly spread quantiles of one normal distribution: samples without sampling noise.
    normal = statistics.NormalDist(0, 1)
    widths = [median_interval([normal.inv_cdf((i + 0.5) / n) for i in range(n)]).width for n in (100, 1600)]
    assert widths[0] == pytest.approx(0.53, abs=0.03)  # 2 x 1.96 x 1.2533 / sqrt(100) = 0.49, and its ranks' 96%
    assert 3.6 < widths[0] / widths[1] < 4.6  # 16 times the values: about a quarter of the width


def test_a_median_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        median_interval([])


def test_large_counts_keep_exact_ranks() -> None:
    interval = median_interval([float(v) for v in range(20000)])
    assert interval.confidence == pytest.approx(0.9515, abs=1e-4) and interval.low == 9860


def test_differences_need_pairs() -> None:
    assert differences([3.0, 5.0], [1.0, 1.5]) == [2.0, 3.5]
    with pytest.raises(ValueError, match="equal counts"):
        differences([1.0], [1.0, 2.0])


def _interval(low: float, high: float, confidence: float = 0.96) -> Interval:
    return Interval((low + high) / 2, low, high, confidence, 100)


@pytest.mark.parametrize(("intervals", "expected"), [
    ([_interval(0.1, 0.25)], True),
    ([_interval(0.1, 0.25), _interval(-1.0, 1.0)], False),  # every one must be narrow
    ([_interval(0.1, 0.35)], False),  # wider than the target
    ([_interval(0.1, 0.11, confidence=0.9)], False),  # narrow, but below the confidence asked for
    ([], False),
])
def test_settled(intervals: list[Interval], expected: bool) -> None:
    assert settled(intervals, 0.2) is expected


@pytest.mark.parametrize(("ours", "theirs", "expected"), [
    (_interval(1.0, 2.0), _interval(4.0, 5.0), (0.2, 0.5)),
    (_interval(-1.0, 2.0), _interval(4.0, 5.0), (-0.25, 0.5)),  # ours may be below nothing
    (_interval(1.0, 2.0), _interval(-0.1, 5.0), None),  # theirs may be nothing: no ratio
])
def test_ratio_bounds(ours: Interval, theirs: Interval, expected: tuple[float, float] | None) -> None:
    bounds = ratio_bounds(ours, theirs)
    assert bounds == (pytest.approx(expected) if expected else None)


# -- pairing ----------------------------------------------------------------------------------------------------


def test_step_order_alternates_routers_every_step_and_routes_every_two() -> None:
    assert [step_order(step, ("m", "r")) for step in range(4)] == [
        [("m", DIRECT), ("m", VIA), ("r", DIRECT), ("r", VIA)],
        [("r", DIRECT), ("r", VIA), ("m", DIRECT), ("m", VIA)],
        [("m", VIA), ("m", DIRECT), ("r", VIA), ("r", DIRECT)],
        [("r", VIA), ("r", DIRECT), ("m", VIA), ("m", DIRECT)],
    ]
    # Over four steps every target takes every position once: none is always first, or always after another.
    for position in range(4):
        assert len({step_order(step, ("m", "r"))[position] for step in range(4)}) == 4


@pytest.mark.parametrize(("kept", "errors", "elapsed", "narrow", "expected"), [
    (99, 0, 500.0, True, False),  # the minimum first, whatever the time or the intervals
    (100, 0, 1.0, False, False),  # then on, while the budget lasts and the intervals are wide
    (100, 0, 1.0, True, True),  # narrow enough
    (100, 0, 60.0, False, True),  # budget spent
    (5, 10, 1.0, False, True),  # a target that mostly fails
    (50, 10, 1.0, False, False),  # a few failures among many kept steps
])
def test_finished(kept: int, errors: int, elapsed: float, narrow: bool, expected: bool) -> None:
    assert finished(kept, errors, elapsed, 100, 60.0, narrow) is expected


def _probe(values: list[float | None]) -> object:
    figures = iter(values)

    async def probe() -> float | None:
        return next(figures)

    return probe


async def test_paired_requests_stop_once_the_intervals_are_narrow() -> None:
    # Exactly 1 ms added by one router, 3 ms by the other, at every step: zero width after the minimum.
    steps = 200
    probes = {"m": {DIRECT: _probe([0.010] * steps), VIA: _probe([0.011] * steps)},
              "r": {DIRECT: _probe([0.020] * steps), VIA: _probe([0.023] * steps)}}
    paired = await paired_requests(probes, minimum=20, budget_s=600.0, width=0.0002)  # type: ignore[arg-type]
    # Looked at every CHECK_EVERY steps: at 16 the minimum was not reached, at 32 the intervals were narrow.
    assert len(paired.direct["m"]) == 2 * CHECK_EVERY
    assert paired.added("m") == pytest.approx([0.001] * len(paired.direct["m"]))
    assert paired.between("m", "r") == pytest.approx([-0.002] * len(paired.direct["m"]))


async def test_a_step_with_a_failure_is_dropped_whole_and_a_failing_target_stops_the_run() -> None:
    probes = {"m": {DIRECT: _probe([0.01] * 40), VIA: _probe([0.012, 0.012, None, *[None] * 37])},
              "r": {DIRECT: _probe([0.01] * 40), VIA: _probe([0.011] * 40)}}
    paired = await paired_requests(probes, minimum=20, budget_s=600.0, width=0.0002)  # type: ignore[arg-type]
    assert len(paired.direct["m"]) == len(paired.via["r"]) == 1  # step 0 opens the pools; step 1 kept
    assert paired.errors == 10


def test_paired_figures_line_up_by_step() -> None:
    paired = Paired("pairs", {"m": [1.0, 2.0], "r": [1.0, 1.0]}, {"m": [1.5, 2.1], "r": [1.2, 1.3]})
    assert paired.added("m") == pytest.approx([0.5, 0.1])
    assert paired.between("m", "r") == pytest.approx([0.3, -0.2])


# -- a swap's phases --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("0.00.001.841 I srv  llama_server: initializing ...", (None, 0.001841, "I srv  llama_server: initializing ...")),
    ("[40493] 1.02.250.007 I cmn init: llama threadpool init, n_threads = 1",
     (40493, 62.250007, "I cmn init: llama threadpool init, n_threads = 1")),  # router mode's prefix
    ("[ 8080] 0.00.313.956 I srv  llama_server: model loaded", (8080, 0.313956, "I srv  llama_server: model loaded")),
    ("\x1b[34m0.00.000.500\x1b[0m \x1b[32mI \x1b[0msrv  x", (None, 0.0005, "I srv  x")),  # colours
    ("srv  load: spawning server instance with name=b on port 40493", None),  # the router's own line
    ("", None),
])
def test_stamp(line: str, expected: tuple[int | None, float, str] | None) -> None:
    parsed = stamp(line)
    if expected is None:
        assert parsed is None
    else:
        assert parsed is not None and parsed[0] == expected[0] and parsed[2] == expected[2]
        assert parsed[1] == pytest.approx(expected[1])


def test_child_marks_place_the_stamps_by_the_line_received_soonest() -> None:
    # The child's clock started at 10.0 on the receiver's: each line is received 2 to 30 ms after it is
    # printed, the least lag (the first line's) places them all; another child's lines are left out.
    received = [
        (10.0035, "[7001] 0.00.001.500 I srv  llama_server: initializing ..."),
        (10.0100, "[7000] 0.05.000.000 I srv  operator(): cleaning up before exit..."),  # the old child
        (10.3000, "[7001] 0.00.281.000 I cmn  init: llama threadpool init, n_threads = 1"),
        (10.3300, "[7001] 0.00.313.000 I srv  llama_server: model loaded"),
        (10.3400, "[7001] 0.00.314.000 I srv  llama_server: listening on http://127.0.0.1:7001"),
    ]
    marks = child_marks(received, port=7001)
    assert marks == pytest.approx({"first line": 10.0035, "weights loaded": 10.283, "warmed up": 10.315})


def test_child_marks_without_the_lines_they_look_for() -> None:
    assert child_marks([(1.0, "no stamp here")]) == {}
    assert child_marks([(1.0, "0.00.001.000 I srv  llama_server: initializing ...")]) == {"first line": 1.0}


def _phases(**marks: float) -> dict[str, float | None]:
    return swap_phases({START: 0.0, **marks})


SEQUENTIAL = {"drained": 0.3, "exited": 0.35, "spawned": 0.36, "first line": 0.37, "weights loaded": 0.9,
              "warmed up": 1.0, "ready": 1.01, "first token": 1.1}


def test_swap_phases_in_order() -> None:
    phases = _phases(**SEQUENTIAL)
    assert list(phases) == [phase for phase, _ in PHASES]
    assert phases == pytest.approx({"drain": 0.3, "stop": 0.05, "handover": 0.01, "process start": 0.01,
                                    "weight load": 0.53, "warm-up": 0.1, "ready": 0.01, "first token": 0.09})


def test_overlapping_work_shortens_a_phase_and_the_phases_still_add_up() -> None:
    # The next child spawned while the old one drains (what a router that overlaps them would do).
    phases = _phases(**{**SEQUENTIAL, "spawned": 0.1, "first line": 0.2, "weights loaded": 0.5})
    assert phases["handover"] == 0 and phases["process start"] == 0
    assert phases["weight load"] == pytest.approx(0.15)  # from the old child's exit, 0.35, to 0.5
    assert sum(v or 0 for v in phases.values()) == pytest.approx(1.1)


def test_a_missing_mark_gives_its_phase_no_figure_and_its_time_to_the_next() -> None:
    phases = _phases(**{k: v for k, v in SEQUENTIAL.items() if k != "warmed up"})
    assert phases["warm-up"] is None and phases["ready"] == pytest.approx(0.11)
    assert sum(v or 0 for v in phases.values()) == pytest.approx(1.1)


def test_phase_medians_skip_the_swaps_that_missed_a_mark() -> None:
    swaps = [{START: 0.0, **SEQUENTIAL}, {START: 0.0, **{**SEQUENTIAL, "drained": 0.1}},
             {START: 0.0, **{k: v for k, v in SEQUENTIAL.items() if k not in ("drained", "exited")}}]
    medians = phase_medians(swaps)
    assert medians["drain"] == pytest.approx(0.2)  # of 0.3 and 0.1; the third saw no drain
    assert medians["first token"] == pytest.approx(0.09)
    assert phase_medians([{START: 0.0}])["drain"] is None
