"""The router-mode routes beyond the ordinary JSON ones (api/streams.py, api/multipart.py, api/gcp.py,
api/disabled.py): the pure parts by table (the multipart field scanner fed in every chunk size, the conversation
map, Vertex AI's request formats and settings, the scope of every new route); the routing in-process over fake
children (a multipart body reaching the child while the client is still sending it, a conversation's stream
replayed, looked up and stopped, a generation that goes on when its client leaves, Vertex AI predictions); and
once end to end over SmolLM2: a stream replayed byte for byte from the child's session, and a transcription,
a control and a decision request answered by the child itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from modelyard.api import gcp, multipart, streams
from modelyard.api.auth import ApiKey, Scope, required_scope
from modelyard.api.context import ServerSettings
from modelyard.children import ChildError
from modelyard.config.options import OptionTable
from modelyard.config.presets import ConfigError
from modelyard.demo import SMOLLM2
from modelyard.engine.command import Engine, launch_plan
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from modelyard.scheduler import Limits, Status
from tests.conftest import Router
from tests.fakes import FakeChild, FakeClock, FakeFleet, FakeReply, StaticSource, app_client, catalog, settle

BOUNDARY = "----b0undary"


def form(*parts: tuple[str, bytes, str | None]) -> bytes:
    """A multipart body: (name, content, filename or None) per part."""
    out = b""
    for name, content, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += b"Content-Type: application/octet-stream\r\n" if filename else b""
        out += b"\r\n" + content + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def scan(body: bytes, chunk: int) -> multipart.FieldScanner:
    scanner = multipart.FieldScanner(BOUNDARY, "model")
    for at in range(0, len(body), chunk):
        scanner.feed(body[at:at + chunk])
    scanner.end()
    return scanner


AUDIO = bytes(range(256)) * 40 + b"\r\n--" + BOUNDARY[:-1].encode() + b"x"  # holds a near-boundary


@pytest.mark.parametrize("body, value, problem", [
    (form(("model", b"smol", None), ("file", AUDIO, "a.wav")), "smol", None),
    (form(("file", AUDIO, "a.wav"), ("language", b"en", None), ("model", b"smol", None)), "smol", None),
    (form(("model", AUDIO[:10], "model.bin"), ("model", "café".encode(), None)), "café", None),  # a file named model
    (b"preamble\r\n" + form(("model", b"smol", None)), "smol", None),
    (form(("file", AUDIO, "a.wav")), None, None),  # the form ends without it
    (form(("model", b"smol", None)).replace(b'name="model"', b"name=model"), "smol", None),  # unquoted
    (form(("model", b"smol", None)).replace(b"Content-Disposition", b"content-disposition"), "smol", None),
    (form(("file", AUDIO, "a.wav"))[:-12], None, "ends before its closing boundary"),
    (form(("model", b"x" * 5000, None)), None, "longer than 4096 bytes"),
    (form(("model", b"\xff\xfe", None)), None, "not UTF-8"),
    (f"--{BOUNDARY}\r\n".encode() + b"X: " + b"y" * 20000, None, "headers are longer"),
    (f"--{BOUNDARY}junk\r\n".encode(), None, "followed by text"),
])
@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 20])
def test_the_scanner_finds_the_field_in_any_chunking(body: bytes, value: str | None, problem: str | None,
                                                     chunk: int) -> None:
    scanner = scan(body, chunk)
    assert scanner.done and scanner.value == value
    assert (scanner.problem is None) if problem is None else (problem in (scanner.problem or ""))


def test_the_scanner_keeps_only_a_boundarys_length_of_a_file() -> None:
    scanner = multipart.FieldScanner(BOUNDARY, "model")
    scanner.feed(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n".encode())
    for _ in range(100):
        scanner.feed(b"\0" * 10_000)
    assert not scanner.done and len(scanner._pending) < len(BOUNDARY) + 4


def test_the_boundary_comes_from_the_content_type() -> None:
    assert multipart.boundary_of(f"multipart/form-data; boundary={BOUNDARY}") == BOUNDARY
    assert multipart.boundary_of('multipart/form-data; boundary="a b"') == "a b"
    assert multipart.boundary_of("multipart/form-data") is None


# --- the conversation map ---------------------------------------------------------------------------------------

def test_conversations_are_remembered_replaced_stopped_and_bounded() -> None:
    convs = streams.Conversations(limit=3)
    first = convs.remember("c1", "a", None)
    assert convs.alive("c1", first) and convs.owner("c1", None) == "a" and convs.waiting("c1")
    convs.settled("c1", first)
    assert not convs.waiting("c1")
    second = convs.remember("c1", "b", None)  # a newer request of the same conversation
    assert not convs.alive("c1", first) and convs.alive("c1", second) and convs.owner("c1", None) == "b"
    convs.forget("c1", None)  # a stop
    assert not convs.alive("c1", second) and convs.owner("c1", None) is None
    for n in range(5):
        convs.remember(f"d{n}", "a", None)
    assert len(convs) == 3 and convs.owner("d1", None) is None and convs.owner("d4", None) == "a"


def test_a_conversation_is_seen_by_its_own_key_and_by_admins() -> None:
    alice, bob = ApiKey("ka", frozenset({Scope.INFERENCE})), ApiKey("kb", frozenset({Scope.INFERENCE}))
    admin = ApiKey("kc")
    convs = streams.Conversations()
    ticket = convs.remember("c", "a", alice)
    assert convs.owner("c", alice) == "a" and convs.owner("c", admin) == "a" and convs.owner("c", bob) is None
    convs.forget("c", bob)
    assert convs.alive("c", ticket)


def test_a_lookup_asks_each_model_once_for_its_own_ids() -> None:
    owners = {"x": "a", "y": "b", "z": "a", "gone": None}
    assert streams.group_by_model(["x", "y", "gone", "z", "x", "never"], owners) == {"a": ["x", "z"], "b": ["y"]}


# --- Vertex AI ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, alias", [
    ("/v1/chat/completions", "chatCompletions"), ("/apply-template", "applyTemplate"), ("/completion", "completion"),
    ("/v1/messages/count_tokens", "messagesCountTokens"), ("/slots/{id}", "slots"), ("/health", "health"),
])
def test_request_formats_are_llama_servers_aliases(path: str, alias: str) -> None:
    assert gcp.request_format(path) == alias


def test_a_shared_alias_means_the_v1_path() -> None:
    assert gcp.target("completions") == "/v1/completions" and gcp.target("chatCompletions") == "/v1/chat/completions"
    assert gcp.target("/completions") == "/completions" and gcp.target("models") == "/v1/models"
    assert gcp.target("nope") is None and gcp.target("/v1/stream") is None


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"AIP_MODE": "TRAINING"}, None),
    ({"AIP_MODE": "PREDICTION"}, gcp.Vertex(8080, "", "/predict")),
    ({"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": "9000", "AIP_HEALTH_ROUTE": "hc", "AIP_PREDICT_ROUTE": "/p"},
     gcp.Vertex(9000, "/hc", "/p")),
])
def test_vertex_settings_come_from_the_environment(environ: dict[str, str], expected: gcp.Vertex | None) -> None:
    assert gcp.Vertex.from_environ(environ) == expected


@pytest.mark.parametrize("port", ["http", "0", "70000"])
def test_a_bad_vertex_port_says_so(port: str) -> None:
    with pytest.raises(ConfigError, match="AIP_HTTP_PORT"):
        gcp.Vertex.from_environ({"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": port})


def test_children_never_see_the_vertex_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A llama-server child with AIP_MODE=PREDICTION would leave its --port for AIP_HTTP_PORT (router mode's
    children do, and fail to load)."""
    for name, value in {"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": "8080", "AIP_HEALTH_ROUTE": "/h",
                        "AIP_PREDICT_ROUTE": "/p"}.items():
        monkeypatch.setenv(name, value)
    config = catalog("m").models["m"]
    plan = launch_plan(replace(config, command=None, settings={"--model": "/m.gguf"}),
                       Engine(Path("/bin/llama-server"), OptionTable([])), 5555)
    assert not [name for name in plan.env if name.startswith("AIP_")]


