"""The model manager: an importable async API over the scheduler core.

    manager = ModelManager.create(models_dir=Path("~/models"), max_models=2)   # reads the sources (I/O)
    await manager.start()
    async with manager.lease("smollm2") as lease:      # loads the model if needed
        async with lease.child.request("POST", "/v1/chat/completions", body=...) as reply: ...
    await manager.close()                              # stops every child

It is the imperative shell: it feeds events to `Scheduler`, runs the actions it returns (start a child,
stop a child, kill a wedged one, hand a lease to a waiting request), and publishes every status change and
every decision with its reason (`Decision`, the last 500 kept); each llama-server child is given its
threads and cores as its load starts (modelyard.placement, from the scheduler's board and the cores the
running children hold: a placement lives as long as its child and shows in `models()`); each model's child
output is kept in `logbook` across restarts. The status feed (`subscribe`, what /models/sse sends) also
carries what the children report of themselves (load progress; sleep and wake under --sleep-idle-seconds,
which the scheduler never hears of: a sleeping child keeps its slot and wakes on its next request, as in
router mode) and the events other parts publish with `notify` (downloads). The constructor does no I/O
(`create` reads the sources and the CPU topology, and asks nvidia-smi); children come from a factory (real
processes, or fakes in tests) and time from an injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from modelyard.background import BackgroundReader
from modelyard.children import Child, ChildExited, ChildFactory, ChildSockets, ProcessChild, free_port, new_child_key
from modelyard.clock import Clock, MonotonicClock, Timer
from modelyard.config.catalog import Catalog, ModelConfig, Sources, parse_engine_args
from modelyard.config.options import load_option_table
from modelyard.config.presets import ConfigError
from modelyard.decisions import Waiting, explain_waiting
from modelyard.digests import FileDigests
from modelyard.engine.command import Engine, launch_plan
from modelyard.engine.defaults import child_defaults
from modelyard.engine.install import cache_root, is_cpu_build
from modelyard.engine.locate import locate_llama_server
from modelyard.errors import ErrorKind, ModelError
from modelyard.feed import Feed
from modelyard.hub.access import router_access
from modelyard.hub.cache import cache_dir
from modelyard.hub.downloads import Download, Downloads
from modelyard.hub.presets import router_presets
from modelyard.logbook import Logbook
from modelyard.memory import (
    Footprint,
    GgufCache,
    GgufFacts,
    available_memory,
    describe,
    fitted_footprint,
    fitted_settings,
    gpu_memory_by_pid,
    gpu_total_memory,
    model_files,
    process_memory,
    serving_context,
)
from modelyard.placement import (
    Placement,
    Resident,
    Topology,
    expected_residents,
    fully_offloaded,
    place,
    read_topology,
    wishes,
)
from modelyard.scheduler import (
    RUNNING,
    Acquire,
    Action,
    Board,
    Cancel,
    ChildUnhealthy,
    Decided,
    DecisionKind,
    Event,
    Grant,
    InstanceExited,
    KillInstance,
    Limits,
    LoadSucceeded,
    MemoryMeasured,
    ModelAdded,
    ModelChanged,
    ModelRemoved,
    ModelSnapshot,
    ModelSpec,
    ReadAhead,
    Reject,
    Release,
    Room,
    Scheduler,
    Shutdown,
    StartLoad,
    Status,
    StatusChanged,
    StopInstance,
    Tick,
    UnloadRequested,
    overages,
    unload_refusal,
)
from modelyard.tasks import log_failure
from modelyard.watchdog import Observation, WatchdogSettings, judge

log = logging.getLogger(__name__)


def read_ahead(settings: Mapping[str, str]) -> None:
    """Ask the kernel to read the files of the model with these settings into the page cache
    (POSIX_FADV_WILLNEED: it queues the reads and returns), so that a child about to load finds its model in
    memory rather than faulting it in page by page. Advice: a file that cannot be opened or advised is logged,
    never raised (the load reports a missing file itself), and nothing is done where the OS has no
    posix_fadvise (macOS). A file that does not fit in MemAvailable, with the files advised before it, is
    skipped: read ahead, a model bigger than free memory would evict the pages of the running models (and its
    own first pages before the load reads them). Blocking (the files are found with stat calls, and the
    kernel may submit reads before it returns): run in a thread."""
    if not hasattr(os, "posix_fadvise"):
        return
    room = available_memory() or None  # None: unknown, every file is advised
    for path in model_files(settings):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                if room is not None and size > room:
                    log.debug("not reading %s ahead: its %s exceed the %s of memory still available", path,
                              describe(size), describe(room))
                    continue
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                room = room - size if room is not None else None
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("could not read %s ahead: %s", path, exc)


class CatalogSource(Protocol):
    def load(self) -> Catalog: ...


@dataclass(frozen=True)
class Lease:
    """The right to send requests to one loaded model until released, through `child.request(...)`."""

    model: str
    request_id: int
    child: Child


@dataclass
class _Running:
    """One running child and what it was started from: the one record per child (its config and its launch
    settings live and die with it)."""

    child: Child
    config: ModelConfig
    settings: Mapping[str, str]
    failed_probes: int = 0
    progress: int | None = None  # the child's main-thread CPU ticks at the last watchdog round
    wake_state: str = ""  # "sleeping" (--sleep-idle-seconds freed its model) or "loading" (waking up again)


@dataclass(frozen=True)
class StatusEvent:
    """A status change of a model (the scheduler's), or one its child reported: `progress` is set only on the
    child's own load reports (its first load, or a wake), `sleeping` when --sleep-idle-seconds freed its model
    (the scheduler still counts it loaded)."""

    model: str
    status: Status
    exit_code: int | None = None
    reason: str = ""
    progress: Mapping[str, Any] | None = None
    info: Mapping[str, Any] | None = None  # the child's own model info, on `loaded`
    sleeping: bool = False


@dataclass(frozen=True)
class ModelsReloaded:
    """What `/models/sse` publishes after the model sources were re-read (models may have come and gone)."""


@dataclass(frozen=True)
class ModelNotice:
    """An event of router mode's /models/sse that is no status change (`download_progress`,
    `download_finished`, `download_failed`, `model_remove`), sent as router mode sends it:
    {"model": model, "event": event, "data": data} (no "data" when None). Published with `notify`."""

    event: str
    model: str
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Decision:
    """One decision of the scheduler, as GET /decisions shows it and metrics count it: `kind` and `cause`
    (a few fixed words per kind, see scheduler.DecisionKind), `reason` for people, `request` the id of the
    request it was for (Lease.request_id), if any."""

    time: float  # Unix seconds
    kind: DecisionKind
    cause: str
    model: str
    reason: str
    request: int | None = None


FeedEvent = StatusEvent | ModelsReloaded | ModelNotice  # the status feed: one union, no sentinel model name


@dataclass(frozen=True)
class ModelView:
    """A snapshot of one model for listings: the core's view of it (`state`) and its running child's."""

    config: ModelConfig
    state: ModelSnapshot
    args: tuple[str, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)
    port: int | None = None
    pid: int | None = None
    expires_in: float | None = None  # seconds until an idle model's keep-alive ends
    idle_for: float | None = None  # seconds since its last request, if it ever had one
    wake_state: str = ""  # a loaded model's child asleep ("sleeping") or waking up ("loading")
    placement: Placement | None = None  # its running child's threads and cores (modelyard.placement)

    @property
    def status(self) -> Status:
        return self.state.status

    @property
    def shown_status(self) -> str:
        """The status router mode would show: `sleeping` (and `loading` while it wakes) for a loaded model
        whose child sleeps under --sleep-idle-seconds."""
        return self.wake_state or self.status.value


@dataclass(frozen=True)
class MemoryUse:
    """What the running models use (measured where measured, estimated otherwise) against the budgets
    (0 = no budget)."""

    used: int
    budget: int
    gpu_used: int
    gpu_budget: int


_MEASURE_EVERY_S = 5.0
_ESTIMATE_WAIT_S = 2.0
# How long watch() waits for a step before it answers with the same board: a cluster's ingress takes a node that
# failed one connection out of placement until a watch started after that answers, so this bounds how long a
# transient error keeps an idle, healthy node out (docs/cluster.md); each beat is one small answer per node.
WATCH_HEARTBEAT_S = 2.0

DECISIONS_KEPT = 500


def _wake(watcher: asyncio.Future[None]) -> None:
    """A board watcher's wake-up: a step's, or its heartbeat's, whichever comes first."""
    if not watcher.done():
        watcher.set_result(None)


