"""One child process serving one model: spawn, readiness, log tail, graceful stop, forced kill.

Children never outlive modelyard: each gets PR_SET_PDEATHSIG=SIGKILL (Linux), llama-server children also
exit when their stdin (a pipe from modelyard) closes, and every child runs in its own process group so a
kill reaches anything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp

from modelyard.engine.command import LaunchPlan, Readiness
from modelyard.proxy import new_upstream_session

log = logging.getLogger(__name__)

_STATE_PREFIX = b"cmd_child_to_router:state:"
_EXIT_COMMAND = b"cmd_router_to_child:exit\n"
_LOG_TAIL_LINES = 40
_HEALTH_POLL_S = 0.02
_MAX_LINE = 1 << 20  # as router mode caps child lines
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """Runs in the child between fork and exec."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Lines until EOF; an over-long line is skipped rather than ending the reader (a full pipe would block
    the child)."""
    while True:
        try:
            line = await stream.readline()
        except ValueError:
            continue
        if not line:
            return
        yield line


class ChildExited(Exception):
    def __init__(self, exit_code: int | None, reason: str) -> None:
        super().__init__(reason)
        self.exit_code = exit_code
        self.reason = reason


class Instance:
    """A child process; `ready` resolves when it can serve, `exited` when it is gone."""

    def __init__(self, model: str, plan: LaunchPlan, port: int,
                 on_progress: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        self.model = model
        self.plan = plan
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.info: Mapping[str, Any] = {}
        self.log_tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        self.started_at = 0.0
        self.ready_at = 0.0
        self._on_progress = on_progress
        self.client = new_upstream_session(plan.max_connections)
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self._spawned: asyncio.Future[bool] = loop.create_future()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        self.started_at = time.monotonic()
        log.info("starting %s on port %d: %s", self.model, self.port, " ".join(self.plan.argv))
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.plan.argv, env=dict(self.plan.env), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=_die_with_parent, limit=_MAX_LINE)
        finally:
            self._spawned.set_result(self._proc is not None)
            if self._proc is None:
                await self.client.close()
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr()),
                       asyncio.create_task(self._watch_exit())]
        if self.plan.readiness == Readiness.HTTP_HEALTH:
            self._tasks.append(asyncio.create_task(self._poll_health()))

    def failure_summary(self, exit_code: int | None) -> str:
        tail = " | ".join(line for line in list(self.log_tail)[-8:] if line.strip())
        code = "was killed by a signal" if exit_code is not None and exit_code < 0 else f"exited with code {exit_code}"
        return f"{os.path.basename(self.plan.argv[0])} {code}" + (f": {tail}" if tail else "")

    async def stop(self, grace: float) -> int:
        """Ask the child to exit; SIGKILL its process group after `grace` seconds."""
        if not await self._spawned:
            return 0
        proc = self._proc
        assert proc is not None
        if proc.returncode is None:
            self._ask_to_exit(proc)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), grace)
            except TimeoutError:
                log.warning("%s did not exit within %.0f s; killing it", self.model, grace)
        self.kill()
        return await self.exited

    def kill(self) -> None:
        """SIGKILL the whole process group (safe to call at any time, also from a signal handler path)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def _ask_to_exit(self, proc: asyncio.subprocess.Process) -> None:
        if self.plan.readiness == Readiness.ROUTER_PROTOCOL and self.ready.done() and proc.stdin:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.write(_EXIT_COMMAND)
                return
        # A llama-server child that is still loading does not read stdin yet; SIGTERM ends it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in _lines(self._proc.stdout):
            if raw.startswith(_STATE_PREFIX):
                self._on_state(raw[len(_STATE_PREFIX):])
            else:
                self._remember(raw)

    def _on_state(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        state = message.get("state")
        if state == "ready":
            self.info = message.get("payload") or {}
            self._mark_ready()
        elif state == "loading" and self._on_progress is not None:
            self._on_progress(message.get("payload") or {})

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in _lines(self._proc.stderr):
            self._remember(raw)

    def _remember(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        self.log_tail.append(line)
        log.debug("[%s] %s", self.model, line)

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        # Let the pipe readers drain so the failure message quotes the child's last words.
        await asyncio.wait([t for t in self._tasks[:2]], timeout=0.5)
        self.kill()  # anything the child left in its process group goes too
        await self.client.close()
        if not self.ready.done():
            self.ready.set_exception(ChildExited(code, self.failure_summary(code)))
            self.ready.exception()  # mark retrieved: the manager learns of it through `exited`
        self.exited.set_result(code)

    async def _poll_health(self) -> None:
        url = f"{self.base_url}/health"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while not self.ready.done() and not self.exited.done():
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            self._mark_ready()
                            return
                await asyncio.sleep(_HEALTH_POLL_S)

    def _mark_ready(self) -> None:
        if not self.ready.done():
            self.ready_at = time.monotonic()
            self.ready.set_result(None)
