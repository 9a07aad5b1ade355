"""The scheduling core: a pure, deterministic state machine (events in, actions out).

It owns the decisions — which model to load, which idle model to evict, which waiting request gets a
lease — and nothing else: no processes, no sockets, no clock (every event is handled at a given `now`).
The asyncio shell (`manager.py`) turns actions into processes and requests, and reports back with events.

Invariants kept here:
- loading + loaded + stopping models never exceed `max_models` (0 = unlimited);
- a model with a lease out (a request granted, proxied or not yet) is never stopped;
- a model that is loading is never evicted;
- requests for one model share one load; a freshly loaded model is leased to its waiters before anything
  else can evict it (router mode's #28698);
- a model chosen to stop is `stopping` at once and takes no new leases; while its in-flight requests finish
  (draining) it keeps its child, which is stopped when the last lease is released; its waiters wait for
  its next load.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from modelyard.errors import ErrorKind


class Status(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    STOPPING = "stopping"
    FAILED = "failed"


RUNNING = frozenset({Status.LOADING, Status.LOADED, Status.STOPPING})


# --- events -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Acquire:
    """A request wants a lease on `model`; with autoload off it is refused unless the model is running."""

    request_id: int
    model: str
    autoload: bool = True


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
class UnloadRequested:
    model: str
    reason: str = "unload requested"


@dataclass(frozen=True)
class ModelAdded:
    model: str


@dataclass(frozen=True)
class ModelRemoved:
    model: str


@dataclass(frozen=True)
class ModelChanged:
    """The model's configuration changed: a running instance restarts once idle."""

    model: str


@dataclass(frozen=True)
class Shutdown:
    """Refuse waiting and new requests and stop every instance once idle."""


Event = (Acquire | Release | Cancel | LoadSucceeded | InstanceExited | UnloadRequested | ModelAdded
         | ModelRemoved | ModelChanged | Shutdown)


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
class Grant:
    request_id: int
    model: str


@dataclass(frozen=True)
class Reject:
    request_id: int
    kind: ErrorKind
    message: str


@dataclass(frozen=True)
class StatusChanged:
    model: str
    status: Status
    exit_code: int | None = None
    reason: str = ""


Action = StartLoad | StopInstance | Grant | Reject | StatusChanged


# --- state ------------------------------------------------------------------------------------------------

@dataclass
class ModelState:
    name: str
    status: Status = Status.UNLOADED
    leases: set[int] = field(default_factory=set)
    last_used: float = 0.0
    draining: bool = False
    drain_reason: str = ""
    removed: bool = False
    exit_code: int | None = None
    failure: str = ""

    @property
    def in_flight(self) -> int:
        return len(self.leases)


@dataclass(frozen=True)
class Waiter:
    request_id: int
    model: str
    since: float
    autoload: bool = True


