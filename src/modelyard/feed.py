"""One stream of events with many subscribers (the status feed, the decisions, the children's log lines): each
subscriber gets a bounded queue; one too slow to follow is cut off (its queue ends with None) rather than
miss events silently or hold memory without bound, and closing the feed ends every subscriber's stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Feed(Generic[T]):
    def __init__(self, backlog: int = 1000) -> None:
        self._backlog = backlog
        self._subscribers: set[asyncio.Queue[T | None]] = set()

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[T | None]]:
        """Events as they are published; None means the stream is over."""
        queue: asyncio.Queue[T | None] = asyncio.Queue(maxsize=self._backlog)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def publish(self, event: T) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._cut(queue)

    def close(self) -> None:
        """End every stream after the events already queued (dropped only where no room is left for the end)."""
        for queue in list(self._subscribers):
            self._subscribers.discard(queue)
            if queue.full():
                self._cut(queue)
            else:
                queue.put_nowait(None)

    def _cut(self, queue: asyncio.Queue[T | None]) -> None:
        self._subscribers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)
