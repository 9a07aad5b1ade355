"""The asyncio shell in-process: a ModelManager over fake children and a fake clock, and the HTTP app over
it through aiohttp's test client. Each test replays a race or a fault (a child that dies or hangs at each
phase, a request racing a death, a drain with streams in flight, timers, reload diffs) and waits on what the
shell signals (futures, status events), never on wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from modelyard.api.app import build_app
from modelyard.api.context import AppContext, ServerSettings
from modelyard.children import ChildError, ProcessChild
from modelyard.config.catalog import Catalog
from modelyard.config.options import OptionTable
from modelyard.engine.command import CHILD_KEY_ENV, Endpoint, Engine, LaunchPlan, Readiness
from modelyard.errors import ErrorKind, ModelError
from modelyard.manager import FeedEvent, ModelManager, ModelsReloaded
from modelyard.memory import GgufCache
from modelyard.scheduler import Limits, Status
from modelyard.watchdog import Observation, WatchdogSettings, judge
from tests.fakes import FakeChild, FakeClock, FakeFleet, FakeReply, StaticSource, catalog, settle

WATCHDOG = WatchdogSettings(stall_timeout=120.0, interval=10.0, probe_timeout=5.0, failed_probes=3)


class Shell:
    def __init__(self, manager: ModelManager, fleet: FakeFleet, clock: FakeClock, source: StaticSource) -> None:
        self.manager, self.fleet, self.clock, self.source = manager, fleet, clock, source

    async def loaded(self, model: str, number: int = 1) -> FakeChild:
        """Wait for the `number`th child of `model`, make it ready, and wait until the shell has it loaded."""
        child = await self.fleet.child(model, number)
        child.become_ready()
        await settle()
        assert self.manager.status_of(model) == Status.LOADED
        return child


@pytest.fixture
async def shell(tmp_path: Path) -> AsyncIterator[Shell]:
    clock = FakeClock()
    fleet = FakeFleet(clock)
    source = StaticSource(catalog("a", "b"))
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                           limits=Limits(max_models=1, load_timeout=600.0, max_wait=1000.0), clock=clock,
                           gguf_cache=GgufCache(tmp_path), child_factory=fleet, watchdog=WATCHDOG)
    await manager.start()
    yield Shell(manager, fleet, clock, source)
    await manager.close()


@pytest.fixture
async def http(shell: Shell) -> AsyncIterator[TestClient[Any, Any]]:
    app = build_app(AppContext(shell.manager, ServerSettings()))
    app.on_startup.clear()  # the manager is already started by the `shell` fixture
    app.on_cleanup.clear()
    async with TestClient(TestServer(app)) as client:
        yield client


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


def streaming(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
    return FakeReply(child, headers={"Content-Type": "text/event-stream"})


def sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


# --- loads ---------------------------------------------------------------------------------------------------

async def test_a_request_loads_its_model_and_gets_a_lease_on_the_child(shell: Shell) -> None:
    waiter = asyncio.ensure_future(shell.manager.acquire("a"))
    child = await shell.loaded("a")
    lease = await waiter
    assert lease.child is child
    shell.manager.release(lease)


async def test_a_child_that_dies_while_loading_fails_its_waiters_with_its_last_words(shell: Shell) -> None:
    waiters = [asyncio.ensure_future(shell.manager.acquire("a")) for _ in range(3)]
    child = await shell.fleet.child("a")
    child.die(1, "error loading model: tensor 'blk.0' has wrong shape")
    for waiter in waiters:
        with pytest.raises(ModelError) as failure:
            await waiter
        assert failure.value.kind == ErrorKind.LOAD_FAILED
        assert "tensor 'blk.0' has wrong shape" in failure.value.message
    assert shell.manager.status_of("a") == Status.FAILED


async def test_a_child_that_cannot_even_start_fails_its_waiters(shell: Shell) -> None:
    shell.fleet.prepare = lambda child: setattr(child, "start_error", OSError("exec format error"))
    with pytest.raises(ModelError) as failure:
        await shell.manager.acquire("a")
    assert failure.value.kind == ErrorKind.LOAD_FAILED and "exec format error" in failure.value.message


async def test_a_load_that_hangs_is_killed_at_the_load_timeout_naming_it_and_the_log(shell: Shell) -> None:
    waiter = asyncio.ensure_future(shell.manager.acquire("a"))
    child = await shell.fleet.child("a")
    child.say("load_tensors: loading model tensors, this can take a while")
    await shell.clock.advance(599)
    assert not waiter.done() and not child.exited.done()
    await shell.clock.advance(2)
    with pytest.raises(ModelError) as failure:
        await waiter
    assert child.exited.result() == -9
    assert failure.value.kind == ErrorKind.UPSTREAM  # 502: the child died under its waiters, not a 500
    assert "not ready within 600 s (load-timeout)" in failure.value.message
    assert "load_tensors: loading model tensors" in failure.value.message
    # The next request loads it again, with a child of its own.
    again = asyncio.ensure_future(shell.manager.acquire("a"))
    await shell.loaded("a", 2)
    shell.manager.release(await again)


# --- the watchdog ------------------------------------------------------------------------------------------

async def test_a_loaded_child_that_stops_answering_its_health_checks_is_killed_and_reloaded(shell: Shell) -> None:
    child = await _loaded_idle(shell, "a")
    child.healthy = False  # as after `kill -STOP`
    await shell.clock.advance(WATCHDOG.interval * 2)
    assert not child.exited.done()  # two failed probes: not yet
    await shell.clock.advance(WATCHDOG.interval)
    assert child.exited.result() == -9
    assert shell.manager.status_of("a") == Status.FAILED
    view = next(v for v in shell.manager.models() if v.config.name == "a")
    assert "no answer to 3 health checks in a row" in view.state.failure
    again = asyncio.ensure_future(shell.manager.acquire("a"))
    await shell.loaded("a", 2)
    shell.manager.release(await again)


async def test_a_child_that_answers_health_but_stalls_its_requests_is_killed(http: TestClient[Any, Any],
                                                                            shell: Shell) -> None:
    request, child = await _stream_started(http, shell)
    await shell.clock.advance(110)
    assert not child.exited.done()
    await shell.clock.advance(20)  # 130 s without a byte, and no progress in its slots
    response = await request
    events = sse_events(await response.text())
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "stall-timeout 120 s" in error["message"] and error["code"] == "upstream_error"
    assert shell.manager.status_of("a") == Status.FAILED


async def test_a_long_silent_generation_that_makes_progress_is_not_a_stall(shell: Shell) -> None:
    """A non-streamed answer sends nothing until it ends; llama-server's slot counters show it is working."""
    shell.fleet.prepare = lambda child: setattr(child, "handler", lambda c, m, p, b: FakeReply(c))
    lease_waiter = asyncio.ensure_future(shell.manager.acquire("a"))
    child = await shell.loaded("a")
    lease = await lease_waiter
    async with lease.child.request("POST", "/v1/chat/completions", body=b"{}"):
        for step in range(40):  # 400 s of decoding (or one long prompt step) with no byte sent
            child.progress_value = step * 100
            await shell.clock.advance(WATCHDOG.interval)
        assert not child.exited.done()
        child.progress_value = 4000  # its main thread stops using CPU: stuck
        await shell.clock.advance(WATCHDOG.stall_timeout + 2 * WATCHDOG.interval)
        assert child.exited.done()
    shell.manager.release(lease)


