"""A preset's `replicas = N` on a cluster (cluster/replicas.py): where the other copies start once a request is
placed (`more_copies`, pure, as a table), and end to end in-process over real node apps with fake children
(test_cluster_ingress's harness, the front's real routes): a request for a model with `replicas = 2` leaves it
loaded on two nodes, the node it was sent to and the next by the hash, and more requests start no third copy;
a model without the key stays on one node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from modelyard.api.context import ServerSettings
from modelyard.cluster.front import build_front
from modelyard.cluster.placement import Choice, NodeState, Send
from modelyard.cluster.replicas import more_copies, wanted
from modelyard.config.catalog import Catalog, ModelConfig
from modelyard.scheduler import Limits, Status
from tests.test_cluster_ingress import Cluster, by_hash, make_cluster, ready_at_once  # noqa: F401 (the fixture)
from tests.test_cluster_placement import G, node, snap


def wanting(view: NodeState, copies: int, model: str = "m") -> NodeState:
    return NodeState(view.node, view.limits, view.models, view.accepting, {model: copies})


def cold(*names: str, copies: int = 2) -> list[NodeState]:
    return [wanting(node(name, 8 * G, snap("m")), copies) for name in names]


def sent(to: str, choice: Choice = Choice.FITS) -> Send:
    return Send(to, "m", choice, "test")


# (views, where the request went, starting, unreachable) -> the nodes where copies start; "next" and "last" are
# the nodes other than the request's, first and last in the order the hash ranks them for the model
MORE = [
    pytest.param(cold("a", "b", "c", copies=1), "a", (), (), [], id="one-copy-is-the-default"),
    pytest.param([node(n, 8 * G, snap("m")) for n in "abc"], "a", (), (), [], id="no-replicas-published"),
    pytest.param(cold("a", "b", "c"), "a", (), (), ["next"], id="the-placed-node-holds-one-the-hash-the-next"),
    pytest.param(cold("a", "b", "c", copies=3), "b", (), (), ["next", "last"], id="every-node-in-hash-order"),
    pytest.param(cold("a", "b", "c", copies=5), "b", (), (), ["next", "last"], id="more-than-nodes"),
    pytest.param(cold("a", "b", "c"), "a", ("next",), (), [], id="a-copy-being-started-counts"),
    pytest.param(cold("a", "b", "c"), "a", (), ("next",), ["last"], id="not-on-an-unreachable-node"),
    pytest.param([wanting(node("a", 8 * G, snap("m", Status.LOADED)), 2),
                  wanting(node("b", 8 * G, snap("m", Status.LOADED)), 2), *cold("c")], "a", (), (), [],
                 id="enough-copies-loaded"),
    pytest.param([wanting(node("a", 8 * G, snap("m", Status.LOADED)), 2),
                  wanting(node("b", 8 * G, snap("m", Status.FAILED)), 2)], "a", (), (), [],
                 id="not-where-its-last-load-failed"),
    pytest.param([wanting(node("a", 8 * G, snap("m")), 2), wanting(node("b", 1 * G, snap("m"),
                  snap("x", Status.LOADED, in_flight=1)), 2)], "a", (), (), [], id="never-where-it-would-wait"),
    pytest.param([wanting(node("a", 8 * G, snap("m")), 2),
                  wanting(node("b", 1 * G, snap("m"), snap("x", Status.LOADED)), 2)], "a", (), (), ["b"],
                 id="where-idle-models-make-room"),
    pytest.param([wanting(node("a", 8 * G, snap("m")), 2), node("b", 8 * G, snap("m"))], "a", (), (), ["b"],
                 id="the-largest-a-node-asks-for"),
]


@pytest.mark.parametrize(("views", "to", "starting", "unreachable", "expected"), MORE)
def test_more_copies(views: list[NodeState], to: str, starting: tuple[str, ...], unreachable: tuple[str, ...],
                     expected: list[str]) -> None:
    others = by_hash("m", [v.node for v in views if v.node != to])
    names = {"next": others[0], "last": others[-1]}
    starting_at = frozenset(names.get(n, n) for n in starting)
    unreachable_at = frozenset(names.get(n, n) for n in unreachable)
    loads = more_copies(views, sent(to), starting=starting_at, unreachable=unreachable_at)
    assert [load.node for load in loads] == [names.get(n, n) for n in expected]
    assert all(load.model == "m" and load.choice in (Choice.FITS, Choice.EVICT) for load in loads)


def test_wanted_is_one_for_a_model_no_node_serves() -> None:
    assert wanted(cold("a"), "other") == 1 and wanted([], "m") == 1


def replicated() -> Catalog:
    models = {name: ModelConfig(name=name, settings={}, source="preset", origin="test", command=f"fake {name}",
                                replicas=copies) for name, copies in (("a", 2), ("b", 1))}
    return Catalog(models=models, by_name={name: name for name in models})


async def test_a_request_for_a_model_with_two_replicas_leaves_it_loaded_on_two_nodes(
        make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster: Cluster = await make_cluster({name: Limits(max_models=2) for name in ("n1", "n2", "n3")},
                                          replicated(), lambda nodes: build_front(nodes, ServerSettings()))
    for node_ in cluster.nodes.values():
        node_.fleet.prepare = ready_at_once
    await cluster.ingress.until(lambda views: all(v.replicas == {"a": 2} for v in views))  # what nodes publish
    first, second, third = by_hash("a", list(cluster.nodes))
    response = await cluster.complete("a")
    assert response.status == 200, await response.text()
    # the other copy is started by the front in the background: the node loads it, the request did not wait
    await cluster.until(lambda boards: boards[second].models["a"].status == Status.LOADED)
    for _ in range(3):
        again = await cluster.complete("a")
        assert again.status == 200, await again.text()
    views = await cluster.ingress.until(lambda views: all(v.models["a"].in_flight == 0 for v in views))
    assert {v.node: v.models["a"].status for v in views} == {first: Status.LOADED, second: Status.LOADED,
                                                             third: Status.UNLOADED}
    assert {name: node_.loads("a") for name, node_ in cluster.nodes.items()} == {first: 1, second: 1, third: 0}
    # the copy's load reached no child as a request: the four requests are all there are
    assert sum(len(node_.fleet.children["a"][0].received) for node_ in cluster.nodes.values() if node_.loads("a")) == 4

    answer = await cluster.complete("b")  # replicas = 1: one copy
    assert answer.status == 200, await answer.text()
    assert {name: node_.loads("b") for name, node_ in cluster.nodes.items()} == {
        name: int(name == by_hash("b", list(cluster.nodes))[0]) for name in cluster.nodes}
