"""The cluster bench's pure parts (bench/cluster_figures.py): loads counted from the front's merged feed, the
failover's figures from its probes, the report over made-up results; and the one line the bench says without Ray.
The bench itself needs Ray and a local cluster: `.venv-ray/bin/modelyard bench --only cluster` runs it."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from modelyard.bench.__main__ import main
from modelyard.bench.cluster import NEEDS_RAY
from modelyard.bench.cluster_figures import (
    BASELINES,
    CHAT,
    FRONT,
    NODE,
    PLANS,
    SINGLE,
    Burst,
    ClusterResults,
    Failover,
    Probe,
    failover_figures,
    loads_by_node,
    render,
    still_loading,
    target_of,
)
from modelyard.bench.paired import DIRECT, VIA, Paired


def event(node: str, status: str, model: str = "gemma") -> dict[str, Any]:
    return {"model": model, "node": node, "data": {"status": status}}


@pytest.mark.parametrize(("events", "loads", "loading"), [
    ([], {}, set()),
    ([event("a", "loading"), event("a", "loaded")], {"a": 1}, set()),
    # a repeated status is one transition, as the single-node bench folds it
    ([event("a", "loading"), event("a", "loading"), event("a", "loaded")], {"a": 1}, set()),
    # one load per node: a duplicate, and one still loading
    ([event("a", "loading"), event("b", "loading"), event("a", "loaded")], {"a": 1, "b": 1}, {"b"}),
    # loaded, stopped, loaded again on one node: two loads there
    ([event("a", "loading"), event("a", "loaded"), event("a", "unloaded"), event("a", "loading")], {"a": 2}, {"a"}),
    # other models, and events without a node or a status, do not count
    ([event("a", "loading", "smol"), {"model": "gemma", "data": {"status": "loading"}},
      {"model": "gemma", "node": "a", "data": {}}], {}, set()),
])
def test_loads_are_each_nodes_transitions_into_loading(events: list[dict[str, Any]], loads: dict[str, int],
                                                       loading: set[str]) -> None:
    assert loads_by_node(events, "gemma") == Counter(loads)
    assert still_loading(events, "gemma") == loading


def run(probes: list[Probe], error_at: float | None = 10.7) -> Failover:
    return Failover("killed", "other", "smol-b", 10.0, error_at, probes=probes)


@pytest.mark.parametrize(("probes", "error_after", "elsewhere", "last_on_killed", "failed"), [
    # the killed node's worker still answers, then the other node does once it has loaded the model
    ([Probe(10.0, 10.1, True, False), Probe(10.15, 10.3, True, False), Probe(10.35, 11.4, True, True)],
     0.7, 1.4, 0.3, 0),
    # a failed probe counts as failed, not as an answer from either node
    ([Probe(10.0, 10.2, False, False), Probe(10.25, 11.0, True, True)], 0.7, 1.0, None, 1),
    # never answered elsewhere within the limit: no figure, every answer is the killed node's
    ([Probe(10.0, 10.1, True, False)], 0.7, None, 0.1, 0),
    ([], 0.7, None, None, 0),
])
def test_failover_figures_from_the_kill(probes: list[Probe], error_after: float, elsewhere: float | None,
                                        last_on_killed: float | None, failed: int) -> None:
    figures = failover_figures(run(probes))
    assert figures.error_after == pytest.approx(error_after)
    assert figures.first_elsewhere_after == (None if elsewhere is None else pytest.approx(elsewhere))
    assert figures.last_on_killed_after == (None if last_on_killed is None else pytest.approx(last_on_killed))
    assert (figures.failed, figures.sent) == (failed, len(probes))


def test_no_error_event_is_no_figure() -> None:
    assert failover_figures(run([], error_at=None)).error_after is None


def test_the_front_is_the_via_side_of_both_pairs() -> None:
    assert {target_of(kind, VIA) for kind in BASELINES} == {FRONT}
    assert [target_of(kind, DIRECT) for kind in BASELINES] == [NODE, SINGLE]


def test_the_report_carries_every_figure() -> None:
    paired = Paired("pairs", {NODE: [0.010] * 20, SINGLE: [0.011] * 20},
                    {NODE: [0.0114] * 20, SINGLE: [0.0123] * 20})
    results = ClusterResults(paired={(CHAT, 1): paired}, rates={(4, FRONT): [30.0], (4, NODE): [40.0]},
                             failover=run([Probe(10.0, 11.25, True, True)]),
                             burst=Burst("gemma", [200] * 8, Counter({"n1": 1}), {"n1": "loaded", "n2": "unloaded"},
                                         2.5),
                             nodes={"n1": "head", "n2": "worker"}, up_after=9.5)
    text = render(results, PLANS["quick"], ["models: smol"], "modelyard bench --only cluster")
    assert "| chat, 1 token | 1 | the node's app | 20 pairs | 10.00 ms | 11.40 ms | 1.40 ms |" in text
    assert "| chat, 1 token | 1 | single-node serve | 20 pairs | 11.00 ms | 12.30 ms | 1.30 ms |" in text
    assert "| 4 | 30.0 | 40.0 | n/a | 0.75x |" in text  # no single-node figure at that concurrency
    assert "| 8 | 8 | 1 (one load, as placement promises) | n1: 1 |" in text
    assert "| kill to the cut stream's error event | 0.70 s |" in text
    assert "(the model loaded there on demand) | 1.25 s |" in text
    assert "cluster up (every node's agent published): 9.5 s" in text


def test_a_duplicate_load_is_said() -> None:
    burst = Burst("gemma", [200] * 3, Counter({"n1": 1, "n2": 1}), {}, 1.0)
    assert "2 loads: expected exactly 1" in render(ClusterResults(burst=burst), PLANS["smoke"], [], "")


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed here")
def test_without_ray_the_cluster_bench_says_so_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--only", "cluster", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {NEEDS_RAY}"
    assert "pip install 'modelyard[ray]'" in result.output
    assert not (tmp_path / "cluster").exists()
