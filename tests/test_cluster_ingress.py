"""The cluster's ingress in-process (docs/cluster.md, issue 13): real single-node apps as the nodes (cluster.node's
app over a ModelManager with fake children, each on its own aiohttp test server, reachable with the cluster key
only), the ingress's views fed by their watches, and requests relayed by proxy.forward through a NodeChild. No
Ray: the transport to the agents is a seam (a watch is any awaitable call, a node any HTTP address).

What the issue asks of placement, end to end over HTTP: the same model goes to the same node; a burst for a cold
model loads it once; a model that fits only one node lands there; a node cut mid-stream gives the client an
error event and [DONE]; a request not started on a node is sent to another.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from modelyard.api.errors import error_response, from_model_error
from modelyard.cluster.ingress import NodeChild, Nodes, Watch
from modelyard.cluster.node import node_app, watch_state
from modelyard.cluster.placement import NodeState, Refusal, Send, rendezvous
from modelyard.config.catalog import Catalog, ModelConfig
from modelyard.config.options import OptionTable
from modelyard.engine.command import Engine
from modelyard.errors import ErrorKind, ModelError
from modelyard.manager import WATCH_HEARTBEAT_S, ModelManager
from modelyard.memory import GgufCache
from modelyard.proxy import forward
from modelyard.scheduler import Board, Limits, retry_after
from modelyard.tasks import log_failure
from tests.fakes import FakeChild, FakeClock, FakeFleet, FakeReply, StaticSource, catalog
from tests.test_background import write_gguf

KEY = "the-cluster-key"


@dataclass
class Node:
    name: str
    manager: ModelManager
    fleet: FakeFleet
    server: TestServer
    publishing: asyncio.Event  # cleared: its watch answers are held back, so the ingress's view of it goes stale
    asked: asyncio.Queue[int] = field(default_factory=asyncio.Queue)  # the version of each watch the ingress asked
    shown: NodeState | None = None  # its last publication the ingress got

    def loads(self, model: str) -> int:
        return len(self.fleet.children.get(model, []))

    def cut(self) -> None:
        """Every connection to this node's app closes, as when its machine drops off the network."""
        assert self.server.runner is not None and self.server.runner.server is not None
        for handler in list(self.server.runner.server.connections):
            if handler.transport is not None:
                handler.transport.close()


