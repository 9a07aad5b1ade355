"""Model children: the small interface the manager drives (start, ready, exited, stop, kill, request, probe,
log tail), and its implementation for real child processes (llama-server, or any engine started by a preset's
`cmd`). A child writes its output lines into its model's ring (modelyard.logbook), which outlives it.

The interface is the seam for fakes, as httpx has its transport: the manager never touches a process or a
socket itself, so the shell can be tested in-process with an in-memory child (tests/fakes.py).

Children never outlive modelyard: each gets PR_SET_PDEATHSIG=SIGKILL (Linux), llama-server children also exit
when their stdin (a pipe from modelyard) closes, and every child runs in its own process group so a kill
reaches anything it started.

Children are reachable only through modelyard: a llama-server child listens on a Unix socket in a directory
only modelyard's user may enter (ChildSockets: 0700, one per modelyard process, removed when it stops; each
socket file goes when its child exits), other engines on a loopback port. Each also gets a random key that
only modelyard knows, through its environment (never argv, which every local user can read), and modelyard
adds it to every request it forwards; a direct call answers 401. llama-server reads it as LLAMA_API_KEY;
other engines find it as MODELYARD_CHILD_KEY. Their CORS origin is pinned to an origin no page has, so a
child never tells a browser it may read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from modelyard.childhttp import ChildClient, ChildHTTPError, ChildResponse
from modelyard.engine.command import CHILD_KEY_ENV, SOCKET_SUFFIX, Endpoint, LaunchPlan, Readiness
from modelyard.logbook import ModelLog

log = logging.getLogger(__name__)

_STATE_PREFIX = b"cmd_child_to_router:state:"
_EXIT_COMMAND = b"cmd_router_to_child:exit\n"
_SUMMARY_LINES = 8  # the child's last lines quoted in its failure message
_HEALTH_POLL_S = 0.02
_MAX_LINE = 1 << 20  # as router mode caps child lines
_DEATH_GRACE_S = 1.0  # how long a failed request waits for its child's exit, to name it (ProcessChild.failure)
_PR_SET_PDEATHSIG = 1
# sockaddr_un.sun_path holds 108 bytes on Linux (104 on macOS), its terminating NUL included.
_SUN_PATH_MAX = 104 if sys.platform == "darwin" else 108
_SOCKETS_PREFIX = "modelyard-"  # ChildSockets' directories: modelyard-<pid>-<random>
# ... made and locked under this name first, which the sweep of stale ones ignores (`_make_locked`)
_NEW_PREFIX = ".modelyard-new-"
_LOCK_FILE = ".lock"


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def socket_fits(path: Path) -> bool:
    """Whether a Unix socket can be bound at `path` (sockaddr_un's limit)."""
    return len(os.fsencode(path)) < _SUN_PATH_MAX


def owner_pid(name: str) -> int | None:
    """The pid of the modelyard that made a ChildSockets directory of that name; None for another name."""
    found = re.fullmatch(re.escape(_SOCKETS_PREFIX) + r"(\d+)-[^/]+", name)
    return int(found.group(1)) if found else None


def sockets_base(environ: Mapping[str, str]) -> Path:
    """Where ChildSockets makes its directory: the user's runtime directory (XDG_RUNTIME_DIR, private and
    emptied at logout) when set, else the temporary directory (TMPDIR, else /tmp)."""
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    return Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())


