"""Table-style tests for the pure scheduling state machine (`modelyard.scheduler`).

Nothing here starts a process or sleeps: every test feeds events to `Scheduler.handle(event, now)` and checks
the actions it returns and the state it leaves. `StatusChanged` actions are left out of the tables (they are
checked separately through `Scheduler.models[...].status`); the other actions are summarised as tuples so a
table reads like a transcript:

    ("start", model)        StartLoad
    ("stop", model)         StopInstance
    ("grant", rid, model)   Grant
    ("reject", rid, kind)   Reject
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from types import EllipsisType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelyard.errors import ErrorKind
from modelyard.scheduler import (
    RUNNING,
    Acquire,
    Action,
    Cancel,
    Candidate,
    ChildUnhealthy,
    Decided,
    DecisionKind,
    Event,
    Grant,
    InLine,
    InstanceExited,
    KillInstance,
    Limits,
    LoadSucceeded,
    MemoryMeasured,
    ModelAdded,
    ModelChanged,
    ModelRemoved,
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
    Waiter,
    eviction_choice,
    held,
    load_order,
    overages,
    unload_refusal,
)

# --- helpers ----------------------------------------------------------------------------------------------

Summary = tuple[Any, ...]
ABSENT = None  # in a scenario's `final` table: the model is no longer known to the scheduler


def summarize(actions: list[Action]) -> list[Summary]:
    out: list[Summary] = []
    for action in actions:
        match action:
            case StartLoad(model=model):
                out.append(("start", model))
            case StopInstance(model=model):
                out.append(("stop", model))
            case KillInstance(model=model):
                out.append(("kill", model))
            case Grant(request_id=rid, model=model):
                out.append(("grant", rid, model))
            case Reject(request_id=rid, kind=kind):
                out.append(("reject", rid, kind))
            case StatusChanged():
                pass
    return out


def effects(actions: list[Action]) -> list[Action]:
    """The actions without their explanations (`Decided`)."""
    return [a for a in actions if not isinstance(a, Decided)]


def start(model: str) -> Summary:
    return ("start", model)


def stop(model: str) -> Summary:
    return ("stop", model)


def grant(rid: int, model: str) -> Summary:
    return ("grant", rid, model)


def reject(rid: int, kind: ErrorKind) -> Summary:
    return ("reject", rid, kind)


def loaded(model: str) -> LoadSucceeded:
    return LoadSucceeded(model)


def exited(model: str, code: int | None = 0, reason: str = "") -> InstanceExited:
    return InstanceExited(model, code, reason)


Expected = list[Summary] | set[Summary]
UNCHECKED = ...  # At.deadline default: next_deadline() is not checked after that step


@dataclass(frozen=True)
class At:
    """A step at an explicit time `now`, optionally checking `next_deadline()` after it."""

    now: float
    event: Event
    expected: Expected
    deadline: float | EllipsisType | None = UNCHECKED


Step = tuple[Event, Expected] | At
G = 2**30  # a GiB, for memory-budget scenarios


@dataclass
class Scenario:
    """Plain steps run at now = 0, 1, 2, ... (one after the previous step); `At` steps at their own time.
    A list expects exactly those actions in order, a set in any order. `specs` and `limits`, when given,
    replace `models` and `max_models`/`max_queue`; `loads`, when given, is the number of StartLoads expected over
    the whole scenario; `xfail` marks a scenario that shows a known scheduler bug (strict)."""

    id: str
    steps: list[Step]
    final: dict[str, Status | None] = field(default_factory=dict)
    models: tuple[str, ...] = ("A", "B", "C")
    max_models: int = 1
    max_queue: int = 1024
    specs: tuple[ModelSpec | str, ...] | None = None
    limits: Limits | None = None
    loads: int | None = None
    xfail: str = ""


def slots_held(sched: Scheduler) -> int:
    """The model slots the running models hold: every loading or loaded one, and each stopping one whose memory
    the budgets do not guard (`held`, with its own room as the wanted one's: the fewest it may hold)."""
    return sum(held(m.status, m.room, m.room, sched.limits).slots for m in sched.models.values()
               if m.status in RUNNING)


def run_scenario(scenario: Scenario) -> Scheduler:
    models = list(scenario.specs) if scenario.specs is not None else list(scenario.models)
    if scenario.limits is not None:
        sched = Scheduler(models, scenario.limits)
    else:
        sched = Scheduler(models, max_models=scenario.max_models, max_queue=scenario.max_queue)
    max_models, budget = sched.max_models, sched.limits.memory_budget
    now, loads = -1.0, 0
    for i, step in enumerate(scenario.steps):
        if isinstance(step, At):
            now, event, expected, deadline = step.now, step.event, step.expected, step.deadline
        else:
            (event, expected), now, deadline = step, now + 1.0, UNCHECKED
        got = summarize(sched.handle(event, now))
        where = f"step {i} at {now:g}: {event}"
        if isinstance(expected, set):
            assert Counter(got) == Counter(expected), where
        else:
            assert got == expected, where
        assert max_models <= 0 or slots_held(sched) <= max_models, where
        if any(a[0] == "start" for a in got):
            loads += sum(1 for a in got if a[0] == "start")
            assert not budget or sched.memory_used() <= budget, f"over the memory budget after {where}"
            gpu_budget = sched.limits.gpu_memory_budget
            assert not gpu_budget or sched.gpu_memory_used() <= gpu_budget, f"over the GPU budget after {where}"
        if deadline is not UNCHECKED:
            assert sched.next_deadline() == deadline, f"next_deadline after {where}"
    for name, status in scenario.final.items():
        if status is ABSENT:
            assert name not in sched.models
        else:
            assert sched.models[name].status == status, name
    if scenario.loads is not None:
        assert loads == scenario.loads, "number of loads"
    return sched


# --- the scenario table -------------------------------------------------------------------------------------

SCENARIOS = [
    # -- loading and coalescing --
    Scenario(
        "one-load-coalesced-fifo-grants",
        max_models=4,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "A"), []),
            (Acquire(3, "A"), []),
            (loaded("A"), [grant(1, "A"), grant(2, "A"), grant(3, "A")]),
        ],
        final={"A": Status.LOADED, "B": Status.UNLOADED},
    ),
    Scenario(
        "loaded-model-grants-at-once",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "A"), [grant(2, "A")]),
            (Release(1), []),
            (Release(2), []),
            (Acquire(3, "A"), [grant(3, "A")]),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "waiters-for-two-models-granted-per-model-in-fifo-order",
        max_models=2,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),
            (Acquire(3, "A"), []),
            (Acquire(4, "B"), []),
            (Acquire(5, "A"), []),
            (loaded("B"), [grant(2, "B"), grant(4, "B")]),
            (loaded("A"), [grant(1, "A"), grant(3, "A"), grant(5, "A")]),
        ],
        final={"A": Status.LOADED, "B": Status.LOADED, "C": Status.UNLOADED},
    ),
    # -- refusals --
    Scenario(
        "unknown-model",
        steps=[(Acquire(1, "nope"), [reject(1, ErrorKind.UNKNOWN_MODEL)])],
        final={"A": Status.UNLOADED},
    ),
    Scenario(
        "autoload-off-unloaded",
        steps=[(Acquire(1, "A", autoload=False), [reject(1, ErrorKind.NOT_LOADED)])],
        final={"A": Status.UNLOADED},
    ),
    Scenario(
        "autoload-off-while-loading-waits-for-the-load",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "A", autoload=False), []),
            (loaded("A"), [grant(1, "A"), grant(2, "A")]),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "autoload-off-loaded-grants",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "A", autoload=False), [grant(2, "A")]),
        ],
    ),
    Scenario(
        "autoload-off-draining-refused",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (UnloadRequested("A"), []),
            (Acquire(2, "A", autoload=False), [reject(2, ErrorKind.NOT_LOADED)]),
        ],
    ),
    Scenario(
        "autoload-off-failed-refused",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (exited("A", 1, "boom"), [reject(1, ErrorKind.LOAD_FAILED)]),
            (Acquire(2, "A", autoload=False), [reject(2, ErrorKind.NOT_LOADED)]),
        ],
        final={"A": Status.FAILED},
    ),
    Scenario(
        "queue-full",
        max_queue=2,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "A"), []),
            (Acquire(3, "A"), [reject(3, ErrorKind.QUEUE_FULL)]),
            (Acquire(4, "B"), [reject(4, ErrorKind.QUEUE_FULL)]),
            (loaded("A"), [grant(1, "A"), grant(2, "A")]),
            (Acquire(5, "A"), [grant(5, "A")]),
        ],
    ),
    Scenario(
        "queue-full-still-grants-a-loaded-model",
        max_models=2,
        max_queue=2,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "B"), [start("B")]),
            (Acquire(3, "B"), []),
            (Acquire(4, "B"), [reject(4, ErrorKind.QUEUE_FULL)]),
            (Acquire(5, "A"), [grant(5, "A")]),
        ],
    ),
    Scenario(
        "cancel-removes-a-waiter",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "A"), []),
            (Acquire(3, "A"), []),
            (Cancel(2), []),
            (loaded("A"), [grant(1, "A"), grant(3, "A")]),
        ],
    ),
    Scenario(
        "cancel-frees-a-queue-slot",
        max_queue=1,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "A"), [reject(2, ErrorKind.QUEUE_FULL)]),
            (Cancel(1), []),
            (Acquire(3, "A"), []),
            (loaded("A"), [grant(3, "A")]),
        ],
    ),
    Scenario(
        "cancel-of-the-only-waiter-for-an-evicting-load",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (Acquire(2, "B"), [stop("A")]),
            (Cancel(2), []),
            (exited("A"), []),
        ],
        final={"A": Status.UNLOADED, "B": Status.UNLOADED},
    ),
    # -- eviction --
    Scenario(
        "evict-idle-model-then-load-after-exit",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (Acquire(2, "B"), [stop("A")]),
            (Acquire(3, "B"), []),
            (Acquire(4, "C"), []),
            (exited("A"), [start("B")]),
            (loaded("B"), [grant(2, "B"), grant(3, "B")]),
            (Release(2), []),
            (Release(3), [stop("B")]),
            (exited("B"), [start("C")]),
            (loaded("C"), [grant(4, "C")]),
        ],
        final={"A": Status.UNLOADED, "B": Status.UNLOADED, "C": Status.LOADED},
    ),
    Scenario(
        "busy-model-not-evicted-until-released",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "B"), []),
            (Acquire(3, "B"), []),
            (Release(1), [stop("A")]),
            (exited("A"), [start("B")]),
            (loaded("B"), [grant(2, "B"), grant(3, "B")]),
        ],
        final={"A": Status.UNLOADED, "B": Status.LOADED},
    ),
    Scenario(
        "loading-model-not-evicted",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Cancel(1), []),
            (Acquire(2, "B"), []),
        ],
        final={"A": Status.LOADING, "B": Status.UNLOADED},
    ),
    Scenario(
        "reservation-28698-loaded-model-goes-to-its-waiter-first",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), []),
            (Acquire(3, "A"), []),
            # A finishes loading while B is waiting for a slot: A's waiters get it, nobody evicts A.
            (loaded("A"), [grant(1, "A"), grant(3, "A")]),
            (Release(1), []),
            (Release(3), [stop("A")]),
            (exited("A"), [start("B")]),
            (loaded("B"), [grant(2, "B")]),
        ],
        final={"A": Status.UNLOADED, "B": Status.LOADED},
    ),
    Scenario(
        "lru-evicts-least-recently-released",
        max_models=2,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "B"), [start("B")]),
            (loaded("B"), [grant(2, "B")]),
            (Release(2), []),
            (Release(1), []),  # A used last
            (Acquire(3, "C"), [stop("B")]),
            (exited("B"), [start("C")]),
        ],
        final={"A": Status.LOADED, "B": Status.UNLOADED, "C": Status.LOADING},
    ),
    Scenario(
        "lru-a-loaded-first-but-used-later-survives",
        max_models=2,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (Acquire(2, "B"), [start("B")]),
            (loaded("B"), [grant(2, "B")]),
            (Release(2), []),
            (Acquire(3, "A"), [grant(3, "A")]),  # a fresh use of A
            (Release(3), []),
            (Acquire(4, "C"), [stop("B")]),
        ],
        final={"A": Status.LOADED, "B": Status.STOPPING},
    ),
    Scenario(
        "lru-mirror-b-used-last",
        max_models=2,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "B"), [start("B")]),
            (loaded("B"), [grant(2, "B")]),
            (Release(1), []),
            (Release(2), []),  # B used last
            (Acquire(3, "C"), [stop("A")]),
        ],
        final={"A": Status.STOPPING, "B": Status.LOADED},
    ),
    Scenario(
        "two-loads-two-evictions-no-over-eviction",
        models=("A", "B", "C", "D"),
        max_models=2,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),
            (loaded("A"), [grant(1, "A")]),
            (loaded("B"), [grant(2, "B")]),
            (Release(1), []),
            (Release(2), []),
            (Acquire(3, "C"), [stop("A")]),
            (Acquire(4, "C"), []),  # A's slot is already on its way to C
            (Acquire(5, "D"), [stop("B")]),
            (Acquire(6, "D"), []),
            (exited("A"), [start("C")]),
            (exited("B"), [start("D")]),
        ],
        final={"A": Status.UNLOADED, "B": Status.UNLOADED, "C": Status.LOADING, "D": Status.LOADING},
    ),
    # -- failures --
    Scenario(
        "load-failure-rejects-every-waiter-then-retries",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "A"), []),
            (exited("A", 1, "bad gguf"), [reject(1, ErrorKind.LOAD_FAILED), reject(2, ErrorKind.LOAD_FAILED)]),
            (Acquire(3, "A"), [start("A")]),
            (loaded("A"), [grant(3, "A")]),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "load-failure-frees-the-slot-for-another-model",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), []),
            (exited("A", 1, "oom"), [reject(1, ErrorKind.LOAD_FAILED), start("B")]),
        ],
        final={"A": Status.FAILED, "B": Status.LOADING},
    ),
    Scenario(
        "loaded-model-dies-then-reloads",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (exited("A", -9, "killed"), []),
            (Acquire(2, "A"), [start("A")]),
            (loaded("A"), [grant(2, "A")]),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "failed-model-takes-no-slot",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (exited("A", -9, "killed"), []),
            (Acquire(2, "B"), [start("B")]),
        ],
        final={"A": Status.FAILED, "B": Status.LOADING},
    ),
    # -- draining (unload, config change, removal, shutdown) --
    Scenario(
        "unload-waits-for-release-and-new-acquires-reload",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (UnloadRequested("A"), []),
            (Acquire(2, "A"), []),  # draining: no new lease
            (Release(1), [stop("A")]),
            (Acquire(3, "A"), []),
            (exited("A"), [start("A")]),
            (loaded("A"), [grant(2, "A"), grant(3, "A")]),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "unload-idle-stops-at-once",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (UnloadRequested("A"), [stop("A")]),
            (exited("A"), []),
        ],
        final={"A": Status.UNLOADED},
    ),
    Scenario(
        "unload-loading-cancels-the-load-and-fails-its-waiters",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (UnloadRequested("A"), [reject(1, ErrorKind.UNLOADED), stop("A")]),
            (loaded("A"), []),  # a late ready report for the stopping child is ignored
            (exited("A"), []),  # nobody waits: it is not loaded again
        ],
        final={"A": Status.UNLOADED},
    ),
    Scenario(
        "config-change-while-loading-restarts-for-its-waiters",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (ModelChanged(ModelSpec("A")), [stop("A")]),
            (exited("A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "model-removed-rejects-waiters-and-stops-the-load",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "A"), []),
            (ModelRemoved("A"), [reject(1, ErrorKind.UNKNOWN_MODEL), reject(2, ErrorKind.UNKNOWN_MODEL), stop("A")]),
            (Acquire(3, "A"), [reject(3, ErrorKind.UNKNOWN_MODEL)]),
            (exited("A"), []),
            (Acquire(4, "A"), [reject(4, ErrorKind.UNKNOWN_MODEL)]),
        ],
        final={"A": ABSENT},
    ),
    Scenario(
        "model-removed-busy-drains-first",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (ModelRemoved("A"), []),
            (Release(1), [stop("A")]),
            (exited("A"), []),
        ],
        final={"A": ABSENT},
    ),
    Scenario(
        "model-removed-unloaded-goes-at-once",
        steps=[
            (ModelRemoved("A"), []),
            (Acquire(1, "A"), [reject(1, ErrorKind.UNKNOWN_MODEL)]),
        ],
        final={"A": ABSENT, "B": Status.UNLOADED},
    ),
    Scenario(
        "removed-stopping-model-hands-its-slot-to-a-waiter",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (ModelRemoved("A"), [stop("A")]),
            (Acquire(2, "B"), []),  # no second stop: A's slot is coming back
            (exited("A"), [start("B")]),
        ],
        final={"A": ABSENT, "B": Status.LOADING},
    ),
    Scenario(
        "model-added-can-be-loaded",
        steps=[
            (Acquire(1, "Z"), [reject(1, ErrorKind.UNKNOWN_MODEL)]),
            (ModelAdded(ModelSpec("Z")), []),
            (Acquire(2, "Z"), [start("Z")]),
        ],
        final={"Z": Status.LOADING},
    ),
    Scenario(
        "model-changed-idle-restarts",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (ModelChanged(ModelSpec("A")), [stop("A")]),
            (exited("A"), []),
        ],
        final={"A": Status.UNLOADED},
    ),
    Scenario(
        "model-changed-busy-waits-for-release",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (ModelChanged(ModelSpec("A")), []),
            (Acquire(2, "A"), []),
            (Release(1), [stop("A")]),
            (exited("A"), [start("A")]),
            (loaded("A"), [grant(2, "A")]),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "model-changed-not-running-is-a-no-op",
        steps=[(ModelChanged(ModelSpec("A")), [])],
        final={"A": Status.UNLOADED},
    ),
    Scenario(
        "shutdown-rejects-waiters-and-stops-everything",
        max_models=3,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (Acquire(2, "B"), [start("B")]),
            (loaded("B"), [grant(2, "B")]),  # B stays busy
            (Acquire(3, "C"), [start("C")]),
            (Acquire(4, "C"), []),
            (Shutdown(), {reject(3, ErrorKind.SHUTTING_DOWN), reject(4, ErrorKind.SHUTTING_DOWN),
                          stop("A"), stop("C")}),
            (Acquire(5, "A"), [reject(5, ErrorKind.SHUTTING_DOWN)]),
            (Release(2), [stop("B")]),
            (exited("A"), []),
            (exited("B"), []),
            (exited("C"), []),
        ],
        final={"A": Status.UNLOADED, "B": Status.UNLOADED, "C": Status.UNLOADED},
    ),
    # -- limits --
    Scenario(
        "max-models-0-is-unlimited",
        models=("A", "B", "C", "D", "E"),
        max_models=0,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),
            (Acquire(3, "C"), [start("C")]),
            (Acquire(4, "D"), [start("D")]),
            (Acquire(5, "E"), [start("E")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (ModelAdded(ModelSpec("F")), []),
            (Acquire(6, "F"), [start("F")]),
        ],
        final={name: Status.LOADING for name in "BCDEF"} | {"A": Status.LOADED},
    ),
    Scenario(
        "max-models-2-loads-two-at-once",
        max_models=2,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),
            (Acquire(3, "C"), []),  # both running models are loading: nothing to evict
        ],
        final={"A": Status.LOADING, "B": Status.LOADING, "C": Status.UNLOADED},
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario(scenario: Scenario) -> None:
    run_scenario(scenario)


