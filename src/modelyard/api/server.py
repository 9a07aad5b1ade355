"""The listening socket and its connections: how many modelyard holds, how long a client may take to send a
request, and the one-line answer when the address cannot be bound.

A fault campaign against main (issue 9) found that 1,100 idle connections at the common 1,024-descriptor
limit left `/health` and model loads unanswered until the flood ended: accept() failed with EMFILE and children
could not be spawned. Nothing closed a connection that never sent a request: aiohttp's AppRunner passes no
`keepalive_timeout`, so RequestHandler's own default (3,630 s) applied, and no request body had a deadline.

What aiohttp 3.14 has, read in web_protocol.py: its keep-alive timer is armed at `connection_made` and after
each response, is not reset by incoming bytes, and closes the connection only while it waits for a complete
head. It is therefore also a deadline for the head of a fresh connection and for a slowloris one, but with
the idle timeout's value. What it lacks: a head deadline distinct from the idle timeout, any body deadline,
and any cap on connections. So:

- `LimitedSite` is a `BaseSite` whose protocol factory wraps each of aiohttp's own RequestHandlers in a thin
  `_Connection` protocol that forwards every transport event unchanged and tells a `ConnectionTable` when
  the connection opens, receives bytes and closes. This is the least fragile seam: aiohttp's `Server` is
  documented as a protocol factory, and the wrapper overrides nothing of RequestHandler (a subclass would
  have to re-create it from the Server's private kwargs). The site also wraps `Server.request_handler`
  (the application's entry point, read by each RequestHandler as it is created) to learn when a request
  starts and when its response has been written: it runs inside aiohttp's per-request task, which also
  finishes the response, so that task's end is exactly "the connection is idle again".
- Head deadline, as nginx's `client_header_timeout`: a fresh connection must deliver a complete head within
  `header_timeout` of connecting; a kept-alive one may idle for `keepalive_timeout` (aiohttp's timer, set
  explicitly), and once it sends the first byte of its next head, must complete it within `header_timeout`.
- Body deadline: `body_timeout` from the end of the head, plus the time the declared Content-Length takes at
  `min_body_rate` (bodies may be 256 MiB). Past it the request's stream raises `BodyTimeout`; the wrapper
  answers 408 and closes the connection. This is enforced here rather than in a middleware that reads the
  body up front, because `tolerant_path_middleware` clones the request and aiohttp refuses to clone a
  request whose body was read.
- Connection cap, derived from the descriptor limit (raised to the hard limit at start): when a connection
  arrives at the cap, the connection idle the longest is closed (idle = no request in progress, including
  one still sending its head); when none is idle the new one is closed at once. Closing, not answering 503:
  the client has usually sent its request already, and closing a socket with unread data sends a reset
  that discards any answer. The decisions are pure functions with table tests (tests/test_connections.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from modelyard.api.errors import error_response
from modelyard.errors import ErrorKind

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0  # a request head is a few hundred bytes: 10 s is generous even on a bad link
# Shorter than the 3,630 s aiohttp would otherwise use, so idle pooled connections give their descriptor
# back soon; equal to aiohttp's own client pool (15 s) and longer than httpx's (5 s), so a client rarely
# reuses a connection at the instant it is closed.
KEEPALIVE_TIMEOUT_S = 15.0
BODY_TIMEOUT_S = 60.0
MIN_BODY_RATE = 2**20  # bytes a second a declared body must sustain beyond BODY_TIMEOUT_S
RESERVED_DESCRIPTORS = 256  # left for children's pipes, upstream sockets, model and log files
MIN_CONNECTIONS = 32
MAX_CONNECTIONS = 4096  # a high hard limit must not let a flood turn into a memory problem

K = TypeVar("K")
_RequestHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = MAX_CONNECTIONS
    header_timeout: float = HEADER_TIMEOUT_S
    keepalive_timeout: float = KEEPALIVE_TIMEOUT_S
    body_timeout: float = BODY_TIMEOUT_S
    min_body_rate: float = MIN_BODY_RATE

    @classmethod
    def for_descriptor_limit(cls, soft_limit: int) -> ConnectionLimits:
        return cls(max_connections=connection_cap(soft_limit))


def connection_cap(soft_limit: int) -> int:
    """How many client connections fit in `soft_limit` descriptors, leaving room for everything else."""
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, soft_limit - RESERVED_DESCRIPTORS))


def descriptor_target(soft: int, hard: int) -> int:
    """The soft RLIMIT_NOFILE to ask for: the hard limit, or (where the hard limit is unlimited, as on
    macOS, whose kernel still refuses more than its own maximum) enough for MAX_CONNECTIONS and children."""
    if hard == resource.RLIM_INFINITY:
        return max(soft, 2 * (MAX_CONNECTIONS + RESERVED_DESCRIPTORS))
    return max(soft, hard)


def raise_descriptor_limit() -> int:
    """Raise this process's soft descriptor limit as far as allowed; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = descriptor_target(soft, hard)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, exc)
    log.debug("descriptor limit %d (hard %s): up to %d client connections", soft,
              "unlimited" if hard == resource.RLIM_INFINITY else hard, connection_cap(soft))
    return soft


