"""`--api-prefix` (api/app.py), as router mode b11434 serves it: every route under the prefix, nothing outside
it. The prefix's values by table; in-process, the same requests to an app with the prefix and to one without
get the same answers (OpenAI, Ollama, management, dashboard, Vertex AI, errors, keys and scopes, CORS), the
children get the path without it, and redirects keep it; once through a real `modelyard serve`, whose child
is started without it and answers a chat under it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient

from modelyard.api.app import parse_api_prefix, strip_prefix
from modelyard.api.auth import ApiKey, Scope
from modelyard.api.context import ServerSettings
from modelyard.config.catalog import Sources, build_catalog, parse_engine_args
from modelyard.config.options import OptionTable, parse_help
from modelyard.config.presets import ConfigError
from modelyard.demo import SMOLLM2
from modelyard.engine.command import Engine, launch_plan
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from modelyard.scheduler import Limits
from tests.fakes import FakeChild, FakeClock, FakeFleet, FakeReply, StaticSource, app_client, catalog, settle

PREFIX = "/llm"
HELP = Path(__file__).parent / "data" / "llama-server-b11434-help.txt"


@pytest.mark.parametrize("value, served", [("", ""), ("/llm", "/llm"), ("/api/v2", "/api/v2"),
                                           ("/a.b_c~d-e", "/a.b_c~d-e")])
def test_a_prefix_is_taken_as_written(value: str, served: str) -> None:
    assert parse_api_prefix(value) == served


@pytest.mark.parametrize("value, says", [
    ("llm", "start it with a slash: --api-prefix /llm"),
    ("/llm/", "without the trailing slash: --api-prefix /llm"),
    ("/", "leave it out"), ("//", "leave it out"),
    ("/a//b", "path segments"), ("/a/../b", "path segments"), ("/l m", "path segments"), ("/llm?x=1", "path segments"),
    ("/caf\u00e9", "path segments"),
])
def test_a_bad_prefix_says_how_to_write_it(value: str, says: str) -> None:
    with pytest.raises(ConfigError, match="is not a path prefix") as error:
        parse_api_prefix(value)
    assert says in str(error.value)


@pytest.mark.parametrize("raw_path, served", [
    ("/llm/v1/models", "/v1/models"), ("/llm/", "/"), ("/llm//api/tags", "//api/tags"),
    ("/llm/v1/models/org%2Frepo", "/v1/models/org%2Frepo"),  # still encoded: the routes decode it once
    ("/llm", None), ("/llmx/health", None), ("/health", None), ("/", None),
])
def test_the_prefix_is_stripped_from_the_path_as_sent(raw_path: str, served: str | None) -> None:
    assert strip_prefix(PREFIX, raw_path) == served


def test_children_never_get_the_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Router mode gives its children --api-prefix and forwards the full path; modelyard's children are reached
    only through modelyard, with the path without it: from the environment, a preset or engine args alike."""
    table = OptionTable(parse_help(HELP.read_text()))
    monkeypatch.setenv("LLAMA_ARG_API_PREFIX", PREFIX)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    preset = tmp_path / "models.ini"
    preset.write_text(f"[*]\napi-prefix = /x\n[m]\nmodel = {gguf}\napi-prefix = /y\n")
    config = build_catalog(Sources(table, preset_path=preset)).models["m"]
    assert "--api-prefix" not in config.settings
    plan = launch_plan(config, Engine(Path("/bin/llama-server"), table), 5555)
    assert "--api-prefix" not in plan.argv and "LLAMA_ARG_API_PREFIX" not in plan.env
    with pytest.raises(ConfigError, match="'--api-prefix' cannot be a per-model default"):
        parse_engine_args(("--api-prefix", PREFIX), table)


# --- in-process: the same requests with and without the prefix ------------------------------------------------

@dataclass
class Pair:
    manager: ModelManager
    plain: TestClient[Any, Any]
    prefixed: TestClient[Any, Any]
    paths: list[str]  # what the child was asked


@pytest.fixture
async def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pair]:
    monkeypatch.setenv("AIP_MODE", "PREDICTION")  # the Vertex AI routes too, prefixed as router mode does
    clock = FakeClock()
    fleet = FakeFleet(clock)
    source = StaticSource(catalog("a", "b"))
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                           limits=Limits(max_models=2), clock=clock, gguf_cache=GgufCache(tmp_path),
                           child_factory=fleet)
    await manager.start()
    task = asyncio.ensure_future(manager.acquire("a"))
    child = await fleet.child("a")
    child.become_ready()
    manager.release(await task)
    await settle()
    paths: list[str] = []

    def answer(c: FakeChild, method: str, path: str, body: Any) -> FakeReply:
        paths.append(path)
        return FakeReply(c, body=json.dumps({"path": path}).encode())

    child.handler = answer
    settings = ServerSettings()  # one start time: both listings say the same `created`
    plain = await app_client(manager, settings)
    prefixed = await app_client(manager, replace(settings, api_prefix=PREFIX))
    yield Pair(manager, plain, prefixed, paths)
    await plain.close()
    await prefixed.close()
    await manager.close()


