"""/models/sse in router mode's form and --sleep-idle-seconds, in-process: the message for each feed event
(a table), what a llama-server child reports of itself read from its stdout, and the sleep and wake of a child
under --sleep-idle-seconds through the manager and the HTTP app over fakes.py's children. That router mode
sends the same events on the same model is test_parity.py's part."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelyard.api.management import sse_message
from modelyard.children import ProcessChild
from modelyard.config.catalog import parse_engine_args
from modelyard.config.options import EngineOption, OptionTable, value_error
from modelyard.config.presets import ConfigError, read_preset_file
from modelyard.engine.command import Endpoint, Engine, LaunchPlan, Readiness
from modelyard.manager import FeedEvent, ModelManager, ModelNotice, ModelsReloaded, StatusEvent
from modelyard.memory import GgufCache
from modelyard.scheduler import Status
from tests.fakes import FakeClock, FakeFleet, StaticSource, app_client, catalog, settle

PROGRESS = {"stages": ["text_model"], "current": "text_model", "value": 0.5}
INFO = {"id": "a", "meta": {"n_ctx": 2048}}


@pytest.mark.parametrize(("event", "message"), [
    (StatusEvent("a", Status.LOADING), {"model": "a", "event": "model_status", "data": {"status": "loading"}}),
    (StatusEvent("a", Status.LOADING, progress=PROGRESS),
     {"model": "a", "event": "status_change", "data": {"status": "loading", "progress": PROGRESS}}),
    (StatusEvent("a", Status.LOADED, info=INFO),
     {"model": "a", "event": "status_change", "data": {"status": "loaded", "info": INFO}}),
    (StatusEvent("a", Status.LOADED), {"model": "a", "event": "status_change", "data": {"status": "loaded"}}),
    (StatusEvent("a", Status.LOADED, sleeping=True),
     {"model": "a", "event": "status_change", "data": {"status": "sleeping"}}),
    (StatusEvent("a", Status.STOPPING, reason="unloaded by request"),
     {"model": "a", "event": "status_change", "data": {"status": "stopping", "reason": "unloaded by request"}}),
    (StatusEvent("a", Status.UNLOADED, exit_code=0),
     {"model": "a", "event": "status_change", "data": {"status": "unloaded", "exit_code": 0}}),
    # router mode always sends the exit code of an unloaded model; one that never ran exited with nothing
    (StatusEvent("a", Status.UNLOADED), {"model": "a", "event": "status_change",
                                          "data": {"status": "unloaded", "exit_code": 0}}),
    (StatusEvent("a", Status.FAILED, exit_code=3, reason="bad file"),
     {"model": "a", "event": "status_change", "data": {"status": "failed", "exit_code": 3, "reason": "bad file"}}),
    (ModelsReloaded(), {"model": "*", "event": "models_reload"}),
    (ModelNotice("download_progress", "org/repo:Q4_K_M", {"progress": {"u": {"done": 1, "total": 2}}}),
     {"model": "org/repo:Q4_K_M", "event": "download_progress", "data": {"progress": {"u": {"done": 1, "total": 2}}}}),
    (ModelNotice("download_finished", "org/repo:Q4_K_M"), {"model": "org/repo:Q4_K_M", "event": "download_finished"}),
])
def test_sse_message(event: FeedEvent, message: dict[str, Any]) -> None:
    assert sse_message(event) == message


# -- what a llama-server child says on stdout ------------------------------------------------------------------

async def test_a_child_reports_progress_sleep_and_wake_and_keeps_its_first_ready_info() -> None:
    reports: list[tuple[str, dict[str, Any]]] = []
    child = ProcessChild("a", LaunchPlan(("llama-server",), {}, Readiness.ROUTER_PROTOCOL, Endpoint(port=1)),
                         lambda state, payload: reports.append((state, dict(payload))))
    for line in (b'{"state": "loading", "payload": {"value": 0.5}}', b'{"state": "ready", "payload": {"id": "a"}}',
                 b'{"state": "sleeping", "payload": {}}', b"not json", b"[1]", b'{"state": "ready", "payload": 7}',
                 b'{"state": "something new"}'):
        child._on_state(line)  # one line after the child protocol's prefix, as _read_stdout hands it over
    assert child.ready.done() and child.info == {"id": "a"}  # a wake's empty `ready` does not replace it
    assert reports == [("loading", {"value": 0.5}), ("sleeping", {}), ("ready", {})]


async def test_a_childs_output_is_split_into_lines_as_it_arrives_with_an_over_long_line_dropped() -> None:
    from modelyard.children import _MAX_LINE, _OutputProtocol

    lines: list[tuple[int, bytes]] = []
    output = _OutputProtocol(lambda fd, line: lines.append((fd, line)), asyncio.get_running_loop())
    for fd, data in ((2, b"0.01.234 I "), (2, b"srv  slot "), (1, b"cmd_child_to_router:st"), (2, b"selected\n"),
                     (1, b'ate:{}\nout\n'), (2, b"x" * (_MAX_LINE + 1)), (2, b"yy\nafter\nlast, unended")):
        output.pipe_data_received(fd, data)  # as llama-server writes a line: in pieces, interleaved
    assert not output.drained.done()
    output.pipe_connection_lost(1, None)
    output.pipe_connection_lost(2, None)
    assert lines == [(2, b"0.01.234 I srv  slot selected\n"), (1, b"cmd_child_to_router:state:{}\n"),
                     (1, b"out\n"), (2, b"after\n"), (2, b"last, unended")]
    assert output.drained.done()


# -- sleep and wake through the manager and the app -------------------------------------------------------------

@dataclass
class Rig:
    manager: ModelManager
    fleet: FakeFleet
    http: Any
    feed: asyncio.Queue[FeedEvent | None]

    async def status(self, model: str = "a") -> dict[str, Any]:
        listing = await (await self.http.get("/models")).json()
        return dict(next(m for m in listing["data"] if m["id"] == model))

    async def messages(self) -> list[dict[str, Any]]:
        """The /models/sse messages published since the last call."""
        await settle()
        found = []
        while not self.feed.empty():
            event = self.feed.get_nowait()
            assert event is not None
            found.append(sse_message(event))
        return found


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = FakeClock()
    fleet = FakeFleet(clock)
    source = StaticSource(catalog("a", stop_timeout=2.0))
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                           clock=clock, gguf_cache=GgufCache(tmp_path), child_factory=fleet)
    await manager.start()
    http = await app_client(manager)
    async with manager.subscribe() as feed:
        yield Rig(manager, fleet, http, feed)
    await http.close()
    await manager.close()


def statuses(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["event"], m["data"]["status"]) for m in messages]


async def test_a_sleeping_child_is_listed_sleeping_and_its_next_request_wakes_it(rig: Rig) -> None:
    rig.manager.load_in_background("a")
    child = await rig.fleet.child("a")
    child.on_progress(PROGRESS)
    child.become_ready(INFO)
    assert statuses(await rig.messages()) == [("model_status", "loading"), ("status_change", "loading"),
                                              ("status_change", "loaded")]

    child.on_state("sleeping", {})
    assert await rig.messages() == [{"model": "a", "event": "status_change", "data": {"status": "sleeping"}}]
    entry = await rig.status()
    assert entry["status"]["value"] == "sleeping" and entry["meta"] == INFO["meta"]  # still running, as in router mode

    answer = await rig.http.post("/v1/chat/completions", json={"model": "a", "messages": []})
    assert answer.status == 200 and len(rig.fleet.children["a"]) == 1  # sent to the sleeping child: it wakes itself
    child.on_state("loading", PROGRESS)  # llama-server loads its model again
    assert (await rig.status())["status"]["value"] == "loading"
    child.on_state("ready", {})
    assert await rig.messages() == [
        {"model": "a", "event": "status_change", "data": {"status": "loading", "progress": PROGRESS}},
        {"model": "a", "event": "status_change", "data": {"status": "loaded"}}]
    entry = await rig.status()
    assert entry["status"]["value"] == "loaded" and entry["meta"] == INFO["meta"]


async def test_unload_all_stops_a_sleeping_model(rig: Rig) -> None:
    rig.manager.load_in_background("a")
    child = await rig.fleet.child("a")
    child.become_ready(INFO)
    child.on_state("sleeping", {})
    answer = await rig.http.post("/models/unload", json={"all": True})
    assert await answer.json() == {"success": True, "unloaded": ["a"]}
    await settle()
    assert child.stop_requested.is_set() and (await rig.status())["status"]["value"] == "unloaded"


async def test_a_report_from_a_child_that_is_not_running_changes_nothing(rig: Rig) -> None:
    rig.manager.load_in_background("a")
    child = await rig.fleet.child("a")
    child.become_ready(INFO)
    await rig.http.post("/models/unload", json={"model": "a"})
    await settle()
    await rig.messages()
    child.on_state("sleeping", {})  # a late line from a child already gone
    child.on_state("ready", {})
    assert await rig.messages() == [] and (await rig.status())["status"]["value"] == "unloaded"


# -- --sleep-idle-seconds as llama-server takes it ---------------------------------------------------------------

SLEEP = OptionTable([EngineOption(("--sleep-idle-seconds",), env=("LLAMA_ARG_SLEEP_IDLE_SECONDS",), takes_value=True),
                     EngineOption(("-m", "--model"), takes_value=True)])


@pytest.mark.parametrize(("value", "ok"), [("1", True), ("300", True), ("-1", True), ("0", False), ("-2", False),
                                           ("soon", False), ("1.5", False), ("", False)])
def test_sleep_idle_seconds_values(value: str, ok: bool) -> None:
    assert (value_error("--sleep-idle-seconds", value) is None) == ok
    assert value_error("--ctx-size", value) is None  # only the options llama-server checks at parse time


def test_sleep_idle_seconds_on_the_command_line_is_every_models_default() -> None:
    assert parse_engine_args(("--sleep-idle-seconds", "30"), SLEEP) == {"--sleep-idle-seconds": "30"}
    assert parse_engine_args(("--sleep-idle-seconds=-1",), SLEEP) == {"--sleep-idle-seconds": "-1"}
    with pytest.raises(ConfigError, match=r"--sleep-idle-seconds takes a whole number .* got '0'"):
        parse_engine_args(("--sleep-idle-seconds", "0"), SLEEP)


def test_a_bad_sleep_idle_seconds_in_a_preset_names_its_line(tmp_path: Path) -> None:
    preset = tmp_path / "models.ini"
    preset.write_text("[*]\nsleep-idle-seconds = 60\n\n[a]\nmodel = a.gguf\nsleep-idle-seconds = 0\n")
    with pytest.raises(ConfigError, match=r"models\.ini:6: in preset \[a\]: --sleep-idle-seconds takes"):
        read_preset_file(preset, SLEEP)
