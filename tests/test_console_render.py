"""Pure table tests of the console's core: units, the ps/ls joins, load steps, SSE parsing, error mapping, the
chat input and stream parsing, and top's state folding and view (rendered to text, no terminal)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from modelyard.console.chat import Command, InputCollector, Submit, chunk_delta
from modelyard.console.client import Connection, SseEvent, SseParser, connection, error_message, failure
from modelyard.console.errors import ConsoleError, ExitCode, RouteMissing
from modelyard.console.render import (
    LoadStep,
    TopState,
    human_bytes,
    load_step,
    log_line,
    ls_rows,
    ls_table,
    processor,
    ps_rows,
    ps_table,
    top_json,
    top_view,
    until,
    with_activity,
    with_model_event,
    with_models,
    with_request,
)
from modelyard.engine.install import _run, build_percent


def text_of(renderable: Any, width: int = 160) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize(("size", "shown"), [
    (None, "-"), (0, "-"), (999, "999 B"), (1000, "1.0 KB"), (98_362_432, "98 MB"), (1_234_000_000, "1.2 GB"),
    (12_500_000_000, "12 GB"), (5 * 10**15, "5000 TB"),
])
def test_human_bytes(size: int | None, shown: str) -> None:
    assert human_bytes(size) == shown


@pytest.mark.parametrize(("size", "vram", "shown"), [
    (None, None, "-"), (100, 0, "100% CPU"), (100, None, "100% CPU"), (100, 100, "100% GPU"),
    (100, 52, "48%/52% CPU/GPU"), (3, 1, "67%/33% CPU/GPU"),
])
def test_processor(size: int | None, vram: int | None, shown: str) -> None:
    assert processor(size, vram) == shown


@pytest.mark.parametrize(("status", "expires_in", "keep_alive", "busy", "shown"), [
    ("loaded", None, -1.0, False, "Forever"),
    ("loaded", 240.0, 300.0, False, "4 minutes from now"),
    ("loaded", 30.4, 300.0, False, "30 seconds from now"),
    ("loaded", None, 300.0, True, "while busy"),
    ("stopping", 10.0, 300.0, False, "Stopping..."),
    ("loading", None, -1.0, False, "-"),
])
def test_until(status: str, expires_in: float | None, keep_alive: float, busy: bool, shown: str) -> None:
    assert until(status, expires_in, keep_alive, busy) == shown


def entry(name: str, value: str, **extra: Any) -> dict[str, Any]:
    return {"id": name, "aliases": [], "status": {"value": value}, "in_flight": 0, "queued": 0,
            "memory": {"estimated": 400_000_000, "measured": None, "estimated_gpu": None, "measured_gpu": None},
            "keep_alive": -1.0, "expires_in": None, **extra}


MODELS = {"data": [
    entry("smol", "loaded", memory={"estimated": 400, "measured": 300_000_000, "estimated_gpu": 9,
                                    "measured_gpu": 100_000_000}, in_flight=2, queued=1, meta={"n_ctx": 2048}),
    entry("gemma", "unloaded"),
    entry("big", "loading", aliases=["b"]),
    entry("old", "stopping", keep_alive=60.0, expires_in=0.0),
    entry("bad", "failed", status={"value": "failed", "failure": "exit 1: no such file"}),
]}
PS = {"models": [{"name": "smol:latest", "size": 400_000_000, "size_vram": 100_000_000, "context_length": 4096}]}


def test_ps_rows_join_models_and_api_ps() -> None:
    rows = ps_rows(MODELS, PS)
    assert [(r.name, r.status) for r in rows] == [("smol", "loaded"), ("big", "loading"), ("old", "stopping")]
    smol, big, _ = rows
    assert (smol.size, smol.size_vram, smol.context, smol.in_flight, smol.queued) == (400_000_000, 100_000_000,
                                                                                       4096, 2, 1)
    assert (big.size, big.size_vram, big.context) == (400_000_000, 0, None)  # the estimate, before /api/ps has it
    assert smol.as_json()["processor"] == "75%/25% CPU/GPU"
    shown = text_of(ps_table(rows))
    assert "smol" in shown and "400 MB" in shown and "75%/25% CPU/GPU" in shown and "2 +1 queued" in shown
    assert "Stopping..." in shown and "gemma" not in shown


def test_ps_rows_context_falls_back_to_the_child_info_and_measured_memory() -> None:
    (row,) = ps_rows({"data": [MODELS["data"][0]]}, {"models": []})
    assert (row.size, row.size_vram, row.context) == (400_000_000, 100_000_000, 2048)


def test_ps_on_a_cluster_has_a_row_for_each_node_where_a_model_runs() -> None:
    nodes = [{"node": "a1b2c3d4" + "0" * 48, "status": "loaded", "in_flight": 1, "queued": 0},
             {"node": "e5f6a7b8" + "0" * 48, "status": "unloaded", "in_flight": 0, "queued": 0},
             {"node": "c9d0e1f2" + "0" * 48, "status": "loading", "in_flight": 0, "queued": 3}]
    rows = ps_rows({"data": [entry("smol", "loaded", nodes=nodes), entry("gemma", "unloaded", nodes=nodes[1:2])]},
                   PS)
    assert [(r.name, r.node[:8] if r.node else None, r.status, r.in_flight, r.queued) for r in rows] == [
        ("smol", "a1b2c3d4", "loaded", 1, 0), ("smol", "c9d0e1f2", "loading", 0, 3)]
    assert rows[0].as_json()["node"] == nodes[0]["node"]
    shown = text_of(ps_table(rows))
    assert "NODE" in shown and "a1b2c3d4 " in shown and "e5f6a7b8" not in shown and "0 +3 queued" in shown
    assert "NODE" not in text_of(ps_table(ps_rows(MODELS, PS))) and "node" not in ps_rows(MODELS, PS)[0].as_json()


def test_ls_rows_every_model_with_file_details() -> None:
    tags = {"models": [{"name": "smol:latest", "size": 98_362_432,
                        "details": {"parameter_size": "135M", "quantization_level": "Q4_1"}}]}
    rows = ls_rows(MODELS, tags)
    assert [r.name for r in rows] == ["smol", "gemma", "big", "old", "bad"]
    assert (rows[0].parameters, rows[0].quantization, rows[0].file_size) == ("135M", "Q4_1", 98_362_432)
    assert rows[2].aliases == ("b",) and rows[4].failure == "exit 1: no such file"
    assert rows[1].as_json()["parameters"] is None
    shown = text_of(ls_table(rows))
    assert "98 MB" in shown and "135M" in shown and "failed" in shown and "unloaded" in shown


def sse(model: str, status: str, **data: Any) -> dict[str, Any]:
    return {"model": model, "event": "status_change", "data": {"status": status, **data}}


@pytest.mark.parametrize(("message", "seen", "step"), [
    (sse("m", "loading"), False, LoadStep("loading", None, "")),
    ({"model": "m", "event": "model_status", "data": {"status": "loading"}}, False, LoadStep("loading", None, "")),
    (sse("m", "loading", progress={"stages": ["text_model"], "current": "text_model", "value": 0.25}), False,
     LoadStep("loading", 0.25, "text_model")),
    (sse("m", "loading", progress={"value": 7}), True, LoadStep("loading", 1.0, "")),
    (sse("m", "loaded", info={}), True, LoadStep("loaded", 1.0)),
    (sse("m", "failed", reason="exit 1: bad file"), True, LoadStep("failed", reason="exit 1: bad file")),
    (sse("m", "failed", exit_code=3), True, LoadStep("failed", reason="the engine exited with code 3")),
    (sse("m", "unloaded"), False, None),  # the end of an earlier unload the load waits behind
    (sse("m", "unloaded"), True, LoadStep("failed", reason="it was unloaded before it finished loading")),
    (sse("other", "loaded"), True, None),
    ({"model": "*", "event": "models_reload"}, True, None),
    ({"model": "m", "event": "download_progress", "data": {"progress": {}}}, True, None),
])
def test_load_step(message: dict[str, Any], seen: bool, step: LoadStep | None) -> None:
    assert load_step(message, "m", seen) == step


def test_sse_parser_frames_events_and_skips_comments() -> None:
    parser = SseParser()
    lines = [": keepalive", "", "event: log", "data: {\"a\": 1}", "", "data: one", "data:two", "", "", "id: 3"]
    frames = [f for f in (parser.feed(line) for line in lines) if f is not None]
    assert frames == [SseEvent("log", '{"a": 1}'), SseEvent("message", "one\ntwo")]


@pytest.mark.parametrize(("body", "parsed"), [
    (b'{"error": {"message": "model \'x\' not found", "code": "model_not_found"}}',
     ("model 'x' not found", "model_not_found")),
    (b'{"error": "ollama style"}', ("ollama style", "")),
    (b"<html>bad gateway</html>", ("<html>bad gateway</html>", "")),
    (b"[1]", ("[1]", "")),
])
def test_error_message(body: bytes, parsed: tuple[str, str]) -> None:
    assert error_message(body) == parsed


NO_KEY = Connection("http://h:1")
WITH_KEY = Connection("http://h:1", "s3cret-key", "$MODELYARD_API_KEY")


@pytest.mark.parametrize(("conn", "status", "body", "code", "words"), [
    (NO_KEY, 401, b'{"error": {"message": "Invalid API Key"}}', ExitCode.REFUSED, "needs an API key"),
    (WITH_KEY, 401, b'{"error": {"message": "Invalid API Key"}}', ExitCode.REFUSED,
     "refused the API key from $MODELYARD_API_KEY"),
    (WITH_KEY, 403, b'{"error": {"message": "this API key (ci) lacks the \'admin\' scope needed for POST '
                    b'/models/load"}}', ExitCode.REFUSED, "lacks the 'admin' scope"),
    (NO_KEY, 404, b'{"error": {"message": "model \'x\' not found", "code": "model_not_found"}}',
     ExitCode.UNKNOWN_MODEL, "model 'x' not found"),
    (NO_KEY, 404, b'{"error": {"message": "unknown endpoint", "code": "not_found"}}', ExitCode.SERVER,
     "does not serve GET /logs/x"),
    (NO_KEY, 500, b'{"error": {"message": "boom", "code": "model_load_failed"}}', ExitCode.SERVER, "boom (HTTP 500)"),
])
def test_failure_maps_status_to_exit_code(conn: Connection, status: int, body: bytes, code: ExitCode,
                                          words: str) -> None:
    error = failure(conn, "GET", "/logs/x", status, body)
    assert error.exit_code == code and words in error.format_message()
    assert "\n" not in error.format_message() and "s3cret" not in error.format_message()
    assert isinstance(error, RouteMissing) == (b"not_found\"" in body and b"model_not_found" not in body)


def test_connection_takes_the_key_from_a_file_or_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("# my key\n\n  secret-1  \n")
    assert connection("http://h:1/", key_file, {}) == Connection("http://h:1", "secret-1", f"--api-key-file {key_file}")
    assert connection("http://h:1", None, {"MODELYARD_API_KEY_FILE": str(key_file)}).key == "secret-1"
    assert connection("http://h:1", None, {"MODELYARD_API_KEY": "e"}) == Connection("http://h:1", "e",
                                                                                     "$MODELYARD_API_KEY")
    assert connection("https://h", None, {}) == Connection("https://h", None, "")


@pytest.mark.parametrize(("url", "content", "words"), [
    ("localhost:8080", None, "must start with http://"),
    ("http://h", "", "holds no key"),
    ("http://h", "[[key]]\nkey = 'a'\n", "server keys file"),
    ("http://h", "missing", "cannot read the API key file"),
])
def test_connection_errors_are_usage_errors(tmp_path: Path, url: str, content: str | None, words: str) -> None:
    path = tmp_path / "key"
    if content is not None and content != "missing":
        path.write_text(content)
    with pytest.raises(ConsoleError) as caught:
        connection(url, path if content is not None else None, {})
    assert caught.value.exit_code == ExitCode.USAGE and words in caught.value.format_message()


@pytest.mark.parametrize(("lines", "actions"), [
    (["hello"], [Submit("hello")]),
    (["", "   "], [None, None]),
    (['"""', "one", "two", '"""'], [None, None, None, Submit("one\ntwo")]),
    (['"""first', "  indented", 'last"""'], [None, None, Submit("first\n  indented\nlast")]),
    (['"""one line"""'], [Submit("one line")]),
    (['"""', '"""'], [None, None]),
    (['"""', "/bye", '"""'], [None, None, Submit("/bye")]),  # inside a block, a command is text
    (["/bye"], [Command("bye")]), (["/exit"], [Command("bye")]), (["/clear"], [Command("clear")]),
    (["/?"], [Command("help")]), (["/nope x"], [Command("unknown", "/nope")]),
])
def test_input_collector(lines: list[str], actions: list[Submit | Command | None]) -> None:
    collector = InputCollector()
    assert [collector.feed(line) for line in lines] == actions
    assert not collector.pending


def test_input_collector_reset_drops_an_open_block() -> None:
    collector = InputCollector()
    collector.feed('"""')
    collector.feed("half")
    assert collector.pending
    collector.reset()
    assert not collector.pending and collector.feed("new") == Submit("new")


