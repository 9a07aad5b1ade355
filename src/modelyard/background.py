"""Background reading of model files (GGUF facts for memory estimates, sha256 digests for Ollama's listings)
that never slows the models (issue 9, points 5 and 7).

Found against main: right after start-up a swap took 6.6 to 7.6 s instead of router mode's 1.3 to 1.5 s,
because the digests and GGUF parsing of every model ran at start in threads that took a core from the
children (ggml's worker threads spin, so a stolen core costs far more than its share); a truncated GGUF was
re-parsed (~8 CPU-seconds) at every start and reload, and a parse still running held up exit for 38.7 s
(threads cannot be cancelled, and the default executor is joined at exit).

So the work runs in one long-lived worker subprocess (`python -m modelyard.background`), not in threads:

- a process can be given idle priority, which a thread of the server cannot without dragging the event loop
  down with it: nice 19, SCHED_IDLE (it only runs on a core no one else wants) and the idle I/O class (it only
  reads the disk when no one else does), set right after it is spawned and before it reads a byte;
- it can be paused while a model loads (SIGSTOP, SIGCONT to resume: even a 40 GB digest stops at once) and
  killed at once at exit (SIGKILL and reap: exit never waits for background work);
- it is started lazily, on the first file to read (constructors do no I/O), and does one file at a time;
- it talks over its stdin/stdout pipes, one JSON request and one JSON reply per line; it never writes a
  cache: the parent is the only writer (see file_cache.py for how writers in several processes merge).

Each file is read once (keyed by path, size and mtime, as the caches are): a failure (a truncated file, not a
GGUF) is cached too and logged once, and not retried until the file changes. Work is done in priority order:
facts a load is waiting for (`want_facts`, urgent: it runs even while paused, and a background job in its way
is interrupted and requeued), then other facts, then digests. Lookups (`facts`, `digest`) never wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import logging
import os
import platform
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from modelyard.digests import FileDigests, sha256_of
from modelyard.file_cache import FileCache, failure, failure_of
from modelyard.memory import GgufCache, GgufFacts, describe_failure, facts_from, read_gguf

log = logging.getLogger(__name__)

FACTS = "facts"
DIGEST = "digest"
_WHAT = {FACTS: "the GGUF metadata", DIGEST: "the sha256 digest"}

URGENT = 0  # a load waits for it
SOON = 1  # facts for estimates and listings
LATER = 2  # digests

_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}  # syscall numbers (the C library has no wrapper)
_IOPRIO_GET = {"x86_64": 252, "aarch64": 31}
_IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
_PR_SET_PDEATHSIG = 1
_LINE_LIMIT = 1 << 20
_REAP_TIMEOUT_S = 2.0  # a SIGKILLed process reaps at once unless stuck in uninterruptible I/O


@dataclass(eq=False)
class Job:
    op: str
    path: Path
    priority: int
    order: int
    waiters: list[asyncio.Future[Any]] = field(default_factory=list)


# -- decisions (pure) --
def next_job(jobs: Iterable[Job], paused: bool) -> Job | None:
    """The job to run next: by priority, then in the order asked; while paused, only urgent ones."""
    ready = [job for job in jobs if not paused or job.priority == URGENT]
    return min(ready, key=lambda job: (job.priority, job.order), default=None)


def should_stop(pauses: int, running: Job | None) -> bool:
    """Whether the worker must be stopped (SIGSTOP): paused, in the middle of a job no load waits for."""
    return pauses > 0 and running is not None and running.priority != URGENT


def should_preempt(running: Job | None, incoming: int) -> bool:
    """An urgent job never waits behind background work: the worker is killed and the interrupted job
    requeued (a 40 GB digest would otherwise hold a load for minutes)."""
    return running is not None and incoming == URGENT and running.priority != URGENT


# -- priorities (Linux) --
def lower_priority(pid: int) -> None:
    """Give a process (0 = this one) idle CPU and I/O priority: nice 19, SCHED_IDLE, idle I/O class."""
    os.setpriority(os.PRIO_PROCESS, pid, 19)
    os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        raise OSError(f"ioprio_set: unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, _IOPRIO_WHO_PROCESS, pid, IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"ioprio_set: {os.strerror(errno)}")


def io_priority_class(pid: int) -> int:
    """The I/O scheduling class of a process (3 = idle), read with ioprio_get."""
    number = _IOPRIO_GET.get(platform.machine())
    if number is None:
        raise OSError(f"ioprio_get: unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    value = int(libc.syscall(number, _IOPRIO_WHO_PROCESS, pid))
    if value < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"ioprio_get: {os.strerror(errno)}")
    return value >> _IOPRIO_CLASS_SHIFT


# -- the worker process --
def _read(op: str, path: Path) -> Any:
    if op == FACTS:
        return asdict(read_gguf(path))
    if op == DIGEST:
        return sha256_of(path)
    raise ValueError(f"unknown operation {op!r}")


def serve(requests: TextIO, replies: TextIO) -> None:
    """The worker's loop: one request per line in, one reply per line out, until its stdin closes."""
    for line in requests:
        request = json.loads(line)
        try:
            reply = {"id": request["id"], "value": _read(request["op"], Path(request["path"]))}
        except Exception as exc:  # not swallowed: the parent caches it as the file's failure and logs it
            reply = {"id": request["id"], "error": describe_failure(exc)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    if sys.platform.startswith("linux"):  # never outlive modelyard, even a SIGKILLed one
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if len(sys.argv) > 1 and os.getppid() != int(sys.argv[1]):
        sys.exit("modelyard.background: the parent is already gone")
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # a library's stray print must not corrupt the replies
    serve(sys.stdin, replies)


# -- the parent's side --
class BackgroundReader:
    """GGUF facts and digests of model files, known or being read in the idle-priority worker.

    The manager calls `pause()` when a load starts and `resume()` when it ends (nestable), `want_facts` for
    a model about to load, `want_facts(..., urgent=False)`/`want_digests` for the rest, and `close()` first
    at exit. `on_request(op, path)` is called for each request sent to the worker (tests count them).
    """

    def __init__(self, gguf: GgufCache, digests: FileDigests, *,
                 on_request: Callable[[str, Path], None] | None = None) -> None:
        self._caches: dict[str, FileCache] = {FACTS: gguf.cache, DIGEST: digests.cache}
        self._on_request = on_request
        self._jobs: dict[tuple[str, Path], Job] = {}
        self._order = itertools.count()
        self._pauses = 0
        self._running: Job | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._stopped = False  # SIGSTOP sent and not undone
        self._preempted = False
        self._closed = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while no job is queued or running
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()

    @property
    def pid(self) -> int | None:
        """The worker's pid while it runs."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    # -- lookups: never wait --
    def facts(self, path: Path) -> GgufFacts | None:
        return facts_from(self._caches[FACTS].get(path))

    def digest(self, path: Path) -> str | None:
        value = self._caches[DIGEST].get(path)
        return value if isinstance(value, str) else None

    # -- asking for work --
    async def want_facts(self, paths: Sequence[Path], urgent: bool = True) -> list[GgufFacts | None]:
        """The facts of `paths` (None where a file cannot be read), read first if not known yet. `urgent`:
        a load waits for them, so they go first and run even while paused."""
        loop = asyncio.get_running_loop()
        futures = []
        for path in paths:
            future: asyncio.Future[Any] = loop.create_future()
            job, known = self._enqueue(FACTS, path, URGENT if urgent else SOON)
            if job is None:
                future.set_result(known)
            else:
                job.waiters.append(future)
            futures.append(future)
        return [facts_from(value) for value in await asyncio.gather(*futures)]

    def want_digests(self, paths: Sequence[Path]) -> None:
        """Queue the digests of `paths` (after every facts job); look them up later with `digest`."""
        for path in paths:
            self._enqueue(DIGEST, path, LATER)

    def _enqueue(self, op: str, path: Path, priority: int) -> tuple[Job | None, Any]:
        """The job reading `path` (None, with the known value, if there is nothing to read)."""
        if self._closed:
            return None, None
        key = self._caches[op].key(path)
        known = None if key is None else self._caches[op].lookup(key)
        if key is None or known is not None:
            message = failure_of(known)
            if key is not None and message is not None:
                self._warn(key, op, path, message)
            return None, known
        job = self._jobs.get((op, path))
        if job is None:
            job = self._jobs[(op, path)] = Job(op, path, priority, next(self._order))
            self._idle.clear()
        job.priority = min(job.priority, priority)
        if should_preempt(self._running, priority) and self.pid is not None:
            assert self._process is not None
            log.debug("interrupting background work for %s", path)
            self._preempted = True
            self._process.kill()
        self._apply_signals()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        self._wake.set()
        return job, None

    async def wait_idle(self) -> None:
        """Until every job asked for is done (tests, and the bench's "after background work" figures)."""
        await self._idle.wait()

    # -- pausing --
    def pause(self) -> None:
        """Stop background work (nestable) until as many `resume()` calls: a model is loading."""
        self._pauses += 1
        self._apply_signals()

    def resume(self) -> None:
        if self._pauses == 0:
            raise RuntimeError("BackgroundReader.resume() without pause()")
        self._pauses -= 1
        self._apply_signals()
        self._wake.set()

    def _apply_signals(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            self._stopped = False
            return
        wanted = should_stop(self._pauses, self._running)
        if wanted != self._stopped:
            with contextlib.suppress(ProcessLookupError):  # it just exited: the runner sees that
                process.send_signal(signal.SIGSTOP if wanted else signal.SIGCONT)
            self._stopped = wanted

    # -- closing --
    async def close(self) -> None:
        """Kill the worker at once (exit never waits for background work); waiters get None."""
        self._closed = True
        task, process = self._task, self._process
        if task is not None:
            task.cancel()
        if process is not None and process.returncode is None:
            process.kill()  # SIGKILL ends a stopped process too
            try:
                await asyncio.wait_for(process.wait(), _REAP_TIMEOUT_S)
            except TimeoutError:
                log.warning("the background reader (pid %d) did not exit after SIGKILL", process.pid)
        self._fail_all()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _fail_all(self) -> None:
        for job in self._jobs.values():
            for future in job.waiters:
                if not future.done():
                    future.set_result(None)
        self._jobs.clear()
        self._idle.set()

    # -- the runner --
    async def _run(self) -> None:
        try:
            while not self._closed:
                job = next_job(self._jobs.values(), self._pauses > 0)
                if job is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._do(job)
        except Exception:
            log.exception("the background file reader failed: GGUF facts and digests not yet read stay unknown")
            self._fail_all()

    async def _do(self, job: Job) -> None:
        cache = self._caches[job.op]
        key = cache.key(job.path)
        known = None if key is None else cache.lookup(key)
        if key is None or known is not None:  # gone, or read meanwhile under another name (a symlink)
            self._finish(job, known)
            return
        process = await self._worker()
        assert process.stdin is not None and process.stdout is not None
        self._running = job
        try:
            self._apply_signals()
            if self._on_request is not None:
                self._on_request(job.op, job.path)
            process.stdin.write(json.dumps({"id": job.order, "op": job.op, "path": str(job.path)}).encode() + b"\n")
            with contextlib.suppress(ConnectionError):  # it died: readline says so
                await process.stdin.drain()
            line = await process.stdout.readline()
        finally:
            self._running = None
        if not line:
            code = await process.wait()
            self._process, self._stopped = None, False
            if self._preempted or self._closed:  # killed by us: the job stays queued
                self._preempted = False
                return
            value: Any = failure(f"the reader process exited with code {code} while reading it")
        else:
            reply = json.loads(line)
            value = reply["value"] if "value" in reply else failure(str(reply["error"]))
        message = failure_of(value)
        if message is not None:
            self._warn(key, job.op, job.path, message)
        if cache.key(job.path) != key:
            return  # the file changed while it was read: read it again (the job stays queued)
        await asyncio.to_thread(cache.put, key, value)  # an fsync: not on the event loop
        self._finish(job, value)

    def _finish(self, job: Job, value: Any) -> None:
        self._jobs.pop((job.op, job.path), None)
        for future in job.waiters:
            if not future.done():
                future.set_result(value)
        if not self._jobs:
            self._idle.set()

    async def _worker(self) -> asyncio.subprocess.Process:
        if self._process is not None and self._process.returncode is None:
            return self._process
        parent = str(os.getpid())
        # One thread: GGUF parsing needs no BLAS threads, and threads started later inherit the idle priority.
        env = {**os.environ, "MODELYARD_PARENT_PID": parent, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "modelyard.background", parent, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=_LINE_LIMIT)
        try:
            lower_priority(process.pid)  # before it has read a byte: it is still starting its interpreter
        except OSError as exc:
            log.warning("could not give the background reader idle priority: %s", exc)
        self._process, self._stopped = process, False
        self._apply_signals()
        return process

    def _warn(self, key: str, op: str, path: Path, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("could not read %s of %s: %s (not retried until the file changes)", _WHAT[op], path,
                        message)


if __name__ == "__main__":
    main()
