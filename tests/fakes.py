"""In-memory fakes for testing the asyncio shell in-process: a clock that moves only when told, and children
that start, become ready, answer, stream, hang and die when the test says so.

Nothing here sleeps or opens a socket: a test drives the fake and waits on what the shell signals back
(status events, futures), so the races of the shell (a request against a death, a drain with streams in
flight, timers) are replayed deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from modelyard.children import ChildError, ChildExited, Reply, StateCallback
from modelyard.config.catalog import Catalog, ModelConfig
from modelyard.engine.command import LaunchPlan
from modelyard.logbook import ModelLog


class FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time stands still until `advance`; then due timers and sleepers run in time order."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._queue: list[tuple[float, int, FakeTimer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._queue, (when, next(self._seq), timer, callback))
        return timer

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_at(self._now + seconds, lambda: future.done() or future.set_result(None))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time on, running each due callback at its own time, and let the woken tasks run."""
        target = self._now + seconds
        while self._queue and self._queue[0][0] <= target:
            when, _, timer, callback = heapq.heappop(self._queue)
            self._now = max(self._now, when)
            if not timer.cancelled:
                callback()
            await settle()
        self._now = target
        await settle()


async def settle(rounds: int = 20) -> None:
    """Let every task that is ready run (the fakes resolve futures; the shell reacts within a few steps)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeReply:
    """A child's answer, fed by the test: `send` bytes, `finish`; a death fails the reader with ChildError."""

    def __init__(self, child: FakeChild, status: int = 200, headers: Mapping[str, str] | None = None,
                 body: bytes | None = None) -> None:
        self._child = child
        self.status = status
        self.headers = dict(headers or {"Content-Type": "application/json"})
        self._queue: asyncio.Queue[bytes | ChildError | None] = asyncio.Queue()
        self.content_length = len(body) if body is not None else None
        if body is not None:
            self._queue.put_nowait(body)
            self._queue.put_nowait(None)

    def send(self, chunk: bytes) -> None:
        self._queue.put_nowait(chunk)

    def finish(self) -> None:
        self._queue.put_nowait(None)

    def fail(self, error: ChildError) -> None:
        self._queue.put_nowait(error)

    async def _next(self) -> bytes | None:
        item = await self._queue.get()
        if isinstance(item, ChildError):
            raise item
        if item is not None:
            self._child.last_activity = self._child.clock.now()
        return item

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self._next()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._next()) is not None:
            yield chunk

    async def lines(self) -> AsyncIterator[bytes]:
        pending = b""
        async for chunk in self.chunks():
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield line + b"\n"
        if pending:
            yield pending


Handler = Callable[["FakeChild", str, str, bytes | None], FakeReply]


