"""Activity records (issue 10 points 3 and 4): the pure token extraction and redaction as table tests, the ring
and capture bounds, the routes in-process over fake children (records, the SSE feed, cancel of a queued and of
a streaming request, key filtering, capture), and one real-engine module that checks the records of real
OpenAI, llama.cpp and Ollama requests and a cancel that stops a real generation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from modelyard.activity import (
    REDACTED,
    Activity,
    CaptureDraft,
    CaptureStore,
    Tokens,
    object_after,
    redact_headers,
    token_counts,
    tokens_in_body,
)
from modelyard.api.app import build_app
from modelyard.api.auth import ApiKey, Scope
from modelyard.api.context import AppContext, ServerSettings
from modelyard.config.options import OptionTable
from modelyard.engine.command import Engine
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from modelyard.scheduler import Limits
from tests.conftest import Router
from tests.fakes import FakeChild, FakeClock, FakeFleet, FakeReply, StaticSource, catalog, settle

# --- pure: tokens -------------------------------------------------------------------------------------------

CHAT = (b'{"choices":[{"message":{"content":"the \\"usage\\": {\\"prompt_tokens\\": 999}"}}],"created":1,'
        b'"usage":{"completion_tokens":3,"prompt_tokens":12,"total_tokens":15,'
        b'"prompt_tokens_details":{"cached_tokens":4}},"id":"x",'
        b'"timings":{"cache_n":4,"prompt_n":8,"prompt_ms":5.1,"predicted_n":3,"predicted_per_second":61.5}}')
COMPLETION = b'{"content":"hi","tokens_predicted":2,"timings":{"prompt_n":6,"cache_n":0,"predicted_n":2}}'
EMBEDDINGS = b'{"model":"m","object":"list","usage":{"prompt_tokens":7,"total_tokens":7},"data":[' + b",".join(
    b'{"embedding":[%s],"index":%d}' % (b",".join(b"0.125" for _ in range(500)), i) for i in range(50)) + b"]}"
MESSAGES = b'{"type":"message","content":[],"usage":{"input_tokens":9,"output_tokens":4}}'
SSE_TAIL = (b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
            b'data: {"choices":[{"finish_reason":"stop","delta":{}}],"timings":{"prompt_n":5,"cache_n":2,'
            b'"predicted_n":8,"predicted_per_second":40.0}}\n\n'
            b'data: {"choices":[],"usage":{"completion_tokens":8,"prompt_tokens":7,"total_tokens":15}}\n\n'
            b"data: [DONE]\n\n")


@pytest.mark.parametrize(("body", "expected"), [
    (CHAT, Tokens(12, 3, 61.5)),  # usage's prompt (cache included), not the quoted one inside the content
    (COMPLETION, Tokens(6, 2, None)),
    (EMBEDDINGS, Tokens(7, None, None)),
    (MESSAGES, Tokens(9, 4, None)),
    (SSE_TAIL, Tokens(7, 8, 40.0)),
    (b'{"tokens":[1,2,3]}', Tokens()),  # /tokenize: nothing to count
    (b"", Tokens()),
    (b'{"usage": {"prompt_tokens": 5', Tokens()),  # cut off: no guess
    (b'{"usage": [1, 2]}', Tokens()),
    (b'{"usage":{"prompt_tokens":-1,"completion_tokens":true}}', Tokens()),  # not counts
    (b'{"timings": {"prompt_n": 3, "predicted_n": 0, "predicted_per_second": 0}}', Tokens(3, 0, None)),
    (b'{"usage" :{"prompt_tokens":1}}', Tokens()),  # orjson never writes a space there; neither does the child
])
def test_tokens_in_body(body: bytes, expected: Tokens) -> None:
    assert tokens_in_body(body) == expected


@pytest.mark.parametrize(("usage", "timings", "expected"), [
    ({"prompt_tokens": 10, "completion_tokens": 4}, {"prompt_n": 2, "cache_n": 8, "predicted_n": 4}, Tokens(10, 4)),
    (None, {"prompt_n": 2, "cache_n": 8, "predicted_n": 4}, Tokens(10, 4)),  # Ollama's count: cache included
    ({"prompt_tokens": 10, "completion_tokens": 4}, None, Tokens(10, 4)),
    ({"input_tokens": 3, "output_tokens": 1}, {}, Tokens(3, 1)),
    ("not a mapping", ["nor this"], Tokens()),
])
def test_token_counts(usage: Any, timings: Any, expected: Tokens) -> None:
    assert token_counts(usage, timings) == expected


def test_object_after_skips_braces_inside_strings_and_bounds_the_scan() -> None:
    assert object_after(b'{"usage":{"note":"a } b","n":1}}', b"usage") == {"note": "a } b", "n": 1}
    assert object_after(b'{"usage":{"n":"' + b"x" * 5000 + b'"}}', b"usage") is None


# --- pure: capture ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "value", "shown"), [
    ("Authorization", "Bearer abc", REDACTED), ("x-api-key", "k", REDACTED), ("Cookie", "a=b", REDACTED),
    ("X-Forwarded-Key", "sk-abcdefghijklmnop", REDACTED), ("X-Custom", "Bearer t0ken", REDACTED),
    ("X-Token", "a" * 40, REDACTED), ("Content-Type", "application/json", "application/json"),
    ("User-Agent", "OpenAI/Python 1.50", "OpenAI/Python 1.50"),
])
def test_redact_headers(name: str, value: str, shown: str) -> None:
    assert redact_headers([(name, value)]) == {name: shown}


def test_capture_store_bounds_total_memory_and_drafts_truncate() -> None:
    activity = Activity(size=3, capture=CaptureStore(max_bytes=3000, max_body_bytes=100))
    for _ in range(10):
        record = activity.begin("127.0.0.1", "/completion", "POST", None)
        record.capture = draft = CaptureDraft(100, {"Content-Type": "application/json"})
        draft.add(b"x" * 80)
        draft.add(b"y" * 80)
        activity.end(record, 200)
    kept = activity.capture.items()
    assert 1 <= len(kept) < 10 and kept[0]["id"] == 10  # newest first, oldest dropped
    assert kept[0]["response"] == {"headers": {}, "body": "x" * 80 + "y" * 20, "truncated": True}
    assert len(activity.recent(1000, lambda r: True)) == 3  # the ring is bounded too


# --- in-process: the routes over fake children -------------------------------------------------------------

class Stack:
    def __init__(self, manager: ModelManager, fleet: FakeFleet, context: AppContext,
                 http: TestClient[Any, Any]) -> None:
        self.manager, self.fleet, self.context, self.http = manager, fleet, context, http
        self.activity = context.activity

    async def loaded(self, model: str) -> FakeChild:
        child = await self.fleet.child(model)
        child.become_ready()
        await settle()
        return child


def _manager(tmp_path: Path, clock: FakeClock, fleet: FakeFleet) -> ModelManager:
    source = StaticSource(catalog("a", "b"))
    return ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                        limits=Limits(max_models=2, load_timeout=600.0, max_wait=1000.0), clock=clock,
                        gguf_cache=GgufCache(tmp_path), child_factory=fleet)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    clock = FakeClock()
    fleet = FakeFleet(clock)
    manager = _manager(tmp_path, clock, fleet)
    await manager.start()
    keys = (ApiKey("root"), ApiKey("a-only", frozenset({Scope.ADMIN}), ("a",)),
            ApiKey("reader", frozenset({Scope.READ})))
    context = AppContext(manager, ServerSettings(api_keys=keys))
    app = build_app(context)
    app.on_startup.clear()  # the manager is started above
    app.on_cleanup.clear()
    async with TestClient(TestServer(app)) as http:
        yield Stack(manager, fleet, context, http)
    await manager.close()


ROOT = {"Authorization": "Bearer root"}


def _answer(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
    return FakeReply(child, body=CHAT)


def _streaming(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
    return FakeReply(child, headers={"Content-Type": "text/event-stream"})


def _chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


def ready_at_once(stack: Stack, handler: Any = _answer) -> None:
    """Children answer with `handler` and become ready as soon as they are made."""
    def prepare(child: FakeChild) -> None:
        child.handler = handler
        asyncio.get_running_loop().call_soon(child.become_ready)

    stack.fleet.prepare = prepare


async def test_a_request_gets_one_record_with_its_tokens_and_waits(stack: Stack) -> None:
    ready_at_once(stack)
    async with stack.activity.follow() as frames:
        reply = await stack.http.post("/v1/chat/completions", json=_chat("a"), headers=ROOT)
        assert reply.status == 200  # served once the child is ready (the loader below)
        states = [(await frames.get() or {})["state"] for _ in range(3)]
    assert states == ["queued", "running", "done"]
    listing = await (await stack.http.get("/activity", headers=ROOT)).json()
    assert listing["in_flight"] == []
    [record] = listing["data"]
    assert {k: record[k] for k in ("model", "route", "method", "stream", "state", "status", "tokens_in",
                                   "tokens_out", "tokens_per_s", "error")} == {
        "model": "a", "route": "/v1/chat/completions", "method": "POST", "stream": False, "state": "done",
        "status": 200, "tokens_in": 12, "tokens_out": 3, "tokens_per_s": 61.5, "error": None}
    assert record["client"] == "127.0.0.1"
    assert 0 <= record["queue_wait"] <= record["ttft"] <= record["duration"]


async def test_refusals_are_recorded_with_their_message(stack: Stack) -> None:
    reply = await stack.http.post("/v1/chat/completions", json={"messages": []}, headers=ROOT)
    assert reply.status == 400
    reply = await stack.http.post("/api/chat", json=_chat("nope"), headers=ROOT)
    assert reply.status == 404
    data = (await (await stack.http.get("/activity", headers=ROOT)).json())["data"]
    assert [(r["model"], r["status"]) for r in data] == [("nope", 404), (None, 400)]
    assert "not found" in data[0]["error"] and "model name is missing" in data[1]["error"]


async def test_cancel_a_queued_request_answers_499(stack: Stack) -> None:
    pending = asyncio.ensure_future(stack.http.post("/v1/chat/completions", json=_chat("a"), headers=ROOT))
    await stack.fleet.child("a")  # loading, never ready: the request waits in the queue
    await settle()
    [record] = stack.activity.in_flight(lambda r: True)
    assert record.state == "queued" and record.model == "a"
    assert (await stack.http.post("/activity/x/cancel", headers=ROOT)).status == 400
    assert (await stack.http.post("/activity/999/cancel", headers=ROOT)).status == 404
    assert (await stack.http.post(f"/activity/{record.id}/cancel", headers=ROOT)).status == 200
    reply = await pending
    assert reply.status == 499
    body = await reply.json()
    assert body["error"]["code"] == "request_cancelled" and f"/activity/{record.id}/cancel" in body["error"]["message"]
    assert stack.manager.models()[0].state.queued == 0  # it left the queue
    assert record.state == "done" and record.status == 499


async def test_cancel_a_stream_ends_it_in_band_and_closes_the_upstream(stack: Stack) -> None:
    ready_at_once(stack, _streaming)
    reply = await stack.http.post("/v1/chat/completions", json=_chat("a", stream=True), headers=ROOT)
    child = await stack.fleet.child("a")
    child.replies[0].send(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    assert (await reply.content.readuntil(b"\n\n")).startswith(b"data: ")
    [record] = stack.activity.in_flight(lambda r: True)
    assert record.state == "running" and record.ttft is not None and record.stream
    assert (await stack.http.post(f"/activity/{record.id}/cancel", headers=ROOT)).status == 200
    rest = (await reply.read()).decode()
    events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["error"]["code"] == "request_cancelled" and events[-1] == "[DONE]"
    assert child.in_flight == 0  # the upstream request is closed: the child stops generating
    assert record.error is not None and "cancelled by an admin" in record.error


async def test_listings_honour_the_keys_model_patterns(stack: Stack) -> None:
    ready_at_once(stack)
    for model in ("a", "b"):
        assert (await stack.http.post("/v1/chat/completions", json=_chat(model), headers=ROOT)).status == 200
    limited = {"Authorization": "Bearer a-only"}
    data = (await (await stack.http.get("/activity", headers=limited)).json())["data"]
    assert [r["model"] for r in data] == ["a"]
    everything = (await (await stack.http.get("/activity?limit=1", headers=ROOT)).json())["data"]
    assert [r["model"] for r in everything] == ["b"]
    only_a = (await (await stack.http.get("/activity?model=a", headers=ROOT)).json())["data"]
    assert [r["model"] for r in only_a] == ["a"]
    for bad in ("0", "1001", "ten"):
        reply = await stack.http.get(f"/activity?limit={bad}", headers=ROOT)
        assert reply.status == 400 and "limit must be" in (await reply.json())["error"]["message"]
    assert (await stack.http.post("/activity/1/cancel", headers={"Authorization": "Bearer reader"})).status == 403
    assert (await stack.http.get("/capture", headers={"Authorization": "Bearer reader"})).status == 403


async def test_capture_is_opt_in_and_redacts_credentials(stack: Stack) -> None:
    ready_at_once(stack)
    assert (await stack.http.post("/v1/chat/completions", json=_chat("a"), headers=ROOT)).status == 200
    state = await (await stack.http.get("/capture", headers=ROOT)).json()
    assert state["enabled"] is False and state["data"] == []
    for bad in ({}, {"enabled": "yes"}, {"enabled": True, "max_body_bytes": -1}, {"enabled": True, "x": 1}):
        reply = await stack.http.post("/capture", json=bad, headers=ROOT)
        assert reply.status == 400, bad
    reply = await stack.http.post("/capture", json={"enabled": True, "max_body_bytes": 20}, headers=ROOT)
    assert (await reply.json())["enabled"] is True
    headers = {**ROOT, "Cookie": "session=s3cret"}
    assert (await stack.http.post("/v1/chat/completions", json=_chat("a"), headers=headers)).status == 200
    [capture] = (await (await stack.http.get("/capture", headers=ROOT)).json())["data"]
    assert capture["request"]["headers"]["Authorization"] == REDACTED
    assert capture["request"]["headers"]["Cookie"] == REDACTED
    assert capture["request"]["truncated"] and len(capture["request"]["body"]) == 20
    assert capture["response"]["body"] == CHAT[:20].decode() and capture["status"] == 200
    assert "root" not in json.dumps(capture) and "s3cret" not in json.dumps(capture)


async def test_ollama_requests_get_records_from_the_translated_answers(stack: Stack) -> None:
    ready_at_once(stack)
    reply = await stack.http.post("/api/chat", json={**_chat("a"), "stream": False}, headers=ROOT)
    assert reply.status == 200 and (await reply.json())["prompt_eval_count"] == 12
    [record] = stack.activity.recent(10, lambda r: True)
    assert (record.route, record.model, record.tokens_in, record.tokens_out, record.status) == (
        "/api/chat", "a", 12, 3, 200)


# --- the real engine ------------------------------------------------------------------------------------------

@pytest.fixture
def router(smol_router: Router) -> Router:
    return smol_router  # shared with the other module (see conftest): read the newest records only


def _records(router: Router, **query: str) -> dict[str, Any]:
    reply = router.client.get("/activity", params=query)
    assert reply.status_code == 200
    return dict(reply.json())


def test_real_requests_are_recorded_with_the_childs_token_counts(router: Router) -> None:
    client = router.client
    chat = {"model": "smol", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    streamed = client.post("/v1/chat/completions", json={**chat, "stream": True})
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert client.post("/api/generate", json={"model": "smol", "prompt": "Hi", "stream": True,
                                              "options": {"num_predict": 3}}).status_code == 200
    assert client.post("/tokenize", json={"model": "smol", "content": "hello"}).status_code == 200
    tokenize, generate, stream, whole = _records(router, limit="4")["data"]
    for record in (whole, stream, generate):
        assert record["status"] == 200 and record["tokens_in"] and record["tokens_out"], record
        assert record["tokens_per_s"] and record["ttft"] is not None and record["duration"] >= record["ttft"]
    assert (whole["stream"], stream["stream"], generate["stream"]) == (False, True, True)
    assert whole["tokens_out"] <= 4 and generate["route"] == "/api/generate"
    assert tokenize["route"] == "/tokenize" and tokenize["tokens_in"] is None and tokenize["status"] == 200


def test_cancel_stops_a_real_generation(router: Router) -> None:
    long = {"model": "smol", "max_tokens": 4000, "temperature": 1, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a very long story."}]}
    with httpx.Client(base_url=router.url, timeout=60) as client, client.stream(
            "POST", "/v1/chat/completions", json=long) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generating
        [record] = _records(router)["in_flight"]
        started = time.monotonic()
        assert router.client.post(f"/activity/{record['id']}/cancel").status_code == 200
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert time.monotonic() - started < 5
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_cancelled"
    [done] = _records(router, limit="1")["data"]
    assert done["id"] == record["id"] and "cancelled" in done["error"]
    # the child stopped: its slot is free at once for the next request
    quick = {"model": "smol", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    assert router.client.post("/v1/chat/completions", json=quick).status_code == 200