@dataclass(frozen=True)
class Ask:
    method: str
    path: str
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    same_body: bool = True  # else status and media type only (counters, times)


HTML = (("Accept", "text/html"),)
CASES = [
    Ask("GET", "/health"), Ask("GET", "/v1/health"), Ask("GET", "/v1/models"), Ask("GET", "/models"),
    Ask("GET", "/props"), Ask("GET", "/v1/models/a"), Ask("GET", "/v1/models/"), Ask("GET", "//models"),
    Ask("GET", "/models?reload=1"),
    Ask("POST", "/v1/chat/completions", {"model": "a", "messages": []}),
    Ask("POST", "/v1/chat/completions", {"messages": []}), Ask("POST", "/v1/chat/completions", "{bad"),
    Ask("POST", "/completion", {"model": "nope"}), Ask("POST", "/slots/0?action=save", {"model": "a"}),
    Ask("GET", "/slots?model=a"), Ask("GET", "/slots/?model=a"), Ask("GET", "/metrics?model=a"),
    Ask("GET", "/metrics", same_body=False),
    Ask("POST", "/models/load", {"model": "nope"}), Ask("POST", "/models/load", {}),
    Ask("GET", "/api/tags", same_body=False), Ask("GET", "/api/version"), Ask("GET", "//api/tags", same_body=False),
    Ask("POST", "/api/show", {"model": "nope"}), Ask("GET", "/"), Ask("GET", "/", headers=HTML),
    Ask("GET", "/ui/app.js"), Ask("GET", "/ui/style.css"), Ask("GET", "/ui/nope.js"), Ask("GET", "/sw.js"),
    Ask("GET", "/activity", same_body=False), Ask("GET", "/decisions", same_body=False),
    Ask("GET", "/v1/stream?conv_id=never"), Ask("POST", "/tools"),
    Ask("POST", "/predict", {"instances": [{"@requestFormat": "chatCompletions", "model": "a"},
                                           {"@requestFormat": "health"}]}),
    Ask("OPTIONS", "/v1/models", headers=(("Origin", "http://localhost:3000"),
                                          ("Access-Control-Request-Method", "POST"))),
    Ask("GET", "/v1/models", headers=(("Origin", "https://evil.example"),)),
    Ask("GET", "/nope", same_body=False), Ask("DELETE", "/health", same_body=False),
]


def url(client: TestClient[Any, Any], path: str) -> str:
    """A whole URL: the test client takes `//models` for a URL of host `models`."""
    return str(client.make_url("/"))[:-1] + path


async def ask(client: TestClient[Any, Any], case: Ask, prefix: str = "") -> tuple[int, str, Any, Any]:
    data = case.body if isinstance(case.body, str) else None
    payload = None if isinstance(case.body, str) else case.body
    async with client.session.request(case.method, url(client, prefix + case.path), json=payload, data=data,
                                      headers=dict(case.headers), allow_redirects=False) as reply:
        body = await reply.read()
        kept = {k: reply.headers.get(k) for k in ("Access-Control-Allow-Origin", "Cache-Control",
                                                   "Content-Security-Policy")}
        return reply.status, reply.content_type, body, kept


async def test_every_route_answers_the_same_under_the_prefix(pair: Pair) -> None:
    for case in CASES:
        plain, prefixed = await ask(pair.plain, case), await ask(pair.prefixed, case, PREFIX)
        assert prefixed[:2] == plain[:2], case
        assert prefixed[3] == plain[3], case
        if case.same_body:
            assert prefixed[2] == plain[2], case
    # the child was asked the same paths, without the prefix, by both
    assert pair.paths[0::2] == pair.paths[1::2]
    assert pair.paths[0::2] == ["/v1/chat/completions", "/slots/0", "/slots", "/slots", "/metrics",
                                "/v1/chat/completions"]  # the tolerant path keeps its query


async def test_errors_name_the_path_as_the_client_wrote_it(pair: Pair) -> None:
    async with pair.prefixed.get(PREFIX + "/nope") as reply:
        assert reply.status == 404
        assert (await reply.json())["error"]["message"] == f"unknown endpoint GET {PREFIX}/nope"
    async with pair.prefixed.delete(PREFIX + "/health") as reply:
        assert reply.status == 405 and f"DELETE is not allowed on {PREFIX}/health" in await reply.text()


@pytest.mark.parametrize("path, hint", [("/health", "/llm/health"), ("/v1/chat/completions",
                                                                     "/llm/v1/chat/completions"),
                                        ("/llm", "/llm/"), ("/api/tags", "/llm/api/tags"), ("/", "/llm/")])
