"""The scheduling core: a pure, deterministic state machine (events in, actions out).

It owns the decisions — which model to load, which model to evict, which waiting request gets a lease, when
an idle model's keep-alive ends — and nothing else: no processes, no sockets, no clock (every event is
handled at a given `now`; `next_deadline()` tells the shell when to send the next `Tick`). The asyncio shell
(`manager.py`) turns actions into processes and requests, and reports back with events.

Invariants kept here:
- loading + loaded models never exceed `max_models` (0 = unlimited), and a load starts only if the
  footprints of running models (stopping ones included: a child holds its memory until it has exited) plus the
  new one fit in `memory_budget` and, for the part offloaded to GPUs, in `gpu_memory_budget` (0 = unlimited);
  a stopping model holds its model slot as well unless those budgets guard both its memory and the new one's
  (`held`): then the next model's load starts while the previous one drains and stops (issue 12 point 2);
- a model with a lease out (a request granted, proxied or not) is never stopped; a loading model is never
  evicted; a pinned model is never evicted by pressure or keep-alive, only by an explicit unload;
- the first request that waits for a model's load has its files read ahead (`ReadAhead`), while it waits;
- requests for one model share one load; a freshly loaded model is leased to its waiters in the same step,
  before anything can evict it (router mode's #28698);
- evictions happen only if they make the waiting model fit; a model that cannot fit even alone is refused
  at once, naming the sizes (no eviction loop, unlike Ollama's #18282);
- a model chosen to stop is `stopping` at once and takes no new leases; while its in-flight requests finish
  (draining) it keeps its child, stopped when the last lease is released; its waiters wait for its next load;
- swap-aware: a loaded model serves every request queued for it, so requests are served grouped by model,
  and an idle model is evicted only for a waiting one; but no request waits longer than `max_wait` behind
  other models' batches: once it has, the models in its way are drained even though they are busy;
- when several models wait for room, the one with the most waiting requests gets it first (`load_order`:
  after priority, before age), but never ahead of a request that has waited `max_wait`;
- when idle models must make room, as few as possible stop (one that makes room alone rather than two), and
  among those that would do, the least recently used unless another is clearly cheaper to bring back
  (smaller, and its fastest load took at most `CHEAPER` of the LRU one's): `eviction_choice`;
- no request waits on a wedged child: a load that is not ready within its `load_timeout` is killed and its
  waiters get the reason; a loaded child the shell's watchdog reports unhealthy (`ChildUnhealthy`) is killed,
  takes no new requests, and its next request loads it again.

Every decision is explained where it is taken: next to the actions that carry it out, the core emits one
`Decided` (a load started, a model chosen to stop or be killed, a child that failed, a request refused) with its
kind, a short fixed cause (for metrics labels) and a sentence for people; `board()` is a frozen copy of the
state from which modelyard.decisions explains why each waiting request still waits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol, TypeVar

from modelyard.errors import ErrorKind


class Status(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    STOPPING = "stopping"
    FAILED = "failed"


RUNNING = frozenset({Status.LOADING, Status.LOADED, Status.STOPPING})
FOREVER = -1.0


@dataclass(frozen=True)
class ModelSpec:
    """What the scheduler needs to know of a model's configuration."""

    name: str
    footprint: int = 0  # estimated bytes in host memory; 0 = unknown
    gpu_footprint: int = 0  # estimated bytes in GPU memory (layers and KV cache offloaded)
    pinned: bool = False
    priority: int = 0
    keep_alive: float | None = None  # seconds idle before unloading; None = the scheduler's default; <0 never
    concurrency_limit: int = 0  # requests in flight + queued for this model; 0 = no limit
    load_timeout: float | None = None  # seconds a load may take; None = the scheduler's default; 0 = no limit


@dataclass(frozen=True)
class Limits:
    max_models: int = 4
    max_queue: int = 1024
    memory_budget: int = 0  # bytes; 0 = unlimited
    gpu_memory_budget: int = 0  # bytes over all GPUs; 0 = unlimited (or no GPU)
    keep_alive: float = FOREVER
    max_wait: float = 30.0
    load_timeout: float = 600.0  # large models on slow disks take minutes; 0 = no limit


# --- events -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Acquire:
    """A request wants a lease on `model`; with autoload off it is refused unless the model is running.
    `keep_alive`, when given, becomes the model's idle timeout once this request is done."""

    request_id: int
    model: str
    autoload: bool = True
    keep_alive: float | None = None


@dataclass(frozen=True)
class Release:
    request_id: int


@dataclass(frozen=True)
class Cancel:
    """The client of a waiting request went away."""

    request_id: int


@dataclass(frozen=True)
class LoadSucceeded:
    model: str


@dataclass(frozen=True)
class InstanceExited:
    model: str
    exit_code: int | None
    reason: str = ""


@dataclass(frozen=True)
class MemoryMeasured:
    """What the model's child really uses (its peak so far, host and GPU bytes); replaces the estimate."""

    model: str
    used: int
    gpu: int = 0


@dataclass(frozen=True)
class ChildUnhealthy:
    """The shell's watchdog found the model's child wedged (no byte on any request for the stall timeout, and
    no answer to a probe) or failing its health checks."""

    model: str
    reason: str


@dataclass(frozen=True)
class UnloadRequested:
    model: str
    reason: str = "unloaded by request"


@dataclass(frozen=True)
class ModelAdded:
    spec: ModelSpec


@dataclass(frozen=True)
class ModelRemoved:
    model: str


@dataclass(frozen=True)
class ModelChanged:
    """New settings for a model; with `restart`, a running instance restarts once idle."""

    spec: ModelSpec
    restart: bool = True


@dataclass(frozen=True)
class Tick:
    """Time has passed: keep-alive timers and waiting limits are checked."""


@dataclass(frozen=True)
class Shutdown:
    """Refuse waiting and new requests and stop every instance once idle."""


Event = (Acquire | Release | Cancel | LoadSucceeded | InstanceExited | MemoryMeasured | UnloadRequested
         | ModelAdded | ModelRemoved | ModelChanged | Tick | Shutdown | ChildUnhealthy)