@pytest.mark.parametrize(("data", "text", "error", "done", "finish"), [
    ('{"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}', "Hi", "", False, ""),
    ('{"choices": [{"delta": {}, "finish_reason": "length"}]}', "", "", False, "length"),
    ('{"choices": []}', "", "", False, ""),
    ("[DONE]", "", "", True, ""),
    ('{"error": {"message": "model \'m\' was killed"}}', "", "model 'm' was killed", False, ""),
    ('{"error": "plain"}', "", "plain", False, ""),
    ("not json", "", "unreadable chunk: not json", False, ""),
])
def test_chunk_delta(data: str, text: str, error: str, done: bool, finish: str) -> None:
    delta = chunk_delta(data)
    assert (delta.text, delta.error, delta.done, delta.finish_reason) == (text, error, done, finish)
    assert delta.usage is None


def test_chunk_delta_keeps_the_usage_of_the_last_chunk() -> None:
    delta = chunk_delta('{"choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 5}}')
    assert (delta.text, delta.usage) == ("", {"prompt_tokens": 31, "completion_tokens": 5})


def record(rid: int, state: str, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "time": 1000.0, "client": "127.0.0.1", "model": "smol", "route": "/v1/chat/completions",
            "state": state, "status": 200 if state == "done" else None, "ttft": None, "duration": None,
            "tokens_in": None, "tokens_out": None, "tokens_per_s": None, "error": None, **extra}


