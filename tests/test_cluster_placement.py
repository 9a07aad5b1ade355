"""Node placement (modelyard.cluster.placement): the rule as tables (loaded > loading > fits > evict > wait >
refuse, the single node's Retry-After, `avoid`, draining nodes, `replicas = N`), and properties over any
cluster state: a burst for one cold model loads it once, a model never goes to a node that cannot hold it,
the answer does not depend on the order the nodes are listed in, and what it predicts of a node is what that
node's own scheduler then does with the request (a real Scheduler after a random history)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modelyard.cluster.placement import (
    COLD,
    Choice,
    NodeState,
    Refusal,
    Send,
    dispatched,
    place,
    rendezvous,
    replica_loads,
    with_pending,
)
from modelyard.errors import ErrorKind
from modelyard.scheduler import (
    RUNNING,
    Acquire,
    Decided,
    DecisionKind,
    Grant,
    InstanceExited,
    Limits,
    LoadSucceeded,
    ModelSnapshot,
    ModelSpec,
    Reject,
    Release,
    Room,
    Scheduler,
    StartLoad,
    Status,
    UnloadRequested,
    overages,
    retry_after,
)

G = 2**30


def snap(name: str, status: Status = Status.UNLOADED, size: int = 1 * G, in_flight: int = 0, queued: int = 0,
         pinned: bool = False, last_used: float = 0.0) -> ModelSnapshot:
    return ModelSnapshot(name, status, in_flight, queued, last_used, None, "", size, 0, 0, 0, -1.0, None,
                         pinned=pinned)


def node(name: str, budget: int, *models: ModelSnapshot, max_models: int = 8, max_queue: int = 16,
         accepting: bool = True) -> NodeState:
    return NodeState(name, Limits(max_models=max_models, memory_budget=budget, max_queue=max_queue),
                     {m.name: m for m in models}, accepting)


def winner(model: str, *names: str) -> str:
    return max(names, key=lambda n: rendezvous(model, n))


def loser(model: str, *names: str) -> str:
    return min(names, key=lambda n: rendezvous(model, n))


# --- the order of the rule --------------------------------------------------------------------------------------

SENDS = [
    pytest.param([node("a", 8 * G, snap("m")), node("b", 8 * G, snap("m", Status.LOADED))], "b", Choice.LOADED,
                 id="loaded-beats-fits"),
    pytest.param([node("a", 8 * G, snap("m", Status.LOADED, in_flight=3)),
                  node("b", 8 * G, snap("m", Status.LOADED, in_flight=1))], "b", Choice.LOADED,
                 id="least-busy-replica"),
    pytest.param([node("a", 8 * G, snap("m", Status.LOADED, in_flight=1), snap("x", Status.LOADED, in_flight=4)),
                  node("b", 8 * G, snap("m", Status.LOADED, in_flight=1))], "b", Choice.LOADED,
                 id="equal-replicas-least-busy-node"),
    pytest.param([node("a", 8 * G, snap("m", Status.LOADED, in_flight=9)),
                  node("b", 8 * G, snap("m", Status.LOADING))], "a", Choice.LOADED,
                 id="a-busy-loaded-copy-beats-a-loading-one"),
    pytest.param([node("a", 8 * G, snap("m")), node("b", 8 * G, snap("m", Status.LOADING))], "b", Choice.LOADING,
                 id="loading-beats-fits"),
    pytest.param([node("a", 8 * G, snap("m")), node("b", 1 * G, snap("m", queued=2), snap("x", Status.LOADED))],
                 "b", Choice.AWAITED, id="awaited-beats-fits"),
    pytest.param([node("a", 1 * G, snap("m"), snap("x", Status.LOADED)), node("b", 8 * G, snap("m"))], "b",
                 Choice.FITS, id="fits-without-eviction-beats-evict"),
    pytest.param([node("a", 1 * G, snap("m"), snap("x", Status.LOADED, in_flight=1)),
                  node("b", 1 * G, snap("m"), snap("y", Status.LOADED))], "b", Choice.EVICT,
                 id="evict-idle-beats-wait"),
    pytest.param([node("a", 1 * G, snap("m"), snap("x", Status.STOPPING)), node("b", 1 * G, snap("m"),
                  snap("y", Status.LOADED))], "a", Choice.FITS, id="a-stopping-child-makes-room-without-eviction"),
    pytest.param([node("a", 1 * G, snap("m"), snap("x", Status.LOADED, in_flight=1)),
                  node("b", 1 * G, snap("m"), snap("y", Status.LOADED, pinned=True))], "a", Choice.WAIT,
                 id="wait-where-busy-models-will-finish-not-behind-a-pin"),
    pytest.param([node("a", 1 * G, snap("m"), snap("x", Status.LOADED, queued=1)),
                  node("b", 1 * G, snap("m"), snap("y", Status.LOADED, in_flight=2))], None, Choice.WAIT,
                 id="a-model-with-waiters-is-not-idle"),
    pytest.param([node("a", 8 * G, snap("m", size=9 * G)), node("b", 16 * G, snap("m", size=9 * G))], "b",
                 Choice.FITS, id="too-big-for-one-node-lands-on-the-other"),
    pytest.param([node("a", 8 * G, snap("x")), node("b", 8 * G, snap("m"))], "b", Choice.FITS,
                 id="only-nodes-that-serve-it"),
    pytest.param([node("a", 8 * G, snap("m"), accepting=False), node("b", 1 * G, snap("m"), snap("x", Status.LOADED))],
                 "b", Choice.EVICT, id="never-a-draining-node"),
    pytest.param([node("a", 8 * G, snap("m", Status.LOADED), max_queue=0), node("b", 8 * G, snap("m"))], "a",
                 Choice.LOADED, id="a-loaded-model-needs-no-queue-room"),
    pytest.param([node("a", 8 * G, snap("m", Status.LOADING, queued=1), max_queue=1), node("b", 8 * G, snap("m")),
                  node("c", 8 * G, snap("m"), snap("x", Status.LOADED, queued=1), max_queue=1)], "b", Choice.FITS,
                 id="a-full-queue-is-skipped"),
    pytest.param([node("a", 8 * G, snap("m", Status.FAILED)), node("b", 8 * G, snap("m", Status.FAILED)),
                  node("c", 8 * G, snap("m"))], "c", Choice.FITS, id="not-where-its-load-failed"),
    pytest.param([node("a", 8 * G, snap("m", Status.FAILED))], "a", Choice.FITS,
                 id="where-it-failed-if-nowhere-else"),
]


@pytest.mark.parametrize(("nodes", "expected", "choice"), SENDS)
def test_place_sends(nodes: list[NodeState], expected: str | None, choice: Choice) -> None:
    decision = place(nodes, "m")
    assert isinstance(decision, Send), decision
    assert decision.choice == choice
    assert decision.node == (expected or winner("m", *(n.node for n in nodes)))
    assert decision.reason


@pytest.mark.parametrize("choice", [Choice.FITS, Choice.EVICT, Choice.WAIT])
def test_cold_model_goes_to_the_hash_winner_of_its_tier(choice: Choice) -> None:
    """Of nodes in the same tier the hash decides, and it is the model's, not the list's: two models spread."""
    def cluster(model: str) -> list[NodeState]:
        other = {Choice.FITS: [], Choice.EVICT: [snap("x", Status.LOADED)],
                 Choice.WAIT: [snap("x", Status.LOADED, in_flight=1)]}[choice]
        return [node(n, 1 * G if other else 8 * G, snap(model), *other) for n in "abcdef"]
    chosen = set()
    for model in ("m", "n", "o", "p", "q"):
        decision = place(cluster(model), model)
        assert isinstance(decision, Send)
        assert (decision.choice, decision.node) == (choice, winner(model, *"abcdef"))
        chosen.add(decision.node)
    assert len(chosen) > 1


REFUSALS = [
    pytest.param([node("a", 8 * G, snap("x"))], {}, ErrorKind.UNKNOWN_MODEL, None, id="no-node-serves-it"),
    pytest.param([node("a", 8 * G, snap("m", size=9 * G)), node("b", 4 * G, snap("m", size=9 * G))], {},
                 ErrorKind.TOO_BIG, None, id="too-big-for-every-node"),
    pytest.param([node("a", 2 * G, snap("m"), snap("p", Status.LOADED, size=2 * G, pinned=True))], {},
                 ErrorKind.TOO_BIG, None, id="pins-never-make-way"),
    pytest.param([node("a", 8 * G, snap("m"), snap("x", Status.LOADED, queued=4), max_queue=4)], {},
                 ErrorKind.QUEUE_FULL, retry_after(ErrorKind.QUEUE_FULL), id="every-queue-full"),
    pytest.param([node("a", 8 * G, snap("m"), accepting=False)], {}, ErrorKind.SHUTTING_DOWN,
                 retry_after(ErrorKind.SHUTTING_DOWN), id="every-node-draining"),
    pytest.param([node("a", 8 * G, snap("m", Status.LOADED)), node("b", 8 * G, snap("m"), accepting=False)],
                 {"avoid": frozenset({"a"})}, ErrorKind.UPSTREAM, None, id="every-node-failed-it"),
    pytest.param([node("a", 8 * G, snap("m"))], {"autoload": False}, ErrorKind.NOT_LOADED, None,
                 id="autoload-off-and-not-running"),
]


@pytest.mark.parametrize(("nodes", "options", "kind", "retry"), REFUSALS)
def test_place_refuses(nodes: list[NodeState], options: Mapping[str, object], kind: ErrorKind,
                       retry: float | None) -> None:
    decision = place(nodes, "m", **options)  # type: ignore[arg-type]
    assert isinstance(decision, Refusal), decision
    assert (decision.kind, decision.retry_after) == (kind, retry)
    assert "'m'" in decision.message
    assert decision.error().kind == kind


def test_queue_full_answers_with_the_single_nodes_retry_after() -> None:
    """The cluster's Retry-After is the one a single node sends for a full queue, not a copy of its value."""
    single = Scheduler([ModelSpec("m"), ModelSpec("x")], Limits(max_models=1, max_queue=1))
    single.handle(Acquire(1, "x"), 0.0)
    single.handle(LoadSucceeded("x"), 0.0)  # x leased to request 1
    single.handle(Acquire(2, "m"), 0.0)  # waits for x's slot
    rejected = [a for a in single.handle(Acquire(3, "m"), 0.0) if type(a).__name__ == "Reject"]
    cluster = place([NodeState.of("a", single.board())], "m")
    assert isinstance(cluster, Refusal)
    assert (cluster.kind, cluster.retry_after) == (rejected[0].kind, rejected[0].retry_after)  # type: ignore[attr-defined]


