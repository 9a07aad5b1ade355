"""The soak's and the fresh-swap scenario's decisions (request mix, kill schedule, outcome classification,
verdict, fresh environment) as table tests, and the classification of real answers from in-process servers
that answer, cut, reset or hang on purpose. The scenarios themselves run in test_bench_smoke.py."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from modelyard.bench import soak
from modelyard.bench.fresh import fresh_env
from modelyard.bench.soak import Footprint, SoakResult, classify, kill_schedule, request_mix, verdict


@pytest.mark.parametrize(("status", "kwargs", "expected"), [
    (None, {"streamed": True}, soak.RESET),
    (None, {"streamed": False}, soak.RESET),
    (502, {"streamed": True}, "502"),
    (500, {"streamed": False}, "500"),
    (200, {"streamed": True, "done": True}, "200"),
    (200, {"streamed": True, "done": False}, soak.TRUNCATED_STREAM),
    (200, {"streamed": True, "error_event": True}, soak.ERROR_EVENT),
    (200, {"streamed": True, "done": True, "error_event": True}, soak.ERROR_EVENT),
    (200, {"streamed": False}, "200"),
    (200, {"streamed": False, "body_complete": False}, soak.TRUNCATED_BODY),
])
def test_classify(status: int | None, kwargs: dict[str, bool], expected: str) -> None:
    assert classify(status, **kwargs) == expected


def test_request_mix_is_seeded_and_uses_every_route() -> None:
    mix = request_mix(1000)
    assert mix == request_mix(1000)
    assert mix != request_mix(1000, seed=10)
    counts = Counter(mix)
    assert set(counts) == set(soak.ROUTES) and min(counts.values()) > 150


@pytest.mark.parametrize(("requests", "kills"), [(10000, 5), (1000, 5), (50, 1), (20, 5)])
def test_kill_schedule_is_seeded_distinct_and_inside_the_run(requests: int, kills: int) -> None:
    schedule = kill_schedule(requests, kills)
    assert schedule == kill_schedule(requests, kills) == sorted(schedule)
    assert len(set(schedule)) == kills
    assert all(requests // 10 <= k < requests for k in schedule)


MIB = 2**20
BASELINE = Footprint(300 * MIB, 100 * MIB, 40)


def _result(outcomes: dict[str, int], before: Footprint = BASELINE, after: Footprint = BASELINE,
            children: int = 2) -> SoakResult:
    return SoakResult(sum(outcomes.values()), {soak.STREAM: Counter(outcomes)}, before=before, after=after,
                      children_after=children)


@pytest.mark.parametrize(("result", "broken"), [
    (_result({"200": 90, "502": 5, "503": 5, soak.ERROR_EVENT: 2}), []),  # explicit errors are answers
    (_result({"200": 99, soak.HANG: 1}), ["1 hang"]),
    (_result({"200": 99, soak.RESET: 2}), [f"2 {soak.RESET}"]),
    (_result({"200": 99, soak.TRUNCATED_STREAM: 1, soak.TRUNCATED_BODY: 1}),
     [f"1 {soak.TRUNCATED_STREAM}", f"1 {soak.TRUNCATED_BODY}"]),
    (_result({"200": 1}, after=Footprint(300 * MIB, 114 * MIB, 40)), []),  # within 15%
    (_result({"200": 1}, after=Footprint(300 * MIB, 116 * MIB, 40)), ["anonymous RSS 116 MiB after"]),
    (_result({"200": 1}, before=Footprint(300 * MIB, 20 * MIB, 40), after=Footprint(300 * MIB, 28 * MIB, 40)),
     []),  # within 8 MiB
    (_result({"200": 1}, after=Footprint(560 * MIB, 100 * MIB, 40)), []),  # mapped GGUF pages are not a leak
    (_result({"200": 1}, after=Footprint(300 * MIB, 100 * MIB, 42)), []),
    (_result({"200": 1}, after=Footprint(300 * MIB, 100 * MIB, 43)), ["43 descriptors after, 40 before"]),
    (_result({"200": 1}, children=3), ["3 children after the run"]),
    (SoakResult(1, {soak.STREAM: Counter({"200": 1})}, idle_after=False), ["requests still in flight"]),
])
def test_verdict(result: SoakResult, broken: list[str]) -> None:
    failures = verdict(result)
    assert len(failures) == len(broken)
    for failure, expected in zip(failures, broken, strict=True):
        assert failure.startswith(expected)


def test_fresh_env_points_every_cache_at_the_new_home(tmp_path: Path) -> None:
    env = fresh_env(tmp_path, {"PATH": "/bin", "HOME": "/home/me", "XDG_CACHE_HOME": "/c",
                               "MODELYARD_ENGINE_CACHE": "/e"})
    assert env == {"PATH": "/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}


def test_write_sources_links_four_names_and_turns_embeddings_on_for_one(tmp_path: Path) -> None:
    smol, gemma = tmp_path / "smol.gguf", tmp_path / "gemma.gguf"
    args = soak.write_sources(tmp_path, smol, gemma)
    models = Path(args[args.index("--models-dir") + 1])
    assert {p.name: p.readlink() for p in models.iterdir()} == {
        f"{soak.ROUTES[soak.STREAM]}.gguf": smol, f"{soak.ROUTES[soak.CHAT]}.gguf": smol,
        f"{soak.ROUTES[soak.EMBED]}.gguf": gemma, f"{soak.ROUTES[soak.TOKENIZE]}.gguf": gemma}
    preset = Path(args[args.index("--models-preset") + 1]).read_text()
    assert f"[{soak.ROUTES[soak.EMBED]}]" in preset and "embeddings = true" in preset


# -- real answers, from servers that misbehave on purpose -----------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[TestServer] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def _stream(request: web.Request, lines: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for line in lines:
        await response.write(line)
    await response.write_eof()
    return response


async def _ask(url: str, route: str) -> str:
    async with aiohttp.ClientSession() as session:
        outcome, _ = await soak._one(session, url, route, 0)
    return outcome


async def test_a_whole_stream_an_error_event_and_a_stream_without_done(serve: Callable[[Handler], Awaitable[str]]
                                                                      ) -> None:
    chunk = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'

    async def whole(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [chunk, b"data: [DONE]\n\n"])

    async def error(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [chunk, b'data: {"error": {"message": "child died"}}\n\n', b"data: [DONE]\n\n"])

    async def cut(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [chunk])

    assert await _ask(await serve(whole), soak.STREAM) == "200"
    assert await _ask(await serve(error), soak.STREAM) == soak.ERROR_EVENT
    assert await _ask(await serve(cut), soak.STREAM) == soak.TRUNCATED_STREAM


async def test_status_codes_and_a_body_that_is_not_whole(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def fine(request: web.Request) -> web.Response:
        return web.json_response({"tokens": [1, 2]})

    async def refused(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no"}}, status=503)

    async def half(request: web.Request) -> web.Response:
        return web.Response(body=b'{"tokens": [1,', content_type="application/json")

    assert await _ask(await serve(fine), soak.TOKENIZE) == "200"
    assert await _ask(await serve(refused), soak.TOKENIZE) == "503"
    assert await _ask(await serve(half), soak.TOKENIZE) == soak.TRUNCATED_BODY


async def test_a_connection_closed_before_the_status_line_is_a_reset() -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert await _ask(f"http://127.0.0.1:{port}", soak.CHAT) == soak.RESET


async def test_no_answer_within_the_limit_is_a_hang(serve: Callable[[Handler], Awaitable[str]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    never = asyncio.Event()

    async def wedged(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    monkeypatch.setattr(soak, "REQUEST_TIMEOUT_S", 0.05)
    assert await _ask(await serve(wedged), soak.EMBED) == soak.HANG
    never.set()  # lets the server close at once


def test_a_report_of_only_the_fresh_swap_and_the_soak_has_just_those_sections() -> None:
    from modelyard.bench.fresh import FreshSwap
    from modelyard.bench.processes import MODELYARD, ROUTER_MODE
    from modelyard.bench.report import render
    from modelyard.bench.scenarios import PLANS, Results

    results = Results(fresh={MODELYARD: [FreshSwap(0.5, 1.0, 7.0, 8.5)], ROUTER_MODE: [FreshSwap(0.2, 1.0, 1.4, 2.6)]},
                      soak=_result({"200": 45, "502": 4, soak.HANG: 1}, after=Footprint(300 * MIB, 130 * MIB, 40)))
    report = render(results, PLANS["smoke"], "m", "b", "c")
    assert "## 1." not in report and "## 7." not in report
    assert "| modelyard | 1 | 0.50 s | 1.00 s | 7.00 s (7.00) | 8.50 s |" in report
    assert "swap first token 5.00x" in report and "noise): not met." in report
    assert "| all | 45 | 4 | 1 |" in report  # 2xx first, then the rest by name
    assert "**not met**: 1 hang; anonymous RSS 130 MiB after" in report