def test_top_state_folds_snapshots_and_events() -> None:
    state = with_models(TopState(), MODELS)
    state = with_activity(state, {"data": [record(1, "done", duration=1.5)], "in_flight": [record(2, "running")]})
    assert sorted(state.in_flight) == [2] and [r["id"] for r in state.recent] == [1]
    state = with_request(state, record(3, "queued"))
    state = with_request(state, record(3, "running", ttft=0.2))
    assert state.in_flight[3]["state"] == "running"
    state = with_request(state, record(2, "done", duration=2.0, tokens_in=12, tokens_out=40, tokens_per_s=55.1))
    assert sorted(state.in_flight) == [3] and [r["id"] for r in state.recent] == [2, 1]
    state = with_model_event(state, sse("gemma", "loading", progress={"value": 0.5}))
    assert state.progress == {"gemma": 0.5} and state.models["gemma"]["status"]["value"] == "loading"
    state = with_model_event(state, sse("new", "loading"))  # a model the listing did not have yet
    assert state.models["new"]["status"]["value"] == "loading"
    shown = text_of(top_view(state, now=1003.0, url="http://h:1"))
    assert "loading 50%" in shown and "12 > 40" in shown and "55.1" in shown and "/v1/chat/completions" in shown
    assert "In flight: 1" in shown and "3.0 s" in shown  # request 3's age
    state = with_model_event(state, sse("gemma", "loaded"))
    assert state.progress == {} and state.models["gemma"]["memory"]  # the listing's other fields stay
    assert [m["id"] for m in top_json(state)["models"]] == sorted([*(e["id"] for e in MODELS["data"]), "new"])
    assert "no /activity" in text_of(top_view(TopState(models=state.models, activity=False), 1003.0, "u"))


