"""Router mode's download API and Ollama's pull/delete in-process (aiohttp's test client over a ModelManager,
the fake hub on loopback): POST /models with its /models/sse events and the model listed after, the
downloading entry and its cancel, DELETE /models, the errors of each, and /api/pull's NDJSON as Ollama's
clients read it."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from modelyard.api.context import CONTEXT
from modelyard.config.catalog import Sources
from modelyard.config.options import OptionTable, parse_help
from modelyard.engine.command import Engine
from modelyard.hub.cache import cached_files
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from modelyard.scheduler import Limits
from tests.fake_hub import COMMIT, FakeHub, running
from tests.fakes import FakeClock, FakeFleet, app_client

HELP = Path(__file__).parent / "data" / "llama-server-b11434-help.txt"
REPO = "org/tiny-GGUF"
NAME = f"{REPO}:Q4_K_M"
SIZE = 3 * 2**20 + 4321


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    tiny = tmp_path_factory.mktemp("tiny") / "tiny-Q4_K_M.gguf"
    tiny.write_bytes(b"GGUF" + os.urandom(SIZE - 4))
    hub = FakeHub()
    hub.add(REPO, "tiny-Q4_K_M.gguf", tiny)
    with running(hub):
        yield hub


@pytest.fixture
def fleet() -> FakeFleet:
    return FakeFleet(FakeClock())


@pytest.fixture
async def http(served: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               fleet: FakeFleet) -> AsyncIterator[TestClient[Any, Any]]:
    served.requests.clear()
    served.pace = 0.0
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    preset = tmp_path / "models.ini"
    preset.write_text(f"[local]\ncmd = fake ${{PORT}}\n\n[hubbed]\nhf-repo = {NAME}\n")
    table = OptionTable(parse_help(HELP.read_text()))
    source = Sources(table, preset_path=preset, hub_cache=cache)
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), table), catalog=source.load(),
                           limits=Limits(max_models=1), clock=fleet.clock, gguf_cache=GgufCache(tmp_path),
                           child_factory=fleet)
    await manager.start()
    client = await app_client(manager)
    yield client
    await client.close()
    await manager.close()


async def _events(client: TestClient[Any, Any], until: str) -> AsyncIterator[dict[str, Any]]:
    """/models/sse messages up to and including the first `until` event."""
    async with client.get("/models/sse") as stream:
        yield {}  # subscribed: the caller may act now
        async for line in stream.content:
            if line.startswith(b"data: "):
                message = json.loads(line[6:])
                yield message
                if message["event"] == until:
                    return


async def _listed(client: TestClient[Any, Any]) -> dict[str, Any]:
    reply = await client.get("/models")
    return {entry["id"]: entry for entry in (await reply.json())["data"]}


async def test_post_models_downloads_with_router_modes_events_then_lists_it(http: TestClient[Any, Any],
                                                                              tmp_path: Path) -> None:
    feed = _events(http, "download_finished")
    await anext(feed)
    reply = await http.post("/models", json={"model": NAME})
    assert reply.status == 200 and await reply.json() == {"success": True}
    seen = [message async for message in feed]
    assert seen[0] == {"model": NAME, "event": "model_status", "data": {"status": "downloading"}}
    progress = [m["data"]["progress"] for m in seen if m["event"] == "download_progress"]
    url = f"{os.environ['HF_ENDPOINT']}/{REPO}/resolve/{COMMIT}/tiny-Q4_K_M.gguf"
    assert progress and progress[-1] == {url: {"done": SIZE, "total": SIZE}}
    assert seen[-1] == {"model": NAME, "event": "download_finished"}
    entry = (await _listed(http))[NAME]
    assert entry["source"] == "cache" and entry["status"]["value"] == "unloaded"
    assert entry["path"].startswith(str(tmp_path / "hub"))
    again = await http.post("/models", json={"model": NAME})
    assert again.status == 400 and f"model '{NAME}' already exists" in (await again.json())["error"]["message"]

    feed = _events(http, "model_remove")
    await anext(feed)
    gone = await http.delete("/models", params={"model": NAME})
    assert gone.status == 200 and await gone.json() == {"success": True}
    removal = [m async for m in feed]
    assert removal[-1] == {"model": NAME, "event": "model_remove"}
    assert not any(m["event"] == "models_reload" for m in removal)  # router mode sends model_remove alone
    assert NAME not in await _listed(http) and cached_files(tmp_path / "hub") == []


async def test_a_download_in_flight_is_listed_and_unload_cancels_it(http: TestClient[Any, Any],
                                                                      served: FakeHub, tmp_path: Path) -> None:
    """Named as posted, as router mode names it (the web UI follows and cancels a download by the string it
    posted): a lower-case quant stays lower case until the cache's own `org/repo:Q4_K_M` entry replaces it."""
    served.pace = 0.5  # 3 MiB: a few seconds unless cancelled
    posted = f"{REPO}:q4_k_m"
    feed = _events(http, "download_failed")
    await anext(feed)
    assert (await http.post("/models", json={"model": posted})).status == 200
    async for message in feed:
        if message["event"] == "download_progress":
            assert message["model"] == posted
            break
    entry = (await _listed(http))[posted]
    assert entry["status"]["value"] == "downloading" and entry["source"] == "cache"
    cancel = await http.post("/models/unload", json={"model": posted})
    assert cancel.status == 200
    failed = [m async for m in feed][-1]
    assert failed["model"] == posted
    assert failed["event"] == "download_failed" and "cancelled" in failed["data"]["error"]
    assert posted not in await _listed(http) and cached_files(tmp_path / "hub") == []