def test_too_big_names_each_nodes_budget() -> None:
    decision = place([node("a", 8 * G, snap("m", size=9 * G)), node("b", 4 * G, snap("m", size=9 * G))], "m")
    assert isinstance(decision, Refusal)
    assert "a: needs 9.00 GiB of memory, budget 8.00 GiB" in decision.message
    assert "b: needs 9.00 GiB of memory, budget 4.00 GiB" in decision.message


def test_avoid_sends_a_retry_elsewhere() -> None:
    nodes = [node("a", 8 * G, snap("m", Status.LOADED)), node("b", 8 * G, snap("m"))]
    assert place(nodes, "m") == Send("a", "m", Choice.LOADED, place(nodes, "m").reason)  # type: ignore[union-attr]
    retry = place(nodes, "m", avoid=frozenset({"a"}))
    assert isinstance(retry, Send) and (retry.node, retry.choice) == ("b", Choice.FITS)


def test_autoload_off_still_routes_to_a_running_copy() -> None:
    for status, choice in ((Status.LOADED, Choice.LOADED), (Status.LOADING, Choice.LOADING)):
        decision = place([node("a", 8 * G, snap("m")), node("b", 8 * G, snap("m", status))], "m", autoload=False)
        assert isinstance(decision, Send) and (decision.node, decision.choice) == ("b", choice)