# --- focused checks -----------------------------------------------------------------------------------------

def test_load_failure_message_and_state() -> None:
    sched = Scheduler(["A"], max_models=1)
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(Acquire(2, "A"), 0.0)
    actions = sched.handle(InstanceExited("A", 3, "unknown model architecture 'foo'"), 1.0)
    rejects = [a for a in actions if isinstance(a, Reject)]
    assert [r.request_id for r in rejects] == [1, 2]
    for r in rejects:
        assert r.kind == ErrorKind.LOAD_FAILED
        assert "unknown model architecture 'foo'" in r.message
        assert "'A'" in r.message
    state = sched.models["A"]
    assert state.status == Status.FAILED
    assert state.exit_code == 3
    assert state.failure == "unknown model architecture 'foo'"
    assert StatusChanged("A", Status.FAILED, 3, "unknown model architecture 'foo'") in actions
    assert sched.queue == []
    starts = [a for a in sched.handle(Acquire(3, "A"), 2.0) if isinstance(a, StartLoad)]
    assert starts == [StartLoad("A", "1 request(s) waiting")]


def test_deliberate_stop_clears_failure() -> None:
    sched = Scheduler(["A"], max_models=1)
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(InstanceExited("A", 1, "boom"), 1.0)
    sched.handle(Acquire(2, "A"), 2.0)
    sched.handle(LoadSucceeded("A"), 3.0)
    sched.handle(Release(2), 4.0)
    sched.handle(UnloadRequested("A"), 5.0)
    sched.handle(InstanceExited("A", 0), 6.0)
    assert sched.models["A"].status == Status.UNLOADED
    assert sched.models["A"].failure == ""


def test_reservation_grant_happens_in_the_load_succeeded_call() -> None:
    """llama.cpp router bug #28698: a model that just loaded for a waiter must not be evicted before the
    waiter gets its lease. The scheduler leases it within the same handle() call, so the very next event
    (another model's acquire) sees it busy."""
    sched = Scheduler(["A", "B"], max_models=1)
    assert sched.handle(Acquire(1, "A"), 0.0).count(StartLoad("A", "1 request(s) waiting")) == 1
    actions = sched.handle(LoadSucceeded("A"), 1.0)
    assert Grant(1, "A") in actions
    assert not any(isinstance(a, StopInstance) for a in actions)
    assert sched.models["A"].leases == {1}
    assert sched.lease_owner == {1: "A"}
    # A concurrent need for B right after: A is leased, so no eviction.
    actions = sched.handle(Acquire(2, "B"), 1.0)
    assert not any(isinstance(a, (StopInstance, StartLoad)) for a in actions)
    assert sched.models["A"].status == Status.LOADED


def test_status_changes_are_reported() -> None:
    sched = Scheduler(["A", "B"], max_models=1)
    seen: list[tuple[str, Status]] = []

    def feed(event: Event, now: float) -> None:
        seen.extend((a.model, a.status) for a in sched.handle(event, now) if isinstance(a, StatusChanged))

    feed(Acquire(1, "A"), 0.0)
    feed(LoadSucceeded("A"), 1.0)
    feed(Release(1), 2.0)
    feed(Acquire(2, "B"), 3.0)
    feed(InstanceExited("A", 0), 4.0)
    assert seen == [("A", Status.LOADING), ("A", Status.LOADED), ("A", Status.STOPPING),
                    ("A", Status.UNLOADED), ("B", Status.LOADING)]


def test_release_of_unknown_or_repeated_request_is_harmless() -> None:
    sched = Scheduler(["A"], max_models=1)
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(LoadSucceeded("A"), 1.0)
    assert summarize(sched.handle(Release(1), 2.0)) == []
    assert summarize(sched.handle(Release(1), 3.0)) == []
    assert summarize(sched.handle(Release(99), 4.0)) == []
    assert sched.models["A"].in_flight == 0


def test_release_updates_last_used() -> None:
    sched = Scheduler(["A"], max_models=1)
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(LoadSucceeded("A"), 1.0)
    assert sched.models["A"].last_used == 1.0
    sched.handle(Release(1), 7.5)
    assert sched.models["A"].last_used == 7.5


def test_model_re_added_while_old_instance_stops() -> None:
    """A model removed and re-added before its old instance exited is kept, not lost."""
    sched = Scheduler(["A"], max_models=1)
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(LoadSucceeded("A"), 1.0)
    sched.handle(Release(1), 2.0)
    assert summarize(sched.handle(ModelRemoved("A"), 3.0)) == [stop("A")]
    sched.handle(ModelAdded(ModelSpec("A")), 4.0)  # e.g. the config file was restored before the child exited
    assert summarize(sched.handle(Acquire(2, "A"), 5.0)) == []  # waits for the old instance to go
    sched.handle(InstanceExited("A", 0), 6.0)
    assert "A" in sched.models
    assert sched.models["A"].status == Status.LOADING


def test_stale_leases_of_a_crashed_instance() -> None:
    """Leases on an instance that died are dropped with it and never count against the next instance."""
    sched = Scheduler(["A"], max_models=1)
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(LoadSucceeded("A"), 1.0)  # request 1 leased
    sched.handle(InstanceExited("A", -9, "killed"), 2.0)  # the child dies under request 1
    assert sched.models["A"].status == Status.FAILED
    sched.handle(Acquire(2, "A"), 3.0)  # reload
    actions = sched.handle(UnloadRequested("A"), 4.0)
    stopped = [a.model for a in actions if isinstance(a, StopInstance)]
    # Either the dead instance's lease is dropped on exit, or the stop waits for it.
    assert not stopped or sched.models["A"].in_flight == 0


# --- property test: random event sequences ----------------------------------------------------------------

OPS = ("acquire", "acquire", "acquire", "release", "cancel", "load_ok", "exit", "unload", "change", "tick",
       "unhealthy", "killed")