def streaming(opened: asyncio.Event) -> Callable[[FakeChild, str, str, bytes | None], FakeReply]:
    """A child's handler that answers with a stream the test feeds, and sets `opened` once it has."""
    def handler(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
        opened.set()
        return FakeReply(child, headers={"Content-Type": "text/event-stream"})
    return handler


ANSWER = b'{"ok": true}'


def generating(opened: asyncio.Event) -> Callable[[FakeChild, str, str, bytes | None], FakeReply]:
    """A child's handler whose whole JSON answer (ANSWER) comes when the test sends it, as a completion being
    generated: the node's app answers only then, so the ingress has no answer while the node counts it in
    flight. It sets `opened` once it has the request."""
    def handler(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
        opened.set()
        reply = FakeReply(child)
        reply.content_length = len(ANSWER)
        return reply
    return handler


def ready_at_once(child: FakeChild) -> None:
    asyncio.get_running_loop().call_soon(child.become_ready)


NODES = web.AppKey("nodes", Nodes)


async def relay(request: web.Request) -> web.StreamResponse:
    """The ingress's part of a completion, as a route will do it: place, then forward to the node."""
    nodes = request.app[NODES]
    body = await request.read()
    model = json.loads(body)["model"]
    send = nodes.place(model)
    if isinstance(send, Refusal):
        return error_response(send.kind, send.message, send.retry_after)
    try:
        return await forward(request, NodeChild(nodes, send), body, request.query)
    except ModelError as error:  # placement refused its retry (NodeChild): the route's envelope, as its own refusals
        return from_model_error(error)


async def serve(ingress: Nodes, watches: Mapping[str, tuple[str, Watch]], follows: list[asyncio.Task[None]],
                front: Callable[[Nodes], web.Application] | None = None) -> TestClient[Any, Any]:
    """The ingress over the nodes of `watches` (each one's address and watch), following each in a task put in
    `follows`, once all have published: a client of its completions route (`relay`), or of the app `front`
    makes (the real routes: test_cluster_front.py)."""
    for name, (address, watch) in watches.items():
        ingress.add(name, address)
        task = asyncio.ensure_future(ingress.follow(name, watch))
        task.add_done_callback(log_failure)
        follows.append(task)
    await ingress.until(lambda views: len(views) == len(watches))
    if front is None:
        app = web.Application()
        app[NODES] = ingress
        app.router.add_post("/v1/chat/completions", relay)
    else:
        app = front(ingress)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


class Cluster:
    def __init__(self, nodes: dict[str, Node], ingress: Nodes, client: TestClient[Any, Any]) -> None:
        self.nodes, self.ingress, self.client = nodes, ingress, client

    async def complete(self, model: str, stream: bool = False) -> aiohttp.ClientResponse:
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        return await self.client.post("/v1/chat/completions", data=json.dumps(body))

    async def until(self, holds: Callable[[dict[str, Board]], bool]) -> None:
        """Until `holds` is true of the nodes' boards, woken by their managers' steps (ModelManager.watch)."""
        versions = {name: -1 for name in self.nodes}
        boards: dict[str, Board] = {}
        watches: dict[str, asyncio.Task[tuple[int, Board]]] = {}
        try:
            while True:
                for name, node in self.nodes.items():
                    if name not in watches:
                        watches[name] = asyncio.ensure_future(node.manager.watch(versions[name]))
                done, _ = await asyncio.wait(watches.values(), return_when=asyncio.FIRST_COMPLETED)
                for name, task in list(watches.items()):
                    if task in done:
                        versions[name], boards[name] = task.result()
                        del watches[name]
                if len(boards) == len(self.nodes) and holds(boards):
                    return
        finally:
            for task in watches.values():
                task.cancel()


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []
    follows: list[asyncio.Task[None]] = []
    sessions: list[aiohttp.ClientSession] = []
    clients: list[TestClient[Any, Any]] = []

    async def make(limits: Mapping[str, Limits], models: Catalog | None = None,
                   front: Callable[[Nodes], web.Application] | None = None) -> Cluster:
        nodes: dict[str, Node] = {}
        for name, node_limits in limits.items():
            clock = FakeClock()
            fleet = FakeFleet(clock)
            source = StaticSource(models or catalog("a", "b"))
            manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])),
                                   catalog=source.value, limits=node_limits, clock=clock,
                                   gguf_cache=GgufCache(tmp_path / name), child_factory=fleet)
            server = TestServer(node_app(manager, KEY, "127.0.0.1"))  # its startup starts the manager
            await server.start_server()
            servers.append(server)
            nodes[name] = Node(name, manager, fleet, server, asyncio.Event())
            nodes[name].publishing.set()
        session = aiohttp.ClientSession()
        sessions.append(session)
        ingress = Nodes(KEY, session)
        watches = {}
        for name, node in nodes.items():

            async def watch(version: int, node: Node = node) -> tuple[int, NodeState]:
                node.asked.put_nowait(version)
                answer = await watch_state(node.manager, node.name, version)
                await node.publishing.wait()
                node.shown = answer[1]
                return answer

            watches[name] = (str(node.server.make_url("")), watch)
        client = await serve(ingress, watches, follows, front)
        clients.append(client)
        return Cluster(nodes, ingress, client)

    yield make
    for task in follows:
        task.cancel()
    for client in clients:
        await client.close()
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()


def by_hash(model: str, names: list[str]) -> list[str]:
    """The nodes in the order the rendezvous hash ranks them for `model`, first the one a cold load goes to."""
    return sorted(names, key=lambda name: rendezvous(model, name), reverse=True)


