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
from dataclasses import dataclass, field
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
    Event,
    Grant,
    InstanceExited,
    LoadSucceeded,
    ModelAdded,
    ModelChanged,
    ModelRemoved,
    Reject,
    Release,
    Scheduler,
    Shutdown,
    StartLoad,
    Status,
    StatusChanged,
    StopInstance,
    UnloadRequested,
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
            case Grant(request_id=rid, model=model):
                out.append(("grant", rid, model))
            case Reject(request_id=rid, kind=kind):
                out.append(("reject", rid, kind))
            case StatusChanged():
                pass
    return out


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


Step = tuple[Event, list[Summary] | set[Summary]]


@dataclass
class Scenario:
    """Steps run at now = 0, 1, 2, ...; a list expects exactly those actions in order, a set in any order."""

    id: str
    steps: list[Step]
    final: dict[str, Status | None] = field(default_factory=dict)
    models: tuple[str, ...] = ("A", "B", "C")
    max_models: int = 1
    max_queue: int = 1024


def run_scenario(scenario: Scenario) -> Scheduler:
    sched = Scheduler(list(scenario.models), max_models=scenario.max_models, max_queue=scenario.max_queue)
    for now, (event, expected) in enumerate(scenario.steps):
        got = summarize(sched.handle(event, float(now)))
        if isinstance(expected, set):
            assert Counter(got) == Counter(expected), f"step {now}: {event}"
        else:
            assert got == expected, f"step {now}: {event}"
        assert scenario.max_models <= 0 or sched.running_count() <= scenario.max_models, f"step {now}: {event}"
    for name, status in scenario.final.items():
        if status is ABSENT:
            assert name not in sched.models
        else:
            assert sched.models[name].status == status, name
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
            (ModelChanged("A"), [stop("A")]),
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
            (ModelAdded("Z"), []),
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
            (ModelChanged("A"), [stop("A")]),
            (exited("A"), []),
        ],
        final={"A": Status.UNLOADED},
    ),
    Scenario(
        "model-changed-busy-waits-for-release",
        steps=[
            (Acquire(1, "A"), [start("A")]),
            (loaded("A"), [grant(1, "A")]),
            (ModelChanged("A"), []),
            (Acquire(2, "A"), []),
            (Release(1), [stop("A")]),
            (exited("A"), [start("A")]),
            (loaded("A"), [grant(2, "A")]),
        ],
        final={"A": Status.LOADED},
    ),
    Scenario(
        "model-changed-not-running-is-a-no-op",
        steps=[(ModelChanged("A"), [])],
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
            (ModelAdded("F"), []),
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
    sched.handle(ModelAdded("A"), 4.0)  # e.g. the config file was restored before the child exited
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

OPS = ("acquire", "acquire", "acquire", "release", "cancel", "load_ok", "exit", "unload", "change", "tick")


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
            assert sched.running_count() <= self.max_models, where
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
                case Grant(request_id=rid, model=model):
                    assert rid in self.waiting, f"grant for a request not waiting: {rid}\n{where}"
                    assert sched.models[model].status == Status.LOADED, where
                    assert rid in sched.models[model].leases, where
                    self.waiting.discard(rid)
                    self.leases[rid] = model
                    self.outcomes[rid] += 1
                case Reject(request_id=rid):
                    assert rid in self.waiting, f"reject for a request not waiting: {rid}\n{where}"
                    self.waiting.discard(rid)
                    self.outcomes[rid] += 1
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
        elif op == "exit" and (running := self.models_in(*RUNNING)):
            name = running[pick % len(running)]
            if self.sched.models[name].status == Status.STOPPING:
                self.feed(InstanceExited(name, 0))
            elif flag:  # a crash (or a failed load)
                self.crash(name)
        elif op == "unload" and (live := self.models_in(Status.LOADING, Status.LOADED)):
            self.feed(UnloadRequested(live[pick % len(live)]))
        elif op == "change":
            self.feed(ModelChanged(names[pick % len(names)]))
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
            elif stopping := self.models_in(Status.STOPPING):
                self.feed(InstanceExited(stopping[0], 0))
            elif loading := self.models_in(Status.LOADING):
                self.feed(LoadSucceeded(loading[0]))
            else:
                return
        raise AssertionError("no quiescence after 1000 steps\n" + "\n".join(self.log))


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
    assert sim.sched.running_count() <= max_models, where
    assert not sim.models_in(Status.LOADING, Status.STOPPING), where


def test_waiter_without_autoload_is_refused_when_its_load_is_stopped() -> None:
    sched = Scheduler(["A"], max_models=1)
    sched.handle(Acquire(1, "A"), 0.0)  # autoload on: starts the load
    sched.handle(Acquire(2, "A", autoload=False), 0.5)  # joins the load in progress
    sched.handle(ModelChanged("A"), 1.0)  # the load is stopped (to restart with the new configuration)
    actions = sched.handle(InstanceExited("A", -15), 2.0)
    rejected = [a for a in actions if isinstance(a, Reject)]
    assert [(a.request_id, a.kind) for a in rejected] == [(2, ErrorKind.NOT_LOADED)]
    assert [a.model for a in actions if isinstance(a, StartLoad)] == ["A"]  # request 1 still gets its model