class ChildSockets:
    """The private directory of this modelyard's children's Unix sockets: made on the first socket asked for
    (mode 0700, so no other local user can connect; a fresh name per modelyard process, so two never share
    one), a new socket path for every child (a stale file left by a crash never blocks the next child: a
    llama-server refuses to bind an existing path), removed with everything left in it by `close`. The
    directories of modelyard processes that died without closing theirs (SIGKILL) are removed when the next
    one is made: each holds a lock on its `.lock` file while it lives (a lock, not its pid, which may be
    another pid namespace's). Where sockets are unavailable (no AF_UNIX, a path too long for sun_path, a
    directory that cannot be made) `path` says None and the child listens on a loopback port instead; once
    closed, `path` says None too (a directory made then would outlive modelyard)."""

    def __init__(self, base: Path | None = None) -> None:
        self._base = base
        self._dir: Path | None = None
        self._lock: int | None = None  # the descriptor holding the directory's lock
        self._failed = False
        self._closed = False
        self._numbers = itertools.count(1)

    @property
    def directory(self) -> Path | None:
        return self._dir

    def path(self) -> Path | None:
        """A socket path no child of this modelyard has used, or None (see the class)."""
        if self._failed or self._closed or not hasattr(socket, "AF_UNIX"):
            return None
        if self._dir is None:
            base = self._base or sockets_base(os.environ)
            try:
                _remove_stale(base)
                self._dir, self._lock = _make_locked(base)
            except OSError as exc:
                log.warning("children listen on loopback ports: no directory for their sockets in %s (%s)",
                            base, exc)
                self._failed = True
                return None
        path = self._dir / f"{next(self._numbers)}{SOCKET_SUFFIX}"
        if not socket_fits(path):
            log.warning("children listen on loopback ports: %s is too long for a Unix socket", path)
            self._failed = True
            return None
        return path

    def close(self) -> None:
        self._closed = True
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _make_locked(base: Path) -> tuple[Path, int]:
    """A new 0700 directory `modelyard-<pid>-<random>` in `base`, and the descriptor holding the lock on its
    `.lock` file. It is made and locked under a name the sweep of stale directories ignores (`.modelyard-new-`)
    and renamed only then: made under its final name, another modelyard sweeping between the mkdir and the
    flock saw an unheld lock and removed a live directory (every later child of this one then failed to bind).
    A modelyard killed in that window leaves an empty `.modelyard-new-*` directory behind, never a live one
    removed."""
    made = Path(tempfile.mkdtemp(prefix=f"{_NEW_PREFIX}{os.getpid()}-", dir=base))
    try:
        lock = os.open(made / _LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            final = base / (_SOCKETS_PREFIX + made.name.removeprefix(_NEW_PREFIX))
            os.rename(made, final)  # the lock goes with it: it is held on the file, not on its name
        except OSError:
            os.close(lock)
            raise
    except OSError:
        shutil.rmtree(made, ignore_errors=True)
        raise
    return final, lock


def _remove_stale(base: Path) -> None:
    """Remove the socket directories in `base` whose modelyard is gone: this user's, with a `.lock` file that
    no process holds (one without is not modelyard's: kept; one being made is under another name until it is
    locked, `_make_locked`)."""
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            if owner_pid(entry.name) is None:
                continue
            with contextlib.suppress(OSError):
                if entry.is_symlink() or not entry.is_dir() or entry.stat().st_uid != os.getuid():
                    continue
                lock = os.open(entry / _LOCK_FILE, os.O_RDWR)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its modelyard lives
                    shutil.rmtree(entry, ignore_errors=True)
                finally:
                    os.close(lock)


class ChildExited(Exception):
    def __init__(self, exit_code: int | None, reason: str) -> None:
        super().__init__(reason)
        self.exit_code = exit_code
        self.reason = reason


class ChildError(Exception):
    """A request to a child failed: it could not be reached, or it failed while answering. The message says
    why (the child's death, a watchdog, shutdown), for the client's error reply."""


class Reply(Protocol):
    """A child's answer: status and headers at once, the body as it arrives. Body reads raise ChildError."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content_length(self) -> int | None: ...
    async def read(self) -> bytes: ...
    def chunks(self) -> AsyncIterator[bytes]: ...
    def lines(self) -> AsyncIterator[bytes]: ...


class Upstream(Protocol):
    """What a request is forwarded through (proxy.forward): a child, or a cluster node (cluster/ingress.py)."""

    def request(self, method: str, path: str, *, body: bytes | AsyncIterable[bytes] | None = None,
                headers: Mapping[str, str] | None = None,
                params: Mapping[str, str] | None = None) -> contextlib.AbstractAsyncContextManager[Reply]: ...


class Child(Upstream, Protocol):
    """One model's server, as the manager sees it. `ready` resolves when it can serve (or fails with
    ChildExited), `exited` with its exit code when it is gone."""

    model: str
    argv: tuple[str, ...]
    endpoint: Endpoint  # where it listens (its plan's)
    info: Mapping[str, Any]
    ready: asyncio.Future[None]
    exited: asyncio.Future[int]
    last_activity: float  # monotonic time the child last sent a byte on any request (or a request began)
    in_flight: int  # requests being answered by it now

    @property
    def pid(self) -> int | None: ...
    @property
    def load_seconds(self) -> float: ...
    def log_tail(self) -> list[str]: ...
    def failure_summary(self, exit_code: int | None) -> str: ...
    async def start(self) -> None: ...
    async def stop(self, grace: float) -> int: ...
    def kill(self, reason: str = "") -> None: ...
    def request(self, method: str, path: str, *, body: bytes | AsyncIterable[bytes] | None = None,
                headers: Mapping[str, str] | None = None,
                params: Mapping[str, str] | None = None) -> contextlib.AbstractAsyncContextManager[Reply]: ...
    async def probe(self, within: float) -> bool: ...
    def progress(self) -> int | None: ...


# What a llama-server child reports of itself after its start (router mode's child protocol): `loading` with
# its load progress, `sleeping` when --sleep-idle-seconds freed its model, `ready` again once a request woke it
# (its first `ready` resolves Child.ready instead). (state, payload).
StateCallback = Callable[[str, Mapping[str, Any]], None]
# (model, plan, on_state, the model's log ring) -> a child, not started yet
ChildFactory = Callable[[str, LaunchPlan, StateCallback, ModelLog], Child]


def _die_with_parent() -> None:
    """Runs in the child between fork and exec."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _setup_child(cpus: frozenset[int]) -> Callable[[], None]:
    """What runs in the child between fork and exec: it dies with modelyard, and keeps to `cpus` (its
    placement) from its first instruction, every thread it starts included. A refusal (a CPU taken away
    since) leaves it unconfined; the parent checks and says so."""
    def setup() -> None:
        _die_with_parent()
        if cpus and hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)
    return setup