def test_top_keeps_only_the_last_finished_requests() -> None:
    state = TopState()
    for rid in range(25):
        state = with_request(state, record(rid, "done"))
    assert [r["id"] for r in state.recent] == list(range(24, 14, -1))


@pytest.mark.parametrize(("line", "with_model", "shown"), [
    ({"time": 0.0, "line": "main: loaded", "model": "smol"}, False, "00:00:00 main: loaded"),
    ({"time": 3661.5, "line": "x", "model": "smol"}, True, "01:01:01 [smol] x"),
    ({"line": "no time"}, False, "no time"),
])
def test_log_line(line: dict[str, Any], with_model: bool, shown: str) -> None:
    assert log_line(line, with_model, utc=True) == shown


@pytest.mark.parametrize(("line", "percent"), [
    ("[ 45%] Building CXX object tools/server/CMakeFiles/llama-server.dir/server.cpp.o", 45),
    ("[  3%] Built target build_info", 3), ("[100%] Linking CXX executable ../../bin/llama-server", 100),
    ("-- Configuring done", None), ("[ 45 %] odd", None), ("gmake[2]: Entering directory", None),
])
def test_build_percent(line: str, percent: int | None) -> None:
    assert build_percent(line) == percent


def test_a_build_step_reports_cmake_percentages_instead_of_echoing_them() -> None:
    script = "print('[ 10%] Building a'); print('warning: x'); print('[100%] Linking b')"
    echoed: list[str] = []
    done: list[int] = []
    _run([sys.executable, "-c", script], echoed.append, progress=True, percent=done.append)
    assert (done, echoed) == ([10, 100], [])
    _run([sys.executable, "-c", script], echoed.append, progress=True)  # without a bar: the lines, as before
    assert echoed == ["[ 10%] Building a", "[100%] Linking b"]
