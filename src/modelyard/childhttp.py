"""The HTTP/1.1 client modelyard forwards requests to its children with: one pool of connections per child, on
the child's Unix socket (llama-server) or its loopback port (another engine).

Why not aiohttp's ClientSession: per request it builds a URL, a ClientRequest, a ClientResponse, a timer and a
tracing context, and under `/tokenize` at concurrency 64 that was a quarter of modelyard's CPU
(bench/results/profile/report.md, issue 12). A child is a server modelyard started, on a socket only modelyard
can reach, so this client needs what such a server's answers use and no more: a status line, headers, and a
body framed by Content-Length, chunked encoding or the end of the connection. Whatever else comes (no HTTP/1.x
status line, headers over 64 KiB, a broken chunk) is a ChildHTTPError naming it, never a guess.

Connections:
- are kept alive and reused, the most recently used first, and never after 4 s idle: the child (cpp-httplib)
  closes an idle connection after 5 s, and a request must not go out on one it is closing;
- are never reused after a chunked answer: llama-server b11434 closes such a connection without saying so
  (`Connection: close`), and a request sent on it fails ("Server disconnected");
- so that the next stream does not wait for a new connection of its own, a spare one is opened as a chunked
  answer's connection goes, under the same 4 s rule (llama-server streams every answer that is streamed, so
  each stream used to pay for its connection: issue 12's "stream-connection cost");
- a request whose reused connection turns out closed before any byte of its answer came (the child closed it
  idle at the moment the request went out) is sent once more, on a new connection: a server that closed an
  idle connection never read the request, so nothing runs twice. A body streamed from the client is never
  sent twice: it fails instead;
- at most `limit` are open at once (0: no limit), idle ones included: each holds one of llama-server's HTTP
  threads (`--threads-http`), and a request beyond them would wait inside the child, unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from pathlib import Path
from urllib.parse import quote, urlencode

from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger(__name__)

IDLE_S = 4.0  # under cpp-httplib's 5 s keep-alive timeout
CONNECT_TIMEOUT_S = 10.0
_HEAD_LIMIT = 64 * 1024  # the most a status line and headers may take
_READ_SIZE = 64 * 1024
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar and '/', as yarl quotes a path
_NO_BODY_STATUSES = frozenset({204, 304})


class ChildHTTPError(Exception):
    """The connection to the child failed, or what came back is not an HTTP answer this client reads."""


class _Connection:
    __slots__ = ("reader", "since", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, now: float) -> None:
        self.reader = reader
        self.writer = writer
        self.since = now  # when it was opened, or last became idle

    def alive(self) -> bool:
        """Not closed by either side, as far as the transport has seen."""
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


def target(path: str, params: Mapping[str, str] | None = None) -> str:
    """The request target of a (decoded) path and a query: the path percent-encoded as a URL's, the query
    form-encoded, each of a multi-valued query's pairs kept."""
    encoded = quote(path, safe=_PATH_SAFE)
    if params:
        encoded += "?" + urlencode(list(params.items()))
    return encoded


