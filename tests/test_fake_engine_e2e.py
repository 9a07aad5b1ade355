"""Timing-sensitive scheduling through the whole stack (CLI, HTTP, manager, children), using a small fake
engine plugged in with the preset key `cmd`, so timings are deterministic. The same behaviours are also
tested with the real llama-server in test_real_engine_e2e.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Router, fake_cmd


def write_preset(tmp_path: Path, models: dict[str, str], extra: str = "") -> Path:
    preset = tmp_path / "fleet.ini"
    body = "".join(f"[{name}]\ncmd = {cmd}\nstop-timeout = 2\n{extra}\n" for name, cmd in models.items())
    preset.write_text(body)
    return preset


def chat(model: str, delay: float = 0.0, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "fake_delay": delay, "stream": stream}


@pytest.fixture
def fleet(tmp_path: Path, start_router: Any) -> Any:
    def start(*args: str, names: tuple[str, ...] = ("a", "b", "c"), load_delay: float = 0.0) -> Router:
        preset = write_preset(tmp_path, {n: fake_cmd(n, load_delay) for n in names})
        router: Router = start_router("--models-preset", str(preset), *args)
        return router
    return start


async def post(url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await client.post("/v1/chat/completions", json=body, **kwargs)


def test_concurrent_requests_for_one_model_share_one_load(fleet: Any) -> None:
    router = fleet(load_delay=0.5)

    async def burst() -> list[httpx.Response]:
        return await asyncio.gather(*(post(router.url, chat("a")) for _ in range(6)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 6
    assert len({r.json()["pid"] for r in responses}) == 1
    assert len(router.children()) == 1


def test_busy_model_is_not_evicted_and_waiting_request_follows(fleet: Any) -> None:
    router = fleet("--models-max", "1")

    async def scenario() -> tuple[httpx.Response, httpx.Response, float, float]:
        started = time.monotonic()
        busy = asyncio.create_task(post(router.url, chat("a", delay=2.0)))
        await asyncio.sleep(0.5)  # a is loaded and busy
        other = await post(router.url, chat("b"))
        b_done = time.monotonic() - started
        first = await busy
        return first, other, b_done, time.monotonic() - started

    first, other, b_done, _ = asyncio.run(scenario())
    assert first.status_code == 200 and first.json()["served_by"] == "a"
    assert other.status_code == 200 and other.json()["served_by"] == "b"
    assert b_done >= 2.0  # b had to wait for a's request to finish: a was never killed under it
    assert router.status("a") == "unloaded" and router.status("b") == "loaded"


def test_load_failure_quotes_the_cause_and_the_next_request_retries(tmp_path: Path, start_router: Any) -> None:
    preset = write_preset(tmp_path, {"broken": fake_cmd("broken", fail=True)})
    router = start_router("--models-preset", str(preset))
    response = router.client.post("/v1/chat/completions", json=chat("broken"))
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "exited with code 3" in error["message"] and "asked to fail" in error["message"]
    entry = router.client.get("/models").json()["data"][0]
    assert entry["status"]["value"] == "failed" and entry["status"]["failed"] is True
    assert entry["status"]["exit_code"] == 3
    again = router.client.post("/v1/chat/completions", json=chat("broken"))
    assert again.status_code == 500  # a new load was tried, and failed again, with the same clear error


def test_queue_limit_answers_503_with_retry_after(fleet: Any) -> None:
    router = fleet("--max-queue", "1", load_delay=1.0)

    async def scenario() -> list[httpx.Response]:
        first = asyncio.create_task(post(router.url, chat("a")))
        await asyncio.sleep(0.3)
        second = await post(router.url, chat("a"))
        return [await first, second]

    first, second = asyncio.run(scenario())
    assert first.status_code == 200
    assert second.status_code == 503 and second.headers["Retry-After"] == "1"
    assert second.json()["error"]["code"] == "queue_full"


def test_client_that_gives_up_while_queued_leaves_the_queue(fleet: Any) -> None:
    router = fleet("--models-max", "1")

    async def scenario() -> httpx.Response:
        busy = asyncio.create_task(post(router.url, chat("a", delay=1.5)))
        await asyncio.sleep(0.3)
        with pytest.raises(httpx.TimeoutException):
            await post(router.url, chat("b"), timeout=0.3)  # gives up while waiting for a
        await busy
        return await post(router.url, chat("a"))

    response = asyncio.run(scenario())
    assert response.status_code == 200
    time.sleep(0.2)
    assert router.status("b") == "unloaded"  # the abandoned request did not evict a or load b
    assert router.status("a") == "loaded"


def test_models_load_waits_in_the_queue_instead_of_failing(fleet: Any) -> None:
    router = fleet("--models-max", "1")

    async def scenario() -> None:
        busy = asyncio.create_task(post(router.url, chat("a", delay=1.0)))
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=router.url) as client:
            response = await client.post("/models/load", json={"model": "b"})
        assert response.status_code == 200 and response.json() == {"success": True}
        assert (await busy).status_code == 200

    asyncio.run(scenario())
    router.wait_status("b", "loaded", timeout=10)
    assert router.status("a") == "unloaded"


def test_autoload_off(fleet: Any) -> None:
    router = fleet("--no-models-autoload")
    refused = router.client.post("/v1/chat/completions", json=chat("a"))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_loaded"
    assert router.client.post("/v1/chat/completions?autoload=true", json=chat("a")).status_code == 200
    assert router.client.post("/v1/chat/completions", json=chat("a")).status_code == 200  # a is loaded now
    assert router.client.post("/models/load", json={"model": "b"}).json() == {"success": True}
    router.wait_status("b", "loaded", timeout=10)


def test_sse_reports_every_status_change_with_one_event_name(fleet: Any) -> None:
    router = fleet("--models-max", "1")
    events: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=router.url, timeout=30) as client, \
                client.stream("GET", "/models/sse") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            await post(router.url, chat("a"))
            await post(router.url, chat("b"))
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                if [e["data"]["status"] for e in events if e["model"] == "b"][-1:] == ["loaded"]:
                    break

    asyncio.run(scenario())
    assert {e["event"] for e in events} == {"status_change"}
    a_states = [e["data"]["status"] for e in events if e["model"] == "a"]
    assert a_states == ["loading", "loaded", "stopping", "unloaded"]
    assert [e["data"]["status"] for e in events if e["model"] == "b"] == ["loading", "loaded"]


async def in_flight_on_loaded(client: httpx.AsyncClient, model: str) -> None:
    """Until a request is in flight on the loaded model (an unload before that would cancel its load)."""
    for _ in range(1000):
        entry = next(m for m in (await client.get("/models")).json()["data"] if m["id"] == model)
        if entry["in_flight"] == 1 and entry["status"]["value"] == "loaded":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no request in flight on {model}")


def test_unload_drains_then_stops(fleet: Any) -> None:
    router = fleet()

    async def scenario() -> None:
        busy = asyncio.create_task(post(router.url, chat("a", delay=1.0)))
        async with httpx.AsyncClient(base_url=router.url) as client:
            await in_flight_on_loaded(client, "a")
            response = await client.post("/models/unload", json={"model": "a"})
            assert response.json() == {"success": True}
        assert (await busy).status_code == 200  # the in-flight request finished

    asyncio.run(scenario())
    router.wait_status("a", "unloaded", timeout=10)
    assert router.children() == []
    not_running = router.client.post("/models/unload", json={"model": "a"})
    assert not_running.status_code == 400 and "not running" in not_running.json()["error"]["message"]
    unknown = router.client.post("/models/unload", json={"model": "zz"})
    assert unknown.status_code == 404


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


def test_load_on_startup(tmp_path: Path, start_router: Any) -> None:
    preset = tmp_path / "fleet.ini"
    preset.write_text(f"[early]\ncmd = {fake_cmd('early')}\nload-on-startup = true\n[late]\ncmd = {fake_cmd('late')}\n")
    router: Router = start_router("--models-preset", str(preset))
    router.wait_status("early", "loaded", timeout=10)
    assert router.status("late") == "unloaded"


def test_unload_while_loading_cancels_the_load_and_fails_its_waiters(fleet: Any) -> None:
    router = fleet(load_delay=1.5)

    async def scenario() -> httpx.Response:
        waiting = asyncio.create_task(post(router.url, chat("a")))
        await asyncio.sleep(0.4)
        async with httpx.AsyncClient(base_url=router.url) as client:
            assert (await client.post("/models/unload", json={"model": "a"})).json() == {"success": True}
        return await waiting

    response = asyncio.run(scenario())
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unloaded"
    router.wait_status("a", "unloaded", timeout=5)
    time.sleep(0.3)
    assert router.status("a") == "unloaded" and router.children() == []


def test_a_busy_model_shows_stopping_as_soon_as_it_is_unloaded(fleet: Any) -> None:
    router = fleet()

    async def scenario() -> None:
        busy = asyncio.create_task(post(router.url, chat("a", delay=1.0)))
        async with httpx.AsyncClient(base_url=router.url) as client:
            await in_flight_on_loaded(client, "a")
            await client.post("/models/unload", json={"model": "a"})
            entry = (await client.get("/models")).json()["data"][0]
            assert entry["status"]["value"] == "stopping" and entry["in_flight"] == 1
        assert (await busy).status_code == 200

    asyncio.run(scenario())
    router.wait_status("a", "unloaded", timeout=5)


def test_streamed_answers_carry_cors_headers(fleet: Any) -> None:
    router = fleet()
    origin = {"Origin": "http://localhost:5173"}
    with router.client.stream("POST", "/v1/chat/completions", json=chat("a", stream=True), headers=origin) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["access-control-allow-origin"] == "http://localhost:5173"
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