# --- actions ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StartLoad:
    model: str
    reason: str


@dataclass(frozen=True)
class StopInstance:
    model: str
    reason: str


@dataclass(frozen=True)
class KillInstance:
    """Kill the model's child at once (no grace): it is wedged. Its exit comes back as InstanceExited."""

    model: str
    reason: str


@dataclass(frozen=True)
class ReadAhead:
    """Have the kernel read the model's files into the page cache now: a request waits for its load (which
    starts now or once there is room). Advice only: the shell never waits for it, and its failure is logged."""

    model: str


@dataclass(frozen=True)
class Grant:
    request_id: int
    model: str


@dataclass(frozen=True)
class Reject:
    request_id: int
    kind: ErrorKind
    message: str
    retry_after: float | None = None  # seconds a client should wait before trying again (503/429)


@dataclass(frozen=True)
class StatusChanged:
    model: str
    status: Status
    exit_code: int | None = None
    reason: str = ""


class DecisionKind(StrEnum):
    LOAD = "load"  # a load started (cause: request)
    EVICT = "evict"  # chosen to stop to make room for another model (cause: lru; size, reload_cost: another
    # than the least recently used, see eviction_choice; max_wait)
    UNLOAD = "unload"  # an explicit unload (cause: request)
    EXPIRE = "expire"  # its keep-alive ended (cause: keep_alive)
    KILL = "kill"  # its child is killed at once (cause: load_timeout, watchdog)
    FAIL = "fail"  # its child ended without being asked to (cause: load, while loading; exit, afterwards)
    DRAIN = "drain"  # stops once its requests finish (cause: config_changed, removed, shutdown)
    REJECT = "reject"  # a request refused (cause: the error code, e.g. queue_full)


@dataclass(frozen=True)
class Decided:
    """Why the core did what it did, for people (GET /decisions) and for metrics: one per decision. `cause` is
    one of a few fixed words per kind (a metrics label); `reason` says it in full; `request_id` is the request
    it was for (a load's or an eviction's oldest waiter, a refused request), if any."""

    kind: DecisionKind
    cause: str
    model: str
    reason: str
    request_id: int | None = None


Action = StartLoad | StopInstance | KillInstance | Grant | Reject | StatusChanged | Decided | ReadAhead


# --- state ------------------------------------------------------------------------------------------------

@dataclass
class ModelState:
    spec: ModelSpec
    status: Status = Status.UNLOADED
    leases: set[int] = field(default_factory=set)
    last_used: float = 0.0
    loaded_at: float = 0.0
    draining: bool = False
    drain_reason: str = ""
    removed: bool = False
    exit_code: int | None = None
    failure: str = ""
    measured: int = 0  # peak host bytes measured for the current instance; 0 = not yet
    measured_gpu: int = 0  # peak GPU bytes measured alongside
    # its fastest load so far (start to ready) with this configuration; 0 = none yet. The fastest, not the
    # last: the first load reads the file cold, and a load beside another load shares the cores
    load_seconds: float = 0.0
    keep_alive: float | None = None  # set by the last request that asked; overrides the spec
    expires_at: float | None = None  # when an idle loaded model's keep-alive ends
    load_deadline: float | None = None  # when a loading model's load-timeout ends
    kill_reason: str = ""  # why its current child is being killed (load timeout, watchdog)
    since: float = 0.0  # when it entered its current status

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def in_flight(self) -> int:
        return len(self.leases)

    @property
    def pinned(self) -> bool:
        return self.spec.pinned

    @property
    def footprint(self) -> int:
        return self.room.memory

    @property
    def gpu_footprint(self) -> int:
        return self.room.gpu_memory

    @property
    def room(self) -> Room:
        return room_of(self.spec.footprint, self.spec.gpu_footprint, self.measured, self.measured_gpu)


@dataclass(frozen=True)
class Room:
    """Host memory, GPU memory (bytes) and model slots: what a model takes and what stopping ones give back."""

    memory: int = 0
    gpu_memory: int = 0
    slots: int = 0

    def __add__(self, other: Room) -> Room:
        return Room(self.memory + other.memory, self.gpu_memory + other.gpu_memory, self.slots + other.slots)

    def __sub__(self, other: Room) -> Room:
        return Room(self.memory - other.memory, self.gpu_memory - other.gpu_memory, self.slots - other.slots)


def room_of(estimated: int, estimated_gpu: int, measured: int, measured_gpu: int) -> Room:
    """What one running model takes: what its child was measured using once it was, its estimate until then."""
    return Room(measured or estimated, measured_gpu if measured else estimated_gpu, 1)


def held(status: Status, room: Room, wanted: Room, limits: Limits) -> Room:
    """What a running model (in `status`, taking `room`) holds against the limits while a model taking `wanted`
    waits to load: all of its room, except that a stopping model holds no model slot when the memory budgets
    guard both models (each footprint known, a budget for each kind of memory either uses). Its memory it
    holds until its process has exited, so the budgets still count it: the next load starts beside it only if
    both fit at once.

    Why --models-max does not count it then: router mode counts a stopping child until it is reaped (so no
    swap overlaps), but what people mean by --models-max is a cap on the resources children take, and memory
    is that resource, which the budget already counts exactly; an idle child on its way out does no work.
    Counting its slot too made every `--models-max 1` swap wait for the old child's exit before the new one
    started (the swap's stop phase, in series). A busy model drained because a request waited past max-wait
    gives its slot back too, while its in-flight requests still run: the waiting request was promised a
    bounded wait (--max-wait), and keeping the slot would stretch it by the rest of those requests (minutes,
    for a long generation) before its load even began; for that while the two children share the CPU (the
    next one's placement counts the leaving child's cores as free, taken last), which the user traded for
    the bound (the table's overlap-a-busy-model-drained-past-max-wait). Without a memory budget (0) or with
    an unknown footprint, nothing else guards memory: the slot counts, as in router mode."""
    if status != Status.STOPPING or not _guarded(room, limits) or not _guarded(wanted, limits):
        return room
    return Room(room.memory, room.gpu_memory, 0)


