"""The downloads in flight (the async shell over fetch.py): one per model name, which every later pull of the
same name joins, and one per file, which every download needing that file shares; each file is fetched in
a daemon thread (never on the event loop, and a stalled read never holds up exit). Progress goes to the
status feed as router mode's events (hub/events.py) at most ten times a second, and to each follower
(`Download.updates`, for /api/pull and `modelyard pull`) as it changes.

A download is cancelled by `cancel` (POST /models/unload and DELETE /models, as in router mode) or by
`close` (the drain at shutdown): its threads stop at their next chunk and keep what they wrote for a later
resume, unless asked to discard it. Free space for all of a model's files is checked before the first byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from modelyard.errors import ErrorKind
from modelyard.hub import events
from modelyard.hub.access import Hub, Token, hub_from_environ
from modelyard.hub.cache import CachedModel, repo_folder
from modelyard.hub.fetch import HubError, RemoteFile, fetch, free_bytes, list_repo, resolve_url
from modelyard.hub.refs import HubRef, NotInRepo, Plan, plan

log = logging.getLogger(__name__)

T = TypeVar("T")
Notify = Callable[[str, str, Mapping[str, Any] | None], None]  # (event, model, data): manager.notify
_PUBLISH_EVERY_S = 0.1  # router mode's child throttles its progress reports to one per 100 ms


@dataclass
class _FileJob:
    """One file being fetched, shared by every download that needs it."""

    file: RemoteFile
    progress: events.FileProgress
    partial: Path | None  # where its bytes go until whole (known for LFS files)
    cancel: threading.Event = field(default_factory=threading.Event)
    holders: set[Download] = field(default_factory=set)
    result: asyncio.Future[Path] | None = None


class Download:
    """One model's download: `result()` is its cached files (or raises HubError), `updates()` follows it.
    `name` is what its events and its `downloading` entry are called: the reference as the caller wrote it
    (router mode's download child is named by POST /models' string, so `org/repo:q4_k_m` stays lower case and
    a cancel with that string finds it), else `org/repo:QUANT`."""

    def __init__(self, ref: HubRef, hub: Hub, want_mmproj: bool, name: str = "") -> None:
        self.ref = ref
        self.name = name or ref.name
        self.hub = hub
        self.want_mmproj = want_mmproj
        self.files: list[_FileJob] = []
        self.cancelled = asyncio.Event()
        self.task: asyncio.Task[CachedModel] | None = None
        self._changed = asyncio.Event()
        self._last_publish = 0.0

    def progress(self) -> list[events.FileProgress]:
        return [job.progress for job in self.files]

    async def result(self) -> CachedModel:
        assert self.task is not None
        return await asyncio.shield(self.task)

    async def updates(self) -> AsyncIterator[list[events.FileProgress]]:
        """The progress at once, then after each change, until the download ends (then `result()`)."""
        assert self.task is not None
        while True:
            self._changed.clear()
            yield self.progress()
            if self.task.done():
                return
            waiter = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait([waiter, self.task], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def stopped(self, within: float = 5.0) -> None:
        """Wait (at most `within` seconds) until the threads of this download's files have stopped writing:
        after a cancel, before its files are deleted."""
        pending = [job.result for job in self.files if job.result is not None and not job.result.done()]
        if pending:
            await asyncio.wait(pending, timeout=within)

    def partials(self) -> list[Path]:
        return [job.partial for job in self.files if job.partial is not None]

    def _touch(self) -> None:
        self._changed.set()


class Downloads:
    """Every download in flight, by model name."""

    def __init__(self, notify: Notify, on_finished: Callable[[Download], None] | None = None, *,
                 environ: Mapping[str, str] | None = None, free_space: Callable[[Path], int] = free_bytes,
                 retry_delay: float = 1.0) -> None:
        """`environ`: where the hub settings are read (the process environment, at each download, by default);
        `free_space` and `retry_delay` are for tests (a full disk, no pause between resumes)."""
        self._notify = notify
        self._on_finished = on_finished
        self._environ = environ
        self._free_space = free_space
        self._retry_delay = retry_delay
        self.token: Token | None = None  # the router's own --hf-token, for downloads without one of their own
        self.offline = False  # the router's --offline: only the cache, as with HF_HUB_OFFLINE
        self._downloads: dict[str, Download] = {}
        self._files: dict[tuple[str, str, str, str], _FileJob] = {}
        self._closed = False

    def hub(self, token: Token | None = None) -> Hub:
        hub = hub_from_environ(self._environ, token)
        return replace(hub, offline=True) if self.offline else hub

    def find(self, name: str) -> Download | None:
        return self._downloads.get(name)

    def active(self) -> list[Download]:
        return list(self._downloads.values())

    async def start(self, ref: HubRef, token: Token | None = None, want_mmproj: bool = True,
                    name: str = "") -> Download:
        """The download of `ref` under `name` (default `ref.name`), joined if one of that name is in flight, else
        started once the hub has listed the repository and it has the file (router mode validates first too): a
        missing repo, file or quant, a refused token, no network or too little disk space raise HubError here,
        before any event. Two names of one file share its fetch."""
        name = name or ref.name
        running = self._downloads.get(name)
        if running is not None:
            return running
        if self._closed:
            raise HubError(ErrorKind.SHUTTING_DOWN, "modelyard is shutting down; no new downloads")
        hub = self.hub(token or self.token)
        listing = await _in_thread(list_repo, hub, ref.repo)
        try:
            chosen = plan(listing.paths, ref, want_mmproj)
        except NotInRepo as exc:
            raise HubError(ErrorKind.HUB_NOT_FOUND, f"{exc} (on {hub.endpoint})") from None
        files = [listing.file(path) for path in chosen.files]
        self._check_space(hub, files)
        running = self._downloads.get(name)  # started while this one listed
        if running is not None:
            return running
        download = Download(ref, hub, want_mmproj, name)
        self._downloads[name] = download
        self._notify(events.STARTED, download.name, {"status": "downloading"})
        download.files = [self._share(hub, file, download) for file in files]
        download.task = asyncio.create_task(self._run(download, chosen), name=f"download {ref.name}")
        download.task.add_done_callback(lambda task: self._ended(download, task))
        return download

    def cancel(self, name: str) -> Download | None:
        """Stop a download in flight (its files too, unless another download still needs them)."""
        download = self._downloads.get(name)
        if download is not None:
            download.cancelled.set()
            for job in download.files:
                self._release(job, download)
        return download

    async def close(self, wait: float = 2.0) -> None:
        """Cancel every download (shutdown) and give their threads `wait` seconds to stop."""
        self._closed = True
        pending = [d.task for d in self._downloads.values() if d.task is not None]
        for name in list(self._downloads):
            self.cancel(name)
        if pending:
            await asyncio.wait(pending, timeout=wait)

    # -- running one download --
    async def _run(self, download: Download, chosen: Plan) -> CachedModel:
        paths = {}
        for job in download.files:
            assert job.result is not None
            paths[job.file.path] = await self._until_cancelled(download, job.result)
        return CachedModel(paths[chosen.primary], paths[chosen.mmproj] if chosen.mmproj else None)

    async def _until_cancelled(self, download: Download, work: asyncio.Future[T]) -> T:
        cancelled = asyncio.ensure_future(download.cancelled.wait())
        waits: list[asyncio.Future[Any]] = [work, cancelled]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
        if download.cancelled.is_set():
            raise HubError(ErrorKind.CANCELLED, f"the download of {download.name} was cancelled")
        return work.result()

    def _check_space(self, hub: Hub, files: list[RemoteFile]) -> None:
        folder = repo_folder(hub.cache, files[0].repo) if files else hub.cache
        pending = [f for f in files if not (folder / "snapshots" / f.commit / f.path).is_file()]
        need = sum((f.size or 0) - _partial_size(hub, f) for f in pending)
        where = _existing(folder)
        free = self._free_space(where)
        if need > free:
            raise HubError(ErrorKind.DISK_FULL, f"{where} has {free / 2**20:,.1f} MiB free but the download needs "
                           f"{need / 2**20:,.1f} MiB; free some space (or set HF_HUB_CACHE to a larger disk) and "
                           f"pull again")

    def _share(self, hub: Hub, file: RemoteFile, download: Download) -> _FileJob:
        key = (str(hub.cache), file.repo, file.commit, file.path)
        job = self._files.get(key)
        previous = None
        if job is not None and job.cancel.is_set():  # being cancelled: a new fetch starts once it has stopped
            previous, job = job.result, None
        if job is None:
            partial = (repo_folder(hub.cache, file.repo) / "blobs" / f"{file.sha256}.incomplete"
                       if file.sha256 else None)
            job = _FileJob(file, events.FileProgress(resolve_url(hub, file), file.sha256 or "", 0, file.size or 0),
                           partial)
            self._files[key] = job
            loop = asyncio.get_running_loop()

            def report(done: int, total: int) -> None:  # from the worker thread
                with contextlib.suppress(RuntimeError):  # the loop closed under a stalled download
                    loop.call_soon_threadsafe(self._progress, job, done, total)

            job.result = asyncio.ensure_future(self._fetch(previous, hub, file, report, job.cancel))
            job.result.add_done_callback(functools.partial(self._forget, key, job))
            job.result.add_done_callback(_retrieved)  # a cancelled fetch's error may have no reader left
        job.holders.add(download)
        return job

    async def _fetch(self, previous: asyncio.Future[Path] | None, hub: Hub, file: RemoteFile,
                     report: Callable[[int, int], None], cancel: threading.Event) -> Path:
        if previous is not None:  # never two writers on one partial file
            await asyncio.wait([previous])
        return await _in_thread(fetch, hub, file, report, cancel, self._free_space, self._retry_delay)

    def _forget(self, key: tuple[str, str, str, str], job: _FileJob, _: object) -> None:
        if self._files.get(key) is job:  # not a newer fetch of the same file
            del self._files[key]

    def _release(self, job: _FileJob, download: Download) -> None:
        job.holders.discard(download)
        if not job.holders:
            job.cancel.set()

    def _progress(self, job: _FileJob, done: int, total: int) -> None:
        job.progress = replace(job.progress, done=done, total=total)
        now = time.monotonic()
        for download in list(job.holders):
            download._touch()
            if now - download._last_publish >= _PUBLISH_EVERY_S or done == total:
                download._last_publish = now
                self._notify(events.PROGRESS, download.name, events.router_progress(download.progress()))

    def _ended(self, download: Download, task: asyncio.Task[CachedModel]) -> None:
        self._downloads.pop(download.name, None)
        for job in download.files:
            self._release(job, download)
        download._touch()
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            message = str(error) if error is not None else "the download was cancelled"
            log.warning("download of %s failed: %s", download.name, message)
            self._notify(events.FAILED, download.name, events.router_failure(message))
            return
        log.info("downloaded %s", download.name)
        self._notify(events.FINISHED, download.name, None)
        if self._on_finished is not None:
            self._on_finished(download)


def _partial_size(hub: Hub, file: RemoteFile) -> int:
    if not file.sha256:
        return 0
    partial = repo_folder(hub.cache, file.repo) / "blobs" / f"{file.sha256}.incomplete"
    try:
        return partial.stat().st_size
    except OSError:
        return 0


def _existing(path: Path) -> Path:
    """The nearest folder that exists (the cache is made by the first download)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a future's error as read: one nobody awaits any more must not be logged as never retrieved."""
    if not future.cancelled():
        future.exception()


def _in_thread(function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`function(*args)` in a daemon thread; its result or exception on the returned future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:  # handed to the awaiting task, which reports it
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (exit): nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    future.add_done_callback(_retrieved)
    threading.Thread(target=work, name=f"modelyard-hub-{getattr(function, '__name__', 'work')}", daemon=True).start()
    return future