# --- scopes -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, scope", [
    *(("POST", p, Scope.INFERENCE) for p in ("/v1/audio/transcriptions", "/audio/transcriptions",
                                              "/v1/chat/completions/control", "/v1/systemone",
                                              "/chat/completions/input_tokens", "/responses/input_tokens",
                                              "/v1/streams/lookup")),
    ("GET", "/v1/stream", Scope.INFERENCE), ("DELETE", "/v1/stream", Scope.INFERENCE),
    ("GET", "/tools", Scope.ADMIN), ("POST", "/tools", Scope.ADMIN), ("POST", "/cors-proxy", Scope.ADMIN),
])
def test_every_new_route_has_its_scope(method: str, path: str, scope: Scope) -> None:
    assert required_scope(method, path, {}) == scope


# --- in-process, over fake children -------------------------------------------------------------------------------

class Rig:
    def __init__(self, manager: ModelManager, fleet: FakeFleet, http: TestClient[Any, Any]) -> None:
        self.manager, self.fleet, self.http = manager, fleet, http

    async def loaded(self, model: str) -> FakeChild:
        task = asyncio.ensure_future(self.manager.acquire(model))
        child = await self.fleet.child(model)
        child.become_ready()
        self.manager.release(await task)
        await settle()
        return child


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setenv("AIP_MODE", "PREDICTION")  # the predict route is served only then
    monkeypatch.setattr(streams, "POLL_S", 0.01)
    clock = FakeClock()
    fleet = FakeFleet(clock)
    source = StaticSource(catalog("a", "b"))
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                           limits=Limits(max_models=2, max_wait=30.0), clock=clock,
                           gguf_cache=GgufCache(tmp_path), child_factory=fleet)
    await manager.start()
    http: TestClient[Any, Any] = await app_client(manager, ServerSettings(max_body_bytes=1 << 20))
    yield Rig(manager, fleet, http)
    await http.close()
    await manager.close()