class _OutputProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """A child process's protocol: its stdout and stderr split into lines in the transport's own callback,
    each handed to `on_line(fd, line)`, with no reader task. llama-server writes each log line in three
    write(2) calls (timestamp, level, message) and prints about nine lines for a 1-token chat; a reader task
    woken for each write cost modelyard more CPU per chat than forwarding it (bench/results/profile/report.md).
    An over-long line (router mode's cap) is dropped to its end rather than held, so a full pipe never blocks
    the child. `drained`: both pipes closed, every line handed over."""

    def __init__(self, on_line: Callable[[int, bytes], None], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_MAX_LINE, loop=loop)
        self._on_line = on_line
        self._pending: dict[int, bytes] = {1: b"", 2: b""}
        self._skipping: set[int] = set()
        self.drained: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        pending = self._pending.get(fd)
        if pending is None:
            super().pipe_data_received(fd, data)
            return
        pending += data.encode() if isinstance(data, str) else data  # bytes: the pipes are not in text mode
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            if fd in self._skipping:
                self._skipping.discard(fd)
            else:
                self._on_line(fd, pending[start:end + 1])
            start = end + 1
        rest = pending[start:]
        if len(rest) > _MAX_LINE:
            rest = b""
            self._skipping.add(fd)
        self._pending[fd] = rest

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        rest = self._pending.pop(fd, None)
        if rest and fd not in self._skipping:
            self._on_line(fd, rest)
        if rest is not None and not self._pending and not self.drained.done():
            self.drained.set_result(None)
        super().pipe_connection_lost(fd, exc)