def ok_json(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
    return FakeReply(child, body=b'{"ok": true, "served_by": "%s"}' % child.model.encode())


class FakeChild:
    """One fake child. Its requests are answered by `handler` (by default a small JSON body at once)."""

    def __init__(self, model: str, plan: LaunchPlan, on_state: StateCallback,
                 clock: FakeClock, log: ModelLog | None = None) -> None:
        self.model = model
        self.plan = plan
        self.argv = plan.argv
        self.endpoint = plan.endpoint
        self.info: Mapping[str, Any] = {}
        self.clock = clock
        self.on_state = on_state  # what it reports of itself: the test calls it (or on_progress)
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.last_activity = clock.now()
        self.in_flight = 0
        self.handler: Handler = ok_json
        self.healthy = True  # answers its probes
        self.progress_value: int | None = None  # main-thread CPU ticks; the test moves them
        self.stop_requested = asyncio.Event()
        self.ignores_stop = False
        self.replies: list[FakeReply] = []
        self.received: list[tuple[str, str, Mapping[str, str]]] = []
        self.log = log or ModelLog(model, clock.now)
        self._log_mark = self.log.mark()
        self.say("fake: loading")
        self.start_error: Exception | None = None
        self._why_gone = ""

    @property
    def pid(self) -> int | None:
        return None  # not a process: the manager measures nothing

    @property
    def load_seconds(self) -> float:
        return 0.0

    @property
    def lines(self) -> list[str]:
        """What this child said (into its model's ring, as a real child does)."""
        return self.log.since(self._log_mark)

    def log_tail(self) -> list[str]:
        return self.lines

    def failure_summary(self, exit_code: int | None) -> str:
        return f"fake exited with code {exit_code}: " + " | ".join(self.lines[-8:])

    async def start(self) -> None:
        if self.start_error is not None:
            raise self.start_error

    # -- what the test does to it --
    def say(self, *lines: str) -> None:
        """Output lines, as the child's stdout/stderr would carry them."""
        for line in lines:
            self.log.append(line)

    def on_progress(self, progress: Mapping[str, Any]) -> None:
        """Report load progress, as llama-server's `loading` lines do."""
        self.on_state("loading", progress)

    def become_ready(self, info: Mapping[str, Any] | None = None) -> None:
        self.info = info or {}
        if not self.ready.done():
            self.ready.set_result(None)

    def die(self, code: int = 1, *lines: str) -> None:
        """The process ends: pending reads fail, the shell learns of it through `exited`."""
        self.say(*lines)
        if self.exited.done():
            return
        error = self.error()
        for reply in self.replies:
            reply.fail(error)
        if not self.ready.done():
            self.ready.set_exception(ChildExited(code, self.failure_summary(code)))
            self.ready.exception()
        self.exited.set_result(code)

    # -- the Child interface --
    async def stop(self, grace: float) -> int:
        self._why_gone = self._why_gone or f"model '{self.model}' was stopped"
        self.stop_requested.set()
        if self.ignores_stop:  # a hung engine: only the kill after the grace ends it
            await self.clock.sleep(grace)
            self.die(-9)
        self.die(0)
        return await self.exited

    def kill(self, reason: str = "") -> None:
        if reason and not self._why_gone:
            self._why_gone = reason
        self.die(-9)

    def error(self) -> ChildError:
        return ChildError(self._why_gone or f"model '{self.model}' exited: {self.failure_summary(None)}")

    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      params: Mapping[str, str] | None = None) -> AsyncIterator[Reply]:
        if self.exited.done():
            raise self.error()
        self.in_flight += 1
        self.last_activity = self.clock.now()
        self.received.append((method, path, dict(headers or {})))
        try:
            reply = self.handler(self, method, path, body)
            self.replies.append(reply)
            yield reply
        finally:
            self.in_flight -= 1

    async def probe(self, within: float) -> bool:
        return self.healthy and not self.exited.done()

    def progress(self) -> int | None:
        return self.progress_value


class FakeFleet:
    """The child factory for a ModelManager: every child it makes, and a signal when one is made."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.children: dict[str, list[FakeChild]] = {}
        self._made = asyncio.Condition()
        self.prepare: Callable[[FakeChild], None] = lambda child: None

    def __call__(self, model: str, plan: LaunchPlan, on_state: StateCallback, log: ModelLog) -> FakeChild:
        child = FakeChild(model, plan, on_state, self.clock, log)
        self.prepare(child)
        self.children.setdefault(model, []).append(child)
        asyncio.get_running_loop().create_task(self._signal())
        return child

    async def _signal(self) -> None:
        async with self._made:
            self._made.notify_all()

    async def child(self, model: str, number: int = 1) -> FakeChild:
        """The `number`th child made for `model`, once it exists."""
        async with self._made:
            await self._made.wait_for(lambda: len(self.children.get(model, [])) >= number)
        return self.children[model][number - 1]


def catalog(*names: str, **overrides: Any) -> Catalog:
    """Models started by a `cmd` (never run: the fake fleet makes the children)."""
    models = {name: ModelConfig(name=name, settings={}, source="preset", origin="test", command=f"fake {name}",
                                **overrides) for name in names}
    return Catalog(models=models, by_name={name: name for name in names})


class StaticSource:
    """A model source whose catalog the test replaces (for reload)."""

    def __init__(self, value: Catalog) -> None:
        self.value = value

    def load(self) -> Catalog:
        return self.value


async def app_client(manager: Any, settings: Any = None) -> Any:
    """An aiohttp test client of the whole app over a manager the test has already started (its startup and
    cleanup hooks are the test's, not the app's). Close it with `await client.close()`."""
    from aiohttp.test_utils import TestClient, TestServer

    from modelyard.api.app import build_app
    from modelyard.api.context import AppContext, ServerSettings

    app = build_app(AppContext(manager, settings or ServerSettings()))
    app.on_startup.clear()
    app.on_cleanup.clear()
    app.cleanup_ctx.clear()
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client