def test_node_state_of_a_scheduler_board() -> None:
    """An agent publishes its scheduler's board as is: the sizes and statuses there are what placement reads."""
    single = Scheduler([ModelSpec("m", footprint=3 * G), ModelSpec("x", footprint=3 * G)],
                       Limits(memory_budget=4 * G))
    single.handle(Acquire(1, "x"), 0.0)
    single.handle(LoadSucceeded("x"), 0.0)
    state = NodeState.of("a", single.board())
    assert state.models["x"].status == Status.LOADED and state.models["x"].in_flight == 1
    assert state.busy == 1 and not state.queue_full
    decision = place([state, node("b", 8 * G, snap("m", size=3 * G))], "m")
    assert isinstance(decision, Send) and (decision.node, decision.choice) == ("b", Choice.FITS)


# --- the ingress's own book between publications ------------------------------------------------------------------

def test_dispatched_counts_the_request_and_starts_the_load_it_caused() -> None:
    a = node("a", 8 * G, snap("m"))
    after = dispatched(a, "m")
    assert (after.models["m"].status, after.models["m"].queued) == (Status.LOADING, 1)
    tight = node("b", 1 * G, snap("m"), snap("x", Status.LOADED))
    after = dispatched(tight, "m")
    assert (after.models["m"].status, after.models["m"].queued) == (Status.UNLOADED, 1)  # waits for eviction
    assert place([after, node("c", 1 * G, snap("m"), snap("y", Status.LOADED))], "m").node == "b"  # type: ignore[union-attr]


