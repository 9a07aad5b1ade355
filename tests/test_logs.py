"""The "what": the children's output kept per model across restarts (modelyard.logbook, GET /logs/{model},
/logs/sse), a streamed chat's load messages (api/loading.py, --send-loading-state) in-process with fake
children, and once end to end with the real engine: load progress on /models/sse, the engine's lines in
/logs, the load in /decisions, and the loading messages through the openai client."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp.test_utils import TestClient

from modelyard.api.auth import ApiKey, Scope
from modelyard.api.context import ServerSettings
from modelyard.api.loading import progress_text
from modelyard.config.options import OptionTable
from modelyard.engine.command import Engine
from modelyard.logbook import Logbook, ModelLog
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from modelyard.scheduler import Limits
from tests.conftest import Router
from tests.fakes import FakeChild, FakeClock, FakeFleet, FakeReply, StaticSource, app_client, catalog, settle

# --- the rings ----------------------------------------------------------------------------------------------


def test_a_ring_keeps_the_newest_lines_and_a_childs_own_lines_from_its_mark() -> None:
    times = iter(range(100, 200))
    log = ModelLog("a", now=lambda: float(next(times)), size=3)
    log.append("first child")
    mark = log.mark()
    for line in ("one", "two", "three", "four"):
        log.append(line)
    assert [(x.time, x.line) for x in log.last(10)] == [(102.0, "two"), (103.0, "three"), (104.0, "four")]
    assert [x.line for x in log.last(2)] == ["three", "four"] and log.last(0) == []
    assert log.since(mark) == ["two", "three", "four"]  # "one" fell off the ring
    assert log.since(log.mark()) == []


def test_a_long_line_is_clipped_saying_how_much() -> None:
    log = ModelLog("a")
    log.append("x" * 5000)
    (line,) = log.last(1)
    assert line.line.startswith("x" * 4096) and line.line.endswith("(904 more characters)")


async def test_followers_get_new_lines_and_the_end_of_the_stream() -> None:
    book = Logbook(now=lambda: 1.0)
    async with book.follow() as lines:
        book.of("a").append("hello")
        book.close()
        first, end = await lines.get(), await lines.get()
    assert first is not None and (first.model, first.line) == ("a", "hello") and end is None


# --- over HTTP, with fake children --------------------------------------------------------------------------

class Rig:
    def __init__(self, manager: ModelManager, fleet: FakeFleet, clock: FakeClock) -> None:
        self.manager, self.fleet, self.clock = manager, fleet, clock

    async def loaded(self, model: str, number: int = 1) -> FakeChild:
        child = await self.fleet.child(model, number)
        child.become_ready()
        await settle()
        return child


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = FakeClock()
    fleet = FakeFleet(clock)
    source = StaticSource(catalog("a", "b"))
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                           limits=Limits(max_models=1, max_wait=30.0), clock=clock,
                           gguf_cache=GgufCache(tmp_path), child_factory=fleet)
    await manager.start()
    yield Rig(manager, fleet, clock)
    await manager.close()


async def client_for(rig: Rig, settings: ServerSettings | None = None) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await app_client(rig.manager, settings)
    return client


@pytest.fixture
async def http(rig: Rig) -> AsyncIterator[TestClient[Any, Any]]:
    client = await client_for(rig)
    yield client
    await client.close()


async def test_logs_keep_every_instance_and_failures_quote_only_their_own(http: TestClient[Any, Any],
                                                                          rig: Rig) -> None:
    request = asyncio.ensure_future(rig.manager.acquire("a"))
    first = await rig.loaded("a")
    first.say("llama_model_loader: loaded meta data", "main: server is listening")
    rig.manager.release(await request)
    first.die(-11, "Segmentation fault")
    await settle()
    again = asyncio.ensure_future(rig.manager.acquire("a"))
    second = await rig.fleet.child("a", 2)
    second.die(1, "error loading model: bad magic")
    with pytest.raises(Exception, match="bad magic") as failure:
        await again
    assert "Segmentation fault" not in str(failure.value)  # the second child's message quotes only itself
    body = await (await http.get("/logs/a?lines=3")).json()
    assert body["model"] == "a"
    assert [x["line"] for x in body["lines"]] == ["Segmentation fault", "fake: loading",
                                                  "error loading model: bad magic"]
    assert all(x["time"] > 1e9 for x in body["lines"])  # Unix time
    everything = await (await http.get("/logs/a")).json()
    assert [x["line"] for x in everything["lines"]][:2] == ["fake: loading", "llama_model_loader: loaded meta data"]


@pytest.mark.parametrize(("path", "status", "code", "says"), [
    ("/logs/nope", 404, "model_not_found", "model 'nope' not found"),
    ("/logs/a?lines=0", 400, "invalid_request", "lines must be a whole number from 1 to 2000"),
    ("/logs/a?lines=lots", 400, "invalid_request", "lines must be a whole number"),
    ("/logs/sse?model=nope", 404, "model_not_found", "model 'nope' not found"),
])
async def test_bad_log_requests_say_what_to_fix(http: TestClient[Any, Any], path: str, status: int, code: str,
                                                says: str) -> None:
    response = await http.get(path)
    assert response.status == status
    error = (await response.json())["error"]
    assert error["code"] == code and says in error["message"]


async def test_logs_respect_the_keys_models(rig: Rig) -> None:
    key = ApiKey("k-a", frozenset({Scope.READ}), ("a",), label="a-only")
    client = await client_for(rig, ServerSettings(api_keys=(key,)))
    try:
        auth = {"Authorization": "Bearer k-a"}
        refused = await client.get("/logs/b", headers=auth)
        assert refused.status == 403 and "may not use model 'b'" in (await refused.json())["error"]["message"]
        assert (await client.get("/logs/a", headers=auth)).status == 200
        assert (await client.get("/logs/a")).status == 401
        stream = await client.get("/logs/sse", headers=auth)
        await settle()
        rig.manager.logbook.of("b").append("b's secret")
        rig.manager.logbook.of("a").append("a's line")
        frames = [(await stream.content.readline()).decode().strip() for _ in range(2)]
        assert frames[0] == "event: log"
        assert json.loads(frames[1].removeprefix("data: "))["line"] == "a's line"  # b's line was not sent
        stream.close()
    finally:
        await client.close()


async def test_logs_sse_of_one_model(http: TestClient[Any, Any], rig: Rig) -> None:
    stream = await http.get("/logs/sse?model=a")
    assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
    await settle()
    rig.manager.logbook.of("b").append("not this one")
    rig.manager.logbook.of("a").append("this one")
    data = [(await stream.content.readline()).decode().strip() for _ in range(2)][1]
    assert json.loads(data.removeprefix("data: "))["model"] == "a"
    stream.close()


# --- loading messages in a streamed chat -------------------------------------------------------------------------

def streaming(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
    return FakeReply(child, headers={"Content-Type": "text/event-stream"})


CHAT = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
LOADING_ON = {"X-Modelyard-Loading-State": "1"}


async def _event(response: Any) -> dict[str, Any] | str:
    while True:
        line = (await response.content.readline()).decode().strip()
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            return data if data == "[DONE]" else dict(json.loads(data))


def _reasoning(event: dict[str, Any] | str) -> str:
    assert isinstance(event, dict) and event["object"] == "chat.completion.chunk", event
    (choice,) = event["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] is None
    return str(choice["delta"]["reasoning_content"])


async def test_a_waiting_stream_is_told_why_it_waits_then_the_progress_then_gets_its_answer(
        http: TestClient[Any, Any], rig: Rig) -> None:
    busy = asyncio.ensure_future(rig.manager.acquire("b"))
    await rig.loaded("b")
    lease_b = await busy
    rig.fleet.prepare = lambda child: setattr(child, "handler", streaming)
    response = await http.post("/v1/chat/completions", json=CHAT, headers=LOADING_ON)
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
    first = await _event(response)
    assert _reasoning(first) == "Loading model 'a'...\n" and first["choices"][0]["delta"]["role"] == "assistant"
    assert _reasoning(await _event(response)).startswith("waiting for 'b' to finish 1 request(s) (--models-max 1)")
    rig.manager.release(lease_b)  # b is evicted for a, which loads
    child = await rig.fleet.child("a")
    child.on_progress({"stages": ["text_model"], "current": "text_model", "value": 0.5})
    assert _reasoning(await _event(response)) == "loading: 50%\n"
    child.become_ready()
    assert _reasoning(await _event(response)).startswith("'a' is ready (")
    await settle()
    child.replies[0].send(b'data: {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}\n\ndata: [DONE]\n\n')
    child.replies[0].finish()
    assert (await _event(response))["choices"][0]["delta"] == {"content": "Hello"}  # type: ignore[index]
    assert await _event(response) == "[DONE]"


async def test_a_load_that_fails_ends_the_stream_with_the_error_and_done(http: TestClient[Any, Any],
                                                                         rig: Rig) -> None:
    response = await http.post("/v1/chat/completions", json=CHAT, headers=LOADING_ON)
    assert response.status == 200
    assert _reasoning(await _event(response)) == "Loading model 'a'...\n"
    (await rig.fleet.child("a")).die(1, "error loading model: bad magic")
    error = await _event(response)
    assert isinstance(error, dict) and error["error"]["code"] == "model_load_failed"
    assert "bad magic" in error["error"]["message"]
    assert await _event(response) == "[DONE]"


async def test_without_the_flag_or_header_or_for_a_loaded_model_nothing_changes(rig: Rig) -> None:
    client = await client_for(rig, ServerSettings(send_loading_state=True))
    try:
        rig.fleet.prepare = lambda child: setattr(child, "handler", streaming)
        off = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT,
                                                headers={"X-Modelyard-Loading-State": "0"}))
        child = await rig.loaded("a")
        await settle()
        child.replies[0].send(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
        child.replies[0].finish()
        assert await _event(await off) == {"choices": []}  # the child's own first event: no loading messages
        loaded = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))  # on, but loaded
        await settle()
        child.replies[1].send(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
        child.replies[1].finish()
        assert await _event(await loaded) == {"choices": []}
        refused = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert refused.status == 404  # a refusal keeps its status
    finally:
        await client.close()


@pytest.mark.parametrize(("progress", "text"), [
    ({"stages": ["text_model"], "current": "text_model", "value": 0.0}, "loading: 0%"),
    ({"stages": ["text_model", "mmproj_model"], "current": "mmproj_model", "value": 0.333},
     "loading mmproj_model: 33%"),
    ({"value": 1}, "loading: 100%"),
    ({"value": "half"}, None),
    ({"value": True}, None),
    ({}, None),
])
def test_progress_text(progress: dict[str, Any], text: str | None) -> None:
    assert progress_text(progress) == text


# --- end to end, with the real engine ------------------------------------------------------------------------------

def test_real_engine_progress_logs_decisions_and_loading_messages(models_dir: Path, start_router: Any) -> None:
    router: Router = start_router("--models-dir", str(models_dir), "--models-max", "1")
    statuses: list[dict[str, Any]] = []
    subscribed = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=router.url, timeout=60) as sse, sse.stream("GET", "/models/sse") as stream:
            subscribed.set()
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event["model"] == "smol":
                        statuses.append(event["data"])
                        if event["data"]["status"] == "loaded":
                            return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert subscribed.wait(10)
    api = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    stream = api.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hi."}],
                                         max_tokens=4, temperature=0, stream=True,
                                         extra_headers={"X-Modelyard-Loading-State": "1"})
    chunks = list(stream)
    thinking = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                       for c in chunks if c.choices)
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert thinking.startswith("Loading model 'smol'...\n") and "'smol' is ready (" in thinking, thinking
    assert "loading: 100%" in thinking, thinking  # the child's own progress, relayed
    assert answer, chunks
    watcher.join(30)
    progress = [s["progress"] for s in statuses if "progress" in s]
    assert progress and set(progress[-1]) == {"stages", "current", "value"}, statuses
    assert progress[-1]["value"] == 1.0 and statuses[-1]["status"] == "loaded"
    lines = router.client.get("/logs/smol", params={"lines": 2000}).json()["lines"]
    assert any("load_model" in x["line"] or "llama_model_loader" in x["line"] for x in lines), lines[:20]
    decisions = router.client.get("/decisions").json()
    loads = [d for d in decisions["data"] if d["kind"] == "load" and d["model"] == "smol"]
    assert len(loads) == 1 and loads[0]["cause"] == "request" and isinstance(loads[0]["request"], int)
    assert decisions["waiting"] == []
