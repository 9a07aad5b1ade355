"""llama-swap's `sendLoadingState`: a streamed chat completion whose model is not loaded yet is answered at once
(200, text/event-stream) and, while it waits, told what is happening as `reasoning_content` deltas of valid
chat.completion.chunk objects (which the openai client and llama.cpp's web UI accept, and show as the model's
thinking): the load, its progress as the child reports it, why the request waits (modelyard.decisions), how
long the load took. The model's own stream then continues on the same connection; a failure ends it with an
error event and `[DONE]`.

Off by default: `--send-loading-state` turns it on for every such request, the header
`X-Modelyard-Loading-State: 1` for one (`0` turns it off for one). Refusals that come at once (an unknown
model, a full queue, a concurrency limit) keep their HTTP status: the answer starts only once the request
really waits.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from aiohttp import web

from modelyard.api.errors import error_body, from_model_error
from modelyard.api.json import dumps
from modelyard.errors import ModelError
from modelyard.manager import FeedEvent, Lease, ModelManager, StatusEvent
from modelyard.scheduler import Status

Send = Callable[[Lease, web.StreamResponse | None], Awaitable[web.StreamResponse]]

HEADER = "X-Modelyard-Loading-State"
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_REFUSAL_WINDOW_S = 0.05  # an immediate refusal (429, 503, 404) comes within this: it keeps its status
_RECHECK_S = 1.0  # how often why it waits is looked at again
_KEEPALIVE_S = 15.0


def wanted(request: web.Request, default: bool) -> bool:
    """The header decides for one request; the server flag otherwise."""
    value = request.headers.get(HEADER)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def progress_text(progress: Mapping[str, Any]) -> str | None:
    """`loading: 45%` (with the stage's name when there are several) from the child's
    `{"stages", "current", "value"}`; None if it carries no usable value."""
    value = progress.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    current, stages = progress.get("current"), progress.get("stages")
    stage = f" {current}" if isinstance(current, str) and isinstance(stages, list) and len(stages) > 1 else ""
    return f"loading{stage}: {max(0, min(100, round(value * 100)))}%"


def chunk(model: str, created: int, text: str, first: bool) -> bytes:
    """One chat.completion.chunk carrying `text` as reasoning; the first one names the role."""
    delta: dict[str, Any] = {"role": "assistant", "reasoning_content": text} if first else {"reasoning_content": text}
    body = {"id": "chatcmpl-modelyard-loading", "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return b"data: " + dumps(body) + b"\n\n"


def _shape(reason: str) -> str:
    """A reason without its numbers: "loading for 3 s" and "loading for 4 s" say the same thing."""
    return re.sub(r"\d+(\.\d+)?", "#", reason)


def _why(manager: ModelManager, model: str) -> str | None:
    """Why the newest waiting request for `model` (most likely this one) waits; None while it loads (its
    progress says more)."""
    reasons = [w.reason for w in manager.waiting() if w.model == model]
    if not reasons or manager.status_of(model) == Status.LOADING:
        return None
    return reasons[-1]


async def stream_while_loading(request: web.Request, manager: ModelManager, model: str,
                               waiting: Coroutine[Any, Any, Lease], send: Send) -> web.StreamResponse:
    """Wait for the lease (`waiting`) with messages in the stream, then `send` the request on it into the
    started stream (or as usual, with None, if the lease came at once). The lease is released here, once."""
    started_at = time.monotonic()
    task = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait({task}, timeout=_REFUSAL_WINDOW_S)
        if task.done():
            error = task.exception()
            if isinstance(error, ModelError):
                return from_model_error(error)
            return await send(task.result(), None)
        return await _stream(request, manager, manager.resolve(model).name, task, send, started_at)
    finally:
        if not task.done():
            task.cancel()  # the client went away while it waited: acquire leaves the queue (or hands the lease back)
        elif not task.cancelled() and task.exception() is None:
            manager.release(task.result())


async def _next_event(events: asyncio.Queue[FeedEvent | None], task: asyncio.Future[Lease], feed_open: bool
                      ) -> tuple[FeedEvent | None, bool]:
    """The next status event, or None when the lease came or a recheck is due; and whether the feed is open."""
    if not feed_open:
        await asyncio.wait({task}, timeout=_RECHECK_S)
        return None, False
    getter = asyncio.ensure_future(events.get())
    waits: set[asyncio.Future[Any]] = {task, getter}
    await asyncio.wait(waits, timeout=_RECHECK_S, return_when=asyncio.FIRST_COMPLETED)
    if not getter.done():
        getter.cancel()
        return None, True
    event = getter.result()
    return event, event is not None


async def _prepared(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    return response


async def _stream(request: web.Request, manager: ModelManager, model: str, task: asyncio.Future[Lease],
                  send: Send, started_at: float) -> web.StreamResponse:
    async with manager.subscribe() as events:  # before the answer starts: no progress is missed
        response = await _prepared(request)
        created = int(time.time())
        first = True

        async def say(text: str) -> None:
            nonlocal first
            await response.write(chunk(model, created, text + "\n", first))
            first = False

        await say(f"Loading model '{model}'...")
        said: dict[str, str] = {}  # what was last said of the progress and of why it waits
        quiet_since = time.monotonic()
        event: FeedEvent | None = None
        feed_open = True
        while True:
            lines = []
            if isinstance(event, StatusEvent) and event.model == model and event.progress is not None:
                text = progress_text(event.progress)
                if text is not None and text != said.get("progress"):
                    said["progress"] = text
                    lines.append(text)
            reason = _why(manager, model) if not task.done() else None
            if reason is not None and _shape(reason) != _shape(said.get("why", "")):
                said["why"] = reason
                lines.append(reason)
            for line in lines:
                await say(line)
                quiet_since = time.monotonic()
            if time.monotonic() - quiet_since >= _KEEPALIVE_S:
                await response.write(b": keepalive\n\n")  # clients ignore comments; proxies see traffic
                quiet_since = time.monotonic()
            if task.done():
                break
            event, feed_open = await _next_event(events, task, feed_open)
    error = task.exception()
    if error is not None:
        message = error.message if isinstance(error, ModelError) else str(error)
        body = error_body(error.kind, message) if isinstance(error, ModelError) else {"error": {"message": message}}
        await response.write(b"data: " + dumps(body) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response
    await say(f"'{model}' is ready ({time.monotonic() - started_at:.1f} s).\n")
    return await send(task.result(), response)