def echo(child: FakeChild, method: str, path: str, body: Any) -> FakeReply:
    """Answers with what it got, reading a streamed body as it arrives."""
    reply = FakeReply(child)

    async def answer() -> None:
        streamed = body is not None and not isinstance(body, bytes)
        got = b"".join([chunk async for chunk in body]) if streamed else body or b""
        child.got = got  # type: ignore[attr-defined]
        reply.send(json.dumps({"path": path, "method": method, "length": len(got)}).encode())
        reply.finish()

    reply.task = asyncio.ensure_future(answer())  # type: ignore[attr-defined]
    return reply


async def test_a_transcription_reaches_the_child_while_the_file_is_still_coming(rig: Rig) -> None:
    child = await rig.loaded("a")
    child.handler = echo
    reached = asyncio.Event()
    original = child.handler

    def noting(c: FakeChild, method: str, path: str, body: Any) -> FakeReply:
        reached.set()
        return original(c, method, path, body)

    child.handler = noting
    body = form(("model", b"a", None), ("file", b"\1" * 300_000, "a.wav"))
    head, tail = body[:1000], body[1000:]

    async def sending() -> AsyncIterator[bytes]:
        yield head
        await asyncio.wait_for(reached.wait(), 10)  # the child has the request before the body's end is sent
        yield tail

    async with rig.http.post("/v1/audio/transcriptions", data=sending(), headers={
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Length": str(len(body))}) as reply:
        assert reply.status == 200
        assert await reply.json() == {"path": "/v1/audio/transcriptions", "method": "POST", "length": len(body)}
    assert child.got == body  # type: ignore[attr-defined]
    assert child.received[-1][2]["Content-Length"] == str(len(body))


async def test_a_file_before_the_model_field_is_spooled_and_sent_whole(rig: Rig, monkeypatch: pytest.MonkeyPatch
                                                                       ) -> None:
    monkeypatch.setattr(multipart, "MEMORY_LIMIT", 1000)  # the spool goes to disk
    child = await rig.loaded("b")
    child.handler = echo
    body = form(("file", b"\2" * 200_000, "a.wav"), ("model", b"b", None))
    async with rig.http.post("/audio/transcriptions", data=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}) as reply:
        assert reply.status == 200
    assert child.got == body  # type: ignore[attr-defined]


@pytest.mark.parametrize("body, content_type, status, says", [
    (form(("file", b"x", "a.wav")), f"multipart/form-data; boundary={BOUNDARY}", 400, 'add a "model" form field'),
    (form(("model", b"nope", None)), f"multipart/form-data; boundary={BOUNDARY}", 404, "model 'nope' not found"),
    (b"garbage", f"multipart/form-data; boundary={BOUNDARY}", 400, "ends before its closing boundary"),
    (b"garbage", "multipart/form-data", 400, "no boundary parameter"),
    (b"x" * (2 << 20), f"multipart/form-data; boundary={BOUNDARY}", 413, "larger than 1 MiB"),
    (b'{"file": "x"}', "application/json", 400, 'set "model"'),  # router mode reads a JSON body's model too
])
async def test_bad_transcriptions_are_refused_before_any_child(rig: Rig, body: bytes, content_type: str,
                                                               status: int, says: str) -> None:
    async with rig.http.post("/v1/audio/transcriptions", data=body, headers={"Content-Type": content_type}) as reply:
        assert reply.status == status
        assert says in (await reply.json())["error"]["message"]
    assert rig.fleet.children == {}


def sends_before_answering(child: FakeChild) -> list[tuple[str, str, dict[str, str]]]:
    """As the real HTTP client does: the whole body goes out before the answer is read, and a failure of the
    body is a failure of the request (aiohttp: ClientConnectionError, a ChildError for the proxy). Returns the
    requests it gets: method, path, query."""
    original, asked = child.request, []

    @contextlib.asynccontextmanager
    async def request(method: str, path: str, *, body: Any = None, params: Any = None,
                      **kwargs: Any) -> AsyncIterator[Any]:
        asked.append((method, path, dict(params or {})))
        if body is not None and not isinstance(body, bytes):
            try:
                body = b"".join([chunk async for chunk in body])
            except Exception as exc:
                raise ChildError(f"failed to send bytes into the connection: {exc!r}") from exc
        async with original(method, path, body=body, params=params, **kwargs) as reply:
            yield reply

    child.request = request  # type: ignore[method-assign]
    return asked


async def test_a_chunked_body_past_the_limit_is_413(rig: Rig) -> None:
    child = await rig.loaded("a")
    child.handler = echo
    sends_before_answering(child)

    async def sending() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        yield form(("model", b"a", None), ("file", b"", "a.wav"))[:-len(BOUNDARY) - 8]
        for _ in range(40):
            yield b"\0" * 65536

    async with rig.http.post("/v1/audio/transcriptions", data=sending(),
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}) as reply:
        assert reply.status == 413


