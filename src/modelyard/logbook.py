"""What the children said, kept for people: one bounded ring of output lines per model (stdout and stderr, each
with its time), kept across restarts of that model, and a live feed of new lines (GET /logs/{model},
/logs/sse).

It is also the one place a child's own last words are read from: a child marks where its lines begin in its
model's ring, so its failure message quotes only what it said itself, not what an earlier instance said. Every
line is clipped (a child may print 1 MiB lines) and every ring bounded, so the memory held is too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from modelyard.feed import Feed

LINES_PER_MODEL = 2000
_MAX_LINE_CHARS = 4096
_FOLLOWER_BACKLOG = 5000  # lines a follower may lag behind before it is cut off (a load prints a few hundred)


@dataclass(frozen=True)
class LogLine:
    model: str
    time: float  # Unix seconds
    line: str


def _ignore(line: LogLine) -> None:
    """Where a ring outside any logbook (a child made on its own) sends its lines: nowhere."""


class ModelLog:
    """One model's ring, shared by its successive children."""

    def __init__(self, model: str, now: Callable[[], float] = time.time,
                 publish: Callable[[LogLine], None] = _ignore, size: int = LINES_PER_MODEL) -> None:
        self.model = model
        self._now = now
        self._publish = publish
        self._lines: deque[LogLine] = deque(maxlen=size)
        self._count = 0  # lines ever appended: marks stay valid as old lines fall off

    def append(self, text: str) -> None:
        if len(text) > _MAX_LINE_CHARS:
            text = text[:_MAX_LINE_CHARS] + f"... ({len(text) - _MAX_LINE_CHARS} more characters)"
        line = LogLine(self.model, self._now(), text)
        self._lines.append(line)
        self._count += 1
        self._publish(line)

    def mark(self) -> int:
        """Where the next line will be: a child takes its mark when it is made."""
        return self._count

    def since(self, mark: int) -> list[str]:
        """The lines appended since `mark` that the ring still holds."""
        first_kept = self._count - len(self._lines)
        return [entry.line for entry in itertools.islice(self._lines, max(mark, first_kept) - first_kept, None)]

    def last(self, count: int) -> list[LogLine]:
        """The newest `count` lines, oldest first."""
        if count <= 0:
            return []
        return list(itertools.islice(self._lines, max(0, len(self._lines) - count), None))


class Logbook:
    """Every model's ring, and the followers of new lines. `now` gives Unix time (injected: the manager's)."""

    def __init__(self, now: Callable[[], float] = time.time, size: int = LINES_PER_MODEL) -> None:
        self._now = now
        self._size = size
        self._logs: dict[str, ModelLog] = {}
        self._feed: Feed[LogLine] = Feed(_FOLLOWER_BACKLOG)

    def of(self, model: str) -> ModelLog:
        """The model's ring, made on first use."""
        log = self._logs.get(model)
        if log is None:
            log = self._logs[model] = ModelLog(model, self._now, self._feed.publish, self._size)
        return log

    def last(self, model: str, count: int) -> list[LogLine]:
        log = self._logs.get(model)
        return log.last(count) if log is not None else []

    @contextlib.asynccontextmanager
    async def follow(self) -> AsyncIterator[asyncio.Queue[LogLine | None]]:
        """New lines of every model as they come; None means the stream is over (the logbook is closing, or
        the follower fell too far behind)."""
        async with self._feed.subscribe() as queue:
            yield queue

    def close(self) -> None:
        """End every follower's stream (shutdown must not wait for long-lived /logs/sse streams)."""
        self._feed.close()
