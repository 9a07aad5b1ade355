"""The listening socket and its connections (modelyard.api.server): table tests of the pure decisions,
in-process tests over a real socket with short deadlines, and end-to-end tests of `modelyard serve` under a
connection flood at a 1,024-descriptor limit and on a port already in use."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from modelyard.api.server import (
    MAX_CONNECTIONS,
    MIN_CONNECTIONS,
    Admission,
    ConnectionLimits,
    LimitedSite,
    admit,
    bind_error_message,
    body_allowance,
    connection_cap,
    descriptor_target,
)
from modelyard.bench.processes import children_of, open_descriptors, stop_gracefully
from tests.conftest import fake_cmd, free_port

# ---------------------------------------------------------------------------------------------------------
# Pure decisions


@pytest.mark.parametrize(("soft", "cap"), [
    (1024, 768),                 # the common default: 256 descriptors left for children and upstreams
    (20000, MAX_CONNECTIONS),    # a high limit does not turn a flood into a memory problem
    (256, MIN_CONNECTIONS),      # a tiny limit still serves a few dozen clients
    (280, MIN_CONNECTIONS),
    (400, 144),
])
def test_connection_cap(soft: int, cap: int) -> None:
    assert connection_cap(soft) == cap
    assert ConnectionLimits.for_descriptor_limit(soft).max_connections == cap


@pytest.mark.parametrize(("soft", "hard", "target"), [
    (1024, 524288, 524288),
    (1024, 1024, 1024),
    (4096, resource.RLIM_INFINITY, 2 * (MAX_CONNECTIONS + 256)),
    (100000, resource.RLIM_INFINITY, 100000),  # never lowered
])
def test_descriptor_target(soft: int, hard: int, target: int) -> None:
    assert descriptor_target(soft, hard) == target


@pytest.mark.parametrize(("idle_since", "cap", "expected"), [
    ({}, 3, Admission(accept=True)),
    ({"a": 1.0, "b": None}, 3, Admission(accept=True)),                    # under the cap: nothing closed
    ({"a": 5.0, "b": 2.0, "c": 9.0}, 3, Admission(accept=True, evict="b")),  # the one idle the longest
    ({"a": None, "b": 7.0, "c": None}, 3, Admission(accept=True, evict="b")),  # never a busy one
    ({"a": 4.0, "b": 4.0, "c": 4.0}, 3, Admission(accept=True, evict="a")),  # equals: the first opened
    ({"a": None, "b": None, "c": None}, 3, Admission(accept=False)),       # all busy: refuse the new one
    ({"a": 3.0, "b": 1.0, "c": None, "d": 2.0}, 3, Admission(accept=True, evict="b")),  # over the cap too
])
def test_admit(idle_since: dict[str, float | None], cap: int, expected: Admission[str]) -> None:
    assert admit(idle_since, cap) == expected


@pytest.mark.parametrize(("content_length", "allowance"), [
    (None, 60.0),        # chunked: the plain deadline
    (0, 60.0),
    (2**20, 61.0),       # a declared body also gets the time it takes at the minimum rate
    (256 * 2**20, 316.0),
])
def test_body_allowance(content_length: int | None, allowance: float) -> None:
    assert body_allowance(content_length, ConnectionLimits(body_timeout=60.0, min_body_rate=2**20)) == allowance


@pytest.mark.parametrize(("host", "exc", "says"), [
    ("127.0.0.1", OSError(errno.EADDRINUSE, "address already in use"),
     "cannot listen on 127.0.0.1:8080: the address is already in use"),
    ("127.0.0.1", OSError(errno.EADDRINUSE, "x"), "choose another --port"),
    ("0.0.0.0", OSError(errno.EACCES, "permission denied"), "choose a --port of 1024 or more"),
    ("10.9.9.9", OSError(errno.EADDRNOTAVAIL, "cannot assign"), "10.9.9.9 is not an address of this machine"),
    ("no.such.host", socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
     "--host no.such.host is not a known address (Name or service not known)"),
    ("::1", OSError(errno.EADDRINUSE, "x"), "cannot listen on [::1]:8080"),
    ("127.0.0.1", OSError(errno.EMFILE, "Too many open files"), "cannot listen on 127.0.0.1:8080: Too many"),
])
def test_bind_error_message(host: str, exc: OSError, says: str) -> None:
    message = bind_error_message(host, 8080, exc)
    assert says in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# In-process: a real socket, aiohttp's own server, short deadlines


class Gate:
    """Lets a test hold requests inside their handler and know when they got there."""

    def __init__(self) -> None:
        self.entered = 0
        self.changed = asyncio.Condition()
        self.release = asyncio.Event()

    async def wait_entered(self, count: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.entered >= count), 5)


def make_app(gate: Gate) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    async def hold(request: web.Request) -> web.Response:
        async with gate.changed:
            gate.entered += 1
            gate.changed.notify_all()
        await gate.release.wait()
        return web.Response(text="held")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_post("/echo", echo)
    app.router.add_get("/hold", hold)
    return app


@asynccontextmanager
async def serving(limits: ConnectionLimits, keepalive: float = 60.0,
                  gate: Gate | None = None) -> AsyncIterator[LimitedSite]:
    runner = web.AppRunner(make_app(gate or Gate()), keepalive_timeout=keepalive, handler_cancellation=True)
    await runner.setup()
    site = LimitedSite(runner, "127.0.0.1", 0, limits=limits)
    await site.start()
    try:
        yield site
    finally:
        await runner.cleanup()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, site: LimitedSite) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", site.port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self) -> tuple[int, bytes]:
        async with asyncio.timeout(5):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length"))
            return int(lines[0].split()[1]), await self.reader.readexactly(length)

    async def get(self, path: str) -> tuple[int, bytes]:
        self.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return await self.response()

    async def closed_after(self) -> float:
        """Seconds until the server closes the connection (everything it sent before is discarded)."""
        started = time.monotonic()
        async with asyncio.timeout(5):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionResetError:
                pass
        return time.monotonic() - started

    def close(self) -> None:
        self.writer.close()


async def test_connection_that_sends_nothing_is_closed_at_the_head_deadline() -> None:
    # aiohttp's keep-alive timer (60 s here) is not what closes it.
    async with serving(ConnectionLimits(header_timeout=0.3)) as site:
        client = await Client.connect(site)
        assert 0.25 <= await client.closed_after() < 2


async def test_slowloris_head_is_closed_at_the_head_deadline() -> None:
    async with serving(ConnectionLimits(header_timeout=0.3)) as site:
        client = await Client.connect(site)

        async def drip() -> None:  # a byte every 50 ms: the head never completes
            for byte in b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                client.send(bytes([byte]))
                await asyncio.sleep(0.05)

        dripping = asyncio.create_task(drip())
        try:
            assert 0.25 <= await client.closed_after() < 2
        finally:
            dripping.cancel()


async def test_kept_alive_connection_idles_for_the_keepalive_timeout_not_the_head_deadline() -> None:
    async with serving(ConnectionLimits(header_timeout=0.2), keepalive=1.0) as site:
        client = await Client.connect(site)
        assert await client.get("/ok") == (200, b"ok")
        assert await client.get("/ok") == (200, b"ok")  # each request in time: served on one connection
        assert 0.8 <= await client.closed_after() < 3


async def test_kept_alive_connection_must_finish_its_next_head_in_time_once_started() -> None:
    async with serving(ConnectionLimits(header_timeout=0.3), keepalive=30.0) as site:
        client = await Client.connect(site)
        assert await client.get("/ok") == (200, b"ok")
        client.send(b"G")
        assert 0.25 <= await client.closed_after() < 2


async def test_bodies_sent_in_time_are_served() -> None:
    async with serving(ConnectionLimits(header_timeout=0.3, body_timeout=0.3)) as site:
        client = await Client.connect(site)
        client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert await client.response() == (200, b"5")
        client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        assert await client.response() == (200, b"3")


@pytest.mark.parametrize("head", [
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
])
async def test_body_that_stops_arriving_is_answered_408_and_the_connection_closed(head: bytes) -> None:
    limits = ConnectionLimits(body_timeout=0.3, min_body_rate=1e12)
    async with serving(limits) as site:
        client = await Client.connect(site)
        client.send(head)
        started = time.monotonic()
        status, body = await client.response()
        assert 0.25 <= time.monotonic() - started < 2
        assert status == 408
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout"
        assert "did not arrive within 0.3 s (10 bytes received)" in error["message"]
        assert await client.closed_after() < 2


async def test_at_the_cap_the_connection_idle_the_longest_is_closed() -> None:
    async with serving(ConnectionLimits(max_connections=3)) as site:
        clients = [await Client.connect(site) for _ in range(3)]
        for client in clients:  # answered in this order: the first is idle the longest
            assert await client.get("/ok") == (200, b"ok")
        newcomer = await Client.connect(site)
        assert await newcomer.get("/ok") == (200, b"ok")
        assert await clients[0].closed_after() < 2
        for client in clients[1:]:
            assert await client.get("/ok") == (200, b"ok")
        assert site.table is not None and len(site.table) == 3


async def test_a_busy_connection_is_never_closed_to_make_room() -> None:
    gate = Gate()
    async with serving(ConnectionLimits(max_connections=2), gate=gate) as site:
        busy, idle = await Client.connect(site), await Client.connect(site)
        busy.send(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        await gate.wait_entered(1)
        assert await idle.get("/ok") == (200, b"ok")
        newcomer = await Client.connect(site)
        assert await newcomer.get("/ok") == (200, b"ok")
        assert await idle.closed_after() < 2
        gate.release.set()
        assert await busy.response() == (200, b"held")


async def test_when_every_connection_is_busy_a_new_one_is_closed_at_once(caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate()
    async with serving(ConnectionLimits(max_connections=2, header_timeout=30), gate=gate) as site:
        busy = [await Client.connect(site) for _ in range(2)]
        for client in busy:
            client.send(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        await gate.wait_entered(2)
        with caplog.at_level(logging.WARNING, logger="modelyard.api.server"):
            refused = await Client.connect(site)
            assert await refused.closed_after() < 1  # not the 30 s head deadline
        assert "every one busy" in caplog.text
        gate.release.set()
        for client in busy:
            assert await client.response() == (200, b"held")
        later = await Client.connect(site)  # room again: an idle one makes way
        assert await later.get("/ok") == (200, b"ok")


async def test_an_address_in_use_fails_with_eaddrinuse() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runner = web.AppRunner(make_app(Gate()))
        await runner.setup()
        try:
            with pytest.raises(OSError) as raised:
                await LimitedSite(runner, "127.0.0.1", port, limits=ConnectionLimits(),
                                  reuse_address=True).start()
            assert "already in use" in bind_error_message("127.0.0.1", port, raised.value)
        finally:
            await runner.cleanup()


# ---------------------------------------------------------------------------------------------------------
# End to end: `modelyard serve` in a subprocess


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


class Served:
    def __init__(self, tmp_path: Path, port: int, *args: str) -> None:
        preset = tmp_path / "fleet.ini"
        preset.write_text("".join(f"[{name}]\ncmd = {fake_cmd(name)}\nstop-timeout = 2\n" for name in ("a", "b")))
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp_path / "router.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelyard.cli", "serve", "--port", str(port), "--models-preset",
                 str(preset), *args], stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limit_descriptors)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"modelyard did not start:\n{self.log()}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    router = Served(tmp_path, free_port())
    try:
        router.wait_ready()
        yield router
    finally:
        stop_gracefully(router.proc)
        assert not children_of(router.proc.pid)


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def _timed(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> tuple[int, float]:
    started = time.monotonic()
    response = await client.request(method, path, **kwargs)
    return response.status_code, time.monotonic() - started


async def _flood(url: str, router_pid: int, baseline: int) -> dict[str, Any]:
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    idle: list[asyncio.StreamWriter] = []
    for _ in range(11):  # 1,100 idle sockets, in batches the listen backlog can take
        pairs = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(100)))
        idle += [writer for _, writer in pairs]
    slow = [await asyncio.open_connection(host, port) for _ in range(5)]

    async def drip(writer: asyncio.StreamWriter) -> None:  # slowloris: a byte every 0.2 s
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.2)

    dripping = [asyncio.create_task(drip(writer)) for _, writer in slow]
    held = open_descriptors(router_pid)
    figures: dict[str, Any] = {"held_during_flood": held}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30,
                                     limits=httpx.Limits(max_keepalive_connections=0)) as client:
            figures["health"] = [await _timed(client, "GET", "/health") for _ in range(5)]
            figures["chat_loaded"] = await _timed(client, "POST", "/v1/chat/completions", json=_chat("a"))
            figures["chat_spawning"] = await _timed(client, "POST", "/v1/chat/completions", json=_chat("b"))
        started = time.monotonic()
        async with asyncio.timeout(20):  # the default 10 s head deadline closes the slowloris sockets
            for reader, _ in slow:
                try:
                    while await reader.read(65536):
                        pass
                except ConnectionResetError:
                    pass
        figures["slowloris_closed_after"] = time.monotonic() - started
        # The idle sockets are still open on this side: the router's head deadline gave their descriptors back.
        for _ in range(200):  # a bounded poll of the router's descriptors, at most 10 s
            if open_descriptors(router_pid) <= baseline + 20:
                break
            await asyncio.sleep(0.05)
        figures["held_after_deadline"] = open_descriptors(router_pid)
    finally:
        for task in dripping:
            task.cancel()
        for writer in idle + [writer for _, writer in slow]:
            writer.close()
    return figures


def test_a_flood_of_idle_and_slowloris_connections_leaves_health_and_models_answering(served: Served) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:  # this process holds 1,105 client sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    with httpx.Client(base_url=served.url, timeout=30) as client:
        assert client.post("/v1/chat/completions", json=_chat("a")).status_code == 200
    baseline = open_descriptors(served.proc.pid)

    figures = asyncio.run(_flood(served.url, served.proc.pid, baseline))
    print(f"\nflood figures: {figures}")
    assert figures["held_during_flood"] >= 700, "the flood did not reach the connection cap"
    assert all(status == 200 and seconds < 1.0 for status, seconds in figures["health"]), figures
    assert figures["chat_loaded"][0] == 200 and figures["chat_loaded"][1] < 2.0, figures
    assert figures["chat_spawning"][0] == 200 and figures["chat_spawning"][1] < 10.0, figures
    assert figures["held_after_deadline"] <= baseline + 20, (baseline, figures)
    assert served.proc.poll() is None
    assert "Too many open files" not in served.log()


def test_port_in_use_is_one_line_nonzero_exit_and_no_child_left(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        preset = tmp_path / "fleet.ini"
        preset.write_text(f"[a]\ncmd = {fake_cmd('a')}\nload-on-startup = true\nstop-timeout = 2\n")
        proc = subprocess.Popen([sys.executable, "-m", "modelyard.cli", "serve", "--port", str(port),
                                 "--models-preset", str(preset)], stderr=subprocess.PIPE, text=True)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: cannot listen on 127.0.0.1:{port}: the address is already in use (another "
                      f"modelyard or llama-server?); stop that server or choose another --port"], stderr
    assert not children_of(proc.pid)