@pytest.mark.parametrize("method, path", [("GET", "/tools"), ("POST", "/tools"), ("GET", "/cors-proxy"),
                                          ("POST", "/cors-proxy")])
async def test_tools_and_the_cors_proxy_are_disabled_as_in_router_mode(rig: Rig, method: str, path: str) -> None:
    async with rig.http.request(method, path) as reply:
        assert reply.status == 403
        error = (await reply.json())["error"]
    assert error["type"] == "feature_disabled" and error["message"].startswith("this feature is disabled")


def sessions(child: FakeChild, done: bool) -> None:
    """The child's stream routes: a replay, a lookup that finds every id asked (done or not), a stop."""

    def handle(c: FakeChild, method: str, path: str, body: Any) -> FakeReply:
        if path == "/v1/streams/lookup":
            ids = json.loads(body)["conversation_ids"]
            return FakeReply(c, body=json.dumps([{"conversation_id": i, "is_done": done} for i in ids]).encode())
        if path == "/v1/stream" and method == "DELETE":
            return FakeReply(c, status=204, body=b"")
        if path == "/v1/stream":
            return FakeReply(c, headers={"Content-Type": "text/event-stream"}, body=b"data: replayed\n\n")
        return FakeReply(c, body=b'{"ok": true}')

    child.handler = handle