@dataclass
class Sim:
    """Drives a Scheduler like the asyncio shell would, and checks invariants after every step."""

    sched: Scheduler
    max_models: int
    now: float = 0.0
    next_rid: int = 1
    waiting: set[int] = field(default_factory=set)  # acquired, no answer yet
    cancelled: set[int] = field(default_factory=set)
    leases: dict[int, str] = field(default_factory=dict)  # granted, not released
    outcomes: Counter[int] = field(default_factory=Counter)  # Grant/Reject per request id
    acquired: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    # With max-wait in play, a model may be drained in the very step it leases its waiters (it has served
    # them, its minimum residency): then a Grant is checked against the status at the time of the grant only.
    drain_after_grant: bool = False
    killed: set[str] = field(default_factory=set)  # models whose child the scheduler asked to kill

    def feed(self, event: Event) -> list[Action]:
        before = {name: (m.status, m.in_flight) for name, m in self.sched.models.items()}
        actions = self.sched.handle(event, self.now)
        self.log.append(f"{event} -> {summarize(actions)}")
        self.check(event, before, actions)
        return actions

    def check(self, event: Event, before: dict[str, tuple[Status, int]], actions: list[Action]) -> None:
        sched = self.sched
        where = "\n".join(self.log)
        if self.max_models > 0:
            assert slots_held(sched) <= self.max_models, where
        status = {name: was for name, (was, _) in before.items()}  # followed through the action list
        for action in actions:
            match action:
                case StatusChanged(model=model, status=new):
                    old = status.get(model, Status.UNLOADED)
                    if new == Status.LOADING:
                        assert old in (Status.UNLOADED, Status.FAILED), f"{model}: {old} -> {new}\n{where}"
                    elif new == Status.STOPPING:
                        assert old in (Status.LOADING, Status.LOADED), f"{model}: {old} -> {new}\n{where}"
                    status[model] = new
                case StopInstance(model=model):
                    assert sched.models[model].in_flight == 0, f"stopped a busy model {model}\n{where}"
                    assert status[model] == Status.STOPPING, where
                case StartLoad(model=model):
                    assert status[model] == Status.LOADING, where
                    self.killed.discard(model)
                case ReadAhead(model=model):  # only for a load to come: a running child has its files
                    assert status[model] in (Status.UNLOADED, Status.FAILED), f"read-ahead of {model}\n{where}"
                case KillInstance(model=model):
                    assert status[model] in RUNNING, f"kill of {model} that is {status[model]}\n{where}"
                    self.killed.add(model)
                case Grant(request_id=rid, model=model):
                    assert rid in self.waiting, f"grant for a request not waiting: {rid}\n{where}"
                    assert status[model] == Status.LOADED, f"grant on a model not loaded then\n{where}"
                    if not self.drain_after_grant:
                        assert sched.models[model].status == Status.LOADED, where
                    assert rid in sched.models[model].leases, where
                    self.waiting.discard(rid)
                    self.leases[rid] = model
                    self.outcomes[rid] += 1
                case Reject(request_id=rid):
                    assert rid in self.waiting, f"reject for a request not waiting: {rid}\n{where}"
                    self.waiting.discard(rid)
                    self.outcomes[rid] += 1
        check_explained(actions, before, where)
        check_no_overtaking(sched, actions, where)
        for rid, count in self.outcomes.items():
            assert count <= 1, f"request {rid} answered {count} times\n{where}"
        queued = {w.request_id for w in sched.queue}
        assert queued <= self.waiting, where
        assert not (queued & self.cancelled), where
        for name, model in sched.models.items():
            if model.status == Status.LOADED and not model.draining:
                assert sched.queued_for(name) == 0, f"{name} loaded but requests wait\n{where}"
            if model.status in (Status.UNLOADED, Status.FAILED):
                assert not model.draining, where

    def models_in(self, *statuses: Status) -> list[str]:
        return sorted(name for name, m in self.sched.models.items() if m.status in statuses)

    def step(self, op: str, pick: int, flag: bool) -> None:
        names = sorted(self.sched.models)
        if op == "acquire":
            rid = self.next_rid
            self.next_rid += 1
            self.acquired.append(rid)
            self.waiting.add(rid)
            self.feed(Acquire(rid, names[pick % len(names)], autoload=flag or pick % 3 != 0))
        elif op == "release" and self.leases:
            rid = sorted(self.leases)[pick % len(self.leases)]
            del self.leases[rid]
            self.feed(Release(rid))
        elif op == "cancel" and self.waiting:
            rid = sorted(self.waiting)[pick % len(self.waiting)]
            self.waiting.discard(rid)
            self.cancelled.add(rid)
            self.feed(Cancel(rid))
        elif op == "load_ok" and (loading := self.models_in(Status.LOADING)):
            self.feed(LoadSucceeded(loading[pick % len(loading)]))
        elif op == "unhealthy" and (running := self.models_in(*RUNNING)):
            self.feed(ChildUnhealthy(running[pick % len(running)], "wedged"))
        elif op == "killed" and (dying := self.dying()):
            self.crash(dying[pick % len(dying)])
        elif op == "exit" and (running := self.models_in(*RUNNING)):
            name = running[pick % len(running)]
            if self.sched.models[name].status == Status.STOPPING:
                self.feed(InstanceExited(name, 0))
            elif flag:  # a crash (or a failed load)
                self.crash(name)
        elif op == "unload" and (live := self.models_in(Status.LOADING, Status.LOADED)):
            self.feed(UnloadRequested(live[pick % len(live)]))
        elif op == "change":
            self.feed(ModelChanged(ModelSpec(names[pick % len(names)])))
        elif op == "tick":
            self.now += 1.0 + pick % 5

    def crash(self, name: str) -> None:
        """The child died. Requests proxied to it fail and hand their leases back (the shell's `lease()`
        context manager), which the property test does at once; stale leases kept across a crash are
        covered by test_stale_leases_of_a_crashed_instance."""
        self.feed(InstanceExited(name, 1, "crashed"))
        for rid in sorted(rid for rid, model in self.leases.items() if model == name):
            del self.leases[rid]
            self.feed(Release(rid))

    def settle(self) -> None:
        """Drive to quiescence: release every lease, finish every load and every stop."""
        for _ in range(1000):
            self.now += 1.0
            if self.leases:
                rid = min(self.leases)
                del self.leases[rid]
                self.feed(Release(rid))
            elif dying := self.dying():
                self.crash(dying[0])
            elif stopping := self.models_in(Status.STOPPING):
                self.feed(InstanceExited(stopping[0], 0))
            elif loading := self.models_in(Status.LOADING):
                self.feed(LoadSucceeded(loading[0]))
            else:
                return
        raise AssertionError("no quiescence after 1000 steps\n" + "\n".join(self.log))

    def dying(self) -> list[str]:
        """Models whose child was killed and has not exited yet."""
        return sorted(m for m in self.killed if m in self.sched.models and self.sched.models[m].status in RUNNING)


CAUSES = {DecisionKind.LOAD: {"request"}, DecisionKind.EVICT: {"lru", "size", "reload_cost", "max_wait"},
          DecisionKind.UNLOAD: {"request"}, DecisionKind.EXPIRE: {"keep_alive"},
          DecisionKind.KILL: {"load_timeout", "watchdog"}, DecisionKind.FAIL: {"load", "exit"},
          DecisionKind.DRAIN: {"config_changed", "removed", "shutdown"},
          DecisionKind.REJECT: {kind.code for kind in ErrorKind}}
STOPS = {DecisionKind.EVICT, DecisionKind.UNLOAD, DecisionKind.EXPIRE, DecisionKind.DRAIN}


def check_explained(actions: list[Action], before: dict[str, tuple[Status, int]], where: str) -> None:
    """Every decision comes with its explanation and every explanation with its decision: a load, a stop (but
    the stop of a model drained earlier, explained then), a kill, a failure, a refusal."""
    decided = [a for a in actions if isinstance(a, Decided)]
    for d in decided:
        assert d.cause in CAUSES[d.kind] and d.reason, f"{d}\n{where}"

    def explained(model: str, kinds: set[DecisionKind]) -> bool:
        return any(d.model == model and d.kind in kinds for d in decided)

    for action in actions:
        match action:
            case StartLoad(model=model):
                assert explained(model, {DecisionKind.LOAD}), where
            case KillInstance(model=model):
                assert explained(model, {DecisionKind.KILL}), where
            case Reject(request_id=rid, kind=kind):
                assert any(d.kind == DecisionKind.REJECT and d.request_id == rid and d.cause == kind.code
                           for d in decided), where
            case StopInstance(model=model):
                was = before.get(model, (Status.UNLOADED, 0))[0]
                assert explained(model, STOPS) or was == Status.STOPPING, where
            case StatusChanged(model=model, status=Status.STOPPING):
                assert explained(model, STOPS | {DecisionKind.KILL}), where
            case StatusChanged(model=model, status=Status.FAILED):
                assert explained(model, {DecisionKind.FAIL}), where
    for d in decided:
        assert any(_carries_out(a, d) for a in actions), f"{d} without its action\n{where}"


def check_no_overtaking(sched: Scheduler, actions: list[Action], where: str) -> None:
    """While a request that has waited max-wait still waits for its model's load, no load starts for a model
    whose requests are younger, unless that model has a higher priority (the bound on "most waiting requests
    first")."""
    deadline = sched.now - sched.limits.max_wait
    oldest: dict[str, float] = {}
    for waiter in sched.queue:
        oldest.setdefault(waiter.model, waiter.since)
    overdue = {name: since for name, since in oldest.items() if since <= deadline
               and sched.models[name].status in (Status.UNLOADED, Status.FAILED)}
    for action in actions:
        if not isinstance(action, StartLoad) or action.model not in oldest:
            continue
        started, priority = oldest[action.model], sched.models[action.model].spec.priority
        overtaken = [name for name, since in overdue.items()
                     if since < started and sched.models[name].spec.priority >= priority]
        assert not overtaken, f"{action.model} loaded ahead of {overtaken}, which waited max-wait\n{where}"


def _carries_out(action: Action, d: Decided) -> bool:
    match action:
        case StartLoad(model=model):
            return d.kind == DecisionKind.LOAD and model == d.model
        case KillInstance(model=model):
            return d.kind == DecisionKind.KILL and model == d.model
        case Reject(request_id=rid):
            return d.kind == DecisionKind.REJECT and rid == d.request_id
        case StatusChanged(model=model, status=Status.FAILED):
            return d.kind == DecisionKind.FAIL and model == d.model
        case StatusChanged(model=model, status=Status.STOPPING):
            return d.kind in STOPS and model == d.model
    return False


op_strategy = st.tuples(st.sampled_from(OPS), st.integers(0, 11), st.booleans())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_models=st.integers(3, 4),
    max_models=st.integers(1, 2),
    max_queue=st.sampled_from([3, 1024]),
    ops=st.lists(op_strategy, max_size=60),
    shutdown_at=st.none() | st.integers(0, 60),
)
def test_random_event_sequences_keep_invariants(
    n_models: int, max_models: int, max_queue: int, ops: list[tuple[str, int, bool]], shutdown_at: int | None
) -> None:
    names = ["A", "B", "C", "D"][:n_models]
    sim = Sim(Scheduler(names, max_models=max_models, max_queue=max_queue), max_models)
    for i, (op, pick, flag) in enumerate(ops):
        if i == shutdown_at:
            sim.feed(Shutdown())
        sim.step(op, pick, flag)
    sim.settle()
    where = "\n".join(sim.log)
    assert sim.sched.queue == [], where
    assert sim.waiting == set(), f"requests never answered: {sorted(sim.waiting)}\n{where}"
    for rid in sim.acquired:
        expected = 0 if rid in sim.cancelled else 1
        assert sim.outcomes[rid] == expected, f"request {rid}: {sim.outcomes[rid]} answers\n{where}"
    assert sim.sched.lease_owner == {}, where
    assert all(m.in_flight == 0 for m in sim.sched.models.values()), where
    assert not sim.models_in(Status.LOADING, Status.STOPPING), where
    assert len(sim.models_in(Status.LOADED)) <= max_models, where  # settled: what runs is what is loaded


def test_waiter_without_autoload_is_refused_when_its_load_is_stopped() -> None:
    sched = Scheduler(["A"], max_models=1)
    sched.handle(Acquire(1, "A"), 0.0)  # autoload on: starts the load
    sched.handle(Acquire(2, "A", autoload=False), 0.5)  # joins the load in progress
    sched.handle(ModelChanged(ModelSpec("A")), 1.0)  # the load is stopped (to restart with the new configuration)
    actions = sched.handle(InstanceExited("A", -15), 2.0)
    rejected = [a for a in actions if isinstance(a, Reject)]
    assert [(a.request_id, a.kind) for a in rejected] == [(2, ErrorKind.NOT_LOADED)]
    assert [a.model for a in actions if isinstance(a, StartLoad)] == ["A"]  # request 1 still gets its model


# === keep-alive, memory budget, pins, priority, swap-aware grouping, max-wait, concurrency limit ============

KA = Limits(max_models=2, keep_alive=10.0, max_wait=1000.0)  # every idle model unloads after 10 s
MB = Limits(max_models=4, memory_budget=10 * G, max_wait=1000.0)  # room for 10 GiB, slots to spare


def spec(name: str, gib: float = 0, **kw: Any) -> ModelSpec:
    return ModelSpec(name, footprint=int(gib * G), **kw)


GB = Limits(max_models=4, memory_budget=10 * G, gpu_memory_budget=8 * G, max_wait=1000.0)  # and an 8 GiB GPU


def gpu_spec(name: str, gib: float, gpu_gib: float, **kw: Any) -> ModelSpec:
    return ModelSpec(name, footprint=int(gib * G), gpu_footprint=int(gpu_gib * G), **kw)