class ChildClient:
    """The pool of one child. Opens nothing until its first request; `close()` ends every connection, those
    in use included (their requests fail with ChildHTTPError)."""

    def __init__(self, socket_path: Path | None = None, port: int = 0, *, limit: int = 0, idle_s: float = IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if socket_path is None and not port:
            raise ValueError("a child's client needs its socket or its port")
        self._socket = str(socket_path) if socket_path is not None else None
        self._port = port
        self._limit = limit
        self._idle_s = idle_s
        self._clock = clock
        # over a socket the Host header is only a formality (llama-server reads none)
        self._host_line = f"Host: {'localhost' if socket_path is not None else f'127.0.0.1:{port}'}\r\n"
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._spare: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def open_connections(self) -> int:
        return len(self._all) + self._opening

    async def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                      body: bytes | AsyncIterable[bytes] | None = None,
                      params: Mapping[str, str] | None = None) -> ChildResponse:
        """Send one request; returns once the answer's status and headers are in. The caller reads the body
        from the response and then releases it (`release()`), which returns its connection to the pool."""
        head = self._head(method, target(path, params), headers or {}, body)
        for attempt in (1, 2):
            connection, reused = await self._acquire()
            try:
                await self._send(connection, head, body)
                return await self._answer(connection, method)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                self._drop(connection)
                untouched = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
                if reused and untouched and attempt == 1 and not _is_stream(body):
                    log.debug("a reused connection to the child was closed under a request; sending it again")
                    continue
                raise ChildHTTPError(_describe(exc)) from exc
            except (OSError, asyncio.LimitOverrunError) as exc:
                self._drop(connection)
                raise ChildHTTPError(_describe(exc)) from exc
            except BaseException:  # the answer's own ChildHTTPError, or cancelled mid-request (the child stops)
                self._drop(connection)
                raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self.closed = True
        if self._spare is not None:
            self._spare.cancel()
        for connection in list(self._all):
            connection.close()
        self._all.clear()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # the request

    def _head(self, method: str, request_target: str, headers: Mapping[str, str],
              body: bytes | AsyncIterable[bytes] | None) -> bytes:
        lines = [f"{method} {request_target} HTTP/1.1\r\n", self._host_line]
        declared = False
        for name, value in headers.items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
                raise ChildHTTPError(f"header {name!r} cannot be sent: it holds a line break or a colon")
            lowered = name.lower()
            if lowered in ("host", "transfer-encoding"):
                continue
            if lowered == "content-length":
                if isinstance(body, (bytes, type(None))):
                    continue  # this client counts a body it holds itself
                declared = True
            lines.append(f"{name}: {value}\r\n")
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is None:
            if method in ("POST", "PUT", "PATCH"):
                lines.append("Content-Length: 0\r\n")
        elif not declared:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    async def _send(self, connection: _Connection, head: bytes, body: bytes | AsyncIterable[bytes] | None) -> None:
        writer = connection.writer
        if body is None or isinstance(body, bytes):
            writer.write(head + body if body else head)
            if writer.transport.get_write_buffer_size() > _READ_SIZE:
                await writer.drain()
            return
        writer.write(head)
        chunked = b"Transfer-Encoding: chunked\r\n" in head
        async for part in body:
            if part:
                writer.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
                await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    # the answer

    async def _answer(self, connection: _Connection, method: str) -> ChildResponse:
        reader = connection.reader
        while True:
            raw = await reader.readuntil(b"\r\n\r\n")
            status, version, headers = _parse_head(raw)
            if status >= 200 or status == 101:
                break  # 1xx (100 Continue, 103 Early Hints) are interim: the answer follows
        connection_header = headers.get("Connection", "").lower()
        keep = version == "HTTP/1.1" and "close" not in connection_header
        length: int | None = None
        if method == "HEAD" or status in _NO_BODY_STATUSES or status == 101:
            framing = _Framing.NONE
            length = 0
            keep = keep and status != 101
        elif "chunked" in headers.get("Transfer-Encoding", "").lower():
            framing = _Framing.CHUNKED
            keep = False  # llama-server closes it after a chunked answer, unannounced (the module's docstring)
        elif (declared := headers.get("Content-Length")) is not None:
            if not declared.strip().isdigit():
                raise ChildHTTPError(f"the child's answer has a bad Content-Length: {declared!r}")
            framing = _Framing.FIXED
            length = int(declared)
        else:
            framing = _Framing.UNTIL_CLOSE
            keep = False
        return ChildResponse(self, connection, status, CIMultiDictProxy(headers), framing, length, keep)

    # the pool

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A connection to send on, and whether it was open before (idle, or the spare)."""
        while True:
            if self.closed:
                raise ChildHTTPError("the child's client is closed")
            now = self._clock()
            while self._idle:
                connection = self._idle.pop()
                if now - connection.since < self._idle_s and connection.alive():
                    return connection, True
                self._drop(connection, wake=False)
            if not self._limit or self.open_connections < self._limit:
                return await self._open(), False
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # it was this one's turn: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise

    async def _open(self) -> _Connection:
        self._opening += 1
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                if self._socket is not None:
                    reader, writer = await asyncio.open_unix_connection(self._socket, limit=_HEAD_LIMIT)
                else:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self._port, limit=_HEAD_LIMIT)
        except (OSError, TimeoutError) as exc:
            self._wake()
            raise ChildHTTPError(f"cannot connect to the child: {_describe(exc)}") from exc
        finally:
            self._opening -= 1
        connection = _Connection(reader, writer, self._clock())
        if self.closed:
            connection.close()
            raise ChildHTTPError("the child's client is closed")
        self._all.add(connection)
        return connection

    def _put_back(self, connection: _Connection) -> None:
        if self.closed or not connection.alive():
            self._drop(connection)
            return
        connection.since = self._clock()
        self._idle.append(connection)
        self._wake()

    def _drop(self, connection: _Connection, *, wake: bool = True) -> None:
        connection.close()
        self._all.discard(connection)
        if wake:
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _ended_chunked(self, connection: _Connection) -> None:
        """A chunked answer was read to its end: its connection goes (see the docstring), and a spare is opened
        for the next stream unless one is idle already."""
        self._drop(connection)
        if (self.closed or self._idle or self._spare is not None or self._waiters
                or (self._limit and self.open_connections >= self._limit)):
            return
        self._spare = asyncio.get_running_loop().create_task(self._open_spare())

    async def _open_spare(self) -> None:
        try:
            connection = await self._open()
        except ChildHTTPError as exc:  # the child is going; the next request says so itself
            log.debug("no spare connection to the child: %s", exc)
        else:
            self._put_back(connection)
        finally:
            self._spare = None


class _Framing:
    NONE, FIXED, CHUNKED, UNTIL_CLOSE = range(4)


class ChildResponse:
    """A child's answer: status and headers, the body read once, whole (`read`) or as it arrives (`chunks`,
    `lines`). Body reads raise ChildHTTPError. `release()` gives its connection back (or closes it, if the body
    was not read to its end)."""

    def __init__(self, client: ChildClient, connection: _Connection, status: int, headers: CIMultiDictProxy[str],
                 framing: int, length: int | None, keep: bool) -> None:
        self._client = client
        self._connection: _Connection | None = connection
        self.status = status
        self.headers = headers
        self.content_length = length
        self._framing = framing
        self._keep = keep
        self._done = framing == _Framing.NONE or length == 0

    async def read(self) -> bytes:
        if self._framing == _Framing.FIXED and self.content_length and self._connection is not None:
            try:
                body = await self._connection.reader.readexactly(self.content_length)
            except (OSError, asyncio.IncompleteReadError) as exc:
                raise ChildHTTPError(_describe(exc, body_started=True)) from exc
            self._done = True
            self.release()
            return body
        return b"".join([part async for part in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked encoding taken off)."""
        connection = self._connection
        if self._done or connection is None:
            return
        reader = connection.reader
        try:
            if self._framing == _Framing.CHUNKED:
                async for part in _dechunked(reader):
                    yield part
            elif self._framing == _Framing.FIXED:
                remaining = self.content_length or 0
                while remaining:
                    part = await reader.read(min(remaining, _READ_SIZE))
                    if not part:
                        raise ChildHTTPError(f"the child's answer ended {remaining} bytes short")
                    remaining -= len(part)
                    yield part
            else:
                while part := await reader.read(_READ_SIZE):
                    yield part
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise ChildHTTPError(_describe(exc, body_started=True)) from exc
        self._done = True
        self.release()

    async def lines(self) -> AsyncIterator[bytes]:
        """The body line by line, each with its b"\\n" (the last one without, if the body does not end in one)."""
        pending = b""
        async for part in self.chunks():
            pending += part
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                yield pending[start:end + 1]
                start = end + 1
            pending = pending[start:]
        if pending:
            yield pending

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if not self._done or not self._keep:
            if self._done and self._framing == _Framing.CHUNKED:
                self._client._ended_chunked(connection)
            else:
                self._client._drop(connection)
        else:
            self._client._put_back(connection)


