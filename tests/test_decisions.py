"""The "why": the reasons the scheduler gives its decisions (table tests over `Decided`), the explanation of
each waiting request (`decisions.explain_waiting`, table tests over scheduler boards), and GET /decisions,
/decisions/sse and POST /models/unload {"all": true} in-process (fake children, fake clock)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from modelyard.api.auth import ApiKey, Scope
from modelyard.api.context import ServerSettings
from modelyard.config.options import OptionTable
from modelyard.decisions import Waiting, explain_waiting
from modelyard.engine.command import Engine
from modelyard.errors import ErrorKind
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from modelyard.scheduler import (
    Acquire,
    ChildUnhealthy,
    Decided,
    DecisionKind,
    Event,
    InstanceExited,
    Limits,
    LoadSucceeded,
    ModelChanged,
    ModelSpec,
    Scheduler,
    Tick,
    UnloadRequested,
    human_duration,
)
from modelyard.scheduler import Release as Done
from modelyard.scheduler import Shutdown as Down
from tests.fakes import FakeClock, FakeFleet, StaticSource, app_client, catalog, settle

G = 2**30

# --- the reasons of decisions -------------------------------------------------------------------------------


def run(specs: list[ModelSpec | str], limits: Limits, steps: list[tuple[float, Event]]) -> list[Decided]:
    sched = Scheduler(specs, limits)
    out: list[Decided] = []
    for now, event in steps:
        out += [a for a in sched.handle(event, now) if isinstance(a, Decided)]
    return out


ONE = Limits(max_models=1, max_wait=30.0)
REASONS = [
    pytest.param(["A"], ONE, [(0, Acquire(1, "A"))],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1)], id="load"),
    pytest.param(["A", "B"], ONE, [(0, Acquire(1, "A")), (1, LoadSucceeded("A")), (2, Done(1)), (42, Acquire(2, "B"))],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1),
                  (DecisionKind.EVICT, "lru", "A",
                   "evicted (least recently used) to make room for 'B', idle 40 s", 2)], id="lru"),
    pytest.param(["A", "B"], ONE, [(0, Acquire(1, "A")), (1, LoadSucceeded("A")), (2, Acquire(2, "B")),
                                   (32, Tick())],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1),
                  (DecisionKind.EVICT, "max_wait", "A", "evicted to make room for 'B': its request waited 30 s "
                   "(max-wait); finishing 1 request(s) first", 2)], id="max-wait drains the busy one"),
    pytest.param([ModelSpec("A", keep_alive=300)], ONE, [(0, Acquire(1, "A")), (1, LoadSucceeded("A")),
                                                          (2, Done(1)), (303, Tick())],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1),
                  (DecisionKind.EXPIRE, "keep_alive", "A", "idle for 5m (keep-alive)", None)], id="keep-alive"),
    pytest.param(["A"], ONE, [(0, Acquire(1, "A")), (1, LoadSucceeded("A")), (2, UnloadRequested("A"))],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1),
                  (DecisionKind.UNLOAD, "request", "A", "unloaded by request; finishing 1 request(s) first", None)],
                 id="unload of a busy model"),
    pytest.param(["A"], Limits(max_models=1, load_timeout=600), [(0, Acquire(1, "A")), (601, Tick()),
                                                                 (602, InstanceExited("A", -9))],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1),
                  (DecisionKind.KILL, "load_timeout", "A", "not ready within 600 s (load-timeout)", None),
                  (DecisionKind.FAIL, "load", "A", "failed to load: not ready within 600 s (load-timeout)", None),
                  (DecisionKind.REJECT, "upstream_error", "A",
                   "model 'A' failed to load: not ready within 600 s (load-timeout)", 1)], id="load timeout"),
    pytest.param(["A"], ONE, [(0, Acquire(1, "A")), (1, LoadSucceeded("A")), (2, Done(1)),
                              (3, ChildUnhealthy("A", "stalled")), (4, InstanceExited("A", -9, "gone"))],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1),
                  (DecisionKind.KILL, "watchdog", "A", "stalled", None),
                  (DecisionKind.FAIL, "exit", "A", "exited: stalled; gone", None)], id="watchdog"),
    pytest.param(["A"], Limits(max_models=1, max_queue=1), [(0, Acquire(1, "A")), (0, Acquire(2, "A"))],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1),
                  (DecisionKind.REJECT, "queue_full", "A", "too many waiting requests (1); retry later", 2)],
                 id="queue full"),
    pytest.param(["A"], ONE, [(0, Acquire(1, "A")), (1, LoadSucceeded("A")), (2, Done(1)),
                              (3, ModelChanged(ModelSpec("A")))],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1),
                  (DecisionKind.DRAIN, "config_changed", "A", "configuration changed", None)], id="config change"),
    pytest.param(["A"], ONE, [(0, Acquire(1, "A")), (5, Down())],
                 [(DecisionKind.LOAD, "request", "A", "1 request(s) waiting", 1),
                  (DecisionKind.REJECT, "shutting_down", "A", "modelyard is shutting down", 1),
                  (DecisionKind.DRAIN, "shutdown", "A", "shutting down", None)], id="shutdown"),
]


@pytest.mark.parametrize(("specs", "limits", "steps", "expected"), REASONS)
def test_each_decision_says_why(specs: list[ModelSpec | str], limits: Limits, steps: list[tuple[float, Event]],
                                expected: list[tuple[Any, ...]]) -> None:
    assert [(d.kind, d.cause, d.model, d.reason, d.request_id) for d in run(specs, limits, steps)] == expected


def test_a_load_waited_for_says_how_long_the_first_request_waited() -> None:
    sched = Scheduler(["A", "B"], ONE)
    sched.handle(Acquire(1, "A"), 0)
    sched.handle(LoadSucceeded("A"), 1)
    sched.handle(Acquire(2, "B"), 2)  # waits behind A's request
    sched.handle(Done(1), 3)  # A is evicted for B...
    (load,) = [a for a in sched.handle(InstanceExited("A", 0), 7)  # ...and B loads once A is gone
               if isinstance(a, Decided) and a.kind == DecisionKind.LOAD]
    assert load.reason == "1 request(s) waiting, the first for 5 s" and load.request_id == 2


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "0.25 s"), (7.5, "7.5 s"), (40, "40 s"), (119.4, "119 s"),
                                               (300, "5m"), (330, "5m30s"), (3600, "1h"), (5400, "1h30m")])
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


# --- why a request waits --------------------------------------------------------------------------------------

def board_after(specs: list[ModelSpec | str], limits: Limits, steps: list[tuple[float, Event]]) -> Scheduler:
    sched = Scheduler(specs, limits)
    for now, event in steps:
        sched.handle(event, now)
    return sched


BUSY_A = [(0, Acquire(1, "A")), (1, LoadSucceeded("A"))]  # A loaded, request 1 in flight
MEM = Limits(max_models=4, memory_budget=10 * G, max_wait=30.0)
WAITING = [
    pytest.param(["A"], ONE, [(0, Acquire(1, "A"))], 2.5,
                 [Waiting(1, "A", 1, 2.5, "waiting for 'A' to load (loading for 2.5 s)", (), None)], id="loading"),
    pytest.param(["A", "B"], ONE, [*BUSY_A, (10, Acquire(2, "B"))], 12,
                 [Waiting(2, "B", 1, 2, "waiting for 'A' to finish 1 request(s) (--models-max 1); drains them in "
                  "28 s (--max-wait)", ("A",), 28)], id="models-max"),
    pytest.param(["A", "B"], ONE, [*BUSY_A, (10, Acquire(2, "B")), (11, Acquire(3, "B"))], 12,
                 [Waiting(2, "B", 1, 2, "waiting for 'A' to finish 1 request(s) (--models-max 1); drains them in "
                  "28 s (--max-wait)", ("A",), 28),
                  Waiting(3, "B", 2, 1, "#2 in the queue of 'B': waiting for 'A' to finish 1 request(s) "
                  "(--models-max 1); drains them in 28 s (--max-wait)", ("A",), 28)], id="position"),
    pytest.param(["A", "B", "C"], ONE, [*BUSY_A, (10, Acquire(2, "B")), (11, Acquire(3, "C"))], 12,
                 [Waiting(2, "B", 1, 2, "waiting for 'A' to finish 1 request(s) (--models-max 1); drains them in "
                  "28 s (--max-wait)", ("A",), 28),
                  Waiting(3, "C", 1, 1, "waiting behind 'B', first in line for room to load", ("B",), None)],
                 id="behind another model"),
    pytest.param(["A", "B", "C"], ONE, [*BUSY_A, (10, Acquire(2, "B")), (11, Acquire(3, "C")), (11.5, Acquire(4, "C"))],
                 12,
                 [Waiting(2, "B", 1, 2, "waiting behind 'C', first in line for room to load (2 requests waiting "
                  "against 1)", ("C",), None),
                  Waiting(3, "C", 1, 1, "waiting for 'A' to finish 1 request(s) (--models-max 1); drains them in "
                  "29 s (--max-wait)", ("A",), 29),
                  Waiting(4, "C", 2, 0.5, "#2 in the queue of 'C': waiting for 'A' to finish 1 request(s) "
                  "(--models-max 1); drains them in 29 s (--max-wait)", ("A",), 29)],
                 id="behind a model with more requests waiting"),
    pytest.param([ModelSpec("A", footprint=6 * G), ModelSpec("B", footprint=6 * G)], MEM,
                 [*BUSY_A, (2, Acquire(2, "B"))], 3,
                 [Waiting(2, "B", 1, 1, "waiting for 'A' to finish 1 request(s) (--memory-budget 10.00 GiB, "
                  "12.00 GiB needed); drains them in 29 s (--max-wait)", ("A",), 29)], id="memory budget"),
    pytest.param([ModelSpec("P", pinned=True), "B", "C"], Limits(max_models=2, max_wait=30.0),
                 [(0, Acquire(1, "P")), (1, LoadSucceeded("P")), (2, Acquire(2, "B")), (3, LoadSucceeded("B")),
                  (4, Acquire(3, "C"))], 5,
                 [Waiting(3, "C", 1, 1, "waiting for 'P' (pinned), 'B' to finish 1 request(s) (--models-max 2); "
                  "drains them in 29 s (--max-wait)", ("P", "B"), 29)], id="pinned"),
    pytest.param(["A"], ONE, [*BUSY_A, (2, UnloadRequested("A")), (3, Acquire(2, "A"))], 4,
                 [Waiting(2, "A", 1, 1, "waiting for the previous instance of 'A' to stop (unloaded by request), "
                  "finishing 1 request(s); it loads again then", ("A",), None)], id="stopping"),
    pytest.param(["A", "B"], ONE, [*BUSY_A, (2, Acquire(2, "B")), (40, Tick())], 41,
                 [Waiting(2, "B", 1, 39, "waiting for 'A' to stop (finishing 1 request(s)) (--models-max 1)",
                  ("A",), None)], id="max-wait passed: A drains"),
]


@pytest.mark.parametrize(("specs", "limits", "steps", "now", "expected"), WAITING)
def test_each_waiting_request_is_explained(specs: list[ModelSpec | str], limits: Limits,
                                           steps: list[tuple[float, Event]], now: float,
                                           expected: list[Waiting]) -> None:
    assert explain_waiting(board_after(specs, limits, steps).board(), now) == expected


# --- over HTTP, with fake children -------------------------------------------------------------------------------

class Rig:
    def __init__(self, manager: ModelManager, fleet: FakeFleet, clock: FakeClock) -> None:
        self.manager, self.fleet, self.clock = manager, fleet, clock


@contextlib.asynccontextmanager
async def started_rig(tmp_path: Path, max_models: int) -> AsyncIterator[Rig]:
    clock = FakeClock()
    fleet = FakeFleet(clock)
    source = StaticSource(catalog("a", "b"))
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                           limits=Limits(max_models=max_models, max_wait=30.0), clock=clock,
                           gguf_cache=GgufCache(tmp_path), child_factory=fleet)
    await manager.start()
    try:
        yield Rig(manager, fleet, clock)
    finally:
        await manager.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with started_rig(tmp_path, max_models=1) as started:
        yield started


async def client_for(rig: Rig, keys: tuple[ApiKey, ...] = ()) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await app_client(rig.manager, ServerSettings(api_keys=keys))
    return client


@pytest.fixture
async def http(rig: Rig) -> AsyncIterator[TestClient[Any, Any]]:
    client = await client_for(rig)
    yield client
    await client.close()


async def loaded(rig: Rig, model: str, number: int = 1) -> None:
    child = await rig.fleet.child(model, number)
    child.become_ready()
    await settle()


async def test_decisions_lists_newest_first_and_explains_the_waiting(http: TestClient[Any, Any], rig: Rig) -> None:
    lease_a = asyncio.ensure_future(rig.manager.acquire("a"))
    await loaded(rig, "a")
    held = await lease_a
    await rig.clock.advance(5)
    waiter = asyncio.ensure_future(rig.manager.acquire("b"))
    await settle()
    body = await (await http.get("/decisions")).json()
    assert [(d["kind"], d["model"], d["cause"]) for d in body["data"]] == [("load", "a", "request")]
    assert body["data"][0]["request"] == held.request_id and body["data"][0]["time"] > 1e9
    (waiting,) = body["waiting"]
    assert waiting["model"] == "b" and waiting["position"] == 1 and waiting["blocked_by"] == ["a"]
    assert waiting["reason"].startswith("waiting for 'a' to finish 1 request(s) (--models-max 1)")
    assert waiting["gives_up_in"] == 30.0
    await rig.clock.advance(31)  # max-wait: a is drained for b
    rig.manager.release(held)
    await loaded(rig, "b")
    rig.manager.release(await waiter)
    kinds = [(d["kind"], d["model"]) for d in (await (await http.get("/decisions?limit=2")).json())["data"]]
    assert kinds == [("load", "b"), ("evict", "a")]


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=ten"])
async def test_a_bad_limit_is_a_400_saying_what_to_send(http: TestClient[Any, Any], query: str) -> None:
    response = await http.get(f"/decisions?{query}")
    assert response.status == 400
    assert "limit must be a whole number from 1 to 500" in (await response.json())["error"]["message"]


async def test_decisions_sse_streams_each_decision_of_the_keys_models(rig: Rig) -> None:
    key = ApiKey("k-a", frozenset({Scope.READ}), ("a",), label="a-only")
    client = await client_for(rig, (key,))
    try:
        response = await client.get("/decisions/sse", headers={"Authorization": "Bearer k-a"})
        assert response.status == 200
        await settle()
        for model in ("b", "a"):  # b's load is not shown to a key limited to a
            request = asyncio.ensure_future(rig.manager.acquire(model))
            await loaded(rig, model, 1)
            rig.manager.release(await request)
            await settle()
        frames = []
        while len(frames) < 2:
            line = (await response.content.readline()).decode().strip()
            if line.startswith(("event:", "data:")):
                frames.append(line)
        assert frames[0] == "event: decision"
        decision = json.loads(frames[1].removeprefix("data: "))
        assert (decision["kind"], decision["model"]) == ("load", "a")  # b's load and eviction are not shown
        listed = await (await client.get("/decisions", headers={"Authorization": "Bearer k-a"})).json()
        assert {d["model"] for d in listed["data"]} == {"a"}
        response.close()
    finally:
        await client.close()


async def test_unload_all_unloads_every_running_model(tmp_path: Path) -> None:
    async with started_rig(tmp_path, max_models=2) as rig:
        await _unload_all(rig)


async def _unload_all(rig: Rig) -> None:
    client = await client_for(rig)
    try:
        for model in ("a", "b"):
            request = asyncio.ensure_future(rig.manager.acquire(model))
            await loaded(rig, model)
            rig.manager.release(await request)
        await settle()
        response = await client.post("/models/unload", json={"all": True})
        assert response.status == 200
        assert await response.json() == {"success": True, "unloaded": ["a", "b"]}
        await settle()
        assert all(c.stop_requested.is_set() for c in (rig.fleet.children["a"][0], rig.fleet.children["b"][0]))
        decisions = [(d.kind, d.model, d.reason) for d in rig.manager.decisions(2)]
        assert decisions == [(DecisionKind.UNLOAD, "b", "unloaded by request (all models)"),
                             (DecisionKind.UNLOAD, "a", "unloaded by request (all models)")]
        nothing = await client.post("/models/unload", json={"all": True})
        assert await nothing.json() == {"success": True, "unloaded": []}
    finally:
        await client.close()


@pytest.mark.parametrize("body", [{"all": "yes"}, {"all": 1}, {"all": True, "model": "a"}, {"all": None}])
async def test_unload_all_refuses_what_it_cannot_mean(http: TestClient[Any, Any], body: dict[str, Any]) -> None:
    response = await http.post("/models/unload", json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == ErrorKind.BAD_REQUEST.code and '"all": true' in error["message"]