async def test_a_conversation_is_replayed_looked_up_and_stopped_on_its_own_child(rig: Rig) -> None:
    a = await rig.loaded("a")
    b = await rig.loaded("b")
    sessions(b, done=True)
    asked = sends_before_answering(b)
    async with rig.http.post("/v1/chat/completions", json={"model": "b", "messages": []},
                             headers={"X-Conversation-Id": "c1::b"}) as reply:
        assert reply.status == 200
    assert b.received[-1][2]["X-Conversation-Id"] == "c1::b"
    async with rig.http.get("/v1/stream", params={"conv_id": "c1::b", "from": "5", "x": "y"}) as reply:
        assert reply.status == 200 and await reply.read() == b"data: replayed\n\n"
    assert asked[-1] == ("GET", "/v1/stream", {"conv_id": "c1::b", "from": "5"})
    async with rig.http.post("/v1/streams/lookup", json={"conversation_ids": ["c1::b", "c1", "other"]}) as reply:
        assert await reply.json() == [{"conversation_id": "c1::b", "is_done": True}]  # only what the map knows
    assert asked[-1][:2] == ("POST", "/v1/streams/lookup") and a.received == []  # a was not asked
    async with rig.http.delete("/v1/stream", params={"conv_id": "c1::b"}) as reply:
        assert reply.status == 204
    assert asked[-1] == ("DELETE", "/v1/stream", {"conv_id": "c1::b"})
    async with rig.http.get("/v1/stream", params={"conv_id": "c1::b"}) as reply:
        assert reply.status == 404 and "c1::b" in (await reply.json())["error"]["message"]


@pytest.mark.parametrize("method, path, body, status, says", [
    ("GET", "/v1/stream", None, 400, "conv_id is missing"),
    ("DELETE", "/v1/stream", None, 400, "conv_id is missing"),
    ("GET", "/v1/stream?conv_id=never", None, 404, "stream not found"),
    ("DELETE", "/v1/stream?conv_id=never", None, 204, None),
    ("POST", "/v1/streams/lookup", b"nope", 400, "not valid JSON"),
    ("POST", "/v1/streams/lookup", b'{"conversation_ids": "c1"}', 400, "array of strings"),
    ("POST", "/v1/streams/lookup", b'{"conversation_ids": ["never"]}', 200, None),
])
async def test_stream_routes_answer_bad_and_unknown_ids(rig: Rig, method: str, path: str, body: bytes | None,
                                                        status: int, says: str | None) -> None:
    async with rig.http.request(method, path, data=body) as reply:
        assert reply.status == status
        if says is not None:
            assert says in (await reply.json())["error"]["message"]
        elif status == 200:
            assert await reply.json() == []


async def test_a_stop_during_the_load_cancels_the_request_and_a_replay_meanwhile_is_503(rig: Rig) -> None:
    request = asyncio.ensure_future(rig.http.post("/v1/chat/completions", json={"model": "a", "messages": []},
                                                  headers={"X-Conversation-Id": "c2"}))
    child = await rig.fleet.child("a")
    async with rig.http.get("/v1/stream", params={"conv_id": "c2"}) as reply:
        assert reply.status == 503 and reply.headers["Retry-After"] == "1"
    async with rig.http.delete("/v1/stream", params={"conv_id": "c2"}) as reply:
        assert reply.status == 204
    child.become_ready()
    async with await request as reply:
        assert reply.status == 400 and (await reply.json())["error"]["message"] == streams.STOPPED
    assert child.received == []


