"""Scheduling through the shell's HTTP app in-process (the ModelManager over fakes.py's fake children and
clock, aiohttp's test client): coalesced loads, a busy model not evicted, load failures, the queue limit, a
client giving up, /models/load in the queue, autoload off, /models/sse, unload (draining, while loading),
load-on-startup, CORS on streams. Each test makes the fake children ready, answer and die when it says, and
waits on what the shell shows, never on wall-clock time. A stop that the engine ignores is tested through
the whole stack, with tests/fake_engine.py as the child process: the SIGTERM, then the SIGKILL, are the point.
`write_preset`, `chat` and `post` serve test_scheduling_e2e.py's runs of the fake engine."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from modelyard.api.app import build_app
from modelyard.api.context import AppContext, ServerSettings
from modelyard.config.catalog import Catalog
from modelyard.config.options import OptionTable
from modelyard.engine.command import Engine
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from modelyard.scheduler import Limits
from tests.conftest import Router, fake_cmd
from tests.fakes import FakeChild, FakeClock, FakeFleet, FakeReply, StaticSource, catalog, ok_json, settle


def write_preset(tmp_path: Path, models: dict[str, str], extra: str = "") -> Path:
    preset = tmp_path / "fleet.ini"
    body = "".join(f"[{name}]\ncmd = {cmd}\nstop-timeout = 2\n{extra}\n" for name, cmd in models.items())
    preset.write_text(body)
    return preset


def chat(model: str, delay: float = 0.0, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "fake_delay": delay, "stream": stream}


async def post(url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await client.post("/v1/chat/completions", json=body, **kwargs)


# -- the shell in-process ---------------------------------------------------------------------------------------

def held(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
    """An answer that stays open until the test calls `finish` on it (as a long generation would)."""
    return FakeReply(child)


def streamed(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
    reply = FakeReply(child, headers={"Content-Type": "text/event-stream"})
    for i in range(3):
        reply.send(b'data: {"choices": [{"delta": {"content": "c%d"}}]}\n\n' % i)
    reply.send(b"data: [DONE]\n\n")
    reply.finish()
    return reply


@dataclass
class Stack:
    manager: ModelManager
    fleet: FakeFleet
    http: TestClient[Any, Any]
    clock: FakeClock

    async def entry(self, model: str) -> dict[str, Any]:
        listing = await (await self.http.get("/models")).json()
        return dict(next(m for m in listing["data"] if m["id"] == model))

    async def status(self, model: str) -> str:
        return str((await self.entry(model))["status"]["value"])

    async def until(self, model: str, what: Callable[[dict[str, Any]], bool]) -> None:
        """Until /models shows `what` for `model` (a bounded poll: the HTTP round trips are real)."""
        for _ in range(500):
            if what(await self.entry(model)):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{model} never got there: {await self.entry(model)}")

    async def ready(self, model: str, number: int = 1) -> FakeChild:
        child = await self.fleet.child(model, number)
        child.become_ready()
        await self.until(model, lambda m: m["status"]["value"] == "loaded")
        return child


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[MakeStack]:
    made: list[tuple[ModelManager, TestClient[Any, Any]]] = []

    async def make(*, limits: Limits | None = None, settings: ServerSettings | None = None,
                   models: Catalog | None = None, handler: Any = None, ready: bool = False) -> Stack:
        """`ready`: every child is ready as soon as it is made (for tests about what happens after loads)."""
        clock = FakeClock()
        fleet = FakeFleet(clock)

        def prepare(child: FakeChild) -> None:
            if handler is not None:
                child.handler = handler
            if ready:
                child.become_ready()

        fleet.prepare = prepare
        source = StaticSource(models or catalog("a", "b", "c", stop_timeout=2.0))
        manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])),
                               catalog=source.value, limits=limits or Limits(), clock=clock,
                               gguf_cache=GgufCache(tmp_path), child_factory=fleet)
        await manager.start()
        app = build_app(AppContext(manager, settings or ServerSettings()))
        app.on_startup.clear()  # the manager is started above
        app.on_cleanup.clear()
        http: TestClient[Any, Any] = TestClient(TestServer(app))
        await http.start_server()
        made.append((manager, http))
        return Stack(manager, fleet, http, clock)

    yield make
    for manager, http in made:
        await http.close()
        await manager.close()


def ask(s: Stack, model: str, **kwargs: Any) -> asyncio.Future[Any]:
    return asyncio.ensure_future(s.http.post("/v1/chat/completions", json=chat(model), **kwargs))


async def test_concurrent_requests_for_one_model_share_one_load(stack: MakeStack) -> None:
    s = await stack()
    replies = [ask(s, "a") for _ in range(6)]
    child = await s.fleet.child("a")
    await s.until("a", lambda m: m["queued"] == 6)  # all six wait on the one load
    child.become_ready()
    assert [r.status for r in await asyncio.gather(*replies)] == [200] * 6
    assert len(s.fleet.children["a"]) == 1
    assert all(request[1] == "/v1/chat/completions" for request in child.received) and len(child.received) == 6


async def test_busy_model_is_not_evicted_and_waiting_request_follows(stack: MakeStack) -> None:
    s = await stack(limits=Limits(max_models=1), handler=held)
    busy = ask(s, "a")
    a = await s.ready("a")
    await s.until("a", lambda m: m["in_flight"] == 1)
    other = ask(s, "b")
    await s.until("b", lambda m: m["queued"] == 1)
    await settle()
    assert not other.done() and not a.stop_requested.is_set()  # a is never stopped under its request
    a.replies[0].send(b'{"served_by": "a"}')
    a.replies[0].finish()
    assert (await busy).status == 200
    b = await s.ready("b")
    await s.until("b", lambda m: m["in_flight"] == 1)
    b.replies[0].finish()
    assert (await other).status == 200
    assert await s.status("a") == "unloaded" and await s.status("b") == "loaded"


async def test_a_request_for_another_model_is_served_within_max_wait_while_a_stays_busy(stack: MakeStack) -> None:
    """max-wait on the fake clock: a keeps getting requests, so before b's wait reaches 1 s a is never
    stopped and its new requests are served; after it, a's new requests queue, a stops once its in-flight
    ones are answered, b is served, and the queued a request follows (the scheduler's own timeline is
    test_scheduler's test_max_wait_bounds_a_wait_behind_continuous_traffic)."""
    s = await stack(limits=Limits(max_models=1, max_wait=1.0), handler=held)
    first = [ask(s, "a"), ask(s, "a")]
    a = await s.ready("a")
    await s.until("a", lambda m: m["in_flight"] == 2)
    other = ask(s, "b")
    await s.until("b", lambda m: m["queued"] == 1)
    await s.clock.advance(0.5)
    more = ask(s, "a")  # still within b's wait: a serves it
    await s.until("a", lambda m: m["in_flight"] == 3)
    a.replies[0].finish()
    assert (await first[0]).status == 200
    assert not other.done() and not a.stop_requested.is_set()
    await s.clock.advance(0.6)  # b has waited 1.1 s: a drains
    late = ask(s, "a")
    await s.until("a", lambda m: m["queued"] == 1)
    assert not a.stop_requested.is_set()  # its requests are still answered
    for reply in a.replies[1:]:
        reply.finish()
    assert [(await r).status for r in (first[1], more)] == [200, 200]
    b = await s.ready("b")
    assert a.stop_requested.is_set()
    await s.until("b", lambda m: m["in_flight"] == 1)
    assert not late.done()
    b.replies[0].send(b'{"served_by": "b"}')
    b.replies[0].finish()
    answer = await other
    assert answer.status == 200 and (await answer.json())["served_by"] == "b"
    again = await s.ready("a", 2)  # b idle, a waiting: a comes back for the queued request
    await s.until("a", lambda m: m["in_flight"] == 1)
    again.replies[0].finish()
    assert (await late).status == 200
    decisions = (await (await s.http.get("/decisions")).json())["data"]
    assert ("evict", "a", "max_wait") in [(d["kind"], d["model"], d["cause"]) for d in decisions]


async def test_load_failure_quotes_the_cause_and_the_next_request_retries(stack: MakeStack) -> None:
    """The process side (a real engine's exit code and last words) is test_real_engine_e2e's corrupt GGUF."""
    s = await stack()
    first = ask(s, "a")
    (await s.fleet.child("a")).die(3, "fake engine: cannot load the model (asked to fail)")
    response = await first
    assert response.status == 500
    error = (await response.json())["error"]
    assert error["code"] == "model_load_failed"
    assert "exited with code 3" in error["message"] and "asked to fail" in error["message"]
    entry = await s.entry("a")
    assert entry["status"]["value"] == "failed" and entry["status"]["failed"] is True
    assert entry["status"]["exit_code"] == 3
    again = ask(s, "a")
    (await s.fleet.child("a", 2)).die(3, "fake engine: cannot load the model (asked to fail)")
    assert (await again).status == 500  # a new load was tried (a second child), and failed the same way


async def test_queue_limit_answers_503_with_retry_after(stack: MakeStack) -> None:
    s = await stack(limits=Limits(max_queue=1))
    first = ask(s, "a")
    child = await s.fleet.child("a")
    await s.until("a", lambda m: m["queued"] == 1)
    second = await s.http.post("/v1/chat/completions", json=chat("a"))
    assert second.status == 503 and second.headers["Retry-After"] == "1"
    assert (await second.json())["error"]["code"] == "queue_full"
    child.become_ready()
    assert (await first).status == 200


async def test_client_that_gives_up_while_queued_leaves_the_queue(stack: MakeStack) -> None:
    s = await stack(limits=Limits(max_models=1), handler=held)
    busy = ask(s, "a")
    a = await s.ready("a")
    await s.until("a", lambda m: m["in_flight"] == 1)
    gives_up = ask(s, "b")
    await s.until("b", lambda m: m["queued"] == 1)
    gives_up.cancel()  # the client goes away while it waits for a
    await s.until("b", lambda m: m["queued"] == 0)
    a.replies[0].finish()
    assert (await busy).status == 200
    a.handler = ok_json
    assert (await s.http.post("/v1/chat/completions", json=chat("a"))).status == 200
    assert await s.status("b") == "unloaded"  # the abandoned request did not evict a or load b
    assert await s.status("a") == "loaded" and "b" not in s.fleet.children


async def test_models_load_waits_in_the_queue_instead_of_failing(stack: MakeStack) -> None:
    s = await stack(limits=Limits(max_models=1), handler=held)
    busy = ask(s, "a")
    a = await s.ready("a")
    await s.until("a", lambda m: m["in_flight"] == 1)
    load = asyncio.ensure_future(s.http.post("/models/load", json={"model": "b"}))
    await s.until("b", lambda m: m["queued"] == 1)
    a.replies[0].finish()
    assert (await busy).status == 200
    await s.ready("b")
    response = await load
    assert response.status == 200 and await response.json() == {"success": True}
    assert await s.status("a") == "unloaded"


async def test_autoload_off(stack: MakeStack) -> None:
    s = await stack(settings=ServerSettings(autoload=False))
    refused = await s.http.post("/v1/chat/completions", json=chat("a"))
    assert refused.status == 400 and (await refused.json())["error"]["code"] == "model_not_loaded"
    asked = asyncio.ensure_future(s.http.post("/v1/chat/completions?autoload=true", json=chat("a")))
    await s.ready("a")
    assert (await asked).status == 200
    assert (await s.http.post("/v1/chat/completions", json=chat("a"))).status == 200  # a is loaded now
    load = asyncio.ensure_future(s.http.post("/models/load", json={"model": "b"}))
    await s.ready("b")
    assert await (await load).json() == {"success": True}


async def test_sse_reports_every_status_change_with_router_modes_event_names(stack: MakeStack) -> None:
    s = await stack(limits=Limits(max_models=1))
    events: list[dict[str, Any]] = []
    async with s.http.get("/models/sse") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        first = ask(s, "a")
        await s.ready("a")
        assert (await first).status == 200
        second = ask(s, "b")
        await s.ready("b")
        assert (await second).status == 200
        async for raw in stream.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
            if [e["data"]["status"] for e in events if e["model"] == "b"][-1:] == ["loaded"]:
                break
    # router mode's names: model_status when a load starts, status_change for every later transition
    assert [(e["event"], e["data"]["status"]) for e in events if e["model"] == "a"] == [
        ("model_status", "loading"), ("status_change", "loaded"), ("status_change", "stopping"),
        ("status_change", "unloaded")]
    assert [(e["event"], e["data"]["status"]) for e in events if e["model"] == "b"] == [
        ("model_status", "loading"), ("status_change", "loaded")]


async def test_unload_drains_then_stops(stack: MakeStack) -> None:
    s = await stack(handler=held)
    busy = ask(s, "a")
    a = await s.ready("a")
    await s.until("a", lambda m: m["in_flight"] == 1)
    assert await (await s.http.post("/models/unload", json={"model": "a"})).json() == {"success": True}
    entry = await s.entry("a")  # a busy model shows stopping at once, and keeps its request
    assert entry["status"]["value"] == "stopping" and entry["in_flight"] == 1
    await settle()
    assert not a.stop_requested.is_set()  # drains first
    a.replies[0].finish()
    assert (await busy).status == 200  # the in-flight request finished
    await s.until("a", lambda m: m["status"]["value"] == "unloaded")
    assert a.stop_requested.is_set() and a.exited.done()
    not_running = await s.http.post("/models/unload", json={"model": "a"})
    assert not_running.status == 400 and "not running" in (await not_running.json())["error"]["message"]
    assert (await s.http.post("/models/unload", json={"model": "zz"})).status == 404


async def test_load_on_startup(stack: MakeStack) -> None:
    early, late = catalog("early", load_on_startup=True), catalog("late")
    s = await stack(models=Catalog(models={**early.models, **late.models}, by_name={**early.by_name, **late.by_name}))
    await s.ready("early")
    assert await s.status("late") == "unloaded" and "late" not in s.fleet.children


async def test_unload_while_loading_cancels_the_load_and_fails_its_waiters(stack: MakeStack) -> None:
    s = await stack()
    waiting = ask(s, "a")
    child = await s.fleet.child("a")
    await s.until("a", lambda m: m["queued"] == 1)
    assert await (await s.http.post("/models/unload", json={"model": "a"})).json() == {"success": True}
    response = await waiting
    assert response.status == 503 and (await response.json())["error"]["code"] == "model_unloaded"
    await s.until("a", lambda m: m["status"]["value"] == "unloaded")
    assert child.exited.done()
    child.become_ready()  # too late: the cancelled load does not come back
    await settle()
    assert await s.status("a") == "unloaded" and len(s.fleet.children["a"]) == 1


async def test_streamed_answers_carry_cors_headers(stack: MakeStack) -> None:
    s = await stack(handler=streamed)
    origin = {"Origin": "http://localhost:5173"}
    reply = asyncio.ensure_future(s.http.post("/v1/chat/completions", json=chat("a", stream=True), headers=origin))
    await s.ready("a")
    response = await reply
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
    lines = [line for line in (await response.text()).splitlines() if line]
    assert lines[-1] == "data: [DONE]"


def merged(*catalogs: Catalog) -> Catalog:
    return Catalog(models={k: v for c in catalogs for k, v in c.models.items()},
                   by_name={k: v for c in catalogs for k, v in c.by_name.items()})


async def test_keep_alive_global_per_model_and_per_request(stack: MakeStack,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelyard")  # the unload says why, as modelyard serve logs it
    bodies: list[dict[str, Any]] = []

    def recording(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
        bodies.append(json.loads(body or b"{}"))
        return ok_json(child, method, path, body)

    s = await stack(limits=Limits(keep_alive=1.0), models=merged(catalog("a", "c"), catalog("b", keep_alive=-1)),
                    handler=recording, ready=True)
    for model in ("a", "b"):
        assert (await s.http.post("/v1/chat/completions", json=chat(model))).status == 200
    entry = await s.entry("a")
    assert entry["keep_alive"] == 1 and entry["expires_in"] is not None and entry["expires_in"] <= 1
    await s.clock.advance(1.1)
    await s.until("a", lambda m: m["status"]["value"] == "unloaded")  # global keep-alive
    assert await s.status("b") == "loaded"  # keep-alive = -1 in its preset
    assert "keep-alive" in caplog.text

    reply = await s.http.post("/v1/chat/completions", json={**chat("c"), "keep_alive": 0})
    assert reply.status == 200
    assert "keep_alive" not in bodies[-1] and bodies[-1]["model"] == "c"  # removed before forwarding
    await s.until("c", lambda m: m["status"]["value"] == "unloaded")  # keep_alive 0: unloaded right after
    assert (await s.http.post("/v1/chat/completions", json={**chat("c"), "keep_alive": "-1"})).status == 200
    await s.clock.advance(1.5)
    assert await s.status("c") == "loaded"  # the request's keep_alive -1 overrides the global 1 s
    bad = await s.http.post("/v1/chat/completions", json={**chat("c"), "keep_alive": "soon"})
    assert bad.status == 400 and "keep_alive" in (await bad.json())["error"]["message"]


async def test_concurrency_limit_answers_429_with_retry_after(stack: MakeStack) -> None:
    s = await stack(models=catalog("a", concurrency_limit=2), handler=held, ready=True)
    replies = [ask(s, "a") for _ in range(3)]
    limited = await next(asyncio.as_completed(replies))  # the third is refused while two are in flight
    assert limited.status == 429 and limited.headers["Retry-After"]
    a = await s.fleet.child("a")
    await s.until("a", lambda m: m["in_flight"] == 2)
    for reply in a.replies:
        reply.finish()
    assert sorted(r.status for r in await asyncio.gather(*replies)) == [200, 200, 429]
    a.handler = ok_json
    # the limit counts only what is in flight or waiting
    assert (await s.http.post("/v1/chat/completions", json=chat("a"))).status == 200


async def test_a_pinned_model_is_not_evicted(stack: MakeStack) -> None:
    s = await stack(limits=Limits(max_models=2), models=merged(catalog("a", pinned=True), catalog("b", "c")),
                    ready=True)
    for model in ("a", "b", "c", "b"):
        assert (await s.http.post("/v1/chat/completions", json=chat(model))).status == 200
    entry = await s.entry("a")
    assert entry["status"]["value"] == "loaded" and entry["pinned"] is True
    assert len(s.fleet.children["a"]) == 1 and len(s.fleet.children["b"]) == 2  # b and c took turns


# -- through the whole stack -------------------------------------------------------------------------------------

def test_a_child_that_ignores_the_stop_is_killed_after_stop_timeout(tmp_path: Path, start_router: Any) -> None:
    preset = tmp_path / "fleet.ini"
    preset.write_text(f"[hung]\ncmd = {fake_cmd('hung', ignore_term=True)}\nstop-timeout = 1\n")
    router: Router = start_router("--models-preset", str(preset))
    assert router.client.post("/v1/chat/completions", json=chat("hung")).status_code == 200
    started = time.monotonic()
    router.client.post("/models/unload", json={"model": "hung"}).raise_for_status()
    router.wait_status("hung", "unloaded", timeout=10)
    assert 0.9 < time.monotonic() - started < 5
    assert router.children() == []