SCHEDULING_SCENARIOS = [
    # -- keep-alive --
    Scenario(
        "keep-alive-timer-starts-when-the-last-request-ends-not-at-grant",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A"), [start("A")], 600.0),  # the load's load-timeout, before the max-wait
            At(1, loaded("A"), [grant(1, "A")], None),  # leased at once: no timer
            At(2, Acquire(2, "A"), [grant(2, "A")], None),
            At(20, Tick(), [], None),  # long past grant + 10 s, but busy
            At(21, Release(1), [], None),  # request 2 still in flight
            At(30, Release(2), [], 40.0),  # the last one ends: the timer starts now
            At(39.5, Tick(), [], 40.0),
            At(40, Tick(), [stop("A")], None),
            At(41, exited("A"), [], None),
        ],
        final={"A": Status.UNLOADED},
    ),
    Scenario(
        "load-timeout-kills-a-load-that-never-becomes-ready-and-fails-its-waiters",
        limits=Limits(max_models=1, load_timeout=60.0, max_wait=1000.0),
        steps=[
            At(0, Acquire(1, "A"), [start("A")], 60.0),
            At(10, Acquire(2, "A"), [], 60.0),
            At(59, Tick(), [], 60.0),
            At(60, Tick(), [("kill", "A")], 1000.0),  # only the max-wait of the waiters is left
            At(60.5, loaded("A"), [], 1000.0),  # ready just too late: a child being killed serves no one
            At(61, exited("A", -9, "llama-server was killed by a signal: loading tensors"),
               {reject(1, ErrorKind.UPSTREAM), reject(2, ErrorKind.UPSTREAM)}, None),
            At(62, Acquire(3, "A"), [start("A")], 122.0),  # the next request loads it again, with a new timeout
        ],
        final={"A": Status.LOADING},
    ),
    Scenario(
        "load-timeout-zero-waits-for-ever",
        limits=Limits(max_models=1, load_timeout=0.0, max_wait=1000.0),
        steps=[
            At(0, Acquire(1, "A"), [start("A")], 1000.0),
            At(5000, Tick(), [], None),
            At(5001, loaded("A"), [grant(1, "A")], None),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "an-unhealthy-loaded-child-is-killed-takes-no-new-requests-and-reloads-for-the-next",
        limits=Limits(max_models=1, max_wait=1000.0),
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, ChildUnhealthy("A", "no byte for 120 s"), [("kill", "A")]),
            At(3, Acquire(2, "A"), []),  # waits: the dying child is not leased
            At(4, exited("A", -9, "killed"), [start("A")]),
            At(5, Release(1), []),  # the stale lease of the dead child
            At(6, loaded("A"), [grant(2, "A")]),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "keep-alive-late-tick-still-stops",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [], 12.0),
            At(500, Tick(), [stop("A")], None),
        ],
        final={"A": Status.STOPPING},
    ),
    Scenario(
        "keep-alive-request-before-expiry-cancels-the-timer",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [], 12.0),
            At(11, Acquire(2, "A"), [grant(2, "A")], None),
            At(12, Tick(), [], None),  # the old expiry: nothing
            At(15, Release(2), [], 25.0),  # a fresh timer from the new last release
            At(24, Tick(), [], 25.0),
            At(25, Tick(), [stop("A")], None),
        ],
        final={"A": Status.STOPPING},
    ),
    Scenario(
        "keep-alive-a-load-nobody-waits-for-any-more-times-out-from-the-load",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, Cancel(1), []),
            At(2, loaded("A"), [], 12.0),
            At(12, Tick(), [stop("A")], None),
        ],
    ),
    Scenario(
        "keep-alive-spec-overrides-limits",
        specs=(spec("A", keep_alive=3.0), "B"),
        limits=KA,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(0, Acquire(2, "B"), [start("B")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(1, loaded("B"), [grant(2, "B")]),
            At(2, Release(1), [], 5.0),
            At(2, Release(2), [], 5.0),  # B's 12.0 is later
            At(5, Tick(), [stop("A")], 12.0),
            At(11, Tick(), [], 12.0),
            At(12, Tick(), [stop("B")], None),
        ],
    ),
    Scenario(
        "keep-alive-spec-never",
        specs=(spec("A", keep_alive=-1.0),),
        limits=KA,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [], None),
            At(10_000, Tick(), [], None),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "keep-alive-request-0-unloads-right-after-it",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A", keep_alive=0), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [stop("A")], None),
            At(3, exited("A"), []),
        ],
        final={"A": Status.UNLOADED},
    ),
    Scenario(
        "keep-alive-request-0-waits-for-the-other-requests-in-flight",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A", keep_alive=0), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Acquire(2, "A"), [grant(2, "A")]),
            At(3, Release(1), [], None),
            At(4, Release(2), [stop("A")], None),
        ],
    ),
    Scenario(
        "keep-alive-request-minus-1-is-forever",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A", keep_alive=-1), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [], None),
            At(10_000, Tick(), [], None),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "keep-alive-request-overrides-the-spec",
        specs=(spec("A", keep_alive=-1.0),),
        limits=KA,
        steps=[
            At(0, Acquire(1, "A", keep_alive=5), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [], 7.0),
            At(7, Tick(), [stop("A")], None),
        ],
    ),
    Scenario(
        "keep-alive-request-value-stays-the-models-timeout-for-later-requests",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A", keep_alive=5), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [], 7.0),
            At(3, Acquire(2, "A"), [grant(2, "A")], None),  # no keep_alive of its own
            At(4, Release(2), [], 9.0),  # still 5 s, not the default 10 s
            At(9, Tick(), [stop("A")], None),
        ],
    ),
    Scenario(
        "keep-alive-never-expires-a-pinned-model",
        specs=(spec("A", pinned=True, keep_alive=1.0),),
        limits=KA,
        steps=[
            At(0, Acquire(1, "A", keep_alive=0), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [], None),
            At(3, Acquire(2, "A", keep_alive=5), [grant(2, "A")]),
            At(4, Release(2), [], None),
            At(10_000, Tick(), [], None),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "keep-alive-request-value-does-not-outlive-the-instance",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A", keep_alive=0), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [stop("A")]),
            At(3, exited("A"), []),
            At(4, Acquire(2, "A"), [start("A")]),  # a new instance, for a request without keep_alive
            At(5, loaded("A"), [grant(2, "A")]),
            At(6, Release(2), [], 16.0),  # the default 10 s, not request 1's 0
            At(16, Tick(), [stop("A")], None),
        ],
    ),
    Scenario(
        "keep-alive-no-deadline-for-a-drained-stopping-model",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, UnloadRequested("A"), [], None),
            At(3, Release(1), [stop("A")], None),  # stopping: there is no idle timer to report
        ],
        final={"A": Status.STOPPING},
    ),
    # -- memory budget --
    Scenario(
        "memory-a-load-waits-while-the-budget-is-full-of-busy-models",
        specs=(spec("A", 4), spec("B", 4), spec("C", 4)),
        limits=MB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),  # 8 GiB of 10
            (loaded("A"), [grant(1, "A")]),
            (loaded("B"), [grant(2, "B")]),
            (Acquire(3, "C"), []),  # 12 GiB would not fit, and nothing is idle
            (Release(1), [stop("A")]),
            (exited("A"), [start("C")]),
            (loaded("C"), [grant(3, "C")]),
        ],
        final={"A": Status.UNLOADED, "B": Status.LOADED, "C": Status.LOADED},
    ),
    Scenario(
        "memory-an-exact-fit-loads",
        specs=(spec("A", 4), spec("B", 6)),
        limits=MB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),
        ],
        final={"A": Status.LOADING, "B": Status.LOADING},
    ),
    Scenario(
        "memory-evicts-idle-models-least-recently-used-first-until-it-fits",
        specs=(spec("A", 4), spec("B", 3), spec("C", 3), spec("D", 6)),
        limits=MB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),
            (Acquire(3, "C"), [start("C")]),  # 10 GiB
            (loaded("A"), [grant(1, "A")]),
            (loaded("B"), [grant(2, "B")]),
            (loaded("C"), [grant(3, "C")]),
            (Release(2), []),  # B least recently used, then A, then C
            (Release(1), []),
            (Release(3), []),
            (Acquire(4, "D"), [stop("B"), stop("A")]),  # B alone frees 3 GiB: not enough; B and A free 7
            (exited("B"), []),  # A still holds its 4 GiB
            (exited("A"), [start("D")]),
            (loaded("D"), [grant(4, "D")]),
        ],
        final={"A": Status.UNLOADED, "B": Status.UNLOADED, "C": Status.LOADED, "D": Status.LOADED},
        loads=4,
    ),
    Scenario(
        "memory-no-partial-eviction-when-evicting-the-idle-models-is-not-enough",
        specs=(spec("A", 3), spec("B", 5), spec("C", 6)),
        limits=MB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),
            (loaded("A"), [grant(1, "A")]),
            (loaded("B"), [grant(2, "B")]),
            (Release(1), []),  # A idle (3 GiB), B busy (5 GiB)
            (Acquire(3, "C"), []),  # evicting A would leave 5 + 6 > 10: A stays
            (Tick(), []),
            # now it can fit, and B alone makes room (3 + 6 <= 10): A, less recently used, stays (one reload fewer)
            (Release(2), [stop("B")]),
            (exited("B"), [start("C")]),
        ],
        final={"A": Status.LOADED, "B": Status.UNLOADED, "C": Status.LOADING},
    ),
    Scenario(
        "memory-a-model-bigger-than-the-budget-is-rejected-at-once-without-eviction",
        specs=(spec("A", 4), spec("C", 12)),
        limits=MB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (Acquire(2, "C"), [reject(2, ErrorKind.TOO_BIG)]),
            (Acquire(3, "C"), [reject(3, ErrorKind.TOO_BIG)]),  # no loop: refused again, at once
            (Tick(), []),
        ],
        final={"A": Status.LOADED, "C": Status.UNLOADED},
        loads=1,
    ),
    Scenario(
        "memory-a-model-bigger-than-the-budget-minus-running-pins-is-rejected-at-once",
        specs=(spec("P", 6, pinned=True), spec("A", 2), spec("C", 5), spec("D", 4)),
        limits=MB,
        steps=[
            (Acquire(1, "P"), [start("P")]),
            (loaded("P"), [grant(1, "P")]),
            (Release(1), []),
            (Acquire(2, "A"), [start("A")]),  # 8 GiB
            (loaded("A"), [grant(2, "A")]),
            (Release(2), []),
            (Acquire(3, "C"), [reject(3, ErrorKind.TOO_BIG)]),  # 5 > 10 - 6: A is not evicted for nothing
            (Acquire(4, "D"), [stop("A")]),  # 4 fits beside P once A goes
            (exited("A"), [start("D")]),
        ],
        final={"P": Status.LOADED, "A": Status.UNLOADED, "C": Status.UNLOADED, "D": Status.LOADING},
    ),
    Scenario(
        "memory-a-pinned-model-not-running-takes-no-room",
        specs=(spec("P", 6, pinned=True), spec("C", 5)),
        limits=MB,
        steps=[(Acquire(1, "C"), [start("C")])],
        final={"P": Status.UNLOADED, "C": Status.LOADING},
    ),
    Scenario(
        "memory-a-larger-measured-figure-counts-against-the-budget",
        specs=(spec("A", 4), spec("B", 5)),
        limits=MB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (MemoryMeasured("A", 7 * G), []),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "B"), []),  # 4 + 5 would fit, 7 + 5 does not
            (Release(1), [stop("A")]),
            (exited("A"), [start("B")]),
        ],
        final={"A": Status.UNLOADED, "B": Status.LOADING},
    ),
    Scenario(
        "memory-a-measured-figure-replaces-the-estimate",
        specs=(spec("A", 8), spec("B", 5)),
        limits=MB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (MemoryMeasured("A", 4 * G), []),
            (Acquire(2, "B"), [start("B")]),  # 4 + 5 fits
        ],
        final={"A": Status.LOADED, "B": Status.LOADING},
    ),
    Scenario(
        "memory-the-measured-peak-is-kept",
        specs=(spec("A", 4), spec("B", 5)),
        limits=MB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (MemoryMeasured("A", 7 * G), []),
            (MemoryMeasured("A", 3 * G), []),
            (Acquire(2, "B"), []),
        ],
        final={"A": Status.LOADED, "B": Status.UNLOADED},
    ),
    Scenario(
        "memory-a-measured-figure-outlives-the-instance",
        specs=(spec("A", 4), spec("B", 5)),
        limits=MB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (MemoryMeasured("A", 9 * G), []),  # A really needs 9 GiB, not the estimated 4
            (Release(1), []),
            (UnloadRequested("A"), [stop("A")]),
            (exited("A"), []),
            (Acquire(2, "B"), [start("B")]),
            (loaded("B"), [grant(2, "B")]),
            (Acquire(3, "A"), []),  # 9 + 5 > 10 and B is busy: A must wait
        ],
        final={"A": Status.UNLOADED, "B": Status.LOADED},
    ),
    # -- GPU memory budget (the part of each model offloaded to GPUs) --
    Scenario(
        "gpu-an-idle-model-is-evicted-when-the-gpu-is-full-though-host-memory-is-free",
        specs=(gpu_spec("A", 1, 6), gpu_spec("B", 1, 6)),
        limits=GB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (Acquire(2, "B"), [stop("A")]),  # host: 1 + 1 of 10; GPU: 6 + 6 > 8
            (exited("A"), [start("B")]),
        ],
        final={"A": Status.UNLOADED, "B": Status.LOADING},
    ),
    Scenario(
        "gpu-models-that-fit-together-on-the-gpu-stay-resident",
        specs=(gpu_spec("A", 1, 3), gpu_spec("B", 1, 5)),
        limits=GB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),  # 3 + 5 fits in 8
        ],
        final={"A": Status.LOADING, "B": Status.LOADING},
    ),
    Scenario(
        "gpu-a-model-bigger-than-the-gpu-budget-is-rejected-at-once",
        specs=(gpu_spec("A", 1, 3), gpu_spec("C", 1, 9)),
        limits=GB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (Acquire(2, "C"), [reject(2, ErrorKind.TOO_BIG)]),
        ],
        final={"A": Status.LOADED, "C": Status.UNLOADED},
    ),
    Scenario(
        "gpu-a-measured-gpu-figure-replaces-the-estimate",
        specs=(gpu_spec("A", 1, 6), gpu_spec("B", 1, 6)),
        limits=GB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (MemoryMeasured("A", 1 * G, gpu=2 * G), []),  # fewer layers fitted than estimated
            (Acquire(2, "B"), [start("B")]),  # 2 + 6 fits in 8
        ],
        final={"A": Status.LOADED, "B": Status.LOADING},
    ),
    Scenario(
        "gpu-a-measurement-without-gpu-memory-means-the-model-is-all-on-the-host",
        specs=(gpu_spec("A", 1, 6), gpu_spec("B", 1, 6)),
        limits=GB,
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (MemoryMeasured("A", 2 * G), []),  # nvidia-smi does not list it: nothing offloaded
            (Acquire(2, "B"), [start("B")]),
        ],
        final={"A": Status.LOADED, "B": Status.LOADING},
    ),
    # -- pins --
    Scenario(
        "pin-an-idle-pinned-model-is-never-the-lru-victim",
        specs=(spec("P", pinned=True), "A", "B"),
        limits=Limits(max_models=2, max_wait=1000.0),
        steps=[
            (Acquire(1, "P"), [start("P")]),
            (Acquire(2, "A"), [start("A")]),
            (loaded("P"), [grant(1, "P")]),
            (loaded("A"), [grant(2, "A")]),
            (Release(1), []),  # P least recently used
            (Release(2), []),
            (Acquire(3, "B"), [stop("A")]),
            (exited("A"), [start("B")]),
        ],
        final={"P": Status.LOADED, "A": Status.UNLOADED, "B": Status.LOADING},
    ),
    Scenario(
        "pin-memory-pressure-does-not-evict-an-idle-pinned-model",
        specs=(spec("P", 5, pinned=True), spec("A", 5), spec("C", 5)),
        limits=MB,
        steps=[
            (Acquire(1, "P"), [start("P")]),
            (Acquire(2, "A"), [start("A")]),
            (loaded("P"), [grant(1, "P")]),
            (loaded("A"), [grant(2, "A")]),
            (Release(1), []),  # P idle, A busy
            (Acquire(3, "C"), []),
            (Tick(), []),
            (Release(2), [stop("A")]),
            (exited("A"), [start("C")]),
        ],
        final={"P": Status.LOADED, "A": Status.UNLOADED, "C": Status.LOADING},
    ),
    Scenario(
        "pin-max-wait-drains-the-busy-unpinned-model-never-the-pinned-one",
        specs=(spec("P", pinned=True), "A", "B"),
        limits=Limits(max_models=2, max_wait=10.0),
        steps=[
            At(0, Acquire(1, "P"), [start("P")]),
            At(0, Acquire(2, "A"), [start("A")]),
            At(1, loaded("P"), [grant(1, "P")]),
            At(1, loaded("A"), [grant(2, "A")]),
            At(2, Acquire(3, "B"), [], 12.0),
            At(11.9, Tick(), []),
            At(12, Tick(), [], None),  # A drains (busy: no stop yet); P is left alone
            At(13, Release(1), []),  # P idle now, but A's slot is already on its way to B
            At(14, Release(2), [stop("A")]),
            At(15, exited("A"), [start("B")]),
            At(16, loaded("B"), [grant(3, "B")]),
        ],
        final={"P": Status.LOADED, "A": Status.UNLOADED, "B": Status.LOADED},
    ),
    Scenario(
        "pin-an-explicit-unload-stops-a-pinned-model",
        specs=(spec("P", pinned=True),),
        steps=[
            (Acquire(1, "P"), [start("P")]),
            (loaded("P"), [grant(1, "P")]),
            (UnloadRequested("P"), []),  # busy: drains
            (Release(1), [stop("P")]),
            (exited("P"), []),
            (Acquire(2, "P"), [start("P")]),
            (loaded("P"), [grant(2, "P")]),
            (Release(2), []),
            (UnloadRequested("P"), [stop("P")]),  # idle: at once
        ],
        final={"P": Status.STOPPING},
    ),
    Scenario(
        "pin-pinning-an-idle-model-cancels-its-keep-alive",
        limits=KA,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Release(1), [], 12.0),
            At(3, ModelChanged(spec("A", pinned=True), restart=False), [], None),  # e.g. `pin = true`, reloaded
            At(12, Tick(), []),
        ],
        final={"A": Status.LOADED},
    ),
    # -- priority --
    Scenario(
        "priority-the-higher-priority-waiter-loads-first",
        specs=("A", spec("B", priority=0), spec("C", priority=5)),
        limits=Limits(max_models=1, max_wait=1000.0),
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "B"), []),
            (Acquire(3, "C"), []),  # later, but higher priority
            (Release(1), [stop("A")]),
            (exited("A"), [start("C")]),
            (loaded("C"), [grant(3, "C")]),
            (Release(3), [stop("C")]),
            (exited("C"), [start("B")]),
            (loaded("B"), [grant(2, "B")]),
        ],
    ),
    Scenario(
        "priority-equal-priority-oldest-waiter-first",
        specs=("A", spec("B", priority=3), spec("C", priority=3)),
        limits=Limits(max_models=1, max_wait=1000.0),
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "C"), []),
            (Acquire(3, "B"), []),
            (Acquire(4, "C"), []),
            (Release(1), [stop("A")]),
            (exited("A"), [start("C")]),
            (loaded("C"), [grant(2, "C"), grant(4, "C")]),
            (Release(2), []),
            (Release(4), [stop("C")]),
            (exited("C"), [start("B")]),
        ],
    ),
    Scenario(
        "priority-a-waiter-past-max-wait-goes-before-a-higher-priority-one",
        specs=("A", spec("B", priority=0), spec("C", priority=5)),
        limits=Limits(max_models=1, max_wait=30.0),
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Acquire(2, "B"), [], 32.0),
            At(32, Tick(), []),  # B overdue: A drains
            At(40, Acquire(3, "C"), [], 70.0),
            At(41, Release(1), [stop("A")]),
            At(42, exited("A"), [start("B")]),
            At(43, loaded("B"), [grant(2, "B")]),
            At(44, Release(2), [stop("B")]),
            At(45, exited("B"), [start("C")]),
        ],
    ),
    # -- swap-aware grouping --
    Scenario(
        "swap-aware-abab-while-a-is-busy-is-served-aa-then-bb",
        models=("A", "B"),
        limits=Limits(max_models=1, max_wait=1000.0),
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Acquire(2, "A"), [grant(2, "A")]),
            (Acquire(3, "B"), []),
            (Acquire(4, "A"), [grant(4, "A")]),
            (Acquire(5, "B"), []),
            (Release(1), []),
            (Release(2), []),
            (Release(4), [stop("A")]),
            (exited("A"), [start("B")]),
            (loaded("B"), [grant(3, "B"), grant(5, "B")]),
        ],
        loads=2,
    ),
    Scenario(
        "swap-aware-abab-while-a-loads-is-served-aa-then-bb",
        models=("A", "B"),
        limits=Limits(max_models=1, max_wait=1000.0),
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), []),
            (Acquire(3, "A"), []),
            (Acquire(4, "B"), []),
            (loaded("A"), [grant(1, "A"), grant(3, "A")]),
            (Release(1), []),
            (Release(3), [stop("A")]),
            (exited("A"), [start("B")]),
            (loaded("B"), [grant(2, "B"), grant(4, "B")]),
        ],
        loads=2,
    ),
    Scenario(
        "swap-aware-babab-during-an-eviction-is-served-bb-then-aa",
        models=("A", "B"),
        limits=Limits(max_models=1, max_wait=1000.0),
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (Release(1), []),
            (Acquire(2, "B"), [stop("A")]),
            (Acquire(3, "A"), []),  # A is stopping: waits for its next load
            (Acquire(4, "B"), []),
            (Acquire(5, "A"), []),
            (exited("A"), [start("B")]),
            (loaded("B"), [grant(2, "B"), grant(4, "B")]),
            (Release(2), []),
            (Release(4), [stop("B")]),
            (exited("B"), [start("A")]),
            (loaded("A"), [grant(3, "A"), grant(5, "A")]),
        ],
        loads=3,
    ),
    # -- max-wait --
    Scenario(
        "max-wait-drains-a-busy-model-and-queues-its-new-requests",
        models=("A", "B"),
        limits=Limits(max_models=1, max_wait=30.0),
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Acquire(2, "A"), [grant(2, "A")]),
            At(5, Acquire(3, "B"), [], 35.0),
            At(10, Release(1), [], 35.0),
            At(11, Acquire(4, "A"), [grant(4, "A")]),  # A never idle
            At(20, Release(2), []),
            At(21, Acquire(5, "A"), [grant(5, "A")]),
            At(30, Release(4), []),
            At(34.9, Tick(), [], 35.0),
            At(35, Tick(), [], None),  # A drains: STOPPING, request 5 still in flight
            At(36, Acquire(6, "A"), []),  # not granted: waits for A's next load
            At(40, Release(5), [stop("A")]),
            At(41, exited("A"), [start("B")]),
            At(42, loaded("B"), [grant(3, "B")]),
            At(43, Release(3), [stop("B")]),
            At(44, exited("B"), [start("A")]),
            At(45, loaded("A"), [grant(6, "A")]),
        ],
        final={"A": Status.LOADED, "B": Status.UNLOADED},
    ),
    # -- concurrency limit --
    Scenario(
        "concurrency-limit-in-flight-plus-queued-rejects-busy",
        specs=(spec("A", concurrency_limit=2), "B"),
        limits=Limits(max_models=2),
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "A"), []),
            (Acquire(3, "A"), [reject(3, ErrorKind.BUSY)]),  # 0 in flight + 2 queued
            (Acquire(4, "B"), [start("B")]),  # other models are not limited
            (loaded("A"), [grant(1, "A"), grant(2, "A")]),
            (Acquire(5, "A"), [reject(5, ErrorKind.BUSY)]),  # 2 in flight
            (Release(1), []),
            (Acquire(6, "A"), [grant(6, "A")]),
            (Acquire(7, "A"), [reject(7, ErrorKind.BUSY)]),
        ],
    ),
    Scenario(
        "concurrency-limit-counts-a-cancelled-waiter-no-more",
        specs=(spec("A", concurrency_limit=1),),
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "A"), [reject(2, ErrorKind.BUSY)]),
            (Cancel(1), []),
            (Acquire(3, "A"), []),
            (loaded("A"), [grant(3, "A")]),
        ],
    ),
]