async def test_outside_the_prefix_everything_is_404_with_the_way_in(pair: Pair, path: str, hint: str) -> None:
    for method in ("GET", "POST"):
        async with pair.prefixed.request(method, path) as reply:
            assert reply.status == 404
            message = (await reply.json())["error"]["message"]
        assert message == f"unknown endpoint {method} {path}: this server serves under --api-prefix /llm; try {hint}"
    assert pair.paths == []


async def test_preflights_and_refused_origins_outside_the_prefix_are_answered_as_anywhere(pair: Pair) -> None:
    """Router mode answers a preflight before routing, on any path."""
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"}
    async with pair.plain.options("/health", headers=preflight) as plain, \
            pair.prefixed.options("/health", headers=preflight) as prefixed:
        assert prefixed.status == plain.status
        assert prefixed.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    async with pair.prefixed.get("/health", headers={"Origin": "https://evil.example"}) as reply:
        assert reply.status == 403


async def test_redirects_and_the_dashboard_keep_the_prefix(pair: Pair) -> None:
    async with pair.prefixed.get(PREFIX + "/", headers=dict(HTML), allow_redirects=False) as reply:
        assert reply.status == 302 and reply.headers["Location"] == f"{PREFIX}/ui"
    async with pair.plain.get("/ui") as plain, pair.prefixed.get(PREFIX + "/ui") as prefixed:
        page, ours = await plain.text(), await prefixed.text()
    assert 'src="/ui/app.js"' in page and 'href="/ui/style.css"' in page
    assert ours == page.replace('="/ui/', f'="{PREFIX}/ui/')


@pytest.mark.parametrize("path, first", [("/activity/sse", b"event: request"), ("/models/sse", b"data: ")])
async def test_event_streams_are_served_under_the_prefix(pair: Pair, path: str, first: bytes) -> None:
    async with pair.prefixed.get(PREFIX + path) as reply:
        assert reply.status == 200 and reply.content_type == "text/event-stream"
        # something to tell: a model request, then an unload
        async with pair.prefixed.post(PREFIX + "/v1/chat/completions", json={"model": "a"}) as chat:
            assert chat.status == 200
        pair.manager.unload("a")
        assert (await asyncio.wait_for(reply.content.readline(), 10)).startswith(first)


async def test_keys_and_scopes_are_decided_on_the_path_without_the_prefix(pair: Pair) -> None:
    """api/auth.py's table keys on the routes' paths. (Router mode compares its public list, `/health` and the
    UI's files, with the full path, so under a prefix its health check needs the key: an oversight not copied.)"""
    keys = (ApiKey("admin-key"), ApiKey("chat-key", frozenset({Scope.INFERENCE}), label="chat"))
    client = await app_client(pair.manager, ServerSettings(api_keys=keys, api_prefix=PREFIX))
    try:
        cases: list[tuple[str, str, dict[str, str], int]] = [
            ("GET", "/health", {}, 200), ("GET", "/ui", {}, 200), ("GET", "/", {}, 200),
            ("GET", "/v1/models", {}, 401), ("GET", "/v1/models", {"Authorization": "Bearer admin-key"}, 200),
            ("POST", "/models/load", {"Authorization": "Bearer chat-key"}, 403),
            ("POST", "//models/load", {"Authorization": "Bearer chat-key"}, 403),  # no walk around the scope
        ]
        for method, path, headers, status in cases:
            async with client.session.request(method, url(client, PREFIX + path), headers=headers,
                                              json={"model": "a"}) as reply:
                assert reply.status == status, (method, path)
                if status == 403:
                    assert "lacks the 'admin' scope needed for POST /models/load" in await reply.text()
    finally:
        await client.close()


# --- a real `modelyard serve --api-prefix` --------------------------------------------------------------------

def test_a_real_router_serves_under_the_prefix_and_its_child_without(start_router: Callable[..., Any],
                                                                    tmp_path: Path, demo_models: dict[str, Path],
                                                                    llama_server: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "smol.gguf").symlink_to(demo_models[SMOLLM2])
    router = start_router("--models-dir", str(models), "-c", "2048", "--api-prefix", PREFIX, wait=False)
    router.client.close()
    router.client = httpx.Client(base_url=router.url + PREFIX, timeout=120)
    router.wait_ready()  # polls {prefix}/health
    chat = router.client.post("/v1/chat/completions", json={"model": "smol", "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert [m["id"] for m in router.client.get("/v1/models").json()["data"]] == ["smol"]
    outside = httpx.get(router.url + "/v1/models")
    assert outside.status_code == 404 and "try /llm/v1/models" in outside.json()["error"]["message"]
    (pid,) = router.children()
    assert b"--api-prefix" not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
