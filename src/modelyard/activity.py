"""Activity: one record per model request, from the moment it arrives to its last byte, kept in a bounded ring
(the newest 1000 finished ones) beside the set still in flight, and published to followers as they change;
plus the opt-in capture of requests and answers (redacted, truncated, bounded in total memory).

The token counts come from what the child already says: the `usage` and `timings` objects of its JSON answer or
of the last events of its stream. They are found by searching the tail of the bytes for those keys and
parsing only the small object that follows, never the whole body (pure functions, table-tested), so an answer
of a megabyte of embeddings costs a byte search, not a parse.

The HTTP side (api/activity.py) creates and ends records; the proxy and the Ollama translation mark the first
byte and the tokens; `cancel` ends an in-flight request by cancelling the task serving it, which closes the
upstream connection (the child stops generating) and lets the handler answer with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

log = logging.getLogger(__name__)

RING_SIZE = 1000
_QUEUE_SIZE = 1000  # frames a follower may lag behind before its stream is ended


# --- tokens: pure functions over the child's bytes ----------------------------------------------------------

class Tokens(NamedTuple):  # a tuple: built once per request, on the hot path
    tokens_in: int | None = None
    tokens_out: int | None = None
    per_s: float | None = None  # generation speed, as the child measured it


NO_TOKENS = Tokens()


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def token_counts(usage: Mapping[str, Any] | None, timings: Mapping[str, Any] | None) -> Tokens:
    """Prompt tokens (cached ones included) and generated tokens, from OpenAI's `usage` (or Anthropic's
    input/output names) and llama-server's `timings`: `usage` is preferred for the prompt, since the child's
    `prompt_n` leaves out what its prompt cache already held, `timings` for the output and the speed."""
    usage = usage if isinstance(usage, dict) else {}  # dict, not Mapping: an ABC check costs a microsecond
    timings = timings if isinstance(timings, dict) else {}
    tokens_in = _count(usage.get("prompt_tokens"))
    if tokens_in is None:
        tokens_in = _count(usage.get("input_tokens"))
    prompt_n = _count(timings.get("prompt_n"))
    if tokens_in is None and prompt_n is not None:
        tokens_in = prompt_n + (_count(timings.get("cache_n")) or 0)
    tokens_out = _count(timings.get("predicted_n"))
    if tokens_out is None:
        tokens_out = _count(usage.get("completion_tokens"))
    if tokens_out is None:
        tokens_out = _count(usage.get("output_tokens"))
    speed = timings.get("predicted_per_second")
    per_s = float(speed) if isinstance(speed, int | float) and not isinstance(speed, bool) and speed > 0 else None
    return Tokens(tokens_in, tokens_out, per_s if tokens_out else None)


_OBJECT_LIMIT = 4096  # usage and timings are a few hundred bytes; anything longer is not them


def object_after(data: bytes, key: bytes) -> dict[str, Any] | None:
    """The JSON object that follows the last `"key":` in `data`, or None. A key inside a JSON string is
    escaped (`\\"usage\\":`), so it is never taken for the real one; the answer's own keys come last."""
    at = data.rfind(b'"' + key + b'":')
    if at < 0:
        return None
    start = at + len(key) + 3
    while start < len(data) and data[start] in b" \t\r\n":
        start += 1
    if start >= len(data) or data[start] != ord("{"):
        return None
    end = min(len(data), start + _OBJECT_LIMIT)
    # Fast path: match braces with find() (usage and timings hold numbers and plain keys); if a brace was in a
    # string after all, the parse fails and the exact scan below decides.
    depth, index = 1, start + 1
    while depth:
        close = data.find(b"}", index, end)
        if close < 0:
            return None
        opening = data.find(b"{", index, close)
        depth, index = (depth + 1, opening + 1) if opening >= 0 else (depth - 1, close + 1)
    try:
        value = orjson.loads(data[start:index])
    except orjson.JSONDecodeError:
        return _scan_object(data, start, end)
    return value if isinstance(value, dict) else None


