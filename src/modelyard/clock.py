"""Time for the shell: what time it is, and a callback at a given time. Injected, so that in-process tests
drive keep-alive, max-wait, load-timeout and watchdog timers with a fake clock instead of waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...
    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...
    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real one: time.monotonic and the running event loop's timers."""

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, when - time.monotonic()), callback)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