class Scheduler:
    def __init__(self, models: list[str], max_models: int = 4, max_queue: int = 1024) -> None:
        self.max_models = max_models
        self.max_queue = max_queue
        self.models: dict[str, ModelState] = {name: ModelState(name) for name in models}
        self.queue: list[Waiter] = []
        self.lease_owner: dict[int, str] = {}
        self.shutting_down = False

    # -- queries --
    def running_count(self) -> int:
        return sum(1 for m in self.models.values() if m.status in RUNNING)

    def queued_for(self, model: str) -> int:
        return sum(1 for w in self.queue if w.model == model)

    # -- the one entry point --
    def handle(self, event: Event, now: float) -> list[Action]:
        actions: list[Action] = []
        match event:
            case Acquire():
                self._acquire(event, now, actions)
            case Release(request_id=rid):
                self._release(rid, now)
            case Cancel(request_id=rid):
                self.queue = [w for w in self.queue if w.request_id != rid]
            case LoadSucceeded(model=name):
                self._loaded(name, now, actions)
            case InstanceExited():
                self._exited(event, actions)
            case UnloadRequested(model=name, reason=reason):
                self._unload(name, reason, actions)
            case ModelAdded(model=name):
                self._add(name)
            case ModelRemoved(model=name):
                self._remove(name, actions)
            case ModelChanged(model=name):
                if self.models[name].status in RUNNING:
                    self._drain(name, "configuration changed", actions)
            case Shutdown():
                self._shutdown(actions)
        self._schedule(now, actions)
        return actions

    # -- event handlers --
    def _acquire(self, event: Acquire, now: float, actions: list[Action]) -> None:
        model = self.models.get(event.model)
        if model is None or model.removed:
            actions.append(Reject(event.request_id, ErrorKind.UNKNOWN_MODEL, f"model '{event.model}' not found"))
        elif self.shutting_down:
            actions.append(Reject(event.request_id, ErrorKind.SHUTTING_DOWN, "modelyard is shutting down"))
        elif not event.autoload and not self._usable_without_autoload(model):
            actions.append(Reject(event.request_id, ErrorKind.NOT_LOADED,
                                  f"model '{event.model}' is not loaded and autoload is off; load it with "
                                  f"POST /models/load or add ?autoload=true"))
        elif len(self.queue) >= self.max_queue and not self._grantable(model):
            actions.append(Reject(event.request_id, ErrorKind.QUEUE_FULL,
                                  f"too many waiting requests ({self.max_queue}); retry later"))
        else:
            self.queue.append(Waiter(event.request_id, event.model, now, event.autoload))

    def _usable_without_autoload(self, model: ModelState) -> bool:
        return model.status in (Status.LOADING, Status.LOADED)

    def _release(self, request_id: int, now: float) -> None:
        name = self.lease_owner.pop(request_id, None)
        if name is not None and name in self.models:
            model = self.models[name]
            model.leases.discard(request_id)
            model.last_used = now

    def _loaded(self, name: str, now: float, actions: list[Action]) -> None:
        model = self.models[name]
        if model.status != Status.LOADING:
            return
        model.last_used = now
        self._set_status(model, Status.LOADED, actions)

    def _exited(self, event: InstanceExited, actions: list[Action]) -> None:
        model = self.models.get(event.model)
        if model is None:
            return
        was = model.status
        deliberate = was == Status.STOPPING
        model.exit_code = event.exit_code
        model.draining = False
        model.leases.clear()  # requests on the dead instance fail on their own; they hold nothing now
        if deliberate:
            model.failure = ""
            self._set_status(model, Status.UNLOADED, actions, event.exit_code)
        else:
            model.failure = event.reason
            self._set_status(model, Status.FAILED, actions, event.exit_code, event.reason)
        if was == Status.LOADING:
            for waiter in self._take_waiters(event.model):
                actions.append(Reject(waiter.request_id, ErrorKind.LOAD_FAILED,
                                      f"model '{event.model}' failed to load: {event.reason}"))
        if model.removed:
            del self.models[event.model]

    def _unload(self, name: str, reason: str, actions: list[Action]) -> None:
        """An explicit unload of a loading model cancels the load: its waiters fail instead of reloading it."""
        if self.models[name].status == Status.LOADING:
            for waiter in self._take_waiters(name):
                actions.append(Reject(waiter.request_id, ErrorKind.UNLOADED,
                                      f"model '{name}' was unloaded while it was loading"))
        self._drain(name, reason, actions)

    def _drain(self, name: str, reason: str, actions: list[Action]) -> None:
        model = self.models[name]
        if model.status == Status.LOADING:
            # A loading child cannot serve anyone yet: stop it now; its waiters wait for the next load.
            self._stop(model, reason, actions)
        elif model.status == Status.LOADED:
            # Stopping from now on: it takes no new requests; the child stops when the in-flight ones finish.
            model.draining = True
            model.drain_reason = reason
            self._set_status(model, Status.STOPPING, actions, reason=reason)

    def _add(self, name: str) -> None:
        model = self.models.get(name)
        if model is None:
            self.models[name] = ModelState(name)
        else:
            model.removed = False  # re-added while its old instance still stops: it stays

    def _remove(self, name: str, actions: list[Action]) -> None:
        model = self.models.get(name)
        if model is None:
            return
        for waiter in self._take_waiters(name):
            actions.append(Reject(waiter.request_id, ErrorKind.UNKNOWN_MODEL,
                                  f"model '{name}' was removed from the configuration"))
        if model.status in RUNNING:
            model.removed = True
            self._drain(name, "removed from the configuration", actions)
        else:
            del self.models[name]

    def _shutdown(self, actions: list[Action]) -> None:
        self.shutting_down = True
        for waiter in self.queue:
            actions.append(Reject(waiter.request_id, ErrorKind.SHUTTING_DOWN, "modelyard is shutting down"))
        self.queue = []
        for model in self.models.values():
            self._drain(model.name, "shutting down", actions)

    # -- the decision pass, run after every event --
    def _schedule(self, now: float, actions: list[Action]) -> None:
        self._grant_ready(now, actions)
        self._stop_drained(actions)
        self._reject_without_autoload(actions)
        self._start_loads(actions)

    def _grantable(self, model: ModelState) -> bool:
        return model.status == Status.LOADED

    def _grant_ready(self, now: float, actions: list[Action]) -> None:
        waiting: list[Waiter] = []
        for waiter in self.queue:
            model = self.models[waiter.model]
            if self._grantable(model):
                model.leases.add(waiter.request_id)
                model.last_used = now
                self.lease_owner[waiter.request_id] = model.name
                actions.append(Grant(waiter.request_id, model.name))
            else:
                waiting.append(waiter)
        self.queue = waiting

    def _reject_without_autoload(self, actions: list[Action]) -> None:
        """A request sent with autoload off never causes a load, even if the load it waited for was stopped."""
        for waiter in [w for w in self.queue if not w.autoload]:
            if self.models[waiter.model].status in (Status.UNLOADED, Status.FAILED):
                self.queue.remove(waiter)
                actions.append(Reject(waiter.request_id, ErrorKind.NOT_LOADED,
                                      f"model '{waiter.model}' is not loaded and autoload is off"))

    def _stop_drained(self, actions: list[Action]) -> None:
        for model in list(self.models.values()):
            if model.draining and model.in_flight == 0:
                model.draining = False
                actions.append(StopInstance(model.name, model.drain_reason))

    def _start_loads(self, actions: list[Action]) -> None:
        free = self._free_slots()
        # Slots that children being stopped now will hand back, unless their model is wanted again. (A model
        # still draining its requests may take long: it is not counted, so an idle one can be evicted.)
        incoming = sum(1 for m in self.models.values() if m.status == Status.STOPPING and not m.draining
                       and (m.removed or self.queued_for(m.name) == 0))
        for name in self._models_needing_load():
            model = self.models[name]
            if free > 0:
                free -= 1
                self._set_status(model, Status.LOADING, actions)
                actions.append(StartLoad(name, f"{self.queued_for(name)} request(s) waiting"))
            elif incoming > 0:
                incoming -= 1
            else:
                victim = self._pick_victim()
                if victim is None:
                    return
                self._stop(victim, f"evicted (least recently used) to make room for '{name}'", actions)

    def _free_slots(self) -> int:
        if self.max_models <= 0:
            return len(self.models) + 1
        return self.max_models - self.running_count()

    def _models_needing_load(self) -> Iterator[str]:
        seen: set[str] = set()
        for waiter in self.queue:
            if waiter.model in seen:
                continue
            seen.add(waiter.model)
            if self.models[waiter.model].status in (Status.UNLOADED, Status.FAILED):
                yield waiter.model

    def _pick_victim(self) -> ModelState | None:
        idle = [m for m in self.models.values()
                if m.status == Status.LOADED and m.in_flight == 0
                and self.queued_for(m.name) == 0]
        return min(idle, key=lambda m: m.last_used, default=None)

    # -- helpers --
    def _stop(self, model: ModelState, reason: str, actions: list[Action]) -> None:
        self._set_status(model, Status.STOPPING, actions, reason=reason)
        actions.append(StopInstance(model.name, reason))

    def _take_waiters(self, name: str) -> list[Waiter]:
        taken = [w for w in self.queue if w.model == name]
        self.queue = [w for w in self.queue if w.model != name]
        return taken

    @staticmethod
    def _set_status(model: ModelState, status: Status, actions: list[Action], exit_code: int | None = None,
                    reason: str = "") -> None:
        model.status = status
        actions.append(StatusChanged(model.name, status, exit_code, reason))