class ModelManager:
    def __init__(self, source: CatalogSource, engine: Engine, *, catalog: Catalog,
                 limits: Limits | None = None, max_models: int | None = None, max_queue: int | None = None,
                 clock: Clock | None = None, gguf_cache: GgufCache | None = None, gpus: bool = False,
                 child_factory: ChildFactory = ProcessChild, watchdog: WatchdogSettings | None = None,
                 topology: Topology | None = None) -> None:
        """`catalog`: the models, as `source` last read them (`source` is read again on reload); `gpus`: whether
        models are offloaded to GPUs, so that estimates count GPU memory (`create` asks nvidia-smi);
        `child_factory` makes the children (the real processes by default, an in-memory fake in tests);
        `topology`: the host's cores, to place children on (`create` reads them; None: no placement)."""
        self._source = source
        self._gpus = gpus
        self._engine = engine
        self._clock: Clock = clock or MonotonicClock()
        self._epoch = time.time() - self._clock.now()  # Unix time = epoch + the clock's time (moments shown)
        self.logbook = Logbook(self.wall)
        self._decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)
        self._new_child = child_factory
        self._watchdog = watchdog or WatchdogSettings()
        self._gguf = gguf_cache or GgufCache(cache_root())
        self.digests = FileDigests(cache_root())
        # GGUF facts and digests are read there, at idle priority, never on the event loop (issue 9 point 7);
        # its worker process starts on the first file to read, not here.
        self.files = BackgroundReader(self._gguf, self.digests)
        self.catalog = catalog
        self._footprints: dict[str, Footprint] = {}
        self._asked_estimate: set[str] = set()  # models whose first request waited (briefly) for an estimate
        limits = limits or Limits()
        self._budget = Footprint(limits.memory_budget, limits.gpu_memory_budget)
        self._scheduler = Scheduler([self._spec(c) for c in self.catalog.models.values()], limits,
                                    max_models=max_models, max_queue=max_queue)
        self._running: dict[str, _Running] = {}
        self._sockets = ChildSockets()  # where llama-server children listen (made on the first load)
        self._closed = False  # close() has begun: no child is started any more
        self._topology = topology
        # The placement of each model's child, from its StartLoad until it is unloaded or failed: set as the
        # load is started, before its child exists, so that loads started together see each other's cores.
        self._placements: dict[str, Placement] = {}
        self._waiting: dict[int, asyncio.Future[Lease]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._feed: Feed[FeedEvent] = Feed()
        self._decision_feed: Feed[Decision] = Feed()
        # Hugging Face downloads (POST /models, /api/pull, and a hub model's first load): their progress goes
        # on the status feed, and each one that ends re-reads the sources so that its model is listed
        self.downloads = Downloads(self.notify, self._downloaded)
        self._timer: Timer | None = None
        self._idle = asyncio.Event()  # set while no request holds a lease, once draining
        self.draining = False
        self._timer_at: float | None = None
        # The board's version, one more after each scheduler step, and the watchers waiting for the next step
        # (each its own future, so that its heartbeat wakes it alone; without watchers a step costs one
        # increment). A cluster node's agent long-polls it to publish the node's state (docs/cluster.md): the
        # status feed has no grants or releases.
        self._board_version = 0
        self._board_watchers: set[asyncio.Future[None]] = set()

    @classmethod
    def create(cls, *, models_dir: Path | None = None, models_preset: Path | None = None,
               llama_server: str | None = None, engine_args: Sequence[str] = (), max_models: int | None = None,
               max_queue: int | None = None, router_port: int = 0, limits: Limits | None = None,
               watchdog: WatchdogSettings | None = None) -> ModelManager:
        """A manager over a models directory and/or preset file, with llama-server found as the CLI finds it.

        `engine_args` are llama-server flags applied to every model (`["-c", "4096"]`); `limits` holds the
        memory budget, default keep-alive and max-wait (`max_models`/`max_queue` override its fields).
        """
        binary = locate_llama_server(llama_server)
        table = load_option_table(binary, cache_root())
        # `-hf org/repo` on the command line serves that repository's preset.ini, as in router mode
        models_preset, router_settings = router_presets(parse_engine_args(tuple(engine_args), table),
                                                        models_preset, table)
        sources = Sources(table, models_dir=models_dir, preset_path=models_preset, router_settings=router_settings,
                          hub_cache=cache_dir(os.environ))  # router mode lists the Hugging Face cache's models
        engine = Engine(binary, table, router_port=router_port, cpu_build=is_cpu_build(binary))
        manager = cls(sources, engine, catalog=sources.load(),
                      limits=limits, max_models=max_models, max_queue=max_queue, gpus=gpu_total_memory() > 0,
                      watchdog=watchdog, topology=read_topology())
        manager.downloads.token, manager.downloads.offline = router_access(sources.router_settings)
        return manager

    def _spec(self, config: ModelConfig) -> ModelSpec:
        if config.name not in self._footprints:
            facts = [self._gguf.get(path) for path in model_files(config.settings)]
            known = [f for f in facts if f is not None]
            self._footprints[config.name] = self._estimate(config, known) if known else Footprint()
        footprint = self._footprints[config.name]
        return ModelSpec(config.name, footprint=footprint.memory, gpu_footprint=footprint.gpu, pinned=config.pinned,
                         priority=config.priority, keep_alive=config.keep_alive,
                         concurrency_limit=config.concurrency_limit, load_timeout=config.load_timeout)

    async def estimate_memory(self, names: Sequence[str] | None = None, urgent: bool = False) -> None:
        """Have the GGUF metadata of the models (`names`, default all) not estimated yet read in the background
        (one file at a time, at idle priority: see modelyard.background), and hand each estimate to the
        scheduler as it comes. `urgent`: a load waits for it, so it goes before all other background work.
        A file that cannot be read is logged once by the reader and leaves the model unestimated."""
        chosen = self.catalog.models.values() if names is None else [self.catalog.models[n] for n in names]
        for config in list(chosen):
            if self._footprints.get(config.name, Footprint()) != Footprint():
                continue
            found = await self.files.want_facts(model_files(config.settings), urgent=urgent)
            facts = [f for f in found if f is not None]
            if len(facts) != len(found) or self._footprints.get(config.name, Footprint()) != Footprint():
                continue  # unreadable, or estimated meanwhile (by an urgent call)
            self._footprints[config.name] = self._estimate(config, facts)
            if self._scheduler.view(config.name) is not None and self.catalog.models.get(config.name) is config:
                self._dispatch(ModelChanged(self._spec(config), restart=False))

    def _estimate(self, config: ModelConfig, facts: list[GgufFacts]) -> Footprint:
        return fitted_footprint(config.settings, facts, self._gpus, self._budget)

    def launch_settings(self, config: ModelConfig) -> Mapping[str, str]:
        """The settings a child is started with: the model's, plus the context chosen to fit the memory
        budget when llama-server would size it itself (see memory.fitted_settings), plus modelyard's defaults
        for children where unset (engine.defaults: what shortens a load)."""
        fitted = fitted_settings(config.settings, self.gguf_facts(config), self._gpus, self._budget)
        return child_defaults(fitted, os.environ, self._engine.options, self._engine.cpu_build)

    def served_context(self, config: ModelConfig) -> int:
        """The context (tokens, all slots) the model's instance serves, or would serve if loaded now; 0 if
        its GGUF has not been read yet."""
        facts = self.gguf_facts(config)
        record = self._running.get(config.name)
        settings = record.settings if record is not None and record.config is config else self.launch_settings(config)
        return serving_context(settings, facts[0]) if facts else 0

    def gguf_facts(self, config: ModelConfig) -> list[GgufFacts]:
        """What is known of the model's GGUF files so far (never waits: the reader runs in the background)."""
        return [f for f in (self._gguf.get(p) for p in model_files(config.settings)) if f is not None]

    def check_pinned(self) -> None:
        """Refuse a configuration whose pinned models alone exceed --models-max or a memory budget (host or GPU)."""
        pinned = [c for c in self.catalog.models.values() if c.pinned]
        limits = self._scheduler.limits
        names = ", ".join(c.name for c in pinned)
        for slots in overages(Room(slots=len(pinned)), limits):
            raise ModelError(ErrorKind.BAD_REQUEST, f"{len(pinned)} models are pinned ({names}) but "
                             f"{slots.flag} is {slots.limit}")
        if not pinned or not (limits.memory_budget or limits.gpu_memory_budget):
            return
        footprints = {c.name: self._estimate(c, [self._gguf.read(p) for p in model_files(c.settings)])
                      for c in pinned}
        need = Room(sum(f.memory for f in footprints.values()), sum(f.gpu for f in footprints.values()))
        for over in overages(need, limits):
            sizes = {n: f.memory if over.kind == "memory" else f.gpu for n, f in footprints.items()}
            detail = ", ".join(f"{name} {describe(size)}" for name, size in sizes.items())
            raise ModelError(ErrorKind.BAD_REQUEST, f"pinned models need about {describe(over.need)} of {over.kind} "
                             f"({detail}) but {over.flag} is {describe(over.limit)}")

    def check_startup_loads(self) -> None:
        """Refuse a configuration whose load-on-startup models alone exceed --models-max."""
        startup = [c.name for c in self.catalog.models.values() if c.load_on_startup]
        for over in overages(Room(slots=len(startup)), self._scheduler.limits):
            raise ModelError(ErrorKind.BAD_REQUEST, f"{len(startup)} models have load-on-startup "
                             f"({', '.join(startup)}) but {over.flag} is {over.limit}")

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def max_models(self) -> int:
        return self._scheduler.max_models

    # -- lifecycle of the manager --
    async def start(self) -> None:
        """Load the models marked `load-on-startup` (without waiting for them), estimate footprints and start
        measuring what children use."""
        for config in self.catalog.models.values():
            if config.load_on_startup:
                self.load_in_background(config.name)
        self._spawn(self.estimate_memory())
        self._spawn(self._measure_forever())
        self._spawn(self._watch_children())
        self._digest_files()

    def _digest_files(self) -> None:
        """Queue the digests (for Ollama's listings, which show "" until they are known) after every facts job."""
        self.files.want_digests([p for c in self.catalog.models.values() for p in model_files(c.settings)])

    def begin_drain(self) -> None:
        """Take no new model requests (they get 503 with Retry-After), refuse the waiting ones, and stop each
        child once its in-flight requests are done. Listings keep answering."""
        if self.draining:
            return
        self.draining = True
        self._dispatch(Shutdown())
        self._spawn(self.files.close())  # background work stops at once: it never delays exit
        self._spawn(self.downloads.close())  # and so do downloads (they resume on the next pull)

    async def wait_idle(self, grace: float, hurry: asyncio.Event | None = None) -> bool:
        """Wait up to `grace` seconds (less if `hurry` is set) for in-flight requests to finish; whether they
        did."""
        waits = [asyncio.ensure_future(self._idle.wait())]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        return self._idle.is_set()

    def in_flight(self) -> int:
        return self._scheduler.leases_out()

    def end_subscriptions(self) -> None:
        """End every feed's streams (long-lived SSE streams must not hold up shutdown)."""
        self._feed.close()
        self._decision_feed.close()
        self.logbook.close()

    async def close(self) -> None:
        """Refuse new work, then stop every child (graceful first, SIGKILL after its stop-timeout)."""
        self._closed = True
        await self.files.close()  # first, and at once: exit never waits for background work (a parse held it 38.7 s)
        await self.downloads.close()
        self.end_subscriptions()
        self._dispatch(Shutdown())
        deadline = max((c.stop_timeout for c in self.catalog.models.values()), default=10.0) + 5
        children = [r.child for r in self._running.values()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.exited for c in children)), deadline)
        for child in children:
            child.kill("modelyard is shutting down")
        self._sockets.close()
        for task in list(self._tasks):
            task.cancel()

    def kill_all(self, reason: str = "modelyard is shutting down") -> None:
        """Kill every child now (the end of a shutdown's grace, or interpreter exit): no child may outlive
        modelyard, and requests still on them end with `reason`."""
        for record in self._running.values():
            record.child.kill(reason)

    # -- leases --
    def resolve(self, name: str) -> ModelConfig:
        config = self.catalog.resolve(name) or self.catalog.resolve(name.removesuffix(":latest"))
        if config is None:
            raise ModelError(ErrorKind.UNKNOWN_MODEL, f"model '{name}' not found")
        return config

    async def acquire(self, name: str, autoload: bool = True, keep_alive: float | None = None) -> Lease:
        """Wait for a lease on `name`, loading it if needed. Cancelling the wait leaves the queue.
        `keep_alive` (seconds, <0 forever, 0 unload when done) becomes the model's idle timeout."""
        config = self.resolve(name)
        if config.needs_download:
            await self._download(config)
        model = config.name
        if model not in self._asked_estimate:  # once per model: later requests never wait for it
            self._asked_estimate.add(model)
            if self._footprints.get(model, Footprint()) == Footprint():
                await self._estimate_first(model)
        request_id = next(self._ids)
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self._dispatch(Acquire(request_id, model, autoload, keep_alive))
        try:
            return await future
        except asyncio.CancelledError:
            self._waiting.pop(request_id, None)
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())
            else:
                self._dispatch(Cancel(request_id))
            raise

    async def _estimate_first(self, model: str) -> None:
        """A model requested before its GGUF was read: have it read now, ahead of other background work, so the
        scheduler admits it with an estimate. Bounded: a SCHED_IDLE reader can be starved by busy children."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.estimate_memory([model], urgent=True), _ESTIMATE_WAIT_S)

    async def _download(self, config: ModelConfig) -> None:
        """A hub model whose file is not cached yet (`hf-repo` in a preset): fetch it before the load is queued
        (no slot is held meanwhile; every request for it joins the one download), then re-read the sources so
        that the model starts on its cached file. Failures are ModelErrors (modelyard.hub.fetch.HubError)."""
        assert config.hub is not None
        download = await self.downloads.start(config.hub.ref, config.hub.token, config.hub.mmproj)
        await download.result()
        if self.resolve(config.name).needs_download:  # not re-read yet by _downloaded
            self._reread(f"downloaded {download.name}")

    def _downloaded(self, download: Download) -> None:
        try:
            self.reload()
        except ConfigError as exc:  # the download stays in the cache; the next good reload lists it
            log.error("downloaded %s, but the model sources cannot be re-read: %s", download.name, exc)

    def _reread(self, why: str) -> None:
        try:
            self.reload()
        except ConfigError as exc:
            raise ModelError(ErrorKind.BAD_REQUEST, f"{why}, but the model sources cannot be re-read: {exc}") from None

    def release(self, lease: Lease) -> None:
        self._dispatch(Release(lease.request_id))

    @asynccontextmanager
    async def lease(self, name: str, autoload: bool = True, keep_alive: float | None = None
                    ) -> AsyncIterator[Lease]:
        granted = await self.acquire(name, autoload, keep_alive)
        try:
            yield granted
        finally:
            self.release(granted)

    # -- management --
    def load_in_background(self, name: str) -> None:
        """Queue a load like a request would (router mode's POST /models/load), without waiting for it."""
        model = self.resolve(name).name

        async def load_and_release() -> None:
            with contextlib.suppress(ModelError):
                self.release(await self.acquire(model))

        self._spawn(load_and_release())

    def unload_all(self, which: Callable[[ModelConfig], bool] = lambda config: True) -> list[str]:
        """Drain and stop every loading or loaded model that `which` admits (POST /models/unload {"all": true});
        the names of those it unloads."""
        names = [name for name, state in self._scheduler.snapshot().items()
                 if state.status in (Status.LOADING, Status.LOADED) and name in self.catalog.models
                 and which(self.catalog.models[name])]
        for name in names:
            self._dispatch(UnloadRequested(name, "unloaded by request (all models)"))
        return names

    def unload(self, name: str) -> None:
        """Drain and stop a running model; its in-flight requests finish first. A model being downloaded has
        its download cancelled instead, as in router mode."""
        if self.downloads.cancel(name) is not None:
            return
        config = self.resolve(name)
        if config.needs_download and config.hub is not None and self.downloads.cancel(config.hub.ref.name):
            return
        status = self._status(config.name)
        refusal = unload_refusal(status, config.name)
        if refusal:
            raise ModelError(ErrorKind.NOT_RUNNING, refusal)
        if status != Status.STOPPING:  # a stopping model is already on its way out
            self._dispatch(UnloadRequested(config.name))

    def reload(self, announce: bool = True) -> None:
        """Re-read the model sources: add new models, drop removed ones, restart changed ones once idle.
        `announce`: publish models_reload (router mode sends none after DELETE /models, only model_remove)."""
        fresh = self._source.load()
        old = self.catalog
        self.catalog = fresh
        for name in fresh.models.keys() - old.models.keys():
            self._dispatch(ModelAdded(self._spec(fresh.models[name])))
        for name in old.models.keys() - fresh.models.keys():
            self._dispatch(ModelRemoved(name))
        for name in fresh.models.keys() & old.models.keys():
            if old.models[name].launch_signature() != fresh.models[name].launch_signature():
                self._footprints.pop(name, None)
                self._asked_estimate.discard(name)
            record = self._running.get(name)
            running = record.config if record is not None else None
            restart = running is not None and running.launch_signature() != fresh.models[name].launch_signature()
            self._dispatch(ModelChanged(self._spec(fresh.models[name]), restart=restart))
        if announce:
            self._publish(ModelsReloaded())
        self._spawn(self.estimate_memory())
        self._digest_files()

    def models(self) -> list[ModelView]:
        now = self._clock.now()
        snapshot = self._scheduler.snapshot()
        views = []
        for name, config in self.catalog.models.items():
            state = snapshot.get(name)
            if state is None:
                continue
            record = self._running.get(name)
            child = record.child if record is not None else None
            loaded = child is not None and state.status == Status.LOADED
            views.append(ModelView(
                config=config, state=state, args=child.argv if child else (),
                info=child.info if child and loaded else {},
                port=child.endpoint.tcp_port if child else None, pid=child.pid if child else None,
                expires_in=max(0.0, state.expires_at - now) if state.expires_at is not None else None,
                idle_for=now - state.last_used if state.last_used else None,
                wake_state=record.wake_state if record is not None and loaded else "",
                placement=self._placements.get(name) if state.status in RUNNING else None))
        return views

    def memory(self) -> MemoryUse:
        """Bytes the running models use, in host and GPU memory, and the budgets."""
        scheduler = self._scheduler
        return MemoryUse(scheduler.memory_used(), scheduler.limits.memory_budget, scheduler.gpu_memory_used(),
                         scheduler.limits.gpu_memory_budget)

    def wall(self) -> float:
        """The time now, in Unix seconds, by the manager's clock (what records show as moments)."""
        return self._epoch + self._clock.now()

    def decisions(self, limit: int = DECISIONS_KEPT) -> list[Decision]:
        """The last decisions, newest first."""
        return list(itertools.islice(reversed(self._decisions), max(0, limit)))

    def waiting(self) -> list[Waiting]:
        """Why each waiting request still waits (modelyard.decisions), in queue order."""
        return explain_waiting(self._scheduler.board(), self._clock.now())

    def board(self) -> Board:
        """The scheduler's board, frozen copies: what a cluster node publishes of itself (cluster.placement)."""
        return self._scheduler.board()

    async def watch(self, version: int, heartbeat: float = WATCH_HEARTBEAT_S) -> tuple[int, Board]:
        """The board and its version once a scheduler step has run after `version` (at once if one has): a
        long-poll. Steps while the watcher is away coalesce into its next answer; a step that changed nothing
        shown (a timer with nothing due) wakes it once with the same board. With no step for `heartbeat` seconds
        (the manager's clock) it answers anyway, with the same version and board: a heartbeat, because an idle
        node runs no step for hours and its watcher must still hear that it is there."""
        if self._board_version <= version:
            woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._board_watchers.add(woken)
            beat = self._clock.call_at(self._clock.now() + heartbeat, functools.partial(_wake, woken))
            try:
                await woken
            finally:
                beat.cancel()
                self._board_watchers.discard(woken)
        return self._board_version, self.board()

    def status_of(self, name: str) -> Status:
        return self._status(self.resolve(name).name)

    def _status(self, model: str) -> Status:
        state = self._scheduler.view(model)
        return state.status if state is not None else Status.UNLOADED

    def notify(self, event: str, model: str, data: Mapping[str, Any] | None = None) -> None:
        """Publish an event of router mode's /models/sse that is no status change, e.g.
        `notify("download_progress", "org/repo:Q4_K_M", {"progress": {url: {"done": n, "total": m}}})` or
        `notify("download_finished", name)`: /models/sse sends it as router mode does (see ModelNotice)."""
        self._publish(ModelNotice(event, model, data))

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[FeedEvent | None]]:
        """Status events as they happen; None means the manager is closing (or the subscriber fell behind)."""
        async with self._feed.subscribe() as queue:
            yield queue

    @asynccontextmanager
    async def follow_decisions(self) -> AsyncIterator[asyncio.Queue[Decision | None]]:
        """Decisions as they are taken; None means the manager is closing (or the subscriber fell behind)."""
        async with self._decision_feed.subscribe() as queue:
            yield queue

    # -- the shell: events in, actions executed --
    def _dispatch(self, event: Event) -> None:
        for action in self._scheduler.handle(event, self._clock.now()):
            self._execute(action)
        self._arm_timer()
        self._board_version += 1
        for woken in self._board_watchers:
            _wake(woken)
        self._board_watchers.clear()
        if self.draining and self._scheduler.leases_out() == 0:
            self._idle.set()

    def _arm_timer(self) -> None:
        """Wake the scheduler when its next keep-alive or max-wait deadline comes."""
        deadline = self._scheduler.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, deadline
        if deadline is not None:
            self._timer = self._clock.call_at(deadline + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._dispatch(Tick())

    async def _measure_forever(self) -> None:
        """What each child really uses (resident memory, plus GPU memory where nvidia-smi reports it)."""
        while True:
            await self._clock.sleep(_MEASURE_EVERY_S)
            await self._measure()

    async def _measure(self) -> None:
        gpu = await gpu_memory_by_pid() if self._running and self._gpus else {}
        for name, record in list(self._running.items()):
            state = self._scheduler.view(name)
            pid = record.child.pid
            if pid is None or state is None or state.status != Status.LOADED:
                continue
            used, gpu_used = process_memory(pid), gpu.get(pid, 0)
            if used > state.measured or gpu_used > state.measured_gpu:
                self._dispatch(MemoryMeasured(name, used, gpu_used))

    async def _watch_children(self) -> None:
        """The watchdog: probe every loaded child each round; a wedged one is reported to the scheduler."""
        while True:
            await self._clock.sleep(self._watchdog.interval)
            records = [(n, r) for n, r in self._running.items()
                       if self._status(n) in (Status.LOADED, Status.STOPPING)]
            await asyncio.gather(*(self._check(name, record) for name, record in records))

    async def _check(self, name: str, record: _Running) -> None:
        child, settings = record.child, self._watchdog
        ok = await child.probe(within=settings.probe_timeout)
        record.failed_probes = 0 if ok else record.failed_probes + 1
        work = child.progress()
        progressed = work is not None and record.progress is not None and work != record.progress
        record.progress = work
        if progressed and child.in_flight:
            child.last_activity = self._clock.now()  # working on them, though it sends nothing yet
        seen = Observation(in_flight=child.in_flight, silent_for=self._clock.now() - child.last_activity,
                           probe_ok=ok, failed_probes=record.failed_probes, progressed=progressed)
        reason = judge(seen, settings)
        if reason and self._running.get(name) is record:
            log.warning("%s is unhealthy: %s; killing it", name, reason)
            self._dispatch(ChildUnhealthy(name, reason))

    def _execute(self, action: Action) -> None:
        match action:
            case Decided(kind=kind, cause=cause, model=model, reason=reason, request_id=rid):
                decision = Decision(self.wall(), kind, cause, model, reason, rid)
                self._decisions.append(decision)
                log.debug("decided %s of %s (%s): %s", kind.value, model, cause, reason)
                self._decision_feed.publish(decision)
            case Grant(request_id=rid, model=model):
                self._grant(rid, model)
            case Reject(request_id=rid, kind=kind, message=message, retry_after=retry):
                future = self._waiting.pop(rid, None)
                if future is not None and not future.done():
                    future.set_exception(ModelError(kind, message, retry_after=retry))
            case StartLoad(model=model, reason=reason):
                try:
                    placement = self._place(model)
                except Exception:  # a placement is an optimisation: its failure never stops a load
                    log.exception("could not place the child of %s; it starts unplaced", model)
                    placement = None
                log.info("loading %s: %s%s", model, reason, f"; {placement.reason}" if placement else "")
                self._spawn(self._start_instance(model))
            case ReadAhead(model=model):
                config = self.catalog.models.get(model)
                if config is not None:
                    self._spawn(asyncio.to_thread(read_ahead, config.settings))
            case StopInstance(model=model, reason=reason):
                log.info("stopping %s: %s", model, reason)
                self._spawn(self._stop_instance(model))
            case KillInstance(model=model, reason=reason):
                log.warning("killing %s: %s", model, reason)
                record = self._running.get(model)
                if record is not None:
                    record.child.kill(f"model '{model}' was killed: {reason}")
            case StatusChanged(model=model, status=status, exit_code=code, reason=reason):
                if status not in RUNNING:
                    self._placements.pop(model, None)  # its child is gone: its cores are free
                level = logging.WARNING if status == Status.FAILED else logging.DEBUG
                log.log(level, "%s: %s%s", model, status.value, f" ({reason})" if reason else "")
                record = self._running.get(model)
                info = record.child.info if record is not None and status == Status.LOADED else None
                self._publish(StatusEvent(model, status, code, reason, info=info))

    def _grant(self, request_id: int, model: str) -> None:
        future = self._waiting.pop(request_id, None)
        record = self._running.get(model)
        if future is None or future.done() or record is None or record.child.exited.done():
            # The waiter is gone (cancelled in the same tick), or the child just died: hand the lease back.
            if future is not None and not future.done():
                future.set_exception(ModelError(ErrorKind.UPSTREAM, f"model '{model}' exited just now; retry"))
            self._dispatch(Release(request_id))
            return
        future.set_result(Lease(model, request_id, record.child))

    def _place(self, model: str) -> Placement | None:
        """Threads and cores for the child of `model`, whose load starts now (modelyard.placement), from the
        scheduler's board and the cores of the children running; None for another engine than llama-server
        (its thread flags are unknown) or without a topology."""
        config = self.catalog.models.get(model)
        if self._topology is None or config is None or config.command is not None:
            return None
        board = self._scheduler.board()
        residents = [Resident(name, placement.cpus, board.models[name].status == Status.STOPPING)
                     for name, placement in self._placements.items()
                     if name != model and name in board.models and board.models[name].status in RUNNING]
        settings = self.launch_settings(config)
        placement = place(self._topology, wishes(settings, os.environ), residents, expected_residents(board, model),
                          fully_offloaded(settings, self.gguf_facts(config), self._gpus))
        self._placements[model] = placement
        return placement

    async def _start_instance(self, model: str) -> None:
        if self._closed:
            # A start queued as close() began: the children it stops may be collected and the sockets' directory
            # removed already, so a child started now could run on unstopped until modelyard exits. Its load
            # ends with close()'s Shutdown, which stops it (before it started: _stop_instance reports that).
            log.info("not starting %s: modelyard is shutting down", model)
            return
        config = self.catalog.models[model]
        placement = self._placements.get(model)
        try:
            settings = self.launch_settings(config)
            if placement is not None:
                settings = {**settings, **placement.args}
            pin = placement is not None and self._topology is not None and self._topology.can_pin
            # a llama-server child listens on a socket where there can be one; a `cmd` engine on a port
            socket = self._sockets.path() if config.command is None else None
            plan = launch_plan(dataclasses.replace(config, settings=settings), self._engine,
                               free_port() if socket is None else 0, new_child_key(),
                               cpus=placement.cpus if pin and placement is not None else frozenset(), socket=socket)
            child = self._new_child(model, plan, lambda state, payload: self._on_child_state(
                model, state, payload), self.logbook.of(model))
        except Exception as exc:
            log.exception("could not prepare the child of %s", model)
            self._dispatch(InstanceExited(model, None, f"could not start model '{model}': {exc}"))
            return
        record = _Running(child, config, settings)
        self._running[model] = record
        self.files.pause()  # background reads would take a core (and the disk) from the load
        try:
            await child.start()
        except Exception as exc:
            self.files.resume()
            self._running.pop(model, None)
            self._dispatch(InstanceExited(model, None, f"could not start {plan.argv[0]}: {exc}"))
            return
        self._spawn(self._watch(record))

    def _on_child_state(self, model: str, state: str, payload: Mapping[str, Any]) -> None:
        """What a running child reports of itself (children.StateCallback), published as router mode does: load
        progress as `loading`, then, under --sleep-idle-seconds, `sleeping`, and on a wake `loading` (with
        progress) and `loaded` again. The scheduler hears none of it: the child still holds its slot and its
        next request is sent to it at once (llama-server wakes itself up for it)."""
        record = self._running.get(model)
        status = self._status(model)
        if record is None or status not in (Status.LOADING, Status.LOADED):
            return
        if state == "loading":
            if status == Status.LOADED:
                record.wake_state = "loading"
            self._publish(StatusEvent(model, Status.LOADING, progress=payload))
        elif state == "sleeping" and status == Status.LOADED:
            record.wake_state = "sleeping"
            log.info("%s is sleeping (--sleep-idle-seconds): its model is freed until the next request", model)
            self._publish(StatusEvent(model, Status.LOADED, sleeping=True))
        elif state == "ready" and status == Status.LOADED and record.wake_state:
            record.wake_state = ""
            log.info("%s woke up", model)
            self._publish(StatusEvent(model, Status.LOADED))

    async def _watch(self, record: _Running) -> None:
        child = record.child
        try:
            await child.ready
            ready = True
        except ChildExited:
            ready = False  # reported below, with its exit code, once it is gone
        finally:
            self.files.resume()  # the load is over, either way
        if ready:
            log.info("%s ready in %.2f s (pid %s, %s)", child.model, child.load_seconds, child.pid, child.endpoint)
            self._dispatch(LoadSucceeded(child.model))
            await self._measure()
        code = await child.exited
        if self._running.get(child.model) is record:
            del self._running[child.model]
        self._dispatch(InstanceExited(child.model, code, child.failure_summary(code)))

    async def _stop_instance(self, model: str) -> None:
        record = self._running.get(model)
        if record is None:  # its start failed or it already exited: nothing to wait for
            self._dispatch(InstanceExited(model, None, "stopped before it started"))
            return
        await record.child.stop(record.config.stop_timeout)

    def _publish(self, event: FeedEvent) -> None:
        self._feed.publish(event)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """Every background task's failure is logged (none may vanish silently)."""
        self._tasks.discard(task)
        log_failure(task)
