"""The router's Prometheus metrics (issue 10 point 4): the classification of status changes as a table, the
counters and scrape-time gauges in-process over fake children (parsed with prometheus_client's own parser),
a key limited to some models, and one real-engine module that scrapes after real traffic."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from modelyard.api.app import build_app
from modelyard.api.auth import ApiKey, Scope
from modelyard.api.context import AppContext, ServerSettings
from modelyard.config.options import OptionTable
from modelyard.engine.command import Engine
from modelyard.manager import Decision, ModelManager
from modelyard.memory import GgufCache
from modelyard.metrics import Counted, classify
from modelyard.scheduler import DecisionKind, Limits
from tests.conftest import Router
from tests.fakes import FakeChild, FakeClock, FakeFleet, FakeReply, StaticSource, catalog, settle

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def _decision(kind: DecisionKind, cause: str) -> Decision:
    return Decision(0.0, kind, cause, "m", "because")


@pytest.mark.parametrize(("decision", "counted"), [
    (_decision(DecisionKind.LOAD, "request"), Counted("load")),
    (_decision(DecisionKind.EVICT, "lru"), Counted("eviction", "lru")),
    (_decision(DecisionKind.EVICT, "max_wait"), Counted("eviction", "max_wait")),
    (_decision(DecisionKind.EXPIRE, "keep_alive"), Counted("eviction", "keep_alive")),
    (_decision(DecisionKind.FAIL, "load"), Counted("load_failure", "load")),
    (_decision(DecisionKind.FAIL, "exit"), Counted("load_failure", "exit")),
    (_decision(DecisionKind.KILL, "load_timeout"), Counted("load_failure", "load_timeout")),
    (_decision(DecisionKind.KILL, "watchdog"), Counted("load_failure", "watchdog")),
    (_decision(DecisionKind.UNLOAD, "request"), None),
    (_decision(DecisionKind.DRAIN, "shutdown"), None),
    (_decision(DecisionKind.REJECT, "queue_full"), None),
])
def test_classify(decision: Decision, counted: Counted | None) -> None:
    assert classify(decision) == counted


# --- in-process ----------------------------------------------------------------------------------------------

USAGE = b'{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":4},"timings":{"predicted_n":4}}'


def _answer(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
    return FakeReply(child, body=USAGE)


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], FakeFleet, FakeClock]]:
    clock = FakeClock()
    fleet = FakeFleet(clock)

    def prepare(child: FakeChild) -> None:
        child.handler = _answer
        asyncio.get_running_loop().call_soon(child.become_ready)

    fleet.prepare = prepare
    source = StaticSource(catalog("a", "b"))
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                           limits=Limits(max_models=1, load_timeout=600.0, max_wait=1000.0, memory_budget=2**30),
                           clock=clock, gguf_cache=GgufCache(tmp_path), child_factory=fleet)
    keys = (ApiKey("root"), ApiKey("b-reader", frozenset({Scope.READ}), ("b",)))
    app = build_app(AppContext(manager, ServerSettings(api_keys=keys)))
    async with TestClient(TestServer(app)) as client:  # startup runs: the manager and the status feed
        yield client, fleet, clock


ROOT = {"Authorization": "Bearer root"}


async def _scrape(client: TestClient[Any, Any], headers: dict[str, str] = ROOT) -> Samples:
    reply = await client.get("/metrics", headers=headers)
    assert reply.status == 200 and reply.content_type == "text/plain"
    return samples(await reply.text())


async def test_requests_loads_and_evictions_are_counted(http: tuple[TestClient[Any, Any], FakeFleet,
                                                                    FakeClock]) -> None:
    client, _, _ = http
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=chat, headers=ROOT)).status == 200
    assert (await client.post("/v1/chat/completions", json={}, headers=ROOT)).status == 400
    assert (await client.post("/v1/chat/completions", json={**chat, "model": "b"}, headers=ROOT)).status == 200
    await settle()
    found = await _scrape(client)
    assert value(found, "modelyard_requests_total", model="a", route="/v1/chat/completions", status="200") == 2
    assert value(found, "modelyard_requests_total", model="", route="/v1/chat/completions", status="400") == 1
    assert value(found, "modelyard_tokens_total", model="a", direction="in") == 20
    assert value(found, "modelyard_tokens_total", model="a", direction="out") == 8
    for histogram in ("request_duration_seconds", "queue_wait_seconds", "time_to_first_token_seconds"):
        assert value(found, f"modelyard_{histogram}_count", model="a") == 2, histogram
    assert value(found, "modelyard_loads_total", model="a") == 1
    assert value(found, "modelyard_loads_total", model="b") == 1
    assert value(found, "modelyard_load_duration_seconds_count", model="a") == 1
    assert value(found, "modelyard_evictions_total", model="a", reason="lru") == 1  # --models-max 1 made room
    assert value(found, "modelyard_model_status", model="b", status="loaded") == 1
    assert value(found, "modelyard_model_status", model="b", status="unloaded") == 0
    assert value(found, "modelyard_in_flight", model="b") == 0 and value(found, "modelyard_queued", model="a") == 0
    assert value(found, "modelyard_memory_budget_bytes", device="host") == 2**30
    assert value(found, "modelyard_memory_budget_bytes", device="gpu") is None  # no GPU budget set
    assert value(found, "modelyard_model_memory_bytes", model="b", kind="estimated", device="host") is not None
    # a key limited to `b` sees b's series only (and those of no model)
    limited = await _scrape(client, {"Authorization": "Bearer b-reader"})
    models = {dict(labels).get("model") for _, labels in limited}
    assert models == {None, "b"}


async def test_the_grafana_dashboard_uses_only_exposed_metrics(http: tuple[TestClient[Any, Any], FakeFleet,
                                                                          FakeClock]) -> None:
    client, _, _ = http
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=chat, headers=ROOT)).status == 200
    text = await (await client.get("/metrics", headers=ROOT)).text()
    exposed = {family.name + suffix for family in text_string_to_metric_families(text)
               for suffix in ("", "_total", "_bucket", "_sum", "_count")}  # counters without samples yet count
    dashboard = json.loads((Path(__file__).parent.parent / "contrib/grafana/modelyard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"modelyard_\w+", target["expr"])}
    assert used and used - exposed == set()


async def test_metrics_with_a_model_is_still_the_childs(http: tuple[TestClient[Any, Any], FakeFleet,
                                                                    FakeClock]) -> None:
    client, fleet, _ = http
    reply = await client.get("/metrics?model=a", headers=ROOT)
    assert reply.status == 200 and await reply.read() == USAGE  # the fake child's answer, passed through
    assert fleet.children["a"][0].received[-1][:2] == ("GET", "/metrics")


# --- the real engine ----------------------------------------------------------------------------------------

@pytest.fixture
def router(smol_router: Router) -> Router:
    return smol_router  # shared with test_activity (see conftest): counters are compared before and after


def test_metrics_after_real_traffic(router: Router) -> None:
    client = router.client
    before = samples(client.get("/metrics").text)  # what test_activity sent, if it ran first

    def added(name: str, **labels: str) -> float:
        return (value(found, name, **labels) or 0) - (value(before, name, **labels) or 0)

    chat = {"model": "smol", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert client.post("/v1/chat/completions", json={**chat, "stream": True}).status_code == 200
    ollama = {"model": "smol", "stream": False, "options": {"num_predict": 3}, "messages": chat["messages"]}
    assert client.post("/api/chat", json=ollama).status_code == 200
    assert client.post("/v1/chat/completions", json={**chat, "model": "nope"}).status_code == 404
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain; version=")
    found = samples(reply.text)
    assert added("modelyard_requests_total", model="smol", route="/v1/chat/completions", status="200") == 2
    assert added("modelyard_requests_total", model="smol", route="/api/chat", status="200") == 1
    assert added("modelyard_requests_total", model="nope", route="/v1/chat/completions", status="404") == 1
    assert added("modelyard_tokens_total", model="smol", direction="out") >= 3
    assert added("modelyard_tokens_total", model="smol", direction="in") > 3
    assert added("modelyard_time_to_first_token_seconds_count", model="smol") == 3
    # one load in the whole session, whichever module sent the first request
    assert value(found, "modelyard_loads_total", model="smol") == 1
    assert value(found, "modelyard_load_duration_seconds_count", model="smol") == 1
    assert value(found, "modelyard_model_status", model="smol", status="loaded") == 1
    assert (value(found, "modelyard_model_memory_bytes", model="smol", kind="measured", device="host") or 0) > 0
    assert (value(found, "modelyard_model_memory_bytes", model="smol", kind="estimated", device="host") or 0) > 0