@pytest.mark.parametrize("scenario", [
    pytest.param(s, id=s.id, marks=[pytest.mark.xfail(strict=True, reason=s.xfail)] if s.xfail else [])
    for s in SCHEDULING_SCENARIOS
])
def test_scheduling_scenario(scenario: Scenario) -> None:
    run_scenario(scenario)


# --- focused checks: reasons, messages, continuous traffic, pinned slots ----------------------------------

def _reasons(actions: list[Action], model: str) -> list[str]:
    return [a.reason for a in actions if isinstance(a, (StopInstance, StatusChanged)) and a.model == model]


def test_keep_alive_stop_names_keep_alive_as_the_reason() -> None:
    sched = Scheduler([spec("A", keep_alive=7.5)], KA)
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(LoadSucceeded("A"), 1.0)
    sched.handle(Release(1), 2.0)
    assert sched.models["A"].expires_at == 9.5
    actions = sched.handle(Tick(), 9.5)
    stops = [a for a in actions if isinstance(a, StopInstance)]
    assert len(stops) == 1 and stops[0].model == "A"
    assert "keep-alive" in stops[0].reason and "7.5" in stops[0].reason
    assert StatusChanged("A", Status.STOPPING, None, stops[0].reason) in actions
    assert sched.models["A"].expires_at is None


def test_lru_eviction_names_the_waiting_model() -> None:
    sched = Scheduler([spec("A", 6), spec("B", 6)], MB)
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(LoadSucceeded("A"), 1.0)
    sched.handle(Release(1), 2.0)
    actions = sched.handle(Acquire(2, "B"), 3.0)
    assert [a.model for a in actions if isinstance(a, StopInstance)] == ["A"]
    assert all("least recently used" in r and "'B'" in r for r in _reasons(actions, "A"))


def test_too_big_message_names_the_sizes_and_evicts_nothing() -> None:
    sched = Scheduler([spec("A", 4), spec("C", 12)], MB)
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(LoadSucceeded("A"), 1.0)
    sched.handle(Release(1), 2.0)
    actions = sched.handle(Acquire(2, "C"), 3.0)
    assert [type(a) for a in actions] == [Decided, Reject]
    (refusal,) = effects(actions)
    assert isinstance(refusal, Reject)
    assert refusal.kind == ErrorKind.TOO_BIG and refusal.kind.status == 507
    assert "'C'" in refusal.message and "12.00 GiB" in refusal.message and "10.00 GiB" in refusal.message
    assert sched.queue == [] and sched.models["A"].status == Status.LOADED


def test_too_big_for_the_gpu_names_the_gpu_budget() -> None:
    sched = Scheduler([gpu_spec("C", 1, 9)], GB)
    (refusal,) = effects(sched.handle(Acquire(1, "C"), 0.0))
    assert isinstance(refusal, Reject) and refusal.kind == ErrorKind.TOO_BIG
    assert "9.00 GiB of GPU memory" in refusal.message and "8.00 GiB" in refusal.message
    assert "--gpu-memory-budget" in refusal.message


def test_too_big_beside_pinned_models_names_what_the_pins_hold() -> None:
    sched = Scheduler([spec("P", 6, pinned=True), spec("C", 5)], MB)
    sched.handle(Acquire(1, "P"), 0.0)
    sched.handle(LoadSucceeded("P"), 1.0)
    sched.handle(Release(1), 2.0)
    (refusal,) = effects(sched.handle(Acquire(2, "C"), 3.0))
    assert isinstance(refusal, Reject) and refusal.kind == ErrorKind.TOO_BIG
    assert "5.00 GiB" in refusal.message and "10.00 GiB" in refusal.message
    assert "6.00 GiB held by pinned models" in refusal.message
    assert sched.models["P"].status == Status.LOADED


def test_a_waiter_is_refused_too_big_when_a_pinned_model_grows() -> None:
    """A request admitted while it fitted, refused with TOO_BIG once a pinned model's measured figure leaves no
    room for it: refused, not left waiting for an eviction that cannot happen."""
    sched = Scheduler([spec("P", 4, pinned=True), spec("A", 5), spec("C", 5)], MB)
    sched.handle(Acquire(1, "P"), 0.0)
    sched.handle(Acquire(2, "A"), 0.0)
    sched.handle(LoadSucceeded("P"), 1.0)
    sched.handle(LoadSucceeded("A"), 1.0)
    assert summarize(sched.handle(Acquire(3, "C"), 2.0)) == []  # 4 + 5 + 5 > 10: waits for A
    assert summarize(sched.handle(MemoryMeasured("P", 6 * G), 3.0)) == [reject(3, ErrorKind.TOO_BIG)]
    assert sched.models["A"].status == Status.LOADED and sched.models["P"].status == Status.LOADED


def test_concurrency_limit_rejects_with_busy_and_429() -> None:
    sched = Scheduler([spec("A", concurrency_limit=1)], Limits(max_models=1))
    sched.handle(Acquire(1, "A"), 0.0)
    (refusal,) = effects(sched.handle(Acquire(2, "A"), 0.0))
    assert isinstance(refusal, Reject) and refusal.kind == ErrorKind.BUSY and refusal.kind.status == 429
    assert "'A'" in refusal.message and "1" in refusal.message