def _scan_object(data: bytes, start: int, end: int) -> dict[str, Any] | None:
    """The object starting at `start`, found byte by byte, strings and escapes understood."""
    depth, index = 0, start
    in_string = False
    while index < end:
        byte = data[index]
        if in_string:
            if byte == 0x5C:  # backslash: skip the escaped byte
                index += 1
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte == 0x7B:
            depth += 1
        elif byte == 0x7D:
            depth -= 1
            if depth == 0:
                try:
                    value = orjson.loads(data[start:index + 1])
                except orjson.JSONDecodeError:
                    return None
                return value if isinstance(value, dict) else None
        index += 1
    return None


def tokens_in_body(data: bytes) -> Tokens:
    """Tokens from a JSON answer or the tail of a stream (SSE `data:` events): its last `usage` and `timings`."""
    if b'"usage"' not in data and b'"timings"' not in data:
        return NO_TOKENS
    return token_counts(object_after(data, b"usage"), object_after(data, b"timings"))


# --- capture: pure helpers ------------------------------------------------------------------------------------

_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "set-cookie", "proxy-authorization"})
_KEY_LOOKING = re.compile(r"(?i)^(bearer|basic)\s+\S|^(sk|pk|rk|key|api)[-_][A-Za-z0-9_-]{8,}|^[A-Za-z0-9_\-]{32,}$")
REDACTED = "[redacted]"


def redact_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Headers as a capture shows them: credentials and values that look like keys replaced by [redacted]."""
    shown: dict[str, str] = {}
    for name, value in headers:
        secret = name.lower() in _SECRET_HEADERS or _KEY_LOOKING.search(value.strip()) is not None
        shown[str(name)] = REDACTED if secret else str(value)  # str: CIMultiDict keys are istr, not str
    return shown


def body_part(body: bytes, limit: int) -> dict[str, Any]:
    """A body as a capture keeps it: at most `limit` bytes, as text (undecodable bytes replaced)."""
    return {"body": body[:limit].decode(errors="replace"), "truncated": len(body) > limit}


# --- records ---------------------------------------------------------------------------------------------------

@dataclass(eq=False, slots=True)
class Record:
    """One model request. The public fields are the contract's Record (docs/observability-api.md)."""

    id: int
    time: float
    client: str | None
    route: str
    method: str
    model: str | None = None
    stream: bool = False
    state: str = "queued"  # queued -> running -> done
    status: int | None = None
    queue_wait: float | None = None
    ttft: float | None = None
    duration: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    # not shown: what the shell needs
    started: float = 0.0  # monotonic
    waiting_since: float = 0.0  # monotonic: when it asked the manager for its model
    task: asyncio.Task[Any] | None = None
    cancelled: bool = False  # by POST /activity/{id}/cancel
    capture: CaptureDraft | None = None

    def count(self, tokens: Tokens) -> None:
        self.tokens_in, self.tokens_out, self.tokens_per_s = tokens.tokens_in, tokens.tokens_out, tokens.per_s

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "client": self.client, "model": self.model, "route": self.route,
                "method": self.method, "stream": self.stream, "state": self.state, "status": self.status,
                "queue_wait": self.queue_wait, "ttft": self.ttft, "duration": self.duration,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "tokens_per_s": self.tokens_per_s,
                "error": self.error}


@dataclass(eq=False)
class CaptureDraft:
    """What is kept of one captured exchange while it runs; the response body grows up to `limit`."""

    limit: int
    request_headers: dict[str, str]
    request: dict[str, Any] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - self.size
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:max(room, 0)]
        if chunk:
            self.chunks.append(chunk)
            self.size += len(chunk)

    def response(self) -> dict[str, Any]:
        body = b"".join(self.chunks)
        return {"headers": self.response_headers, "body": body.decode(errors="replace"), "truncated": self.truncated}


class CaptureStore:
    """The captured exchanges, newest last, within `max_bytes` in total (the oldest dropped first)."""

    def __init__(self, max_bytes: int = 16 * 2**20, max_body_bytes: int = 65536) -> None:
        self.enabled = False
        self.max_bytes = max_bytes
        self.max_body_bytes = max_body_bytes
        self._items: deque[tuple[int, dict[str, Any]]] = deque()
        self._size = 0

    def add(self, record: Record, draft: CaptureDraft) -> None:
        item = {**record.as_json(), "request": draft.request, "response": draft.response()}
        size = len(orjson.dumps(item))
        self._items.append((size, item))
        self._size += size
        while self._size > self.max_bytes and self._items:
            dropped, _ = self._items.popleft()
            self._size -= dropped

    def items(self) -> list[dict[str, Any]]:
        return [item for _, item in reversed(self._items)]

    def clear(self) -> None:
        self._items.clear()
        self._size = 0