async def test_a_generation_goes_on_when_its_client_leaves_and_holds_its_model(rig: Rig) -> None:
    child = await rig.loaded("a")
    replies: list[FakeReply] = []
    lookups = {"done": False}

    def handle(c: FakeChild, method: str, path: str, body: Any) -> FakeReply:
        if path == "/v1/streams/lookup":
            return FakeReply(c, body=json.dumps([{"conversation_id": "c3", "is_done": lookups["done"]}]).encode())
        reply = FakeReply(c, headers={"Content-Type": "text/event-stream"})
        replies.append(reply)
        return reply

    child.handler = handle
    async with rig.http.post("/v1/chat/completions", json={"model": "a", "stream": True, "messages": []},
                             headers={"X-Conversation-Id": "c3"}) as reply:
        replies[0].send(b"data: first\n\n")
        assert await reply.content.readline() == b"data: first\n"
    # the client has gone: the lease stays while the child's session is not done
    await asyncio.sleep(0.05)
    assert rig.manager.models()[0].state.in_flight == 1
    lookups["done"] = True
    for _ in range(200):
        if rig.manager.models()[0].state.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert rig.manager.models()[0].state.in_flight == 0


async def test_a_request_whose_client_left_during_the_load_is_sent_once_loaded(rig: Rig) -> None:
    request = asyncio.ensure_future(rig.http.post("/v1/chat/completions", json={"model": "b", "messages": []},
                                                  headers={"X-Conversation-Id": "c4"}))
    child = await rig.fleet.child("b")
    await settle()
    request.cancel()  # the client goes away while the model loads
    await asyncio.gather(request, return_exceptions=True)
    child.handler = echo
    child.become_ready()
    for _ in range(200):
        if child.received:
            break
        await asyncio.sleep(0.01)
    assert child.received[0][:2] == ("POST", "/v1/chat/completions")
    assert child.received[0][2]["X-Conversation-Id"] == "c4"


async def test_vertex_predictions_reach_the_models_unstreamed(rig: Rig) -> None:
    child = await rig.loaded("a")
    seen: list[Any] = []

    def answer(c: FakeChild, method: str, path: str, body: Any) -> FakeReply:
        seen.append(json.loads(body))
        return FakeReply(c, body=json.dumps({"path": path}).encode())

    child.handler = answer
    instances = [{"@requestFormat": "chatCompletions", "model": "a", "stream": True, "messages": []},
                 {"@requestFormat": "/tokenize", "model": "a", "content": "hi"},
                 {"@requestFormat": "health"}, {"@requestFormat": "nope"}, {"model": "a"}, 5,
                 {"@requestFormat": "completions", "model": "missing"}]
    async with rig.http.post("/predict", json={"instances": instances}) as reply:
        assert reply.status == 200
        predictions = (await reply.json())["predictions"]
    assert predictions[:3] == [{"path": "/v1/chat/completions"}, {"path": "/tokenize"}, {"status": "ok"}]
    assert [p["error"]["message"].split(":")[0] for p in predictions[3:]] == [
        "no handler registered for @requestFormat", "each instance must include a string @requestFormat",
        "each instance must be a JSON object", "model 'missing' not found"]
    assert seen[0]["stream"] is False and "@requestFormat" not in seen[0]
    for body in (b"[]", b'{"instances": {}}', json.dumps({"instances": [{}] * 129}).encode()):
        async with rig.http.post("/predict", data=body) as reply:
            assert reply.status == 400


# --- activity records of the requests that have no record of their own route ------------------------------------

async def records(rig: Rig, wanted: Any = lambda data: True) -> dict[str, Any]:
    """GET /activity once `wanted` holds of it (polled: the background tasks end their records on their own)."""
    for _ in range(300):
        async with rig.http.get("/activity") as reply:
            data = await reply.json()
        if wanted(data):
            return data  # type: ignore[no-any-return]
        await asyncio.sleep(0.01)
    raise AssertionError(f"activity never became as wanted: {data}")