# --- requests racing deaths ----------------------------------------------------------------------------------

async def test_a_request_that_arrives_as_its_child_dies_gets_502_with_the_cause(http: TestClient[Any, Any],
                                                                               shell: Shell) -> None:
    child = await _loaded_idle(shell, "a")

    def dies_on_arrival(c: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
        c.die(-9, "Segmentation fault")
        raise c.error()

    child.handler = dies_on_arrival
    response = await http.post("/v1/chat/completions", json=chat("a"))
    assert response.status == 502
    assert "Segmentation fault" in (await response.json())["error"]["message"]


async def test_a_grant_to_a_child_that_just_exited_is_an_upstream_error(shell: Shell) -> None:
    """The child is gone and the shell has not heard yet: the grant, in the same step as the request, fails
    with 502's kind instead of handing out a dead child (it was a 500 'Session is closed')."""
    await _loaded_idle(shell, "a")
    shell.fleet.children["a"][0].exited.set_result(-9)
    request = shell.manager.acquire("a")
    with pytest.raises(ModelError) as failure:
        request.send(None)  # runs up to the grant synchronously, before the shell's watcher can run
    assert failure.value.kind == ErrorKind.UPSTREAM and "exited" in failure.value.message


async def test_a_real_child_that_is_gone_refuses_requests_with_a_child_error() -> None:
    plan = LaunchPlan(("llama-server",), {CHILD_KEY_ENV: "k"}, Readiness.ROUTER_PROTOCOL, Endpoint(port=1))
    child = ProcessChild("a", plan)
    with pytest.raises(ChildError, match=r"exited|failed"):
        async with child.request("POST", "/v1/chat/completions", body=b"{}"):
            pass


async def test_a_child_dying_mid_stream_ends_the_stream_with_an_error_event_and_done(
        http: TestClient[Any, Any], shell: Shell) -> None:
    request, child = await _stream_started(http, shell)
    child.die(-11, "Segmentation fault (core dumped)")
    events = sse_events(await (await request).text())
    assert events[0].startswith('{"choices"') and events[-1] == "[DONE]"
    assert "Segmentation fault" in json.loads(events[-2])["error"]["message"]


async def test_the_child_gets_its_own_key_and_never_the_clients(http: TestClient[Any, Any], shell: Shell) -> None:
    request = asyncio.ensure_future(http.post("/v1/chat/completions", json=chat("a"),
                                              headers={"Authorization": "Bearer users-secret", "X-Api-Key": "k"}))
    child = await shell.loaded("a")
    assert (await request).status == 200
    assert CHILD_KEY_ENV in child.plan.env and len(child.plan.env[CHILD_KEY_ENV]) >= 32
    assert child.plan.env[CHILD_KEY_ENV] not in " ".join(child.plan.argv)
    _method, path, headers = child.received[0]
    lowered = {k.lower() for k in headers}
    assert "authorization" not in lowered and "x-api-key" not in lowered  # the fake gets no key header added
    assert path == "/v1/chat/completions"


# --- drain ---------------------------------------------------------------------------------------------------

async def test_drain_lets_streams_finish_refuses_new_requests_and_says_so_on_health(
        http: TestClient[Any, Any], shell: Shell) -> None:
    shell.fleet.prepare = lambda child: setattr(child, "handler", streaming)
    stream = asyncio.ensure_future(http.post("/v1/chat/completions", json=chat("a", stream=True)))
    child = await shell.loaded("a")
    await settle()
    shell.manager.begin_drain()
    refused = await http.post("/v1/chat/completions", json=chat("a"))
    assert refused.status == 503 and refused.headers["Retry-After"] == "5"
    assert (await refused.json())["error"]["code"] == "shutting_down"
    health = await http.get("/health")
    assert health.status == 503 and (await health.json()) == {"status": "draining"}
    assert (await http.get("/models")).status == 200
    idle = asyncio.ensure_future(shell.manager.wait_idle(30))
    await settle()
    assert not idle.done()
    child.replies[0].send(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
    child.replies[0].finish()
    assert sse_events(await (await stream).text())[-1] == "[DONE]"
    assert await idle
    await settle()
    assert child.stop_requested.is_set()  # stopped once its last request was done


async def test_what_is_left_after_the_grace_ends_with_an_error_event_naming_the_shutdown(
        http: TestClient[Any, Any], shell: Shell) -> None:
    shell.fleet.prepare = lambda child: setattr(child, "handler", streaming)
    stream = asyncio.ensure_future(http.post("/v1/chat/completions", json=chat("a", stream=True)))
    await shell.loaded("a")
    await settle()
    shell.manager.begin_drain()
    assert not await shell.manager.wait_idle(0)
    shell.manager.kill_all("modelyard is shutting down (the --shutdown-grace of 30 s is over)")
    events = sse_events(await (await stream).text())
    assert events[-1] == "[DONE]"
    assert "--shutdown-grace of 30 s is over" in json.loads(events[-2])["error"]["message"]


async def test_a_second_signal_cuts_the_grace_short(shell: Shell) -> None:
    lease_waiter = asyncio.ensure_future(shell.manager.acquire("a"))
    await shell.loaded("a")
    lease = await lease_waiter
    shell.manager.begin_drain()
    hurry = asyncio.Event()
    idle = asyncio.ensure_future(shell.manager.wait_idle(3600, hurry))
    await settle()
    hurry.set()
    assert await idle is False
    shell.manager.release(lease)


# --- timers and reloads --------------------------------------------------------------------------------------

async def test_keep_alive_stops_an_idle_child_on_the_fake_clock(shell: Shell) -> None:
    lease_waiter = asyncio.ensure_future(shell.manager.acquire("a", keep_alive=60))
    child = await shell.loaded("a")
    shell.manager.release(await lease_waiter)
    await settle()
    await shell.clock.advance(59)
    assert not child.stop_requested.is_set()
    await shell.clock.advance(2)
    assert child.stop_requested.is_set()
    assert shell.manager.status_of("a") == Status.UNLOADED


async def test_reload_adds_removes_and_restarts_changed_models_once_idle(shell: Shell) -> None:
    lease_waiter = asyncio.ensure_future(shell.manager.acquire("a"))
    child = await shell.loaded("a")
    lease = await lease_waiter
    changed = catalog("a", "c", priority=0)
    models = dict(changed.models)
    models["a"] = models["a"].__class__(**{**models["a"].__dict__, "settings": {"--ctx-size": "2048"}})
    shell.source.value = Catalog(models=models, by_name=changed.by_name)
    async with shell.manager.subscribe() as events:
        shell.manager.reload()
        assert sorted(v.config.name for v in shell.manager.models()) == ["a", "c"]
        assert shell.manager.status_of("a") == Status.STOPPING  # draining: its request is still in flight
        assert not child.stop_requested.is_set()
        shell.manager.release(lease)
        await settle()
        assert child.stop_requested.is_set()
        seen = _drain_queue(events)
    assert any(isinstance(e, ModelsReloaded) for e in seen)
    with pytest.raises(ModelError) as unknown:
        await shell.manager.acquire("b")
    assert unknown.value.kind == ErrorKind.UNKNOWN_MODEL


async def test_a_background_task_failure_is_logged(shell: Shell, caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    shell.manager._spawn(broken())
    await settle()
    assert any("background task" in r.message and r.exc_info for r in caplog.records)


# --- helpers -------------------------------------------------------------------------------------------------

async def _stream_started(http: TestClient[Any, Any], shell: Shell) -> tuple[asyncio.Future[Any], FakeChild]:
    """A streamed chat to a freshly loaded `a` whose child has sent its first chunk."""
    shell.fleet.prepare = lambda child: setattr(child, "handler", streaming)
    request = asyncio.ensure_future(http.post("/v1/chat/completions", json=chat("a", stream=True)))
    child = await shell.loaded("a")
    await settle()
    child.replies[0].send(b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n')
    await settle()
    return request, child


async def _loaded_idle(shell: Shell, model: str) -> FakeChild:
    waiter = asyncio.ensure_future(shell.manager.acquire(model))
    child = await shell.loaded(model)
    shell.manager.release(await waiter)
    await settle()
    return child


def _drain_queue(queue: asyncio.Queue[FeedEvent | None]) -> list[FeedEvent]:
    out = []
    while not queue.empty():
        item = queue.get_nowait()
        if item is not None:
            out.append(item)
    return out


# --- the watchdog's decision, as a table ----------------------------------------------------------------------

@pytest.mark.parametrize(("seen", "verdict"), [
    (Observation(in_flight=0, silent_for=999, probe_ok=True, failed_probes=0, progressed=False), ""),
    (Observation(in_flight=0, silent_for=999, probe_ok=False, failed_probes=2, progressed=False), ""),
    (Observation(in_flight=0, silent_for=0, probe_ok=False, failed_probes=3, progressed=False), "health checks"),
    # every HTTP thread busy with requests: probes time out, but it is working
    (Observation(in_flight=64, silent_for=1, probe_ok=False, failed_probes=5, progressed=True), ""),
    (Observation(in_flight=2, silent_for=119, probe_ok=True, failed_probes=0, progressed=False), ""),
    (Observation(in_flight=2, silent_for=120, probe_ok=True, failed_probes=0, progressed=False), "stall-timeout"),
    (Observation(in_flight=2, silent_for=300, probe_ok=True, failed_probes=0, progressed=True), ""),
    (Observation(in_flight=1, silent_for=121, probe_ok=False, failed_probes=1, progressed=False), "stall-timeout"),
])
def test_watchdog_verdicts(seen: Observation, verdict: str) -> None:
    reason = judge(seen, WATCHDOG)
    assert (verdict in reason) if verdict else reason == ""


def test_stall_timeout_off_never_judges_a_stall() -> None:
    off = WatchdogSettings.for_stall_timeout(0)
    assert judge(Observation(1, 10**6, True, 0, False), off) == ""
    assert (off.interval, off.probe_timeout) == (10.0, 10.0)
    assert WatchdogSettings.for_stall_timeout(4).interval == 1.0