def test_max_wait_bounds_a_wait_behind_continuous_traffic() -> None:
    """Clients keep model A busy (a new 2 s request every second, so A is never idle); a request for B at
    t=5 makes A drain at t=5+max_wait: new A requests queue, A stops once its in-flight ones are done, B
    loads and is granted, then A comes back for the requests that queued."""
    max_wait = 30.0
    sched = Scheduler(["A", "B"], Limits(max_models=1, max_wait=max_wait))
    log: list[str] = []
    engine: list[Event] = []  # what the engine reports one second after the action
    in_flight: dict[int, float] = {}  # granted A and B requests -> when
    queued_a: list[int] = []
    granted_at: dict[int, float] = {}
    loads: list[str] = []
    a_stopping_at: float | None = None
    b_rid = 1000

    def feed(event: Event, now: float) -> list[Action]:
        actions = sched.handle(event, now)
        log.append(f"{now:g} {event} -> {summarize(actions)}")
        for action in actions:
            match action:
                case Grant(request_id=rid):
                    in_flight[rid] = now
                    granted_at[rid] = now
                case StartLoad(model=model):
                    loads.append(model)
                    engine.append(LoadSucceeded(model))
                case StopInstance(model=model):
                    assert sched.models[model].in_flight == 0, "\n".join(log)
                    engine.append(InstanceExited(model, 0))
        return actions

    feed(Acquire(1, "A"), 0.0)
    feed(engine.pop(), 0.5)  # A loaded: request 1 granted
    rid = 2
    for second in range(1, 80):
        now = float(second)
        pending, engine[:] = list(engine), []
        for event in pending:
            feed(event, now)
        for r, since in sorted(in_flight.items()):
            if now - since >= 2:
                del in_flight[r]
                feed(Release(r), now)
        if second == 5:
            assert summarize(feed(Acquire(b_rid, "B"), now)) == []
        if second <= 50:
            was_stopping = sched.models["A"].status == Status.STOPPING
            actions = feed(Acquire(rid, "A"), now)
            if was_stopping:
                assert Grant(rid, "A") not in actions, "a draining model took a new request\n" + "\n".join(log)
                queued_a.append(rid)
            rid += 1
        feed(Tick(), now)
        if 5 <= second < 5 + max_wait:
            assert b_rid in sched.lease_owner or sched.next_deadline() == 5 + max_wait, "\n".join(log)
            assert sched.models["A"].status == Status.LOADED, "A evicted before max-wait\n" + "\n".join(log)
            assert sched.models["A"].in_flight > 0  # the traffic really keeps A busy
        if a_stopping_at is None and sched.models["A"].status == Status.STOPPING:
            a_stopping_at = now
            assert "max-wait" in sched.models["A"].drain_reason
    where = "\n".join(log)
    assert a_stopping_at == 5 + max_wait, where
    assert b_rid in granted_at and granted_at[b_rid] <= 5 + max_wait + 3, where  # the drain, a stop, a load
    assert queued_a and all(r in granted_at for r in queued_a), where
    assert loads == ["A", "B", "A"], where


def test_a_request_is_answered_when_pinned_models_hold_every_slot() -> None:
    sched = Scheduler([spec("P", pinned=True), "B"], Limits(max_models=1, max_wait=30.0))
    sched.handle(Acquire(1, "P"), 0.0)
    sched.handle(LoadSucceeded("P"), 1.0)
    sched.handle(Release(1), 2.0)
    answers = summarize(sched.handle(Acquire(2, "B"), 3.0))
    answers += summarize(sched.handle(Tick(), 33.0))
    answers += summarize(sched.handle(Tick(), 1000.0))
    assert stop("P") not in answers and sched.models["P"].status == Status.LOADED
    assert [a for a in answers if a[0] in ("grant", "reject") and a[1] == 2], "request 2 never answered"


@pytest.mark.parametrize("keep_alive", [0.0, 10.0])
def test_next_deadline_is_in_the_future_after_a_drained_model_is_released(keep_alive: float) -> None:
    sched = Scheduler(["A"], Limits(max_models=1, keep_alive=keep_alive))
    sched.handle(Acquire(1, "A"), 0.0)
    sched.handle(LoadSucceeded("A"), 1.0)
    sched.handle(UnloadRequested("A"), 2.0)
    assert summarize(sched.handle(Release(1), 3.0)) == [stop("A")]
    sched.handle(Tick(), 20.0)  # the child takes its time to exit
    deadline = sched.next_deadline()
    assert deadline is None or deadline > 20.0


# --- property test: memory budget, pins, keep-alive and time ------------------------------------------------

BUDGET_OPS = ("acquire", "acquire", "acquire", "release", "release", "cancel", "load_ok", "load_ok", "exit",
              "unload", "change", "measure", "tick", "tick", "deadline", "wait_out", "remove", "add", "unhealthy",
              "killed")
REQUEST_KEEP_ALIVES = (None, None, None, 0.0, 3.0, -1.0)