# --- the registry ------------------------------------------------------------------------------------------------

Listener = Callable[[Record], None]


class Activity:
    """The ring of finished records, the in-flight ones, their followers and the capture store. `clock` is
    monotonic (durations), `wall` gives the records' times; both are injectable for tests."""

    def __init__(self, size: int = RING_SIZE, clock: Callable[[], float] = time.perf_counter,
                 wall: Callable[[], float] = time.time, capture: CaptureStore | None = None) -> None:
        self.size = size
        self._clock = clock
        self._wall = wall
        self._ring: deque[Record] = deque(maxlen=size)
        self._in_flight: dict[int, Record] = {}
        self._ids = itertools.count(1)
        self._followers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self.listeners: list[Listener] = []  # called as each request ends (the metrics)
        self.capture = capture or CaptureStore()

    def begin(self, client: str | None, route: str, method: str, task: asyncio.Task[Any] | None) -> Record:
        record = Record(next(self._ids), self._wall(), client, route, method, started=self._clock(), task=task)
        self._in_flight[record.id] = record
        return record

    def queued(self, record: Record, model: str, stream: bool) -> None:
        """The request names its model and waits for a lease: followers see it start."""
        record.model, record.stream = model, stream
        record.waiting_since = self._clock()
        self._publish(record)

    def running(self, record: Record, model: str) -> None:
        record.model = model
        record.state = "running"
        record.queue_wait = self._clock() - record.waiting_since
        self._publish(record)

    def first_byte(self, record: Record) -> None:
        if record.ttft is None:
            record.ttft = self._clock() - record.started

    def end(self, record: Record, status: int | None, error: str | None = None) -> None:
        if record.state == "done":
            return
        record.state = "done"
        record.status = status
        record.duration = self._clock() - record.started
        if error is not None and record.error is None:
            record.error = error
        if record.tokens_out and record.tokens_per_s is None and record.duration > 0:
            generating = record.duration - (record.ttft or 0.0) if record.stream else record.duration
            record.tokens_per_s = record.tokens_out / generating if generating > 0 else None
        record.task = None
        self._in_flight.pop(record.id, None)
        self._ring.append(record)
        if record.capture is not None:
            self.capture.add(record, record.capture)
            record.capture = None
        for listener in self.listeners:
            try:
                listener(record)
            except Exception:  # one broken listener must not fail the request it observes
                log.exception("activity listener %r failed on request %d", listener, record.id)
        self._publish(record)

    def cancel(self, request_id: int, reason: str) -> bool:
        """End an in-flight request at once; False if it is not in flight."""
        record = self._in_flight.get(request_id)
        if record is None or record.task is None or record.cancelled:
            return False
        record.cancelled = True
        record.error = reason
        record.task.cancel()
        return True

    def recent(self, limit: int, wanted: Callable[[Record], bool]) -> list[Record]:
        found = []
        for record in reversed(self._ring):
            if wanted(record):
                found.append(record)
                if len(found) >= limit:
                    break
        return found

    def in_flight(self, wanted: Callable[[Record], bool]) -> list[Record]:
        return [r for r in self._in_flight.values() if wanted(r)]

    # -- followers --
    def _publish(self, record: Record) -> None:
        if not self._followers:
            return
        frame = record.as_json()
        for queue in list(self._followers):
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:  # too slow to follow: end its stream rather than skip records silently
                self._followers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    @contextlib.asynccontextmanager
    async def follow(self) -> AsyncIterator[asyncio.Queue[dict[str, Any] | None]]:
        """Records (as JSON) as they start, run and end; None means the stream must end."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=_QUEUE_SIZE)
        self._followers.add(queue)
        try:
            yield queue
        finally:
            self._followers.discard(queue)

    def end_followers(self) -> None:
        for queue in list(self._followers):
            while not queue.empty():  # the end must get in, even behind a backlog
                queue.get_nowait()
            queue.put_nowait(None)