USAGE = b'{"usage": {"prompt_tokens": 7, "completion_tokens": 3}}'


async def test_each_vertex_instance_for_a_model_has_its_record_and_an_admin_cancels_one_alone(rig: Rig) -> None:
    child = await rig.loaded("a")
    hung: list[FakeReply] = []

    def answer(c: FakeChild, method: str, path: str, body: Any) -> FakeReply:
        if path == "/tokenize":  # never answers: the one an admin cancels
            hung.append(FakeReply(c))
            return hung[-1]
        return FakeReply(c, body=USAGE)

    child.handler = answer
    instances = [{"@requestFormat": "chatCompletions", "model": "a", "messages": []},
                 {"@requestFormat": "/tokenize", "model": "a", "content": "hi"},
                 {"@requestFormat": "health"}, {"@requestFormat": "nope"}, {"@requestFormat": "completions"}]
    predict = asyncio.ensure_future(rig.http.post("/predict", json={"instances": instances}))
    waiting = await records(rig, lambda data: any(r["route"] == "/tokenize" and r["state"] == "running"
                                                  for r in data["in_flight"]))
    (tokenize,) = [r for r in waiting["in_flight"] if r["route"] == "/tokenize"]
    async with rig.http.post(f"/activity/{tokenize['id']}/cancel") as reply:
        assert reply.status == 200
    async with await predict as reply:
        assert reply.status == 200
        predictions = (await reply.json())["predictions"]
    assert predictions[0] == {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    assert predictions[1]["error"]["message"] == f"request {tokenize['id']} was cancelled by an admin " \
                                                 f"(POST /activity/{tokenize['id']}/cancel)"
    assert predictions[2] == {"status": "ok"}
    done = {r["route"]: r for r in (await records(rig))["data"]}
    assert set(done) == {"/v1/chat/completions", "/tokenize", "/v1/completions"}  # not health, not the bad one
    chat = done["/v1/chat/completions"]
    assert (chat["model"], chat["status"], chat["tokens_in"], chat["tokens_out"]) == ("a", 200, 7, 3)
    assert done["/tokenize"]["status"] == 499 and "cancelled by an admin" in done["/tokenize"]["error"]
    assert done["/v1/completions"]["status"] == 400 and "model name is missing" in done["/v1/completions"]["error"]


async def test_a_request_sent_after_its_client_left_has_its_own_record(rig: Rig) -> None:
    request = asyncio.ensure_future(rig.http.post("/v1/chat/completions", json={"model": "b", "messages": []},
                                                  headers={"X-Conversation-Id": "c5"}))
    child = await rig.fleet.child("b")
    await records(rig, lambda data: any(r["state"] == "queued" for r in data["in_flight"]))
    request.cancel()  # the client goes away while the model loads
    await asyncio.gather(request, return_exceptions=True)
    child.handler = lambda c, method, path, body: FakeReply(c, body=USAGE)
    queued = await records(rig, lambda data: len(data["in_flight"]) == 1 and len(data["data"]) == 1)
    assert queued["data"][0]["error"] == "the client went away"
    assert queued["in_flight"][0]["state"] == "queued" and queued["in_flight"][0]["model"] == "b"
    child.become_ready()
    (detached, left) = (await records(rig, lambda data: len(data["data"]) == 2))["data"]
    assert left["error"] == "the client went away"
    assert (detached["route"], detached["model"], detached["status"], detached["tokens_out"]) == (
        "/v1/chat/completions", "b", 200, 3)
    assert detached["client"] == left["client"] and detached["error"] is None


async def test_an_admin_cancel_of_a_generation_without_its_client_stops_its_session(rig: Rig) -> None:
    child = await rig.loaded("a")
    streamed: list[FakeReply] = []

    def handle(c: FakeChild, method: str, path: str, body: Any) -> FakeReply:
        if path == "/v1/streams/lookup":  # never done until stopped
            return FakeReply(c, body=json.dumps([{"conversation_id": "c6", "is_done": False}]).encode())
        if path == "/v1/stream":
            return FakeReply(c, status=204, body=b"")
        streamed.append(FakeReply(c, headers={"Content-Type": "text/event-stream"}))
        return streamed[-1]

    child.handler = handle
    asked = sends_before_answering(child)
    async with rig.http.post("/v1/chat/completions", json={"model": "a", "stream": True, "messages": []},
                             headers={"X-Conversation-Id": "c6"}) as reply:
        streamed[0].send(b"data: first\n\n")
        assert await reply.content.readline() == b"data: first\n"
    held = await records(rig, lambda data: len(data["in_flight"]) == 1 and data["data"])
    (record,) = held["in_flight"]
    assert (record["route"], record["model"], record["state"]) == ("/v1/chat/completions", "a", "running")
    assert rig.manager.models()[0].state.in_flight == 1
    async with rig.http.post(f"/activity/{record['id']}/cancel") as reply:
        assert reply.status == 200
    ended = await records(rig, lambda data: not data["in_flight"])
    assert ended["data"][0]["status"] == 499 and ended["data"][0]["id"] == record["id"]
    assert ("DELETE", "/v1/stream", {"conv_id": "c6"}) in asked  # the child's session is stopped
    assert rig.manager.models()[0].state.in_flight == 0


# --- end to end, SmolLM2 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(start_module_router: Any, tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path],
         llama_server: Path) -> Router:
    models = tmp_path_factory.mktemp("routes-models")
    (models / "smol.gguf").symlink_to(demo_models[SMOLLM2])
    router: Router = start_module_router("--models-dir", str(models), "-c", "2048")
    return router