@dataclass
class BudgetSim(Sim):
    """Sim with footprints, a memory budget, pins, keep-alive and Ticks; the specs never change (a
    ModelChanged carries the model's own spec), so a model's pin is known from `specs`."""

    specs: dict[str, ModelSpec] = field(default_factory=dict)
    budget: int = 0
    gpu_budget: int = 0
    max_wait: float = 30.0
    requested: dict[int, str] = field(default_factory=dict)  # request id -> model
    shut_down: bool = False

    def check(self, event: Event, before: dict[str, tuple[Status, int]], actions: list[Action]) -> None:
        super().check(event, before, actions)
        sched, where = self.sched, "\n".join(self.log)
        if isinstance(event, Shutdown):
            self.shut_down = True
        match event:  # the model this event explicitly stops, if any: the only way a pinned model may go
            case UnloadRequested(model=named) | ModelRemoved(model=named) | ChildUnhealthy(model=named):
                pass
            case ModelChanged(spec=changed, restart=True):
                named = changed.name
            case _:
                named = None
        for action in actions:
            match action:
                case StartLoad(model=model):
                    assert sched.memory_used() <= self.budget, f"over budget loading {model}\n{where}"
                    assert not self.gpu_budget or sched.gpu_memory_used() <= self.gpu_budget, \
                        f"over the GPU budget loading {model}\n{where}"
                case StatusChanged(model=model, status=Status.STOPPING) if self.specs[model].pinned:
                    assert self.shut_down or named == model, f"pinned {model} drained by {event}\n{where}"
                case StopInstance(model=model, reason=reason):
                    if self.specs[model].pinned:
                        was = before.get(model, (Status.UNLOADED, 0))[0]  # already draining: allowed then
                        assert self.shut_down or named == model or was == Status.STOPPING, \
                            f"pinned {model} stopped by {event}\n{where}"
                    if "keep-alive" in reason:
                        assert not self.specs[model].pinned, where
                case Reject(kind=ErrorKind.TOO_BIG, request_id=rid):
                    model = self.requested[rid]
                    pins = [m for m in sched.models.values()
                            if m.spec.pinned and m.name != model and m.status in RUNNING]
                    wanted = sched.models[model]
                    too_big = wanted.footprint > self.budget - sum(m.footprint for m in pins)
                    too_big_gpu = bool(self.gpu_budget) and (
                        wanted.gpu_footprint > self.gpu_budget - sum(m.gpu_footprint for m in pins))
                    assert too_big or too_big_gpu, f"TOO_BIG for {rid}\n{where}"
        for name, model in sched.models.items():
            # every keep-alive that has ended was acted on (a STOPPING model's stale timer is the known bug
            # of test_next_deadline_is_in_the_future_after_a_drained_model_is_released)
            if model.status == Status.LOADED and model.expires_at is not None:
                assert model.expires_at > self.now, f"{name} outlived its keep-alive\n{where}"
                assert not self.specs[name].pinned, f"pinned {name} has a keep-alive timer\n{where}"

    def step4(self, op: str, pick: int, flag: bool, extra: int) -> None:
        names = sorted(self.specs)
        name = names[pick % len(names)]
        state = self.sched.models.get(name)
        present = state is not None and not state.removed
        if op == "acquire":
            rid = self.next_rid
            self.next_rid += 1
            self.acquired.append(rid)
            self.waiting.add(rid)
            self.requested[rid] = name
            keep_alive = REQUEST_KEEP_ALIVES[extra % len(REQUEST_KEEP_ALIVES)]
            self.feed(Acquire(rid, name, autoload=flag or pick % 3 != 0, keep_alive=keep_alive))
        elif op == "change" and present:
            self.feed(ModelChanged(self.specs[name], restart=flag))
        elif op == "measure" and (running := self.models_in(*RUNNING)):
            name = running[pick % len(running)]
            self.feed(MemoryMeasured(name, self.specs[name].footprint * (extra + 2) // 4))  # 0.5x .. 1.75x
        elif op == "tick":
            self.now += 0.5 * (1 + extra)
            self.feed(Tick())
        elif op == "deadline" and (deadline := self.sched.next_deadline()) is not None:
            self.now = max(self.now, deadline)
            self.feed(Tick())
        elif op == "wait_out":
            self.wait_out()
        elif op == "remove" and present:
            self.feed(ModelRemoved(name))
        elif op == "add" and not present:
            self.feed(ModelAdded(self.specs[name]))
        elif op not in ("change", "measure", "tick", "deadline", "remove", "add"):  # the base ops
            self.step(op, pick, flag)

    def wait_out(self) -> None:
        """Let max-wait pass with nothing else happening (leases kept, loads and stops unfinished): a request
        still waiting then must have something under way for it: a load, or a model stopping (draining)."""
        self.now += self.max_wait
        self.feed(Tick())
        if self.sched.queue:
            assert self.models_in(Status.LOADING, Status.STOPPING), \
                "requests wait past max-wait with nothing under way\n" + "\n".join(self.log)

    def settle_with_time(self) -> None:
        """Drive to quiescence: release every lease, finish every load and stop, and let time pass (with
        Ticks) while requests still wait, so max-wait and keep-alive deadlines come."""
        self.wait_out()
        for _ in range(2000):
            if self.leases:
                self.now += 1.0
                rid = min(self.leases)
                del self.leases[rid]
                self.feed(Release(rid))
            elif dying := self.dying():
                self.now += 1.0
                self.crash(dying[0])
            elif stopping := self.models_in(Status.STOPPING):
                self.now += 1.0
                self.feed(InstanceExited(stopping[0], 0))
            elif loading := self.models_in(Status.LOADING):
                self.now += 1.0
                self.feed(LoadSucceeded(loading[0]))
            elif self.sched.queue:
                deadline = self.sched.next_deadline()
                self.now = max(self.now + 1.0, deadline if deadline is not None else self.now + self.max_wait)
                self.feed(Tick())
            else:
                return
        raise AssertionError("no quiescence after 2000 steps\n" + "\n".join(self.log))


@st.composite
def budget_configs(draw: st.DrawFn) -> tuple[list[ModelSpec], Limits]:
    max_models = draw(st.sampled_from([1, 2, 2, 3]))
    budget_gib = draw(st.sampled_from([6, 8, 10]))
    gpu_budget_gib = draw(st.sampled_from([0, 0, 8]))  # with a GPU half the time: offloaded parts count too
    n_models = draw(st.integers(3, 5))
    specs: list[ModelSpec] = []
    pinned_gib = pinned_gpu_gib = pinned_count = 0
    for name in "ABCDE"[:n_models]:
        gib = draw(st.sampled_from([1, 2, 3, 4, 6, 12]))  # 12 GiB never fits
        gpu_gib = draw(st.sampled_from([0, 1, 3, 5, 9])) if gpu_budget_gib else 0  # 9 GiB never fits
        # as check_pinned allows: pins fit the budget, and (see the xfail above) leave a slot to the others
        pinned = (draw(st.booleans()) and pinned_count + 1 < max_models and pinned_gib + gib <= budget_gib // 2
                  and pinned_gpu_gib + gpu_gib <= gpu_budget_gib // 2)
        if pinned:
            pinned_count, pinned_gib, pinned_gpu_gib = pinned_count + 1, pinned_gib + gib, pinned_gpu_gib + gpu_gib
        specs.append(ModelSpec(name, footprint=gib * G, gpu_footprint=gpu_gib * G, pinned=pinned,
                               priority=draw(st.integers(0, 2)),
                               keep_alive=draw(st.sampled_from([None, None, 2.0, 5.0, -1.0])),
                               concurrency_limit=draw(st.sampled_from([0, 0, 2]))))
    limits = Limits(max_models=max_models, max_queue=draw(st.sampled_from([4, 1024])),
                    memory_budget=budget_gib * G, gpu_memory_budget=gpu_budget_gib * G,
                    keep_alive=draw(st.sampled_from([-1.0, 0.0, 4.0])),
                    max_wait=draw(st.sampled_from([3.0, 10.0])))
    return specs, limits


budget_op_strategy = st.tuples(st.sampled_from(BUDGET_OPS), st.integers(0, 11), st.booleans(), st.integers(0, 5))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=budget_configs(), ops=st.lists(budget_op_strategy, min_size=20, max_size=120),
       shutdown_at=st.none() | st.integers(0, 120))
def test_random_sequences_keep_the_budget_pins_and_answer_every_request(
    config: tuple[list[ModelSpec], Limits], ops: list[tuple[str, int, bool, int]], shutdown_at: int | None
) -> None:
    specs, limits = config
    sim = BudgetSim(Scheduler(specs, limits), limits.max_models, drain_after_grant=True,
                    specs={s.name: s for s in specs}, budget=limits.memory_budget,
                    gpu_budget=limits.gpu_memory_budget,
                    max_wait=limits.max_wait)
    for i, (op, pick, flag, extra) in enumerate(ops):
        if i == shutdown_at:
            sim.feed(Shutdown())
        sim.step4(op, pick, flag, extra)
    sim.settle_with_time()
    where = "\n".join(sim.log)
    assert sim.sched.queue == [], where
    assert sim.waiting == set(), f"requests never answered: {sorted(sim.waiting)}\n{where}"
    for rid in sim.acquired:
        expected = 0 if rid in sim.cancelled else 1
        assert sim.outcomes[rid] == expected, f"request {rid}: {sim.outcomes[rid]} answers\n{where}"
    assert sim.sched.lease_owner == {}, where
    assert not sim.models_in(Status.LOADING, Status.STOPPING), where
    assert len(sim.models_in(Status.LOADED)) <= limits.max_models, where  # settled: what runs is what is loaded


def state_of(sched: Scheduler) -> dict[str, Any]:
    """Everything a scheduler holds but the fast-path switch: what two equivalent schedulers must agree on."""
    return {key: value for key, value in vars(sched).items() if key != "fast_path"}


@dataclass
class TwinSim(BudgetSim):
    """BudgetSim whose every event also goes to a twin that runs the full decision pass after every event:
    the fast path (a grant at once, the pass skipped when it has nothing to do) must give the same actions,
    in the same order, and leave the same state, at every step."""

    twin: Scheduler | None = None

    def feed(self, event: Event) -> list[Action]:
        assert self.twin is not None
        full = self.twin.handle(event, self.now)
        actions = super().feed(event)
        where = "\n".join(self.log)
        assert actions == full, f"fast path {summarize(actions)} != full pass {summarize(full)}\n{where}"
        assert state_of(self.sched) == state_of(self.twin), where
        assert self.sched.board() == self.twin.board(), where
        assert self.sched.next_deadline() == self.twin.next_deadline(), where
        return actions


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=budget_configs(), ops=st.lists(budget_op_strategy, min_size=20, max_size=120),
       load_timeout=st.sampled_from([0.0, 2.0, 600.0]), shutdown_at=st.none() | st.integers(0, 120))
def test_the_fast_path_acts_exactly_as_the_full_pass(
    config: tuple[list[ModelSpec], Limits], ops: list[tuple[str, int, bool, int]], load_timeout: float,
    shutdown_at: int | None
) -> None:
    specs, limits = config
    limits = replace(limits, load_timeout=load_timeout)  # a load deadline due is one more thing the pass acts on
    sim = TwinSim(Scheduler(specs, limits), limits.max_models, drain_after_grant=True,
                  specs={s.name: s for s in specs}, budget=limits.memory_budget,
                  gpu_budget=limits.gpu_memory_budget, max_wait=limits.max_wait,
                  twin=Scheduler(specs, limits, fast_path=False))
    for i, (op, pick, flag, extra) in enumerate(ops):
        if i == shutdown_at:
            sim.feed(Shutdown())
        sim.step4(op, pick, flag, extra)
    sim.settle_with_time()


def test_a_grant_on_a_loaded_model_and_its_release_skip_the_decision_pass() -> None:
    """The fast path is taken where the profile needs it (without it the twin test above passes trivially):
    a request for a loaded, idle model and its release, with nobody waiting, never run the pass."""
    sched = Scheduler([ModelSpec("A", keep_alive=10.0), "B"])
    sched.handle(Acquire(1, "A"), 0)
    sched.handle(loaded("A"), 1)
    sched.handle(Release(1), 2)

    def no_pass(actions: list[Action]) -> None:
        raise AssertionError("the full pass ran")

    sched._schedule = no_pass  # type: ignore[method-assign]
    assert sched.handle(Acquire(2, "A"), 3) == [Grant(2, "A")]
    assert sched.handle(Acquire(3, "A", keep_alive=0.0), 3) == [Grant(3, "A")]
    assert sched.handle(Release(2), 4) == []
    assert sched.models["A"].expires_at is None  # request 3 still holds it
    with pytest.raises(AssertionError, match="the full pass ran"):
        sched.handle(Release(3), 5)  # its keep-alive of 0 ends now: the pass stops it


def test_a_killed_child_fails_with_the_kill_reason_and_the_childs_last_words() -> None:
    sched = Scheduler(["A"], Limits(max_models=1, load_timeout=30.0))
    sched.handle(Acquire(1, "A"), 0)
    sched.handle(Tick(), 30)
    actions = sched.handle(exited("A", -9, "llama-server was killed by a signal: load_tensors: 40%"), 31)
    message = next(a.message for a in actions if isinstance(a, Reject))
    assert message == ("model 'A' failed to load: not ready within 30 s (load-timeout); "
                       "llama-server was killed by a signal: load_tensors: 40%")
    assert sched.models["A"].status == Status.FAILED
    assert sched.models["A"].failure.startswith("not ready within 30 s (load-timeout)")


def test_retry_after_is_decided_by_the_core() -> None:
    sched = Scheduler(["A"], Limits(max_models=1, max_queue=1))
    sched.handle(Acquire(1, "A"), 0)
    full = [a for a in sched.handle(Acquire(2, "A"), 0) if isinstance(a, Reject)]
    assert [(a.kind, a.retry_after) for a in full] == [(ErrorKind.QUEUE_FULL, 1.0)]
    down = [a for a in sched.handle(Shutdown(), 1) if isinstance(a, Reject)]
    assert [(a.kind, a.retry_after) for a in down] == [(ErrorKind.SHUTTING_DOWN, 5.0)]


@pytest.mark.parametrize(("status", "refused"), [
    (Status.UNLOADED, True), (Status.FAILED, True), (Status.LOADING, False), (Status.LOADED, False),
    (Status.STOPPING, False),
])
def test_unload_validity(status: Status, refused: bool) -> None:
    assert bool(unload_refusal(status, "A")) == refused


@pytest.mark.parametrize(("need", "limits", "kinds"), [
    (Room(5 * G, 0, 1), Limits(max_models=4, memory_budget=10 * G), []),
    (Room(11 * G, 0, 1), Limits(max_models=4, memory_budget=10 * G), ["memory"]),
    (Room(1, 9 * G, 5), Limits(max_models=4, memory_budget=10 * G, gpu_memory_budget=8 * G),
     ["model slots", "GPU memory"]),
    (Room(10**15, 10**15, 10**6), Limits(max_models=0), []),  # 0 = no limit, for each of them
    (Room(10 * G, 8 * G, 4), Limits(max_models=4, memory_budget=10 * G, gpu_memory_budget=8 * G), []),  # at: fits
])
def test_the_one_budget_rule(need: Room, limits: Limits, kinds: list[str]) -> None:
    assert [o.kind for o in overages(need, limits)] == kinds


# === point 5 of issue 12: most waiting requests first (bounded by max-wait); the cheapest eviction ========

ORDER = Limits(max_models=1, max_wait=30.0)


def w(rid: int, model: str, since: float) -> Waiter:
    return Waiter(rid, model, since)


@pytest.mark.parametrize(("queue", "priorities", "now", "expected"), [
    pytest.param([w(1, "B", 0), w(2, "C", 1), w(3, "C", 2), w(4, "C", 3)], {}, 10,
                 [InLine("C", False, 3, 1), InLine("B", False, 1, 0)], id="most-waiting-first"),
    pytest.param([w(1, "B", 0), w(2, "C", 1)], {}, 10, [InLine("B", False, 1, 0), InLine("C", False, 1, 1)],
                 id="equal-counts-oldest-first"),
    pytest.param([w(1, "B", 0), w(2, "C", 1), w(3, "C", 2)], {}, 30,
                 [InLine("B", True, 1, 0), InLine("C", False, 2, 1)], id="overdue-is-never-overtaken"),
    pytest.param([w(1, "B", 0), w(2, "C", 1), w(3, "C", 2)], {}, 31,
                 [InLine("B", True, 1, 0), InLine("C", True, 2, 1)], id="overdue-ones-by-age-not-count"),
    pytest.param([w(1, "B", 0), w(2, "C", 1), w(3, "C", 2)], {"B": 1}, 10,
                 [InLine("B", False, 1, 0), InLine("C", False, 2, 1)], id="priority-before-count"),
    pytest.param([w(1, "A", 0), w(2, "C", 1), w(3, "C", 2), w(4, "A", 3)], {}, 10,
                 [InLine("C", False, 2, 1)], id="a-model-that-needs-no-load-is-not-in-line"),
    pytest.param([], {}, 10, [], id="empty"),
])
def test_load_order(queue: list[Waiter], priorities: dict[str, int], now: float, expected: list[InLine]) -> None:
    assert load_order(queue, lambda n: n != "A", lambda n: priorities.get(n, 0), now, 30.0) == expected


def c(model: str, last_used: float, load_seconds: float, gib: float = 1.0) -> Candidate:
    return Candidate(model, last_used, load_seconds, int(gib * G))


@pytest.mark.parametrize(("candidates", "chosen", "rival"), [
    pytest.param([c("a", 1, 2.0)], "a", None, id="one"),
    pytest.param([c("a", 1, 2.1, 4), c("b", 2, 0.4, 0.5)], "b", "a", id="smaller-and-much-faster-to-bring-back"),
    pytest.param([c("a", 1, 2.1, 1), c("b", 2, 0.4, 1)], "a", None, id="same-size-lru-a-cold-first-load-is-no-cost"),
    pytest.param([c("a", 1, 2.1, 1), c("b", 2, 0.4, 4)], "a", None, id="faster-but-larger-lru"),
    pytest.param([c("a", 1, 1.0, 4), c("b", 2, 0.6, 1)], "a", None, id="smaller-but-not-twice-as-fast-lru"),
    pytest.param([c("a", 1, 1.0, 4), c("b", 2, 0.5, 1)], "b", "a", id="half-the-time-is-enough"),
    pytest.param([c("a", 1, 3.0, 4), c("b", 2, 1.0, 2), c("c", 3, 0.5, 2)], "c", "a", id="the-fastest-of-the-cheaper"),
    pytest.param([c("a", 1, 3.0, 4), c("b", 2, 1.0, 2), c("c", 3, 1.0, 1)], "b", "a", id="equal-times-lru-first"),
    pytest.param([c("a", 1, 2.0, 4), c("b", 2, 0.0, 1)], "a", None, id="an-unknown-load-time-is-not-cheap"),
    pytest.param([c("a", 1, 2.0, 4), c("b", 2, 0.5, 0)], "a", None, id="an-unknown-size-is-not-cheap"),
    pytest.param([c("a", 1, 0.0, 4), c("b", 2, 1.0, 1)], "a", None, id="lru-unknown-stays-lru"),
])
def test_eviction_choice(candidates: list[Candidate], chosen: str, rival: str | None) -> None:
    pick, instead = eviction_choice(candidates)
    assert (pick.model, instead.model if instead else None) == (chosen, rival)


TWO = Limits(max_models=2, max_wait=1000.0)
SIZED = (spec("A", 4), spec("B", 1), spec("C", 1))  # A is four times B's size


PREFERENCE_SCENARIOS = [
    Scenario(
        "the-model-with-the-most-waiting-requests-loads-first",
        limits=ORDER,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Acquire(2, "B"), []),  # the oldest waiter, alone
            At(3, Acquire(3, "C"), []),
            At(4, Acquire(4, "C"), []),
            At(5, Release(1), [stop("A")]),
            At(6, exited("A"), [start("C")]),  # one load serves two requests
            At(7, loaded("C"), [grant(3, "C"), grant(4, "C")]),
            At(8, Release(3), []),
            At(9, Release(4), [stop("C")]),
            At(10, exited("C"), [start("B")]),
        ],
        final={"B": Status.LOADING, "C": Status.UNLOADED},
    ),
    Scenario(
        "a-request-that-waited-max-wait-is-not-overtaken-by-more-requests",
        limits=ORDER,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Acquire(2, "B"), []),
            At(3, Acquire(3, "C"), []),
            At(4, Acquire(4, "C"), []),
            At(32, Tick(), []),  # B's request waited 30 s: A, though busy, is drained for it...
            At(33, Release(1), [stop("A")]),  # ...and stops once its request is done
            At(34, exited("A"), [start("B")]),  # B first, though C has more requests waiting
        ],
        final={"B": Status.LOADING, "C": Status.UNLOADED},
    ),
    Scenario(
        "evicts-the-model-cheaper-to-bring-back-rather-than-the-lru-one",
        specs=SIZED,
        limits=TWO,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(5, loaded("A"), [grant(1, "A")]),  # A takes 5 s to load
            At(6, Acquire(2, "B"), [start("B")]),
            At(7, loaded("B"), [grant(2, "B")]),  # B 1 s
            At(8, Release(1), []),  # A is the least recently used...
            At(9, Release(2), []),
            At(10, Acquire(3, "C"), [stop("B")]),  # ...but B, a quarter of its size, loads in a fifth of its time
        ],
        final={"A": Status.LOADED, "B": Status.STOPPING},
    ),
    Scenario(
        "close-load-times-keep-lru",
        specs=SIZED,
        limits=TWO,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1.0, loaded("A"), [grant(1, "A")]),
            At(2, Acquire(2, "B"), [start("B")]),
            At(2.6, loaded("B"), [grant(2, "B")]),  # 0.6 s against 1 s: not clearly cheaper
            At(4, Release(1), []),
            At(5, Release(2), []),
            At(6, Acquire(3, "C"), [stop("A")]),
        ],
        final={"A": Status.STOPPING, "B": Status.LOADED},
    ),
    Scenario(
        "a-cheap-busy-model-is-never-the-victim",
        specs=SIZED,
        limits=TWO,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(5, loaded("A"), [grant(1, "A")]),
            At(6, Acquire(2, "B"), [start("B")]),
            At(7, loaded("B"), [grant(2, "B")]),
            At(8, Release(1), []),
            At(9, Acquire(3, "C"), [stop("A")]),  # B, busy, is not idle: A (idle) goes, slow to reload or not
        ],
        final={"A": Status.STOPPING, "B": Status.LOADED},
    ),
    Scenario(
        "the-fastest-load-counts-not-the-last",
        specs=SIZED,
        limits=TWO,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(5, loaded("A"), [grant(1, "A")]),
            At(6, Acquire(2, "B"), [start("B")]),
            At(7, loaded("B"), [grant(2, "B")]),  # B: 1 s
            At(8, Release(2), []),
            At(9, UnloadRequested("B"), [stop("B")]),
            At(10, exited("B"), []),
            At(11, Acquire(3, "B"), [start("B")]),
            At(15, loaded("B"), [grant(3, "B")]),  # 4 s this time (beside a busy disk, say)
            At(16, Release(1), []),
            At(17, Release(3), []),
            At(18, Acquire(4, "C"), [stop("B")]),  # its best, 1 s, is still a fifth of A's
        ],
        final={"A": Status.LOADED, "B": Status.STOPPING},
    ),
    Scenario(
        "a-reload-with-a-new-configuration-forgets-the-old-load-time",
        specs=SIZED,
        limits=TWO,
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(5, loaded("A"), [grant(1, "A")]),
            At(6, Acquire(2, "B"), [start("B")]),
            At(7, loaded("B"), [grant(2, "B")]),
            At(8, Release(1), []),
            At(9, Release(2), []),
            At(10, ModelChanged(spec("B", 1)), [stop("B")]),  # idle: restarts at once
            At(11, exited("B"), []),
            At(12, Acquire(4, "B"), [start("B")]),
            At(12, loaded("B"), [grant(4, "B")]),  # loaded in no measurable time: unknown, not cheap
            At(13, Release(4), []),
            At(14, Acquire(5, "C"), [stop("A")]),  # so A, the least recently used, goes
        ],
        final={"A": Status.STOPPING, "B": Status.LOADED},
    ),
]