class _ProcessReply:
    """A child's answer (childhttp.ChildResponse), recording activity as bytes arrive and turning failures into
    ChildError that names the cause."""

    def __init__(self, child: ProcessChild, response: ChildResponse) -> None:
        self._child = child
        self._response = response
        self.status = response.status
        self.headers = response.headers
        self.content_length = response.content_length

    async def read(self) -> bytes:
        try:
            body = await self._response.read()
        except ChildHTTPError as exc:
            raise await self._child.failure(exc) from exc
        self._child.last_activity = time.monotonic()
        return body

    def chunks(self) -> AsyncIterator[bytes]:
        return self._guarded(self._response.chunks())

    def lines(self) -> AsyncIterator[bytes]:
        return self._guarded(self._response.lines())

    async def _guarded(self, parts: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for part in parts:
                self._child.last_activity = time.monotonic()
                yield part
        except ChildHTTPError as exc:
            raise await self._child.failure(exc) from exc


class ProcessChild:
    """A child process serving one model over HTTP, on its plan's endpoint."""

    def __init__(self, model: str, plan: LaunchPlan, on_state: StateCallback | None = None,
                 log: ModelLog | None = None) -> None:
        self.model = model
        self.plan = plan
        self.argv = plan.argv
        self.endpoint = plan.endpoint
        self.info: Mapping[str, Any] = {}
        self._log = log or ModelLog(model)
        self._log_mark = self._log.mark()  # its own lines start here
        self.started_at = 0.0
        self.ready_at = 0.0
        self.last_activity = 0.0
        self.in_flight = 0
        self._on_state_report = on_state
        self._key = plan.env.get(CHILD_KEY_ENV, "")
        self._auth = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client: ChildClient | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._output: _OutputProtocol | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._why_gone = ""  # why modelyard stopped or killed it, for the errors of requests it cuts
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self._spawned: asyncio.Future[bool] = loop.create_future()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def load_seconds(self) -> float:
        return self.ready_at - self.started_at if self.ready_at else 0.0

    def log_tail(self) -> list[str]:
        """What this child said (that its model's ring still holds)."""
        return self._log.since(self._log_mark)

    async def start(self) -> None:
        self.started_at = time.monotonic()
        log.info("starting %s on %s: %s", self.model, self.endpoint, " ".join(self.plan.argv))
        self._remove_socket()  # a path is never given twice; should a file be there, it would block the bind
        try:
            loop = asyncio.get_running_loop()
            transport, self._output = await loop.subprocess_exec(
                lambda: _OutputProtocol(self._on_line, loop), *self.plan.argv, env=dict(self.plan.env),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=_setup_child(self.plan.cpus))
            self._proc = asyncio.subprocess.Process(transport, self._output, loop)
        finally:
            self._spawned.set_result(self._proc is not None)
        self._check_cpus(self._proc.pid)
        self._client = ChildClient(self.endpoint.socket, self.endpoint.port, limit=self.plan.max_connections)
        self._tasks = [asyncio.create_task(self._watch_exit())]
        if self.plan.readiness == Readiness.HTTP_HEALTH:
            self._tasks.append(asyncio.create_task(self._poll_health()))

    def _check_cpus(self, pid: int) -> None:
        if not self.plan.cpus or not hasattr(os, "sched_getaffinity"):
            return
        with contextlib.suppress(OSError):  # gone already: its exit is reported elsewhere
            got = os.sched_getaffinity(pid)
            if got != self.plan.cpus:
                log.warning("%s could not be confined to CPUs %s (it runs on %s)", self.model,
                            sorted(self.plan.cpus), sorted(got))

    def failure_summary(self, exit_code: int | None) -> str:
        tail = " | ".join(line for line in self.log_tail()[-_SUMMARY_LINES:] if line.strip())
        code = "was killed by a signal" if exit_code is not None and exit_code < 0 else f"exited with code {exit_code}"
        return f"{os.path.basename(self.plan.argv[0])} {code}" + (f": {tail}" if tail else "")

    async def stop(self, grace: float) -> int:
        """Ask the child to exit; SIGKILL its process group after `grace` seconds."""
        if not await self._spawned:
            return 0
        proc = self._proc
        assert proc is not None
        self._why_gone = self._why_gone or f"model '{self.model}' was stopped"
        if proc.returncode is None:
            self._ask_to_exit(proc)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), grace)
            except TimeoutError:
                log.warning("%s did not exit within %.0f s; killing it", self.model, grace)
        self.kill()
        return await self.exited

    def kill(self, reason: str = "") -> None:
        """SIGKILL the whole process group (safe to call at any time)."""
        if reason and not self._why_gone:
            self._why_gone = reason
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def error(self, exc: BaseException) -> ChildError:
        """The error a request sees when the child fails under it: why modelyard ended it, if it did."""
        if self._why_gone:
            return ChildError(self._why_gone)
        if self.exited.done():
            return ChildError(f"model '{self.model}' exited: {self.failure_summary(self.exited.result())}")
        return ChildError(f"the model's server failed: {exc or repr(exc)}")

    async def failure(self, exc: BaseException) -> ChildError:
        """`error` for a request the child's connection failed under. A child killed by a signal resets its
        connections before its exit is reaped, so the error would name the reset ("Connection reset by peer",
        the soak's 502s) instead of the death; it waits a moment for the exit first, unless modelyard ended the
        child itself (then the reason is known)."""
        if not self._why_gone and not self.exited.done():
            await asyncio.wait([self.exited], timeout=_DEATH_GRACE_S)
        return self.error(exc)

    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, *, body: bytes | AsyncIterable[bytes] | None = None,
                      headers: Mapping[str, str] | None = None,
                      params: Mapping[str, str] | None = None) -> AsyncIterator[Reply]:
        """Send a request with the child's key; the reply's body streams as it arrives."""
        client = self._client
        if client is None or client.closed or self.exited.done():
            # The child died between the grant and this request (was a 500 "Session is closed").
            raise self.error(ConnectionError("not running"))
        self.in_flight += 1
        self.last_activity = time.monotonic()
        try:
            try:
                response = await client.request(method, path, params=params, body=body,
                                                headers={**(headers or {}), **self._auth})
            except ChildHTTPError as exc:
                raise await self.failure(exc) from exc
            self.last_activity = time.monotonic()
            try:
                # Only failures of the child become ChildError: the caller's own (its client went away) pass.
                yield _ProcessReply(self, response)
            finally:
                response.release()
        finally:
            self.in_flight -= 1

    async def probe(self, within: float) -> bool:
        """Does the child's HTTP server answer /health with 200 within `within` seconds?"""
        client = self._client
        if client is None or client.closed:
            return False
        response = None
        try:
            async with asyncio.timeout(within):
                response = await client.request("GET", "/health", headers=self._auth)
                await response.read()
                return response.status == 200
        except (ChildHTTPError, TimeoutError):
            return False
        finally:
            if response is not None:
                response.release()

    def progress(self) -> int | None:
        """CPU ticks of the child's main thread: they move while it works, even when a non-streamed answer or a
        long prompt sends nothing for minutes, and stop when it is stopped or deadlocked. (llama-server's
        /slots was tried first: it answers only between engine steps, so one long step looked like a stall.)
        The main thread, not the whole process: answering the watchdog's own /health probes costs ticks of the
        HTTP threads. None if unknown."""
        pid = self.pid
        if pid is None:
            return None
        try:
            fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[11]) + int(fields[12])  # utime + stime

    def _ask_to_exit(self, proc: asyncio.subprocess.Process) -> None:
        if self.plan.readiness == Readiness.ROUTER_PROTOCOL and self.ready.done() and proc.stdin:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.write(_EXIT_COMMAND)
                return
        # A llama-server child that is still loading does not read stdin yet; SIGTERM ends it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)

    def _on_line(self, fd: int, raw: bytes) -> None:
        if fd == 1 and raw.startswith(_STATE_PREFIX):
            self._on_state(raw[len(_STATE_PREFIX):])
        else:
            self._remember(raw)

    def _on_state(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        state, payload = message.get("state"), message.get("payload")
        payload = payload if isinstance(payload, dict) else {}
        if state == "ready" and not self.ready.done():
            self.info = payload
            self._mark_ready()
        elif state in ("loading", "sleeping", "ready") and self._on_state_report is not None:
            # a `ready` after a wake has an empty payload: the model info of the first one stays
            self._on_state_report(state, payload)

    def _remember(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        self._log.append(line)
        log.debug("[%s] %s", self.model, line)

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        # Let the pipes drain so the failure message quotes the child's last words.
        if self._output is not None:
            await asyncio.wait([self._output.drained], timeout=0.5)
        self.kill()  # anything the child left in its process group goes too
        self._remove_socket()  # llama-server leaves its socket file behind when it exits
        if self._client is not None:
            await self._client.close()
        if not self.ready.done():
            self.ready.set_exception(ChildExited(code, self.failure_summary(code)))
            self.ready.exception()  # mark retrieved: the manager learns of it through `exited`
        self.exited.set_result(code)

    async def _poll_health(self) -> None:
        while not self.ready.done() and not self.exited.done():
            if await self.probe(within=2):
                self._mark_ready()
                return
            await asyncio.sleep(_HEALTH_POLL_S)

    def _remove_socket(self) -> None:
        if self.endpoint.socket is not None:
            with contextlib.suppress(OSError):
                self.endpoint.socket.unlink(missing_ok=True)

    def _mark_ready(self) -> None:
        if not self.ready.done():
            self.ready_at = time.monotonic()
            self.ready.set_result(None)


def new_child_key() -> str:
    return secrets.token_urlsafe(32)
