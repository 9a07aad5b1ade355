"""Load generation: timed requests at a given concurrency, streamed generations, and a status recorder that
follows /models/sse to count loads and draw the timeline."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

POOL_IDLE_S = 5.5  # longer than both modelyard's (4 s) and llama-server's (5 s) keep-alive timeouts


def new_session(concurrency: int, force_close: bool = False, socket_path: Path | None = None
                ) -> aiohttp.ClientSession:
    """A client of at most `concurrency` connections, kept alive unless `force_close` (one per request), over
    TCP or, with `socket_path`, to the Unix socket there (a modelyard child, called "direct")."""
    connector: aiohttp.BaseConnector
    if socket_path is not None:
        connector = aiohttp.UnixConnector(str(socket_path), limit=concurrency, force_close=force_close)
    else:
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=force_close)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))


@dataclass
class Timed:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0


async def timed_requests(session: aiohttp.ClientSession, url: str, body: Callable[[int], dict[str, Any]],
                         count: int, concurrency: int, headers: dict[str, str] | None = None) -> Timed:
    """`count` POSTs of `body(i)` to `url` from `concurrency` workers; latency of each successful one."""
    result = Timed()
    counter = iter(range(count))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            try:
                async with session.post(url, json=body(i), headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                result.latencies.append(time.perf_counter() - started)
            else:
                result.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall = time.perf_counter() - started
    return result


@dataclass
class Stream:
    first_token: float  # seconds from the request to the first content token
    gaps: list[float]
    tokens: int
    total: float  # from the request to the last content token
    started: float = 0.0  # perf_counter() when the request was sent
    ended: float = 0.0  # perf_counter() when the answer had ended (after [DONE])


async def streamed_chat(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int,
                        prompt: str = "Tell me a story about a lighthouse.",
                        headers: dict[str, str] | None = None, first: asyncio.Event | None = None) -> Stream:
    """One streamed chat completion: time to first content token, the gaps between tokens, token count.
    `first` is set when the first content token arrives (a swap is asked for while this one is in flight)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    started = time.perf_counter()
    stamps: list[float] = []
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
                if first is not None:
                    first.set()
    ended = time.perf_counter()
    if not stamps:
        raise RuntimeError(f"no token streamed from {url} for {model}")
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return Stream(stamps[0] - started, gaps, len(stamps), stamps[-1] - started, started, ended)


@dataclass
class StatusRecorder:
    """Follows a router's /models/sse and keeps every status transition (duplicates folded)."""

    url: str
    linger_s: float = 0.2  # how long the last transitions are waited for when it closes
    origin: float = field(default_factory=time.perf_counter)
    transitions: list[tuple[float, str, str]] = field(default_factory=list)
    _last: dict[str, str] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def __aenter__(self) -> StatusRecorder:
        ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(ready))
        await asyncio.wait_for(ready, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(self.linger_s)  # let the last transitions arrive
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def loads(self) -> int:
        return sum(1 for _, _, status in self.transitions if status == "loading")

    def reached(self, model: str, status: str, after: float) -> float | None:
        """When (perf_counter) `model` first went to `status` at or after `after`, if it has."""
        return next((self.origin + t for t, m, s in self.transitions
                     if m == model and s == status and self.origin + t >= after), None)

    async def wait_for(self, model: str, status: str, after: float) -> None:
        """Until `reached` has an answer."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.reached(model, status, after) is not None)

    async def _follow(self, ready: asyncio.Future[None]) -> None:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/models/sse") as response:
            ready.set_result(None)
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                status = (event.get("data") or {}).get("status")
                model = event.get("model")
                if status and model and self._last.get(model) != status:
                    self._last[model] = status
                    self.transitions.append((time.perf_counter() - self.origin, model, status))
                    async with self._changed:
                        self._changed.notify_all()