@pytest.mark.parametrize("scenario", PREFERENCE_SCENARIOS, ids=[s.id for s in PREFERENCE_SCENARIOS])
def test_preference_scenario(scenario: Scenario) -> None:
    run_scenario(scenario)


# --- overlap: the next model loads while the one it replaces drains and stops (issue 12 point 2) ---------------

SWAP = Limits(max_models=1, memory_budget=10 * G, max_wait=1000.0)  # one slot, a 10 GiB budget

IDLE_A: list[Step] = [(Acquire(1, "A"), [start("A")]), (loaded("A"), [grant(1, "A")]), (Release(1), [])]


def swap_overlaps(id: str, specs: tuple[ModelSpec, ...], limits: Limits = SWAP) -> Scenario:
    """From A loaded and idle to B, where both fit: B's load starts in the step that stops A."""
    return Scenario(id, specs=specs, limits=limits, steps=[
        *IDLE_A, (Acquire(2, "B"), [stop("A"), start("B")]), (loaded("B"), [grant(2, "B")]), (exited("A"), [])],
        final={"A": Status.UNLOADED, "B": Status.LOADED})


def swap_waits(id: str, specs: tuple[ModelSpec, ...], limits: Limits = SWAP) -> Scenario:
    """From A loaded and idle to B, where A's slot or memory stays held until it has exited."""
    return Scenario(id, specs=specs, limits=limits, steps=[
        *IDLE_A, (Acquire(2, "B"), [stop("A")]), (Tick(), []), (exited("A"), [start("B")])],
        final={"A": Status.UNLOADED, "B": Status.LOADING})


OVERLAP_SCENARIOS = [
    swap_overlaps("overlap-the-next-load-starts-as-the-evicted-model-stops", (spec("A", 4), spec("B", 4))),
    # 12 GiB > 10: A holds its memory until it has exited
    swap_waits("overlap-not-when-both-do-not-fit-the-memory-budget", (spec("A", 6), spec("B", 6))),
    # nothing guards memory but --models-max: router mode's rule
    swap_waits("overlap-not-without-a-memory-budget", (spec("A", 4), spec("B", 4)),
               Limits(max_models=1, max_wait=1000.0)),
    swap_waits("overlap-not-when-the-next-models-footprint-is-unknown", (spec("A", 4), spec("B"))),
    # no --gpu-memory-budget: the GPU part of either is unguarded
    swap_waits("overlap-not-when-gpu-memory-has-no-budget", (gpu_spec("A", 1, 2), gpu_spec("B", 1, 2))),
    swap_overlaps("overlap-with-gpus-when-both-fit-each-budget", (gpu_spec("A", 1, 3), gpu_spec("B", 1, 3)),
                  Limits(max_models=1, memory_budget=10 * G, gpu_memory_budget=8 * G, max_wait=1000.0)),
    swap_waits("overlap-not-when-the-gpu-budget-cannot-hold-both", (gpu_spec("A", 1, 5), gpu_spec("B", 1, 5)),
               Limits(max_models=1, memory_budget=10 * G, gpu_memory_budget=8 * G, max_wait=1000.0)),
    Scenario(
        "overlap-a-busy-model-drained-past-max-wait-drains-beside-the-next-load",
        specs=(spec("A", 4), spec("B", 4)),
        limits=Limits(max_models=1, memory_budget=10 * G, max_wait=10.0),
        steps=[
            At(0, Acquire(1, "A"), [start("A")]),
            At(1, loaded("A"), [grant(1, "A")]),
            At(2, Acquire(2, "B"), []),  # A is busy: B waits, up to max-wait
            At(12, Tick(), [start("B")]),  # A drains (its request still runs) while B loads
            At(13, loaded("B"), [grant(2, "B")]),
            At(14, Release(1), [stop("A")]),
            At(15, exited("A"), []),
        ],
        final={"A": Status.UNLOADED, "B": Status.LOADED},
    ),
    Scenario(
        "overlap-a-stopping-model-holds-its-memory-for-a-third",
        specs=(spec("A", 4), spec("B", 4), spec("C", 4)),
        limits=Limits(max_models=2, memory_budget=10 * G, max_wait=1000.0),
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (Acquire(2, "B"), [start("B")]),
            (loaded("A"), [grant(1, "A")]),
            (loaded("B"), [grant(2, "B")]),
            (Release(1), []),  # A idle, B busy
            (Acquire(3, "C"), [stop("A")]),  # its slot is free, but 4 + 4 + 4 GiB > 10 until A has exited
            (exited("A"), [start("C")]),
        ],
        final={"A": Status.UNLOADED, "B": Status.LOADED, "C": Status.LOADING},
    ),
    Scenario(
        "overlap-a-stopping-model-wanted-again-waits-for-the-slot-like-any-other",
        specs=(spec("A", 4), spec("B", 4)),
        limits=SWAP,
        steps=[
            *IDLE_A,
            (Acquire(2, "B"), [stop("A"), start("B")]),
            (Acquire(3, "A"), []),  # for A's next instance; B holds the one slot
            (exited("A"), []),
            (loaded("B"), [grant(2, "B")]),
            (Release(2), [stop("B"), start("A")]),  # the swap back overlaps too
        ],
        final={"A": Status.LOADING, "B": Status.STOPPING},
        loads=3,
    ),
]


@pytest.mark.parametrize("scenario", OVERLAP_SCENARIOS, ids=[s.id for s in OVERLAP_SCENARIOS])
def test_overlap_scenario(scenario: Scenario) -> None:
    run_scenario(scenario)


@pytest.mark.parametrize(("status", "room", "wanted", "limits", "slots"), [
    (Status.STOPPING, Room(4 * G, 0, 1), Room(4 * G, 0, 1), SWAP, 0),  # both guarded: memory only
    (Status.LOADED, Room(4 * G, 0, 1), Room(4 * G, 0, 1), SWAP, 1),  # a loaded model holds its slot
    (Status.LOADING, Room(4 * G, 0, 1), Room(4 * G, 0, 1), SWAP, 1),
    (Status.STOPPING, Room(4 * G, 0, 1), Room(4 * G, 0, 1), Limits(max_models=1), 1),  # no memory budget
    (Status.STOPPING, Room(0, 0, 1), Room(4 * G, 0, 1), SWAP, 1),  # its footprint unknown
    (Status.STOPPING, Room(4 * G, 0, 1), Room(0, 0, 1), SWAP, 1),  # the wanted one's unknown
    (Status.STOPPING, Room(4 * G, G, 1), Room(4 * G, 0, 1), SWAP, 1),  # GPU memory, no GPU budget
    (Status.STOPPING, Room(4 * G, G, 1), Room(4 * G, G, 1), GB, 0),
])
def test_held_counts_a_stopping_models_slot_only_where_memory_is_unguarded(
    status: Status, room: Room, wanted: Room, limits: Limits, slots: int
) -> None:
    got = held(status, room, wanted, limits)
    assert (got.memory, got.gpu_memory, got.slots) == (room.memory, room.gpu_memory, slots)


def test_a_swap_that_overlaps_explains_the_load_and_the_eviction() -> None:
    sched = Scheduler([spec("A", 4), spec("B", 4)], SWAP)
    sched.handle(Acquire(1, "A"), 0)
    sched.handle(loaded("A"), 1)
    sched.handle(Release(1), 2)
    actions = sched.handle(Acquire(2, "B"), 3)
    assert [(d.kind, d.cause, d.model) for d in actions if isinstance(d, Decided)] == [
        (DecisionKind.EVICT, "lru", "A"), (DecisionKind.LOAD, "request", "B")]


# --- read-ahead: the first request to wait for a model's load has its files read (issue 12 point 2) -----------

def read_aheads(sched: Scheduler, steps: list[Event]) -> list[list[str]]:
    """For each event in turn, the models whose files the scheduler asks to read ahead."""
    return [[a.model for a in sched.handle(event, float(i)) if isinstance(a, ReadAhead)]
            for i, event in enumerate(steps)]


@pytest.mark.parametrize(("steps", "expected"), [
    # a cold load: read ahead as it starts, once for all its waiters
    ([Acquire(1, "A"), Acquire(2, "A"), loaded("A"), Acquire(3, "A")], [["A"], [], [], []]),
    # waiting for room (A busy, one slot): read ahead while it waits, once
    ([Acquire(1, "A"), loaded("A"), Acquire(2, "B"), Acquire(3, "B"), Release(1), exited("A")],
     [["A"], [], ["B"], [], [], []]),
    # autoload off: refused, nothing read
    ([Acquire(1, "A", autoload=False)], [[]]),
    # a failed model's next request reads it again (its next load)
    ([Acquire(1, "A"), exited("A", 1), Acquire(2, "A")], [["A"], [], ["A"]]),
    # a stopping model wanted again: its old child still maps the files, nothing to read
    ([Acquire(1, "A"), loaded("A"), Release(1), UnloadRequested("A"), Acquire(2, "A"), exited("A")],
     [["A"], [], [], [], [], []]),
])
def test_read_ahead_is_asked_once_when_a_request_starts_waiting_for_a_load(
    steps: list[Event], expected: list[list[str]]
) -> None:
    assert read_aheads(Scheduler(["A", "B"], max_models=1), steps) == expected


def test_read_ahead_comes_before_the_load_it_is_for() -> None:
    actions = Scheduler(["A"]).handle(Acquire(1, "A"), 0)
    kinds = [type(a).__name__ for a in actions if isinstance(a, (ReadAhead, StartLoad))]
    assert kinds == ["ReadAhead", "StartLoad"]


def _decided(actions: list[Action], kind: DecisionKind) -> list[tuple[str, str, str]]:
    return [(d.cause, d.model, d.reason) for d in actions if isinstance(d, Decided) and d.kind == kind]


def test_an_eviction_for_a_cheaper_reload_says_what_it_spared() -> None:
    sched = run_scenario(PREFERENCE_SCENARIOS[2])
    assert sched.models["B"].drain_reason == ("evicted to make room for 'C': it reloads in 1 s (1.00 GiB), rather "
                                              "than 'A' (least recently used, reloads in 5 s, 4.00 GiB); idle 1 s")
    actions = Scheduler(["A", "B"], max_models=1).handle(Acquire(1, "A"), 0.0)
    assert _decided(actions, DecisionKind.LOAD) == [("request", "A", "1 request(s) waiting")]


def test_an_eviction_that_spares_a_reload_by_size_says_so() -> None:
    sched = Scheduler([spec("A", 3), spec("B", 5), spec("C", 6)], MB)
    for now, event in [(0, Acquire(1, "A")), (1, LoadSucceeded("A")), (2, Acquire(2, "B")), (3, LoadSucceeded("B")),
                       (4, Release(1)), (5, Release(2))]:
        sched.handle(event, now)
    actions = sched.handle(Acquire(3, "C"), 6)
    assert _decided(actions, DecisionKind.EVICT) == [
        ("size", "B", "evicted to make room for 'C': stopping it makes room, where stopping 'A' (less recently used) "
                      "would not; idle 1 s")]


def test_a_load_that_overtakes_an_older_request_says_why() -> None:
    sched = Scheduler(["A", "B", "C"], ORDER)
    for now, event in [(0, Acquire(1, "A")), (1, LoadSucceeded("A")), (2, Acquire(2, "B")), (3, Acquire(3, "C")),
                       (4, Acquire(4, "C")), (5, Release(1))]:
        sched.handle(event, now)
    actions = sched.handle(InstanceExited("A", 0), 6)
    assert _decided(actions, DecisionKind.LOAD) == [
        ("request", "C", "2 request(s) waiting, the first for 3 s; ahead of 'B' (1 waiting, the first for 4 s): "
                         "more requests waiting")]


OVERTAKE_OPS = ("acquire", "acquire", "acquire", "release", "load_ok", "exit", "tick")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(OVERTAKE_OPS), st.integers(0, 11), st.just(True)), min_size=30,
                    max_size=80))
def test_random_queues_never_overtake_a_request_that_waited_max_wait(ops: list[tuple[str, int, bool]]) -> None:
    """Many requests over three models and one slot, with time passing: the queue where "most waiting
    requests first" and max-wait meet (`check_no_overtaking` runs after every step)."""
    sim = Sim(Scheduler(["A", "B", "C"], Limits(max_models=1, max_wait=8.0)), 1, drain_after_grant=True)
    for op, pick, flag in ops:
        sim.step(op, pick, flag)
    sim.settle()
    assert sim.waiting == set(), "\n".join(sim.log)


def test_max_models_and_max_queue_given_apart_keep_the_other_limits() -> None:
    limits = Limits(max_models=4, memory_budget=10 * G, gpu_memory_budget=8 * G, keep_alive=5.0, max_wait=7.0,
                    load_timeout=30.0)
    assert Scheduler(["A"], limits, max_models=1, max_queue=2).limits == Limits(
        max_models=1, max_queue=2, memory_budget=10 * G, gpu_memory_budget=8 * G, keep_alive=5.0, max_wait=7.0,
        load_timeout=30.0)