def test_with_pending_applies_the_requests_the_publication_does_not_show_yet() -> None:
    """The book (the requests sent there and not finished) and the node's own counts hold each request once:
    one the node shows waiting or in flight is not applied again."""
    published = node("a", 8 * G, snap("m"), snap("x", Status.LOADED, in_flight=1), snap("y", Status.LOADING, queued=2),
                     max_queue=3)
    view = with_pending(published, {"m": 3, "x": 1, "y": 3, "gone": 2})  # a model the node no longer serves: ignored
    assert (view.models["m"].status, view.models["m"].queued) == (Status.LOADING, 3)  # none of them there yet
    assert view.models["x"] == published.models["x"]  # the one in flight there is the one sent
    assert view.models["y"].queued == 3  # two wait there, one is on its way
    assert set(view.models) == {"m", "x", "y"}
    assert with_pending(published, {}) == published
    assert not with_pending(published, {"y": 2, "x": 1}).queue_full  # what the node shows is all there is


def test_a_burst_spreads_over_loaded_replicas() -> None:
    nodes = [node(n, 8 * G, snap("m", Status.LOADED)) for n in "abc"]
    seen = []
    for _ in range(6):
        decision = place(nodes, "m")
        assert isinstance(decision, Send)
        seen.append(decision.node)
        nodes = [dispatched(n, "m") if n.node == decision.node else n for n in nodes]
    assert sorted(seen) == ["a", "a", "b", "b", "c", "c"]


# --- replicas = N -------------------------------------------------------------------------------------------------

def test_replicas_start_where_they_fit_then_by_evicting_never_waiting() -> None:
    nodes = [node("a", 8 * G, snap("m", Status.LOADED)), node("b", 8 * G, snap("m")),
             node("c", 1 * G, snap("m"), snap("x", Status.LOADED)),
             node("d", 1 * G, snap("m"), snap("y", Status.LOADED, in_flight=1)),
             node("e", 8 * G, snap("m"), accepting=False)]
    assert [(s.node, s.choice) for s in replica_loads(nodes, "m", 5)] == [("b", Choice.FITS), ("c", Choice.EVICT)]
    assert [(s.node, s.choice) for s in replica_loads(nodes, "m", 2)] == [("b", Choice.FITS)]
    assert replica_loads(nodes, "m", 1) == []
    many = [node(n, 8 * G, snap("m")) for n in "pqrs"]
    assert [s.node for s in replica_loads(many, "m", 2)] == sorted("pqrs", key=lambda n: -rendezvous("m", n))[:2]
    assert loser("m", *"pqrs") not in [s.node for s in replica_loads(many, "m", 3)]


# --- properties over any cluster state ----------------------------------------------------------------------------

