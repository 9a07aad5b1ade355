"""One swap, measured phase by phase (bench/phases.py names the phases and their marks).

With `--models-max 1` and model `old` loaded, a stream for `old` is started and, once its first token is
in, a stream for `new` is asked for: the router must let `old`'s answer finish (drain), stop its child,
start `new`'s and forward the request. The marks come from where each can be seen, the same way for both
routers where both show it:
- asked, drained, first token: the bench's own requests;
- exited: `old`'s child process leaving the process table (polled in /proc: a zombie has exited);
- spawned, ready: the router's /models/sse events for `new` (`loading`, `loaded`), when they arrive;
- first line, weights loaded, warmed up: `new`'s child's own log stamps, placed on the bench's clock by
  when its lines were received: modelyard records that time for each line (GET /logs/{model}), router mode
  forwards the lines to its output, which the bench follows as they are written."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp

from modelyard.bench.load import StatusRecorder, streamed_chat
from modelyard.bench.phases import START, child_marks
from modelyard.bench.processes import MODELYARD, RouterProcess, child_pid

_POLL_S = 0.002  # how often the process table and router mode's log are looked at during a swap
_SWAP_LIMIT_S = 120.0  # a swap not done by then fails the scenario rather than hanging it
_TOKENS = 4  # the new model's stream


class LogFollower:
    """The lines appended to a file from now on, each with when it was read (perf_counter)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None
        self._pending = b""

    async def __aenter__(self) -> LogFollower:
        self._file = self.path.open("rb")
        self._file.seek(0, 2)
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._read()
        self._file.close()

    def _read(self) -> None:
        chunk = self._file.read()
        if chunk:
            now = time.perf_counter()
            *complete, self._pending = (self._pending + chunk).split(b"\n")
            self.lines += [(now, line.decode(errors="replace")) for line in complete]

    async def _follow(self) -> None:
        while True:
            self._read()
            await asyncio.sleep(_POLL_S)


def has_exited(pid: int) -> bool:
    """Whether process `pid` has exited: gone from /proc, or a zombie its parent has not reaped yet. (A read
    of /proc never waits on a disk: fine on the event loop.)"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


async def process_exit(pid: int) -> float:
    """When (perf_counter) process `pid` has exited, polled every _POLL_S."""
    deadline = time.perf_counter() + _SWAP_LIMIT_S
    while not has_exited(pid):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"process {pid} had not exited after {_SWAP_LIMIT_S:.0f} s")
        await asyncio.sleep(_POLL_S)
    return time.perf_counter()


async def _modelyard_lines(session: aiohttp.ClientSession, router: RouterProcess, model: str) -> list[tuple[float,
                                                                                                           str]]:
    """The model's log lines as modelyard keeps them, each with when modelyard read it (moved onto the
    perf_counter clock)."""
    async with session.get(f"{router.url}/logs/{model}", params={"lines": "500"}) as response:
        response.raise_for_status()
        lines = (await response.json())["lines"]
    offset = time.time() - time.perf_counter()
    return [(float(item["time"]) - offset, str(item["line"])) for item in lines]


async def measured_swap(session: aiohttp.ClientSession, router: RouterProcess, recorder: StatusRecorder, old: str,
                        new: str, drain_tokens: int) -> dict[str, float]:
    """One swap from `old` to `new`; its marks in seconds since the ask (START is 0)."""
    old_pid = child_pid(router.pid, router.child_endpoint(old))
    follower = LogFollower(router.log) if router.kind != MODELYARD else None
    async with follower or contextlib.nullcontext():
        first = asyncio.Event()
        in_flight = asyncio.create_task(streamed_chat(session, router.url, old, drain_tokens, first=first))
        await asyncio.wait_for(first.wait(), _SWAP_LIMIT_S)
        asked = time.perf_counter()
        exited = asyncio.create_task(process_exit(old_pid)) if old_pid is not None else None
        swapped = await asyncio.wait_for(streamed_chat(session, router.url, new, _TOKENS), _SWAP_LIMIT_S)
        drained = (await in_flight).ended
        marks: dict[str, Any] = {START: asked, "drained": drained, "first token": swapped.started +
                                 swapped.first_token, "exited": await exited if exited is not None else None}
        # The router's `loaded` event may come a moment after the first token (it goes out on another stream).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await recorder.wait_for(new, "loaded", asked)
    marks["ready"] = recorder.reached(new, "loaded", asked)
    marks["spawned"] = recorder.reached(new, "loading", asked)
    if follower is not None:
        lines, port = follower.lines, router.child_endpoint(new).port  # router mode's child: on a port
    else:
        lines, port = await _modelyard_lines(session, router, new), None
    marks.update(child_marks([(at, line) for at, line in lines if at >= asked], port))
    return {mark: at - asked for mark, at in marks.items() if at is not None}