def _guarded(room: Room, limits: Limits) -> bool:
    """Whether the budgets account for all of `room`: its host memory is known and budgeted, and so is its GPU
    memory if it has any."""
    return (limits.memory_budget > 0 and room.memory > 0
            and (room.gpu_memory == 0 or limits.gpu_memory_budget > 0))


@dataclass(frozen=True)
class ModelSnapshot:
    """What the shell may read of one model: a copy, so that nothing outside the core holds its state."""

    name: str
    status: Status
    in_flight: int
    queued: int
    last_used: float
    exit_code: int | None
    failure: str
    estimated: int  # host bytes, from the spec
    estimated_gpu: int
    measured: int  # peak host bytes of the running child; 0 = not yet
    measured_gpu: int
    keep_alive: float  # effective: the last request's, the preset's or the default
    expires_at: float | None
    pinned: bool = False
    priority: int = 0
    since: float = 0.0  # when it entered its current status
    stopping_reason: str = ""  # why it is stopping (drained or killed), while it is
    load_seconds: float = 0.0  # its fastest load with this configuration; 0 = not loaded yet

    @property
    def room(self) -> Room:
        return room_of(self.estimated, self.estimated_gpu, self.measured, self.measured_gpu)


@dataclass(frozen=True)
class Overage:
    """One limit that a set of models exceeds."""

    kind: str  # "model slots", "memory", "GPU memory"
    flag: str  # the setting that sets it
    limit: int
    need: int


def overages(need: Room, limits: Limits) -> list[Overage]:
    """Each limit (--models-max, --memory-budget, --gpu-memory-budget; 0 = none) that `need` exceeds: the one
    budget rule, used by the scheduler's admission and by the start-up checks of pins and load-on-startup."""
    checks = (("model slots", "--models-max", limits.max_models, need.slots),
              ("memory", "--memory-budget", limits.memory_budget, need.memory),
              ("GPU memory", "--gpu-memory-budget", limits.gpu_memory_budget, need.gpu_memory))
    return [Overage(kind, flag, limit, amount) for kind, flag, limit, amount in checks if limit > 0 and amount > limit]


class Holding(Protocol):
    """A model as the budget rules read it: a ModelState in the core, or a ModelSnapshot of a node's board in
    cluster placement (cluster.placement predicts a node's admissions with the functions below)."""

    @property
    def status(self) -> Status: ...

    @property
    def room(self) -> Room: ...

    @property
    def pinned(self) -> bool: ...


H = TypeVar("H", bound=Holding)


def held_room(models: Iterable[Holding], wanted: Room, limits: Limits) -> Room:
    """What `models` hold against the limits while a model taking `wanted` waits to load (`held`, summed)."""
    return sum((held(m.status, m.room, wanted, limits) for m in models), Room())


def fits_beside(running: Iterable[Holding], wanted: Room, freed: Room, limits: Limits) -> bool:
    """Whether a model taking `wanted` may start beside `running` (the other models loading, loaded or stopping)
    once `freed` is handed back: the admission rule, one fact for the core and for placement's view of a node."""
    return not overages(held_room(running, wanted, limits) - freed + wanted, limits)


def pinned_in_the_way(others: Iterable[H], wanted: Room, limits: Limits) -> tuple[list[H], list[Overage]]:
    """The pinned models among `others` that hold room (loading or loaded: they never make way), and the limits
    a model taking `wanted` exceeds beside them however long it waits: none if it can ever be held there (the
    too-big refusal; a model running there already is never refused)."""
    pins = [m for m in others if m.pinned and m.status in (Status.LOADING, Status.LOADED)]
    return pins, overages(sum((m.room for m in pins), Room()) + wanted, limits)


@dataclass(frozen=True)
class Waiter:
    request_id: int
    model: str
    since: float
    autoload: bool = True
    keep_alive: float | None = None


@dataclass(frozen=True)
class Board:
    """A frozen copy of the core's state: its limits, every model and the queue in order (for explanations)."""

    limits: Limits
    models: Mapping[str, ModelSnapshot]
    queue: tuple[Waiter, ...]


@dataclass(frozen=True)
class InLine:
    """One model waiting for room to load: how many requests wait for it, since when, and whether the oldest
    has waited `max_wait` (overdue)."""

    model: str
    overdue: bool
    waiting: int
    since: float


def load_order(queue: Iterable[Waiter], needs_load: Callable[[str], bool], priority: Callable[[str], int],
               now: float, max_wait: float) -> list[InLine]:
    """The models with waiters and no instance, in the order they get room: overdue ones first (by priority,
    then age: once a request has waited max-wait nothing overtakes it), then by priority, then the one with
    the most waiting requests (one load serves them all), then the oldest waiter."""
    oldest: dict[str, float] = {}
    waiting: Counter[str] = Counter()
    for waiter in queue:
        if needs_load(waiter.model):
            oldest.setdefault(waiter.model, waiter.since)
            waiting[waiter.model] += 1
    deadline = now - max_wait

    def rank(name: str) -> tuple[bool, int, int, float]:
        overdue = oldest[name] <= deadline
        return (not overdue, -priority(name), 0 if overdue else -waiting[name], oldest[name])

    return [InLine(name, oldest[name] <= deadline, waiting[name], oldest[name]) for name in sorted(oldest, key=rank)]


def overtaken(order: list[InLine], index: int) -> InLine | None:
    """The model first in line after `order[index]` whose oldest request waited longer, if any: the one that
    more waiting requests (or a higher priority) put behind it."""
    chosen = order[index]
    return next((later for later in order[index + 1:] if later.since < chosen.since), None)


# Another model is evicted rather than the least recently used one only when it is clearly cheaper to bring
# back on both counts: smaller (its estimated footprint), and its fastest load took at most this share of the
# LRU one's. Load times alone mislead: the same file loads twice as fast warm as cold, or beside another load;
# and recency is the better guess of what is wanted again, so only a large difference outweighs it.
CHEAPER = 0.5