@st.composite
def clusters(draw: st.DrawFn) -> list[NodeState]:
    """2-5 nodes, each serving most of models m0-m3 (sizes per node differ: another GPU offload, another
    estimate), some running, busy, waiting, pinned, stopping or failed; budgets of 1-8 GiB, 1-4 model slots.
    Only states a node's scheduler can be in: what runs there fits its budgets, and nothing waits there for a
    model that can never fit (it refuses those at once)."""
    nodes = []
    for index in range(draw(st.integers(2, 5))):
        limits = Limits(max_models=draw(st.integers(1, 4)), memory_budget=draw(st.integers(1, 8)) * G,
                        max_queue=draw(st.sampled_from([4, 64])))
        models: list[ModelSnapshot] = []
        for name in ("m0", "m1", "m2", "m3"):
            if draw(st.integers(0, 4)) == 0:
                continue
            size = draw(st.integers(1, 6)) * G // 2
            status = draw(st.sampled_from(list(Status)))
            held = sum((m.room for m in models if m.status in RUNNING), Room())
            if status in RUNNING and overages(held + Room(size, 0, 1), limits):
                status = Status.UNLOADED
            running = status in (Status.LOADED, Status.STOPPING)
            too_big = bool(overages(Room(size, 0, 1), limits))
            models.append(snap(name, status, size=size,
                               in_flight=draw(st.integers(0, 3)) if running else 0,
                               queued=draw(st.integers(0, 2)) if status != Status.STOPPING and not too_big else 0,
                               pinned=draw(st.booleans()) and status == Status.LOADED,
                               last_used=draw(st.floats(0, 100))))
        nodes.append(NodeState(f"node-{index}", limits, {m.name: m for m in models}, draw(st.integers(0, 5)) > 0))
    return nodes


def _could_ever_hold(state: NodeState, model: str) -> bool:
    pinned = sum((m.room for m in state.models.values() if m.pinned and m.name != model
                  and m.status in (Status.LOADING, Status.LOADED)), Room())
    return not overages(pinned + state.models[model].room, state.limits)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=clusters(), model=st.sampled_from(["m0", "m1", "m2", "m3"]), burst=st.integers(2, 12),
       avoid=st.sets(st.sampled_from([f"node-{i}" for i in range(5)]), max_size=2))
def test_placement_properties(nodes: list[NodeState], model: str, burst: int, avoid: set[str]) -> None:
    by_name = {n.node: n for n in nodes}
    first = place(nodes, model, avoid=frozenset(avoid))
    # the answer is the nodes', not their order's
    assert place(list(reversed(nodes)), model, avoid=frozenset(avoid)) == first
    if isinstance(first, Refusal):
        return
    chosen = by_name[first.node]
    # never a node that cannot serve it: not its catalog, draining, already failed this request, or too small
    assert model in chosen.models and chosen.accepting and first.node not in avoid
    assert _could_ever_hold(chosen, model)
    if first.choice != Choice.LOADED:
        assert not chosen.queue_full
    # a burst of requests placed one after another from the same view (each seeing the ones before it) loads
    # the model only where it is not running, and only if no node that has it running or awaited can take
    # the request: a burst for a cold model loads it once until that node's queue is full
    view = list(nodes)
    loads = 0
    for _ in range(burst):
        decision = place(view, model, avoid=frozenset(avoid))
        if isinstance(decision, Refusal):
            assert decision.kind == ErrorKind.QUEUE_FULL
            break
        if decision.choice in COLD:
            loads += 1
            started = [n for n in view if model in n.models and n.accepting and n.node not in avoid
                       and (n.models[model].status in (Status.LOADING, Status.LOADED)
                            or (n.models[model].queued and _could_ever_hold(n, model)))]
            assert all(n.queue_full and n.models[model].status != Status.LOADED for n in started)
        view = [dispatched(n, model) if n.node == decision.node else n for n in view]
    if not any(n.queue_full for n in view):
        assert loads <= 1


@settings(max_examples=200, deadline=None)
@given(nodes=clusters(), pending=st.dictionaries(st.sampled_from(["m0", "m1", "m2", "m3"]), st.integers(0, 6)))
def test_the_book_counts_what_the_node_does_not_show(nodes: list[NodeState], pending: dict[str, int]) -> None:
    """A model's requests in the view are the node's own count or the book's, whichever is more."""
    view = with_pending(nodes[0], pending)
    for name, shown in nodes[0].models.items():
        seen = view.models[name]
        assert seen.queued + seen.in_flight == max(shown.queued + shown.in_flight, pending.get(name, 0))


# --- one node: placement reads a node as its own scheduler decides ------------------------------------------------