async def _dechunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ChildHTTPError(f"the child's chunked answer is broken: {size_line[:100]!r} is no chunk size") \
                from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers, which nothing here reads
            return
        while size:
            part = await reader.read(min(size, _READ_SIZE))
            if not part:
                raise asyncio.IncompleteReadError(b"", size)
            size -= len(part)
            yield part
        if await reader.readexactly(2) != b"\r\n":
            raise ChildHTTPError("the child's chunked answer is broken: a chunk does not end in CRLF")


def _parse_head(raw: bytes) -> tuple[int, str, CIMultiDict[str]]:
    lines = raw[:-4].decode("utf-8", "surrogateescape").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ChildHTTPError(f"the child did not answer in HTTP/1.x: {lines[0][:200]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ChildHTTPError(f"the child's answer has a bad header line: {line[:200]!r}")
        headers.add(name, value.strip())
    return int(code), version, headers


def _is_stream(body: bytes | AsyncIterable[bytes] | None) -> bool:
    return body is not None and not isinstance(body, bytes)


def _describe(exc: BaseException, *, body_started: bool = False) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the child closed the connection before its answer ended" if exc.partial or body_started else \
            "the child closed the connection without answering"
    if isinstance(exc, asyncio.LimitOverrunError):
        return f"the child's answer has headers or a chunk line over {_HEAD_LIMIT} bytes"
    if isinstance(exc, TimeoutError):
        return f"no connection within {CONNECT_TIMEOUT_S:.0f} s"
    return str(exc) or type(exc).__name__