@dataclass(frozen=True)
class Candidate:
    """A loaded model that could be stopped to make room."""

    model: str
    last_used: float
    load_seconds: float  # its fastest load; 0 = unknown
    size: int = 0  # its estimated footprint, host and GPU bytes; 0 = unknown


def eviction_choice(candidates: list[Candidate]) -> tuple[Candidate, Candidate | None]:
    """Which of `candidates` (each of which would make room, the least recently used first) to evict: the
    least recently used, unless others are smaller and load in at most CHEAPER of its time (then the fastest
    of those to bring back, the least recently used among equals); returned with the LRU one it was preferred
    to, if it was. A model whose load time or size is unknown is never preferred for being cheap."""
    lru = candidates[0]
    cheaper = [c for c in candidates if 0 < c.load_seconds <= CHEAPER * lru.load_seconds and 0 < c.size < lru.size]
    if not cheaper:
        return lru, None
    return min(cheaper, key=lambda c: (c.load_seconds, c.last_used)), lru


class Scheduler:
    def __init__(self, models: Iterable[ModelSpec | str], limits: Limits | None = None, *,
                 max_models: int | None = None, max_queue: int | None = None, fast_path: bool = True) -> None:
        limits = limits or Limits()
        # Only the two fields given change (each field listed by hand lost load_timeout: reset to 600 s).
        limits = replace(limits, max_models=limits.max_models if max_models is None else max_models,
                         max_queue=limits.max_queue if max_queue is None else max_queue)
        self.limits = limits
        self.models: dict[str, ModelState] = {}
        for model in models:
            spec = ModelSpec(model) if isinstance(model, str) else model
            self.models[spec.name] = ModelState(spec)
        self.queue: list[Waiter] = []
        self.lease_owner: dict[int, str] = {}
        self.lease_keep_alive: dict[int, float] = {}
        # Indexes over `models`, so that a request to a loaded model costs the same with 10 or 10,000 models.
        self._expiring: set[str] = set()  # models with a keep-alive deadline
        self._draining: set[str] = set()  # stopping models whose in-flight requests are finishing
        self._loading: set[str] = set()  # loading models with a load deadline
        self.shutting_down = False
        self.now = 0.0
        # False runs the full pass after every event: the oracle the fast path is tested against
        # (test_scheduler's twin simulation), never needed in production.
        self.fast_path = fast_path

    @property
    def max_models(self) -> int:
        return self.limits.max_models

    @property
    def max_queue(self) -> int:
        return self.limits.max_queue

    # -- queries --
    def memory_used(self) -> int:
        return sum(m.footprint for m in self.models.values() if m.status in RUNNING)

    def gpu_memory_used(self) -> int:
        return sum(m.gpu_footprint for m in self.models.values() if m.status in RUNNING)

    def view(self, name: str) -> ModelSnapshot | None:
        """One model as the shell may see it (None if unknown)."""
        model = self.models.get(name)
        if model is None:
            return None
        return self._snapshot_of(model, self.queued_for(name))

    def snapshot(self) -> dict[str, ModelSnapshot]:
        """Every model as the shell may see it, in one pass over the queue."""
        queued = Counter(w.model for w in self.queue)
        return {name: self._snapshot_of(m, queued[name]) for name, m in self.models.items()}

    def board(self) -> Board:
        """Everything modelyard.decisions needs to explain the waiting requests, as frozen copies."""
        return Board(self.limits, self.snapshot(), tuple(self.queue))

    def _snapshot_of(self, m: ModelState, queued: int) -> ModelSnapshot:
        stopping = m.kill_reason or (m.drain_reason if m.status == Status.STOPPING else "")
        return ModelSnapshot(m.name, m.status, m.in_flight, queued, m.last_used, m.exit_code, m.failure,
                             m.spec.footprint, m.spec.gpu_footprint, m.measured, m.measured_gpu,
                             self.effective_keep_alive(m), m.expires_at, pinned=m.spec.pinned,
                             priority=m.spec.priority, since=m.since, stopping_reason=stopping,
                             load_seconds=m.load_seconds)

    def leases_out(self) -> int:
        """Requests holding a lease (in flight on a child)."""
        return len(self.lease_owner)

    def queued_for(self, model: str) -> int:
        return sum(1 for w in self.queue if w.model == model)

    def effective_keep_alive(self, model: ModelState) -> float:
        for value in (model.keep_alive, model.spec.keep_alive):
            if value is not None:
                return value
        return self.limits.keep_alive

    def next_deadline(self) -> float | None:
        """When the next Tick could change something: a keep-alive ending or a waiter reaching max_wait."""
        deadlines = [e for e in (self.models[n].expires_at for n in self._expiring) if e is not None]
        deadlines += [d for d in (self.models[n].load_deadline for n in self._loading) if d is not None]
        deadlines += [w.since + self.limits.max_wait for w in self.queue
                      if w.since + self.limits.max_wait > self.now]
        return min(deadlines, default=None)

    # -- the one entry point --
    def handle(self, event: Event, now: float) -> list[Action]:
        self.now = now
        actions: list[Action] = []
        match event:
            case Acquire():
                self._acquire(event, actions)
            case Release(request_id=rid):
                self._release(rid)
            case Cancel(request_id=rid):
                self.queue = [w for w in self.queue if w.request_id != rid]
            case LoadSucceeded(model=name):
                self._loaded(name, actions)
            case InstanceExited():
                self._exited(event, actions)
            case MemoryMeasured(model=name, used=used, gpu=gpu):
                if name in self.models and self.models[name].status in RUNNING:
                    model = self.models[name]
                    model.measured, model.measured_gpu = max(model.measured, used), max(model.measured_gpu, gpu)
            case UnloadRequested(model=name, reason=reason):
                self._unload(name, reason, actions)
            case ModelAdded(spec=spec):
                self._add(spec)
            case ModelRemoved(model=name):
                self._remove(name, actions)
            case ModelChanged(spec=spec, restart=restart):
                self._change(spec, restart, actions)
            case Shutdown():
                self._shutdown(actions)
            case ChildUnhealthy(model=name, reason=reason):
                self._unhealthy(name, reason, actions)
            case Tick():
                pass
        if not (self.fast_path and self._settled()):
            self._schedule(actions)
        return actions

    def _settled(self) -> bool:
        """Whether the decision pass would do nothing now: nobody waits (so nothing to grant, refuse or load)
        and no load deadline, keep-alive or drained model is due (what the pass's other steps act on). Then
        it is skipped, after any event: each of its steps finds nothing, changes nothing, so the next finds
        nothing either. Each check catches all that its step acts on (and more: a keep-alive due on a busy
        model), so a doubt runs the pass. Why: this is the hot path's common case, a grant on a loaded model
        and its release, where the full pass (load_order's Counter, a list per step) was 5.6% of a proxied
        request's CPU (bench/results/profile); with it, a grant and its release take 5.5 to 6.1 µs in handle()
        instead of 10.4 to 11.0 µs (timeit)."""
        if self.queue:
            return False
        models = self.models
        if any(models[n].in_flight == 0 for n in self._draining):
            return False
        if any((d := models[n].load_deadline) is not None and d <= self.now for n in self._loading):
            return False
        return not any((e := models[n].expires_at) is not None and e <= self.now for n in self._expiring)

    # -- event handlers --
    def _acquire(self, event: Acquire, actions: list[Action]) -> None:
        model = self.models.get(event.model)
        refusal = self._refusal(event, model)
        if refusal is not None:
            kind, message = refusal
            self._reject(event.request_id, event.model, kind, message, actions)
        else:
            waiter = Waiter(event.request_id, event.model, self.now, event.autoload, event.keep_alive)
            assert model is not None  # no refusal: it is known
            if self.fast_path and not self.queue and self._grantable(model):
                # Nobody waits: the pass's first step would grant this request alone, now (the fast path).
                self._grant(waiter, model, actions)
                return
            self.queue.append(waiter)
            if model.status in (Status.UNLOADED, Status.FAILED) and self.queued_for(model.name) == 1:
                # The first request to wait for this model's load: its files are read while it waits for room
                # (a drain, a stop) and while its child starts, rather than by the child's page faults.
                actions.append(ReadAhead(model.name))

    def _refusal(self, event: Acquire, model: ModelState | None) -> tuple[ErrorKind, str] | None:
        if model is None or model.removed:
            return ErrorKind.UNKNOWN_MODEL, f"model '{event.model}' not found"
        if self.shutting_down:
            return ErrorKind.SHUTTING_DOWN, "modelyard is shutting down"
        if not event.autoload and model.status not in (Status.LOADING, Status.LOADED):
            return ErrorKind.NOT_LOADED, (f"model '{event.model}' is not loaded and autoload is off; load it with "
                                          f"POST /models/load or add ?autoload=true")
        too_big = self._never_fits(model)
        if too_big:
            return ErrorKind.TOO_BIG, too_big
        limit = model.spec.concurrency_limit
        if limit and model.in_flight + self.queued_for(model.name) >= limit:
            return ErrorKind.BUSY, (f"model '{model.name}' already has {limit} requests in flight or waiting "
                                    f"(its concurrency-limit); retry later")
        if len(self.queue) >= self.max_queue and not self._grantable(model):
            return ErrorKind.QUEUE_FULL, f"too many waiting requests ({self.max_queue}); retry later"
        return None

    def _never_fits(self, model: ModelState) -> str:
        """Why `model` cannot be placed however long it waits (pinned models never make way), or ""."""
        if model.status in RUNNING:
            return ""
        pins, over_limits = pinned_in_the_way((m for m in self.models.values() if m.name != model.name), model.room,
                                              self.limits)
        held = sum((m.room for m in pins), Room())
        for over in over_limits:
            if over.kind == "model slots":
                return (f"model '{model.name}' cannot be loaded: all {self.max_models} model slots (--models-max) "
                        f"are held by pinned models ({', '.join(m.name for m in pins)})")
            pinned = held.memory if over.kind == "memory" else held.gpu_memory
            detail = f" ({_gib(pinned)} held by pinned models)" if pinned else ""
            return (f"model '{model.name}' needs about {_gib(over.need - pinned)} of {over.kind} but the budget is "
                    f"{_gib(over.limit)}{detail}; raise {over.flag} or lower its ctx-size/parallel"
                    + ("/gpu-layers" if over.kind == "GPU memory" else ""))
        return ""

    def _release(self, request_id: int) -> None:
        name = self.lease_owner.pop(request_id, None)
        keep_alive = self.lease_keep_alive.pop(request_id, None)
        model = self.models.get(name) if name is not None else None
        if model is None or request_id not in model.leases:
            return
        model.leases.discard(request_id)
        model.last_used = self.now
        if keep_alive is not None:
            model.keep_alive = keep_alive
        if model.in_flight == 0 and model.status == Status.LOADED:
            self._start_idle_timer(model)

    def _start_idle_timer(self, model: ModelState) -> None:
        keep_alive = self.effective_keep_alive(model)
        self._set_expiry(model, None if keep_alive < 0 or model.spec.pinned else self.now + keep_alive)

    def _loaded(self, name: str, actions: list[Action]) -> None:
        model = self.models[name]
        if model.status != Status.LOADING or model.kill_reason:
            return  # a child being killed (its load timed out just before it became ready) serves no one
        self._set_load_deadline(model, None)
        took = self.now - model.since  # since it became `loading`: what bringing it back costs
        model.load_seconds = min(model.load_seconds, took) if model.load_seconds > 0 else took
        model.last_used = model.loaded_at = self.now
        self._set_status(model, Status.LOADED, actions)
        self._start_idle_timer(model)

    def _exited(self, event: InstanceExited, actions: list[Action]) -> None:
        model = self.models.get(event.model)
        if model is None:
            return
        was = model.status
        killed, model.kill_reason = model.kill_reason, ""
        reason = f"{killed}; {event.reason}" if killed and event.reason else killed or event.reason
        model.exit_code = event.exit_code
        self._set_load_deadline(model, None)
        self._set_draining(model, False)
        model.keep_alive = None  # a request's keep-alive applies to the instance it was sent to
        self._set_expiry(model, None)
        model.leases.clear()  # requests on the dead instance fail on their own; they hold nothing now
        if was == Status.STOPPING and not killed:
            model.failure = ""
            self._set_status(model, Status.UNLOADED, actions, event.exit_code)
        else:
            model.failure = reason
            self._set_status(model, Status.FAILED, actions, event.exit_code, reason)
            loading = was == Status.LOADING
            actions.append(Decided(DecisionKind.FAIL, "load" if loading else "exit", model.name,
                                   f"{'failed to load' if loading else 'exited'}: {reason or 'no reason given'}"))
        if was == Status.LOADING:
            # Killed (by a signal, or by modelyard at its load-timeout), the child died under its waiters: 502,
            # as for any request whose child dies. Exiting by itself, it could not load the model: 500.
            died = killed or (event.exit_code is not None and event.exit_code < 0)
            kind = ErrorKind.UPSTREAM if died else ErrorKind.LOAD_FAILED
            for waiter in self._take_waiters(event.model):
                self._reject(waiter.request_id, event.model, kind, f"model '{event.model}' failed to load: {reason}",
                             actions)
        if model.removed:
            del self.models[event.model]

    def _unhealthy(self, name: str, reason: str, actions: list[Action]) -> None:
        """Kill a wedged child now. Loaded, it becomes `stopping` (no new leases; requests queued meanwhile load
        it again once it is gone); loading, its waiters fail with the reason when it exits."""
        model = self.models.get(name)
        if model is None or model.status not in RUNNING or model.kill_reason:
            return
        self._kill(model, "watchdog", reason, actions)

    def _kill(self, model: ModelState, cause: str, reason: str, actions: list[Action]) -> None:
        actions.append(Decided(DecisionKind.KILL, cause, model.name, reason))
        model.kill_reason = reason
        self._set_expiry(model, None)
        self._set_load_deadline(model, None)
        self._set_draining(model, False)
        if model.status == Status.LOADED:
            self._set_status(model, Status.STOPPING, actions, reason=reason)
        actions.append(KillInstance(model.name, reason))

    def _unload(self, name: str, reason: str, actions: list[Action]) -> None:
        """An explicit unload of a loading model cancels the load: its waiters fail instead of reloading it."""
        if self.models[name].status == Status.LOADING:
            for waiter in self._take_waiters(name):
                self._reject(waiter.request_id, name, ErrorKind.UNLOADED,
                             f"model '{name}' was unloaded while it was loading", actions)
        self._drain(self.models[name], DecisionKind.UNLOAD, "request", reason, actions)

    def _drain(self, model: ModelState, kind: DecisionKind, cause: str, reason: str, actions: list[Action],
               request_id: int | None = None) -> None:
        """Stop `model` now if nothing runs on it, else once its in-flight requests are done; explained as
        `kind`/`cause` (nothing is decided for a model that is not loading or loaded)."""
        self._set_expiry(model, None)
        if model.status == Status.LOADING or (model.status == Status.LOADED and model.in_flight == 0):
            # A loading child cannot serve anyone yet, an idle one serves no one: stop it now.
            self._stop(model, kind, cause, reason, actions, request_id)
        elif model.status == Status.LOADED:
            # Stopping from now on: it takes no new requests; the child stops when the in-flight ones finish.
            busy = f"{reason}; finishing {model.in_flight} request(s) first"
            actions.append(Decided(kind, cause, model.name, busy, request_id))
            self._set_draining(model, True)
            model.drain_reason = reason
            self._set_status(model, Status.STOPPING, actions, reason=reason)

    def _add(self, spec: ModelSpec) -> None:
        model = self.models.get(spec.name)
        if model is None:
            self.models[spec.name] = ModelState(spec)
        else:
            model.spec = spec
            model.removed = False  # re-added while its old instance still stops: it stays

    def _change(self, spec: ModelSpec, restart: bool, actions: list[Action]) -> None:
        model = self.models[spec.name]
        model.spec = spec
        if restart:
            # another configuration: the old measurements say nothing
            model.measured = model.measured_gpu = 0
            model.load_seconds = 0.0
            if model.status in (Status.LOADING, Status.LOADED):
                self._drain(model, DecisionKind.DRAIN, "config_changed", "configuration changed", actions)
        elif model.status == Status.LOADED and model.in_flight == 0:
            self._start_idle_timer(model)  # a new keep-alive or pin applies to the running timer

    def _remove(self, name: str, actions: list[Action]) -> None:
        model = self.models.get(name)
        if model is None:
            return
        for waiter in self._take_waiters(name):
            self._reject(waiter.request_id, name, ErrorKind.UNKNOWN_MODEL,
                         f"model '{name}' was removed from the configuration", actions)
        if model.status in RUNNING:
            model.removed = True
            self._drain(model, DecisionKind.DRAIN, "removed", "removed from the configuration", actions)
        else:
            del self.models[name]

    def _shutdown(self, actions: list[Action]) -> None:
        self.shutting_down = True
        waiters, self.queue = self.queue, []
        for waiter in waiters:
            self._reject(waiter.request_id, waiter.model, ErrorKind.SHUTTING_DOWN, "modelyard is shutting down",
                         actions)
        for model in self.models.values():
            self._drain(model, DecisionKind.DRAIN, "shutdown", "shutting down", actions)

    def _expire_loads(self, actions: list[Action]) -> None:
        for model in [self.models[n] for n in self._loading]:
            deadline = model.load_deadline
            if deadline is not None and deadline <= self.now and model.status == Status.LOADING:
                timeout = self._load_timeout(model)
                self._kill(model, "load_timeout", f"not ready within {timeout:g} s (load-timeout)", actions)

    def _load_timeout(self, model: ModelState) -> float:
        timeout = model.spec.load_timeout
        return self.limits.load_timeout if timeout is None else timeout

    # -- the decision pass, run after every event --
    def _schedule(self, actions: list[Action]) -> None:
        self._grant_ready(actions)
        self._expire_loads(actions)
        self._stop_drained(actions)
        self._expire_keep_alive(actions)
        self._reject_without_autoload(actions)
        self._start_loads(actions)

    def _grantable(self, model: ModelState) -> bool:
        return model.status == Status.LOADED

    def _grant_ready(self, actions: list[Action]) -> None:
        waiting: list[Waiter] = []
        for waiter in self.queue:
            model = self.models[waiter.model]
            if self._grantable(model):
                self._grant(waiter, model, actions)
            else:
                waiting.append(waiter)
        self.queue = waiting

    def _grant(self, waiter: Waiter, model: ModelState, actions: list[Action]) -> None:
        model.leases.add(waiter.request_id)
        model.last_used = self.now
        self._set_expiry(model, None)
        self.lease_owner[waiter.request_id] = model.name
        if waiter.keep_alive is not None:
            self.lease_keep_alive[waiter.request_id] = waiter.keep_alive
        actions.append(Grant(waiter.request_id, model.name))

    def _stop_drained(self, actions: list[Action]) -> None:
        for name in [n for n in self._draining if self.models[n].in_flight == 0]:
            model = self.models[name]
            self._set_draining(model, False)
            actions.append(StopInstance(name, model.drain_reason))  # decided (and explained) when it was drained

    def _expire_keep_alive(self, actions: list[Action]) -> None:
        for model in [self.models[n] for n in self._expiring]:
            expires = model.expires_at
            if (expires is not None and expires <= self.now and model.status == Status.LOADED
                    and model.in_flight == 0 and not model.spec.pinned and self.queued_for(model.name) == 0):
                keep_alive = self.effective_keep_alive(model)
                self._stop(model, DecisionKind.EXPIRE, "keep_alive",
                           f"idle for {human_duration(keep_alive)} (keep-alive)", actions)

    def _reject_without_autoload(self, actions: list[Action]) -> None:
        """A request sent with autoload off never causes a load, even if the load it waited for was stopped."""
        for waiter in [w for w in self.queue if not w.autoload]:
            if self.models[waiter.model].status in (Status.UNLOADED, Status.FAILED):
                self.queue.remove(waiter)
                self._reject(waiter.request_id, waiter.model, ErrorKind.NOT_LOADED,
                             f"model '{waiter.model}' is not loaded and autoload is off", actions)

    def _start_loads(self, actions: list[Action]) -> None:
        claimed = Room()  # what stopping children hand back that is already promised to earlier waiting models
        order = self._models_needing_load()
        for index, line in enumerate(order):
            name, overdue = line.model, line.overdue
            model = self.models[name]
            too_big = self._never_fits(model)
            if too_big:
                for waiter in self._take_waiters(name):
                    self._reject(waiter.request_id, name, ErrorKind.TOO_BIG, too_big, actions)
                continue
            fits = claimed == Room() and self._fits(model, freed=Room())
            if not fits:
                room = self._make_room(model, overdue, claimed, actions)
                if room is None:
                    return  # the head of the line waits for room; later models must not take it
                # The models just chosen to stop may hold only their memory now (`held`): if that leaves
                # room, the load starts beside their drain and exit instead of after it.
                fits = claimed == Room() and self._fits(model, freed=Room())
                if not fits:
                    claimed = room
                    continue
            self._set_status(model, Status.LOADING, actions)
            timeout = self._load_timeout(model)
            self._set_load_deadline(model, self.now + timeout if timeout > 0 else None)
            first = self._first_waiter(name)
            waited = self.now - first.since
            reason = f"{self.queued_for(name)} request(s) waiting" + (
                f", the first for {human_duration(waited)}" if waited >= 1 else "")
            behind = overtaken(order, index)
            if behind is not None and not overdue:
                reason += (f"; ahead of '{behind.model}' ({behind.waiting} waiting, the first for "
                           f"{human_duration(self.now - behind.since)}): "
                           + ("higher priority" if model.spec.priority > self.models[behind.model].spec.priority
                              else "more requests waiting"))
            actions.append(Decided(DecisionKind.LOAD, "request", name, reason, first.request_id))
            actions.append(StartLoad(name, reason))

    def _models_needing_load(self) -> list[InLine]:
        """Models with waiters and no instance, in the order they get room (`load_order`)."""
        return load_order(self.queue, lambda n: self.models[n].status in (Status.UNLOADED, Status.FAILED),
                          lambda n: self.models[n].spec.priority, self.now, self.limits.max_wait)

    def _fits(self, model: ModelState, freed: Room) -> bool:
        return fits_beside(self._running_models(), model.room, freed, self.limits)

    def _running_models(self) -> list[ModelState]:
        return [m for m in self.models.values() if m.status in RUNNING]

    def _held_by(self, models: Iterable[ModelState], wanted: ModelState) -> Room:
        """What `models` hold against the limits while `wanted` waits to load (`held_room`)."""
        return held_room(models, wanted.room, self.limits)

    def _make_room(self, model: ModelState, overdue: bool, claimed: Room, actions: list[Action]) -> Room | None:
        """Stop idle models, and busy ones too if `model` has waited past max_wait, but only if that is enough
        to make it fit (`_victims_for`). Returns the room now promised, or None."""
        freed = self._pending_room(model) - claimed
        promised = claimed + model.room
        if self._fits(model, freed):
            return promised  # children already stopping will make room: wait for them
        idle = self._victims(busy_too=False)
        chosen = self._victims_for(model, freed, idle)
        if chosen is None and overdue:
            chosen = self._victims_for(model, freed, self._victims(busy_too=True))
        if chosen is None:
            return None
        first = self._first_waiter(model.name)
        for victim, (cause, why) in chosen:
            idle_for = human_duration(self.now - victim.last_used)
            if overdue:
                cause, reason = "max_wait", (f"evicted to make room for '{model.name}': its request waited "
                                             f"{human_duration(self.limits.max_wait)} (max-wait)")
            elif cause == "lru":
                reason = f"evicted (least recently used) to make room for '{model.name}', idle {idle_for}"
            else:
                reason = f"evicted to make room for '{model.name}': {why}; idle {idle_for}"
            self._drain(victim, DecisionKind.EVICT, cause, reason, actions, first.request_id)
        return promised

    def _victims_for(self, model: ModelState, freed: Room, pool: list[ModelState]
                     ) -> list[tuple[ModelState, tuple[str, str]]] | None:
        """The models of `pool` (idle before busy, least recently used first) to stop so that `model` fits,
        each with its cause and why: as soon as one would make room alone, that one is the last (the choice
        among several such: `eviction_choice`); until then, the least recently used. None if all of them
        would not make room."""
        if not self._fits(model, freed + sum((v.room for v in pool), Room())):
            return None
        pool = list(pool)
        chosen: list[tuple[ModelState, tuple[str, str]]] = []
        while True:
            enough = [v for v in pool if self._fits(model, freed + v.room)]
            if enough:
                enough = [v for v in enough if v.in_flight == 0] or enough  # an idle one rather than a busy one
                pick, rival = eviction_choice([Candidate(v.name, v.last_used, v.load_seconds,
                                                         v.spec.footprint + v.spec.gpu_footprint) for v in enough])
                victim = self.models[pick.model]
                if rival is not None:
                    why = (f"it reloads in {human_duration(pick.load_seconds)} ({_gib(pick.size)}), rather than "
                           f"'{rival.model}' (least recently used, reloads in {human_duration(rival.load_seconds)}, "
                           f"{_gib(rival.size)})")
                    return [*chosen, (victim, ("reload_cost", why))]
                if victim is not pool[0]:
                    why = f"stopping it makes room, where stopping '{pool[0].name}' (less recently used) would not"
                    return [*chosen, (victim, ("size", why))]
                return [*chosen, (victim, ("lru", ""))]
            victim = pool.pop(0)
            chosen.append((victim, ("lru", "")))
            freed += victim.room

    def _pending_room(self, wanted: ModelState) -> Room:
        """Memory and slots that children being stopped will hand back (draining ones count: they are
        committed to stop), unless their model is wanted again: what they hold while `wanted` waits."""
        leaving = [m for m in self.models.values() if m.status == Status.STOPPING
                   and (m.removed or self.queued_for(m.name) == 0)]
        return self._held_by(leaving, wanted)

    def _victims(self, busy_too: bool) -> list[ModelState]:
        candidates = [m for m in self.models.values()
                      if m.status == Status.LOADED and not m.spec.pinned and self.queued_for(m.name) == 0
                      and (busy_too or m.in_flight == 0)]
        # Idle before busy, then least recently used.
        return sorted(candidates, key=lambda m: (m.in_flight > 0, m.last_used))

    # -- helpers --
    def _set_expiry(self, model: ModelState, deadline: float | None) -> None:
        model.expires_at = deadline
        if deadline is None:
            self._expiring.discard(model.name)
        else:
            self._expiring.add(model.name)

    def _set_load_deadline(self, model: ModelState, deadline: float | None) -> None:
        model.load_deadline = deadline
        if deadline is None:
            self._loading.discard(model.name)
        else:
            self._loading.add(model.name)

    def _set_draining(self, model: ModelState, draining: bool) -> None:
        model.draining = draining
        if draining:
            self._draining.add(model.name)
        else:
            self._draining.discard(model.name)

    def _stop(self, model: ModelState, kind: DecisionKind, cause: str, reason: str, actions: list[Action],
              request_id: int | None = None) -> None:
        actions.append(Decided(kind, cause, model.name, reason, request_id))
        self._set_expiry(model, None)
        model.drain_reason = reason  # why it is stopping, for the explanations
        self._set_status(model, Status.STOPPING, actions, reason=reason)
        actions.append(StopInstance(model.name, reason))

    def _reject(self, request_id: int, model: str, kind: ErrorKind, message: str, actions: list[Action]) -> None:
        actions.append(Decided(DecisionKind.REJECT, kind.code, model, message, request_id))
        actions.append(Reject(request_id, kind, message, retry_after(kind)))

    def _first_waiter(self, name: str) -> Waiter:
        return next(w for w in self.queue if w.model == name)

    def _take_waiters(self, name: str) -> list[Waiter]:
        taken = [w for w in self.queue if w.model == name]
        self.queue = [w for w in self.queue if w.model != name]
        return taken

    def _set_status(self, model: ModelState, status: Status, actions: list[Action], exit_code: int | None = None,
                    reason: str = "") -> None:
        model.status = status
        model.since = self.now
        actions.append(StatusChanged(model.name, status, exit_code, reason))


def retry_after(kind: ErrorKind) -> float | None:
    """How long a refused client should wait before trying again: soon for a full queue or a busy model (a
    slot frees as soon as one request ends), and not at all for refusals that waiting does not cure."""
    if kind in (ErrorKind.QUEUE_FULL, ErrorKind.BUSY):
        return 1.0
    if kind == ErrorKind.SHUTTING_DOWN:
        return 5.0  # a supervisor restarting modelyard takes a few seconds
    return None


def unload_refusal(status: Status, name: str) -> str:
    """Why an explicit unload of a model in `status` is refused, or "" when it may go ahead (a stopping model
    is already on its way out: nothing to do, and no error)."""
    if status in (Status.LOADING, Status.LOADED, Status.STOPPING):
        return ""
    return f"model '{name}' is not running"


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def human_duration(seconds: float) -> str:
    """`7.5 s`, `40 s`, `5m`, `5m30s`, `1h30m`: a duration as people read it in a reason."""
    if seconds < 120:
        return f"{max(0.0, seconds):.3g} s"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs and not hours
                                                                                 else "")