@pytest.mark.parametrize(("method", "path", "body", "status", "says"), [
    ("POST", "/models", {}, 400, "model must be a non-empty string"),
    ("POST", "/models", {"model": "no-slash"}, 400, "is not a Hugging Face model: write org/repo"),
    ("POST", "/models", {"model": "org/missing"}, 404, "repository org/missing was not found"),
    ("POST", "/models", {"model": f"{REPO}:Q3_K_S"}, 404, "has no GGUF file with quant Q3_K_S; it has: Q4_K_M"),
    ("POST", "/models", {"model": "local"}, 400, "is not a Hugging Face model"),
    ("DELETE", "/models", None, 400, "model must be a non-empty string"),
    ("DELETE", "/models?model=nothing", None, 404, "model 'nothing' not found"),
    ("DELETE", "/models?model=local", None, 400, "model 'local' is not removable: modelyard removes only"),
])
async def test_bad_downloads_say_what_to_fix(http: TestClient[Any, Any], method: str, path: str,
                                             body: dict[str, Any] | None, status: int, says: str) -> None:
    reply = await http.request(method, path, json=body)
    assert reply.status == status
    error = (await reply.json())["error"]
    assert says in error["message"] and set(error) == {"message", "type", "param", "code"}


async def test_ollama_pull_streams_ndjson_as_ollamas_clients_read_it(http: TestClient[Any, Any],
                                                                     served: FakeHub) -> None:
    reply = await http.post("/api/pull", json={"model": f"hf.co/{REPO}:latest"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in (await reply.text()).splitlines()]  # no empty line: ollama-python
    assert lines[0] == {"status": "pulling manifest"}
    digest = served.repos[REPO]["tiny-Q4_K_M.gguf"].sha256
    files = lines[1:-3]
    assert files and all(line == {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                                  "total": SIZE, "completed": line["completed"]} for line in files)
    assert files[-1]["completed"] == SIZE
    assert lines[-3:] == [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                          {"status": "success"}]
    assert NAME in await _listed(http)
    again = await http.post("/api/pull", json={"name": f"{REPO}:q4_k_m", "stream": False})  # cached: at once
    assert await again.json() == {"status": "success"} and len(served.downloads()) == 1
    deleted = await http.delete("/api/delete", json={"model": f"hf.co/{NAME}"})
    assert deleted.status == 200 and await deleted.read() == b""
    missing = await http.delete("/api/delete", json={"model": f"hf.co/{NAME}"})
    assert missing.status == 404 and await missing.json() == {"error": f"model '{NAME}' not found"}


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"model": "llama3.2"}, 400, "modelyard pulls GGUF models from Hugging Face, not Ollama's library"),
    ({}, 400, 'missing "model"'),
    ({"model": "hf.co/org/missing"}, 404, "repository org/missing was not found"),
])
async def test_ollama_pull_errors(http: TestClient[Any, Any], body: dict[str, Any], status: int, says: str) -> None:
    reply = await http.post("/api/pull", json=body)
    assert reply.status == status and says in (await reply.json())["error"]


async def test_the_drain_cancels_downloads_and_takes_no_new_ones(http: TestClient[Any, Any], served: FakeHub,
                                                                 tmp_path: Path) -> None:
    served.pace = 0.5
    feed = _events(http, "download_failed")
    await anext(feed)
    assert (await http.post("/models", json={"model": NAME})).status == 200
    async for message in feed:
        if message["event"] == "download_progress":
            http.app[CONTEXT].manager.begin_drain()  # what SIGTERM does
    refused = await http.post("/models", json={"model": NAME})
    assert refused.status == 503 and "shutting down" in (await refused.json())["error"]["message"]
    partial = next((tmp_path / "hub" / "models--org--tiny-GGUF" / "blobs").iterdir())
    assert partial.name.endswith(".incomplete")  # kept: the next start's pull resumes it


async def test_a_hub_presets_first_load_downloads_it_then_starts_it_on_the_cached_file(
        http: TestClient[Any, Any], served: FakeHub, fleet: FakeFleet, tmp_path: Path) -> None:
    served.pace = 0.3
    assert (await _listed(http))["hubbed"]["path"] is None
    feed = _events(http, "download_progress")
    await anext(feed)
    assert (await http.post("/models/load", json={"model": "hubbed"})).status == 200
    _ = [message async for message in feed]
    assert (await _listed(http))["hubbed"]["status"]["value"] == "downloading"
    child = await fleet.child("hubbed")  # made once the file is whole
    assert child.plan.argv[child.plan.argv.index("--model") + 1].startswith(str(tmp_path / "hub"))
    child.become_ready()
    listed = await _listed(http)
    assert listed["hubbed"]["path"] == child.plan.argv[child.plan.argv.index("--model") + 1]
    assert listed[NAME]["source"] == "cache" and listed[NAME]["can_remove"] and not listed["hubbed"]["can_remove"]