@st.composite
def scheduler_states(draw: st.DrawFn) -> Scheduler:
    """A single node's scheduler after a random history (requests, loads, releases, unloads, and the shell's
    reports of loads done and children gone)."""
    specs = [ModelSpec(f"m{i}", footprint=draw(st.integers(1, 3)) * G, pinned=draw(st.integers(0, 6)) == 0)
             for i in range(4)]
    limits = Limits(max_models=draw(st.integers(1, 3)), memory_budget=draw(st.sampled_from([0, 3 * G, 4 * G])),
                    max_queue=64)
    scheduler = Scheduler(specs, limits)
    leases: list[int] = []
    ops = st.tuples(st.sampled_from(["acquire", "acquire", "release", "release", "unload", "settle"]),
                    st.integers(0, 3))
    for rid, (kind, index) in enumerate(draw(st.lists(ops, max_size=30)), start=1):
        name, now = f"m{index}", float(rid)
        if kind == "acquire":
            grants = [a for a in scheduler.handle(Acquire(rid, name), now) if isinstance(a, Grant)]
            leases += [g.request_id for g in grants]
        elif kind == "release" and leases:
            scheduler.handle(Release(leases.pop(index % len(leases))), now)
        elif kind == "unload" and scheduler.models[name].status in (Status.LOADING, Status.LOADED):
            scheduler.handle(UnloadRequested(name), now)
        # the shell's reports: loads done, stopped children gone (each only sometimes, so that loading and
        # stopping models stay in the states too)
        for model in list(scheduler.models.values()):
            if kind == "settle" or draw(st.booleans()):
                if model.status == Status.LOADING:
                    actions = scheduler.handle(LoadSucceeded(model.name), now)
                    leases += [a.request_id for a in actions if isinstance(a, Grant)]
                elif model.status == Status.STOPPING and model.in_flight == 0:
                    scheduler.handle(InstanceExited(model.name, 0), now)
    return scheduler


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(scheduler=scheduler_states(), model=st.sampled_from(["m0", "m1", "m2", "m3"]))
def test_placement_agrees_with_the_nodes_scheduler(scheduler: Scheduler, model: str) -> None:
    """What placement predicts of a node is what that node's scheduler then does with the request: served at
    once where loaded, a load started or a stop awaited where it fits, idle models evicted where they must make
    room, waiting where only busy ones could, refused as the node would refuse it."""
    # requests waiting only for models already loading: none of them competes with `model` for room (a model
    # waiting for room ahead of it would get it first, which a node publishes as that model being awaited)
    assume(all(scheduler.models[w.model].status == Status.LOADING for w in scheduler.queue))
    decision = place([NodeState.of("a", scheduler.board())], model)
    own_stopping = scheduler.models[model].status == Status.STOPPING and scheduler.models[model].in_flight == 0
    actions = scheduler.handle(Acquire(10_000, model), 100.0)
    granted = any(isinstance(a, Grant) for a in actions)
    loads = [a for a in actions if isinstance(a, StartLoad) and a.model == model]
    evicted = [a for a in actions if isinstance(a, Decided) and a.kind == DecisionKind.EVICT]
    rejected = [a for a in actions if isinstance(a, Reject)]
    if own_stopping and not evicted and isinstance(decision, Send) and decision.choice == Choice.EVICT:
        # the model's own child is still on its way out: the node makes room for the new one once it has gone
        # (it could not start a second child of the model before that anyway), not at once
        evicted = [a for a in scheduler.handle(InstanceExited(model, 0), 101.0)
                   if isinstance(a, Decided) and a.kind == DecisionKind.EVICT]
    if isinstance(decision, Refusal):
        assert [r.kind for r in rejected] == [decision.kind]
        return
    assert not rejected
    # (granted, load started, idle models evicted); None: either. A model that fits starts now, or once children
    # already stopping are gone; one that evicts starts beside the evicted one when the budgets guard both
    # (scheduler.held), else once it has exited
    expected = {Choice.LOADED: (True, False, False), Choice.LOADING: (False, False, False),
                Choice.FITS: (False, None, False), Choice.EVICT: (False, None, True),
                Choice.WAIT: (False, False, False)}[decision.choice]
    assert granted == expected[0]
    if expected[1] is not None:
        assert bool(loads) == expected[1]
    assert bool(evicted) == expected[2]