def test_a_conversations_stream_is_replayed_byte_for_byte_from_its_child(smol: Router) -> None:
    chat = {"model": "smol", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    original = smol.client.post("/v1/chat/completions", json=chat, headers={"X-Conversation-Id": "e2e::smol"})
    assert original.status_code == 200 and original.text.endswith("data: [DONE]\n\n")
    # The replay first: it streams until the child's session is done, which the child marks a moment after
    # writing [DONE] (a lookup straight after the answer once found is_done false in make test).
    replay = smol.client.get("/v1/stream", params={"conv_id": "e2e::smol", "from": "0"})
    assert replay.status_code == 200 and replay.content == original.content
    assert replay.headers["Content-Type"].startswith("text/event-stream")
    (found,) = smol.client.post("/v1/streams/lookup", json={"conversation_ids": ["e2e::smol", "e2e"]}).json()
    assert found["conversation_id"] == "e2e::smol" and found["is_done"] is True
    assert found["total_bytes"] == len(original.content)
    bad = smol.client.get("/v1/stream", params={"conv_id": "e2e::smol", "from": "abc"})
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "Invalid 'from' offset"  # the child's own
    assert smol.client.delete("/v1/stream", params={"conv_id": "e2e::smol"}).status_code == 204
    assert smol.client.post("/v1/streams/lookup", json={"conversation_ids": ["e2e::smol"]}).json() == []


def test_transcription_control_and_decisions_get_the_childs_own_answers(smol: Router) -> None:
    smol.wait_status("smol", Status.LOADED.value)
    audio = smol.client.post("/v1/audio/transcriptions", data={"model": "smol"},
                             files={"file": ("a.wav", b"RIFF" + b"\0" * 100_000, "audio/wav")})
    assert audio.status_code == 501 and "does not support audio input" in audio.json()["error"]["message"]
    control = smol.client.post("/v1/chat/completions/control", json={"model": "smol"})
    assert control.status_code == 400 and control.json()["error"]["message"] == "missing completion id"
    decision = smol.client.post("/v1/systemone", json={"model": "smol"})
    assert decision.status_code == 501 and "not a decision model" in decision.json()["error"]["message"]
    counted = smol.client.post("/chat/completions/input_tokens", json={"model": "smol", "messages": [
        {"role": "user", "content": "hi"}]})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