def body_allowance(content_length: int | None, limits: ConnectionLimits) -> float:
    """Seconds a request body may take after its head: chunked bodies (no length) get body_timeout."""
    return limits.body_timeout + max(0, content_length or 0) / limits.min_body_rate


@dataclass(frozen=True)
class Admission(Generic[K]):
    accept: bool
    evict: K | None = None


def admit(idle_since: Mapping[K, float | None], cap: int) -> Admission[K]:
    """What to do when a connection arrives. `idle_since` maps each open connection to when it last became
    idle (None: a request is in progress on it). Under the cap: accept. At the cap: close the connection
    idle the longest (the first of equals) to make room, or, when every one is busy, refuse the new one."""
    if len(idle_since) < cap:
        return Admission(accept=True)
    idle = [(since, n) for n, since in enumerate(idle_since.values()) if since is not None]
    if not idle:
        return Admission(accept=False)
    oldest = min(idle)[1]
    return Admission(accept=True, evict=list(idle_since)[oldest])


def bind_error_message(host: str, port: int, exc: OSError) -> str:
    """One line naming the address and what to do, for each way binding the listening socket fails."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    prefix = f"cannot listen on {address}"
    if isinstance(exc, socket.gaierror):
        return f"{prefix}: --host {host} is not a known address ({exc.strerror}); pass an IP address or a " \
               f"name that resolves"
    if exc.errno == errno.EADDRINUSE:
        return f"{prefix}: the address is already in use (another modelyard or llama-server?); stop that " \
               f"server or choose another --port"
    if exc.errno == errno.EACCES:
        return f"{prefix}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE); " \
               f"choose a --port of 1024 or more"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{prefix}: {host} is not an address of this machine; pass one of its addresses, 127.0.0.1 " \
               f"or 0.0.0.0 as --host"
    return f"{prefix}: {exc.strerror or exc}"


class BodyTimeout(TimeoutError):
    """A request body did not arrive in time. A TimeoutError, so that aiohttp's lingering read of an unread
    body, which expects one, ends quietly instead of logging an unhandled exception."""


def request_timeout_response(message: str) -> web.Response:
    response = error_response(ErrorKind.REQUEST_TIMEOUT, message)
    response.force_close()  # the rest of the body may still be on its way: never read it as a next request
    return response


class _Connection(asyncio.Protocol):
    """Stands between a transport and aiohttp's RequestHandler: forwards every event to it unchanged and
    tells the table when the connection opens, receives bytes and closes."""

    def __init__(self, table: ConnectionTable, handler: RequestHandler) -> None:
        self.handler = handler
        self.head_timer: asyncio.TimerHandle | None = None
        self._table = table
        self._accepted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accepted = self._table.opened(self)
        if not self._accepted:
            transport.close()
            return
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._table.received(self)
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()  # returns None: the transport closes once the client half-closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._table.closed(self)
        if self._accepted:
            self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def close(self) -> None:
        self.handler.force_close()


class ConnectionTable:
    """The open connections of one site: when each became idle, its head deadline, and the cap."""

    def __init__(self, limits: ConnectionLimits, server: web.Server, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self._server = server
        self._loop = loop
        self._idle_since: dict[_Connection, float | None] = {}
        self._by_handler: dict[RequestHandler, _Connection] = {}
        self._refusing = False

    def __len__(self) -> int:
        return len(self._idle_since)

    def protocol(self) -> asyncio.Protocol:
        return _Connection(self, self._server())

    def opened(self, connection: _Connection) -> bool:
        decision = admit(self._idle_since, self.limits.max_connections)
        if decision.evict is not None:
            log.debug("at %d connections: closing the one idle the longest", len(self))
            self.closed(decision.evict)
            decision.evict.close()
        if not decision.accept:
            if not self._refusing:
                log.warning("%d connections, every one busy: refusing new connections until one is free",
                            len(self))
            self._refusing = True
            return False
        self._refusing = False
        self._idle_since[connection] = self._loop.time()
        self._by_handler[connection.handler] = connection
        self._arm_head_timer(connection)
        return True

    def received(self, connection: _Connection) -> None:
        if self._idle_since.get(connection) is not None and connection.head_timer is None:
            self._arm_head_timer(connection)  # the first byte of a kept-alive connection's next head

    def closed(self, connection: _Connection) -> None:
        if connection in self._idle_since:
            del self._idle_since[connection]
            del self._by_handler[connection.handler]
        self._cancel_head_timer(connection)

    def wrap(self, handler: _RequestHandler) -> _RequestHandler:
        """The application's entry point, marking its connection busy until the response is written and
        giving the body its deadline."""

        async def tracked(request: BaseRequest) -> web.StreamResponse:
            connection = self._by_handler.get(request.protocol)
            if connection is None:
                return await handler(request)
            self._request_started(connection, asyncio.current_task())
            body_timer = self._arm_body_timer(request)
            try:
                return await handler(request)
            except BodyTimeout as exc:
                return request_timeout_response(str(exc))
            finally:
                if body_timer is not None:
                    body_timer.cancel()

        return tracked

    def _request_started(self, connection: _Connection, task: asyncio.Task[object] | None) -> None:
        self._idle_since[connection] = None
        self._cancel_head_timer(connection)
        if task is None:  # not in aiohttp's per-request task: never idle again, so never evicted
            return

        # aiohttp writes the response in the same task, after the handler returns.
        def finished(_: object) -> None:
            if connection in self._idle_since:
                self._idle_since[connection] = self._loop.time()

        task.add_done_callback(finished)

    def _arm_head_timer(self, connection: _Connection) -> None:
        def overdue() -> None:
            connection.head_timer = None
            if self._idle_since.get(connection) is not None:
                log.debug("closing a connection that sent no complete request head in %g s",
                          self.limits.header_timeout)
                self.closed(connection)
                connection.close()

        connection.head_timer = self._loop.call_later(self.limits.header_timeout, overdue)

    def _cancel_head_timer(self, connection: _Connection) -> None:
        if connection.head_timer is not None:
            connection.head_timer.cancel()
            connection.head_timer = None

    def _arm_body_timer(self, request: BaseRequest) -> asyncio.TimerHandle | None:
        content = request.content
        if not request.body_exists or content.is_eof():
            return None
        allowance = body_allowance(request.content_length, self.limits)

        def overdue() -> None:
            if content.is_eof():
                return
            declared = f"of {request.content_length} bytes " if request.content_length is not None else ""
            log.info("%s %s: body not received in %g s; answering 408", request.method, request.path, allowance)
            content.set_exception(BodyTimeout(
                f"the request body {declared}did not arrive within {allowance:g} s ({content.total_bytes} "
                f"bytes received); send the whole body without pausing"))

        return self._loop.call_later(allowance, overdue)


class LimitedSite(web.BaseSite):
    """A TCP site with the head and body deadlines and the connection cap of `limits`. The runner should be
    made with `keepalive_timeout=limits.keepalive_timeout`."""

    __slots__ = ("_host", "_limits", "_listener", "_port", "_reuse_address", "table")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limits: ConnectionLimits,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128,
                 reuse_address: bool | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._limits = limits
        self._reuse_address = reuse_address
        self.table: ConnectionTable | None = None
        self._listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), the requested one before."""
        if self._listener is not None and self._listener.sockets:
            return int(self._listener.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "runner.setup() comes before the site"
        loop = asyncio.get_running_loop()
        table = ConnectionTable(self._limits, server, loop)
        server.request_handler = table.wrap(server.request_handler)
        # A TLS handshake comes before connection_made: bound it as a head would be.
        handshake = self._limits.header_timeout if self._ssl_context else None
        self._listener = await loop.create_server(table.protocol, self._host, self._port, ssl=self._ssl_context,
                                                  backlog=self._backlog, reuse_address=self._reuse_address,
                                                  ssl_handshake_timeout=handshake)
        self._server = self._listener
        self.table = table