async def test_the_same_model_goes_to_the_same_node(make_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await make_cluster({name: Limits(max_models=2) for name in ("n1", "n2", "n3")})
    for node in cluster.nodes.values():
        node.fleet.prepare = ready_at_once
    for _ in range(4):
        response = await cluster.complete("a")
        assert response.status == 200, await response.text()
        assert (await response.json())["served_by"] == "a"
    loads = {name: node.loads("a") for name, node in cluster.nodes.items()}
    first = by_hash("a", list(cluster.nodes))[0]
    assert loads == {name: 1 if name == first else 0 for name in cluster.nodes}
    (child,) = cluster.nodes[first].fleet.children["a"]
    assert len(child.received) == 4
    # the client's credentials never reach the node; the cluster key did (the node refuses anything else)
    assert all("authorization" not in {k.lower() for k in headers} for _, _, headers in child.received)


async def test_a_node_refuses_requests_without_the_cluster_key(make_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await make_cluster({"n1": Limits()})
    node = cluster.nodes["n1"]
    async with aiohttp.ClientSession() as session:
        async with session.get(node.server.make_url("/v1/models")) as response:
            assert response.status == 401
        async with session.get(node.server.make_url("/v1/models"),
                               headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.status == 200


async def test_a_burst_for_a_cold_model_loads_it_once(make_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await make_cluster({name: Limits(max_models=2) for name in ("n1", "n2", "n3")})
    burst = [asyncio.ensure_future(cluster.complete("a")) for _ in range(8)]
    # every request waits for the one load: all 8 in the nodes' queues before any child is ready
    await cluster.until(lambda boards: sum(b.models["a"].queued for b in boards.values()) == 8)
    loading = [name for name, node in cluster.nodes.items() if node.loads("a")]
    assert loading == [by_hash("a", list(cluster.nodes))[0]]
    (child,) = cluster.nodes[loading[0]].fleet.children["a"]
    child.become_ready()
    for response in await asyncio.gather(*burst):
        assert response.status == 200
    assert sum(node.loads("a") for node in cluster.nodes.values()) == 1
    assert len(child.received) == 8


async def test_a_model_that_fits_only_one_node_lands_there(make_cluster: Callable[..., Any], tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "big.gguf")
    config = ModelConfig(name="big", settings={"--model": str(model)}, source="preset", origin="test",
                         command="fake big")
    models = Catalog(models={"big": config}, by_name={"big": "big"})
    # the small node is the one the hash prefers, so only the fit can send the model elsewhere
    small, large = by_hash("big", ["p", "q"])
    cluster: Cluster = await make_cluster({small: Limits(memory_budget=4096), large: Limits(memory_budget=2**34)},
                                          models)
    for node in cluster.nodes.values():
        node.fleet.prepare = ready_at_once
    views = await cluster.ingress.until(lambda views: len(views) == 2 and all(v.models["big"].estimated > 4096
                                                                               for v in views))
    assert {v.node for v in views} == {small, large}
    response = await cluster.complete("big")
    assert response.status == 200, await response.text()
    assert cluster.nodes[large].loads("big") == 1 and cluster.nodes[small].loads("big") == 0


async def test_a_node_cut_mid_stream_ends_the_stream_with_an_error_event_and_done(
        make_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await make_cluster({name: Limits() for name in ("n1", "n2")})
    first = by_hash("a", list(cluster.nodes))[0]
    node = cluster.nodes[first]
    opened = asyncio.Event()
    node.fleet.prepare = lambda child: (setattr(child, "handler", streaming(opened)), ready_at_once(child))
    pending = asyncio.ensure_future(cluster.complete("a", stream=True))
    child = await node.fleet.child("a")
    await opened.wait()
    child.replies[0].send(b'data: {"choices": [{"delta": {"content": "Once"}}]}\n\n')
    response = await pending
    assert response.status == 200
    assert b"Once" in await response.content.readuntil(b"\n\n")
    node.cut()
    rest = (await response.read()).decode()
    events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "upstream_error" and f"node {first}" in error["message"]
    assert first in cluster.ingress.unreachable()  # until its watch answers again


async def test_a_request_cut_before_its_answer_started_is_sent_to_another_node(
        make_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await make_cluster({name: Limits() for name in ("n1", "n2")})
    first, second = by_hash("a", list(cluster.nodes))
    cluster.nodes[second].fleet.prepare = ready_at_once
    pending = asyncio.ensure_future(cluster.complete("a"))
    await cluster.nodes[first].fleet.child("a")  # never ready: the request waits there for the load
    await cluster.until(lambda boards: boards[first].models["a"].queued == 1)
    cluster.nodes[first].cut()  # nothing of the answer was sent: the request goes to the other node
    response = await pending
    assert response.status == 200, await response.text()
    assert cluster.nodes[second].loads("a") == 1
    (other,) = cluster.nodes[second].fleet.children["a"]
    assert len(other.received) == 1


async def test_every_node_failing_a_request_is_an_upstream_error(make_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await make_cluster({name: Limits() for name in ("n1", "n2")})
    pending = asyncio.ensure_future(cluster.complete("a"))
    for name in by_hash("a", list(cluster.nodes)):  # each in turn: the request waits for the load, then is cut
        await cluster.nodes[name].fleet.child("a")
        await cluster.until(lambda boards, name=name: boards[name].models["a"].queued == 1)  # type: ignore[misc]
        cluster.nodes[name].cut()
    response = await pending
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "upstream_error" and "failed this request (n1, n2)" in error["message"]


async def test_a_node_that_drains_before_the_ingress_knows_sends_the_request_elsewhere(
        make_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await make_cluster({name: Limits() for name in ("n1", "n2")})
    first, second = by_hash("a", list(cluster.nodes))
    for node in cluster.nodes.values():
        node.fleet.prepare = ready_at_once
    cluster.nodes[first].publishing.clear()  # the ingress still sees it accepting
    cluster.nodes[first].manager.begin_drain()
    response = await cluster.complete("a")  # the first node answers 503 shutting_down: not an answer to relay
    assert response.status == 200, await response.text()
    assert cluster.nodes[second].loads("a") == 1 and cluster.nodes[first].loads("a") == 0
    cluster.nodes[first].publishing.set()
    await cluster.ingress.until(lambda views: not next(v for v in views if v.node == first).accepting)
    assert cluster.ingress.place("a").node == second  # type: ignore[union-attr]


async def test_a_node_lost_after_a_failed_connection_is_back_within_a_heartbeat(
        make_cluster: Callable[..., Any]) -> None:
    cluster: Cluster = await make_cluster({name: Limits() for name in ("n1", "n2")})
    first, second = by_hash("a", list(cluster.nodes))
    node = cluster.nodes[first]
    cluster.nodes[second].fleet.prepare = ready_at_once
    pending = asyncio.ensure_future(cluster.complete("a"))
    await node.fleet.child("a")  # never ready: the request waits there for the load
    await cluster.until(lambda boards: boards[first].models["a"].queued == 1)
    node.cut()
    assert (await pending).status == 200  # sent to the other node, and the first one is out
    assert first in cluster.ingress.unreachable()
    # Nothing more happens on the node, yet a watch asked after the loss answers within one heartbeat (by the
    # node's clock), the same board again: the node is back. Each turn lets one watch's heartbeat come.
    while first in cluster.ingress.unreachable():
        await node.asked.get()  # a watch is outstanding, its heartbeat set
        await node.fleet.clock.advance(WATCH_HEARTBEAT_S)
    assert cluster.ingress.place("b", avoid=frozenset({second})).node == first  # type: ignore[union-attr]


class Scripted:
    """A node's watch answered by the test: each call waits on a future it puts in `asked`."""

    def __init__(self) -> None:
        self.asked: asyncio.Queue[asyncio.Future[tuple[int, NodeState]]] = asyncio.Queue()

    async def __call__(self, version: int) -> tuple[int, NodeState]:
        answer: asyncio.Future[tuple[int, NodeState]] = asyncio.get_running_loop().create_future()
        self.asked.put_nowait(answer)
        return await answer


class Died(Exception):
    """What the Ray caller's `dead` recognises (ActorDiedError)."""


async def test_follow_retries_a_failed_watch_with_bounded_backoff_until_the_node_answers_or_dies(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelyard.cluster.ingress")
    sleeps: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def sleep(seconds: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sleeps.put_nowait((seconds, woken))
        await woken

    state = NodeState("n1", Limits(), {})
    watch = Scripted()
    async with aiohttp.ClientSession() as session:
        ingress = Nodes(KEY, session, sleep=sleep)
        ingress.add("n1", "http://127.0.0.1:9")
        follow = asyncio.ensure_future(ingress.follow("n1", watch, dead=lambda exc: isinstance(exc, Died)))
        (await watch.asked.get()).set_result((1, state))
        await ingress.until(lambda views: len(views) == 1)
        assert ingress.unreachable() == frozenset()

        # transient failures (Ray's ActorUnavailableError): out of placement, asked again after a doubling,
        # bounded delay, and said once
        delays = []
        for _ in range(7):
            (await watch.asked.get()).set_exception(ConnectionError("unavailable for now"))
            seconds, woken = await sleeps.get()
            delays.append(seconds)
            assert ingress.unreachable() == {"n1"}
            woken.set_result(None)
        assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "node n1 is unreachable" in warnings[0]
        # a watch asked after the loss answers (a heartbeat: the same version): back, and the backoff starts over
        (await watch.asked.get()).set_result((1, state))
        await ingress.until(lambda views: ingress.unreachable() == frozenset())
        (await watch.asked.get()).set_exception(ConnectionError("unavailable again"))
        seconds, woken = await sleeps.get()
        assert seconds == 0.1
        woken.set_result(None)
        (await watch.asked.get()).set_result((1, state))
        await ingress.until(lambda views: ingress.unreachable() == frozenset())

        # an answer to a watch asked before a failed connection says nothing of the node since: still out,
        # until the next watch answers
        asked_before = await watch.asked.get()
        await ingress.cut("n1", ConnectionResetError("reset by peer"))
        asked_before.set_result((2, state))
        asked_after = await watch.asked.get()  # the stale answer was taken, and the next watch asked
        assert ingress.unreachable() == {"n1"}
        asked_after.set_result((2, state))
        await ingress.until(lambda views: ingress.unreachable() == frozenset())

        # a dead agent: said once more, removed, and the follow ends (no error: nothing to log as failed)
        (await watch.asked.get()).set_exception(Died("the actor died"))
        await follow
        assert ingress.views() == [] and ingress.unreachable() == frozenset() and sleeps.empty()
        assert isinstance(ingress.place("a"), Refusal)  # its models are placed on the nodes left: none here
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 4 and "dead" in warnings[-1]
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
            "node n1 is reachable again"] * 3


@pytest.mark.parametrize(("held", "max_queue"), [("queued", 2), ("in_flight", 1)])
async def test_a_request_the_node_shows_is_not_counted_again_by_the_ingress(
        make_cluster: Callable[..., Any], held: str, max_queue: int) -> None:
    """The ingress's book and the node's publication count a request once between them, whether it waits there
    for its model's load (`queued`) or is being answered with nothing of its answer sent yet (`in_flight`):
    counted by both, a node with room looked full (queue_full) and a cold model was refused there."""
    cluster: Cluster = await make_cluster({"n1": Limits(max_queue=max_queue)})
    node = cluster.nodes["n1"]
    opened = asyncio.Event()
    if held == "in_flight":
        node.fleet.prepare = lambda child: (setattr(child, "handler", generating(opened)), ready_at_once(child))
    pending = asyncio.ensure_future(cluster.complete("a"))
    child = await node.fleet.child("a")
    # the node's own publication shows the request, whose answer the ingress has not had yet
    await cluster.ingress.until(lambda views: node.shown is not None and getattr(node.shown.models["a"], held) == 1)
    (view,) = cluster.ingress.views()
    assert view.models["a"].queued + view.models["a"].in_flight == 1
    assert not view.queue_full
    assert isinstance(cluster.ingress.place("b"), Send)  # the node has room for a cold model's request
    if held == "in_flight":
        await opened.wait()
        child.replies[0].send(ANSWER)
        child.replies[0].finish()
    else:
        child.become_ready()
    response = await pending
    assert response.status == 200, await response.text()


async def test_a_retry_that_no_node_can_take_is_the_apis_own_refusal_with_its_retry_after(
        make_cluster: Callable[..., Any]) -> None:
    first, second = by_hash("a", ["n1", "n2"])
    # the second node's queue is always full: the first request goes to the first node, its retry nowhere
    cluster: Cluster = await make_cluster({first: Limits(), second: Limits(max_queue=0)})
    pending = asyncio.ensure_future(cluster.complete("a"))
    await cluster.nodes[first].fleet.child("a")  # never ready: the request waits there for the load
    await cluster.until(lambda boards: boards[first].models["a"].queued == 1)
    cluster.nodes[first].cut()
    response = await pending
    assert response.status == 503  # not a 502: placement refused the retry, no node failed it
    assert (await response.json())["error"]["code"] == "queue_full"
    assert response.headers["Retry-After"] == str(round(retry_after(ErrorKind.QUEUE_FULL) or 0))
    assert cluster.nodes[second].loads("a") == 0


async def test_a_node_cut_mid_ollama_stream_ends_it_with_ollamas_error_line(make_cluster: Callable[..., Any]) -> None:
    """A node's Ollama stream is NDJSON, relayed as bytes: cut mid-stream, it ends with Ollama's own error line
    (which its clients raise) and a clean end, not a cut connection."""
    cluster: Cluster = await make_cluster({name: Limits() for name in ("n1", "n2")})
    first = by_hash("a", list(cluster.nodes))[0]
    node = cluster.nodes[first]
    opened = asyncio.Event()
    node.fleet.prepare = lambda child: (setattr(child, "handler", streaming(opened)), ready_at_once(child))
    app = web.Application()
    app[NODES] = cluster.ingress
    app.router.add_post("/api/chat", relay)  # Ollama's chat, answered by the node (its route translates)
    async with TestClient(TestServer(app)) as client:
        body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}  # Ollama streams by default
        pending = asyncio.ensure_future(client.post("/api/chat", data=json.dumps(body)))
        child = await node.fleet.child("a")
        await opened.wait()
        child.replies[0].send(b'data: {"choices": [{"delta": {"content": "Once"}}]}\n\n')
        response = await pending
        assert response.status == 200 and response.headers["Content-Type"].startswith("application/x-ndjson")
        assert json.loads(await response.content.readline())["message"]["content"] == "Once"
        node.cut()
        lines = (await response.read()).splitlines()  # the answer ends whole: read() raises on a cut one
        error = json.loads(lines[-1])
        assert set(error) == {"error"} and f"node {first}" in error["error"]
