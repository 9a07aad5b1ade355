"""Server-sent event streams and the query parameters the listing routes share.

`event_stream` is the one loop behind /models/sse, /activity/sse, /decisions/sse and /logs/sse: frames from a
feed's queue until the feed ends (None) or the client goes away, a comment every 15 s so that proxies keep a
quiet stream open (clients ignore comments). `query_count` parses a bounded whole-number parameter (`limit`,
`lines`) with a 400 that says what is accepted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from modelyard.errors import ErrorKind, ModelError

KEEPALIVE_S = 15.0
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_KEEPALIVE = b": keepalive\n\n"
T = TypeVar("T")


async def event_stream(request: web.Request, events: asyncio.Queue[T | None],
                       frame: Callable[[T], bytes | None]) -> web.StreamResponse:
    """Answer with the frames of `events`; `frame` skips an event by answering None."""
    response = web.StreamResponse(headers=HEADERS)
    await response.prepare(request)
    while True:
        try:
            event = await asyncio.wait_for(events.get(), KEEPALIVE_S)
        except TimeoutError:
            data: bytes | None = _KEEPALIVE
        else:
            if event is None:
                break
            data = frame(event)
        if data is None:
            continue
        try:
            await response.write(data)
        except (ConnectionError, RuntimeError):  # the client went away
            break
    return response


def query_count(request: web.Request, name: str, default: int, most: int) -> int:
    raw = request.query.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise ModelError(ErrorKind.BAD_REQUEST, f"{name} must be a whole number from 1 to {most}, not {raw[:40]!r}")
    return value
