"""The cluster's front (cluster/front.py) in-process: its real routes over real single-node apps with fake
children as the nodes (test_cluster_ingress.py's harness). What a client of `modelyard serve --ray` sees: the
merged model list with where each model runs, aliases and keys as on one node, the management routes, Ollama's
list and error shape, the merged status feed, and the router's /props and /health.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from modelyard.api.auth import ApiKey, Scope
from modelyard.api.context import ServerSettings
from modelyard.cluster.front import build_front, merged
from modelyard.cluster.ingress import Nodes
from modelyard.cluster.placement import NodeState
from modelyard.config.catalog import Catalog, ModelConfig
from modelyard.scheduler import Limits, ModelSnapshot, Status
from tests.test_cluster_ingress import Cluster, by_hash, make_cluster, ready_at_once  # noqa: F401 (the fixture)

LIMITED = ApiKey("only-a", label="only a", models=("a",), scopes=frozenset({Scope.INFERENCE, Scope.READ}))
ADMIN = ApiKey("admin", label="admin", scopes=frozenset(Scope))


def with_aliases() -> Catalog:
    models = {name: ModelConfig(name=name, settings={}, source="preset", origin="test", command=f"fake {name}",
                                aliases=(f"{name}{name}",)) for name in ("a", "b")}
    return Catalog(models=models, by_name={**{n: n for n in models}, **{f"{n}{n}": n for n in models}})


def front(settings: ServerSettings) -> Callable[[Nodes], web.Application]:
    return lambda nodes: build_front(nodes, settings)


async def cluster_of(make_cluster: Callable[..., Any], settings: ServerSettings | None = None) -> Cluster:  # noqa: F811
    cluster: Cluster = await make_cluster({name: Limits(max_models=2) for name in ("n1", "n2")}, with_aliases(),
                                          front(settings or ServerSettings()))
    for node in cluster.nodes.values():
        node.fleet.prepare = ready_at_once
    return cluster


def _snapshot(model: str, status: Status, in_flight: int = 0) -> ModelSnapshot:
    return ModelSnapshot(model, status, in_flight, 0, 0.0, None, "", 0, 0, 0, 0, -1.0, None)


def test_a_merged_entry_is_the_best_nodes_with_where_the_model_runs() -> None:
    listings = {"n1": [{"id": "a", "status": {"value": "unloaded"}}, {"id": "b", "status": {"value": "failed"}}],
                "n2": [{"id": "a", "status": {"value": "loaded"}, "owned_by": "n2's"}]}
    views = [NodeState("n1", Limits(), {"a": _snapshot("a", Status.UNLOADED), "b": _snapshot("b", Status.FAILED)}),
             NodeState("n2", Limits(), {"a": _snapshot("a", Status.LOADED, in_flight=2)})]
    entries = {entry["id"]: entry for entry in merged(listings, views)}
    assert entries["a"]["owned_by"] == "n2's" and entries["a"]["status"] == {"value": "loaded"}
    assert entries["a"]["nodes"] == [{"node": "n1", "status": "unloaded", "in_flight": 0, "queued": 0},
                                     {"node": "n2", "status": "loaded", "in_flight": 2, "queued": 0}]
    assert entries["b"]["nodes"] == [{"node": "n1", "status": "failed", "in_flight": 0, "queued": 0}]


async def test_one_list_says_where_each_model_runs_and_an_alias_reaches_it(
        make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await cluster_of(make_cluster)
    first = by_hash("a", list(cluster.nodes))[0]
    response = await cluster.complete("aa")  # an alias: the front learns it from the nodes' listings
    assert response.status == 200, await response.text()
    assert (await response.json())["served_by"] == "a"
    assert cluster.nodes[first].loads("a") == 1
    listing = await (await cluster.client.get("/v1/models")).json()
    entries = {entry["id"]: entry for entry in listing["data"]}
    assert sorted(entries) == ["a", "b"] and entries["a"]["aliases"] == ["aa"]
    assert entries["a"]["status"]["value"] == "loaded"
    assert {n["node"]: n["status"] for n in entries["a"]["nodes"]} == {
        name: "loaded" if name == first else "unloaded" for name in cluster.nodes}
    one = await cluster.client.get("/v1/models/aa")
    assert one.status == 200 and (await one.json())["id"] == "a"
    missing = await cluster.client.get("/v1/models/nope")
    assert missing.status == 404 and "'nope' not found" in (await missing.json())["error"]["message"]


async def test_an_unknown_model_is_the_single_nodes_404_in_each_apis_shape(
        make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await cluster_of(make_cluster)
    openai = await cluster.complete("nope")
    assert openai.status == 404 and "nope" in (await openai.json())["error"]["message"]
    ollama = await cluster.client.post("/api/chat", json={"model": "nope", "messages": []})
    body = await ollama.json()
    assert ollama.status == 404 and isinstance(body["error"], str) and "nope" in body["error"]
    no_model = await cluster.client.post("/v1/chat/completions", json={"messages": []})
    assert no_model.status == 400 and "model name is missing" in (await no_model.json())["error"]["message"]
    not_json = await cluster.client.post("/v1/chat/completions", data=b"{")
    assert not_json.status == 400


async def test_keys_and_their_models_are_checked_at_the_front(make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await cluster_of(make_cluster, ServerSettings(api_keys=(LIMITED, ADMIN)))
    client = cluster.client
    assert (await client.get("/v1/models")).status == 401
    limited = {"Authorization": "Bearer only-a"}
    listing = await (await client.get("/v1/models", headers=limited)).json()
    assert [entry["id"] for entry in listing["data"]] == ["a"]
    body = json.dumps({"model": "bb", "messages": [{"role": "user", "content": "hi"}]})
    refused = await client.post("/v1/chat/completions", data=body, headers=limited)
    assert refused.status == 403 and "may not use model 'b'" in (await refused.json())["error"]["message"]
    assert all(node.loads("b") == 0 for node in cluster.nodes.values())
    allowed = await client.post("/v1/chat/completions", headers=limited,
                                data=json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}]}))
    assert allowed.status == 200
    load = await client.post("/models/load", json={"model": "a"}, headers=limited)
    assert load.status == 403  # the admin scope, as on one node


async def test_load_and_unload_go_where_the_model_runs(make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await cluster_of(make_cluster)
    first = by_hash("b", list(cluster.nodes))[0]
    load = await cluster.client.post("/models/load", json={"model": "b"})
    assert load.status == 200 and await load.json() == {"success": True}
    await cluster.until(lambda boards: boards[first].models["b"].status == Status.LOADED)
    assert [node.loads("b") for node in cluster.nodes.values()].count(1) == 1
    unload = await cluster.client.post("/models/unload", json={"model": "bb"})
    assert unload.status == 200
    await cluster.until(lambda boards: boards[first].models["b"].status == Status.UNLOADED)
    unknown = await cluster.client.post("/models/unload", json={"model": "nope"})
    assert unknown.status == 404


async def test_the_feed_merges_the_nodes_events_each_with_its_node(make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await cluster_of(make_cluster)
    first = by_hash("a", list(cluster.nodes))[0]
    feed = await cluster.client.get("/models/sse")
    assert feed.headers["Content-Type"] == "text/event-stream"
    # the front subscribed to each node before its answer started: a status event made after it is relayed
    await cluster.client.post("/models/load", json={"model": "a"})
    events = []
    while not any(e.get("data", {}).get("status") == "loaded" for e in events):
        line = await feed.content.readline()
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    assert {event["node"] for event in events} == {first} and {event["model"] for event in events} == {"a"}
    feed.close()


async def test_the_router_props_health_and_ollama_list_cover_every_node(make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await cluster_of(make_cluster)
    props = await (await cluster.client.get("/props")).json()
    assert props["role"] == "router" and props["max_instances"] == 4 and sorted(props["nodes"]) == ["n1", "n2"]
    health = await cluster.client.get("/health")
    assert health.status == 200 and (await health.json()) == {"status": "ok", "nodes": 2}
    metrics = await (await cluster.client.get("/metrics")).text()
    assert {f'node="{name}"' in metrics for name in cluster.nodes} == {True}
    tags = await (await cluster.client.get("/api/tags")).json()
    assert sorted(model["name"] for model in tags["models"]) == ["a:latest", "b:latest"]  # each once
    for node in cluster.nodes.values():
        node.manager.begin_drain()
    await cluster.ingress.until(lambda views: not any(view.accepting for view in views))
    assert (await cluster.client.get("/health")).status == 503
