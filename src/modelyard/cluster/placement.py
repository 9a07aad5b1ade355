"""Node placement: which node of a cluster serves a request for a model (docs/cluster.md, issue 13). Not to be
confused with modelyard.placement, which places one node's children on its CPU cores.

A pure rule over what each node's agent publishes of itself (`NodeState`: its budgets and `--max-queue`, and
every model it can serve as its own scheduler sees it, so that a model's size is its size *on that node*, its
estimate or what its child was measured using there). `place` answers one request, in the issue's order:

1. a node where the model is loaded, the least busy first; else one where it is loading, or where requests
   already wait for it (`Choice.LOADED`, `LOADING`, `AWAITED`): a model is never loaded twice for one burst;
2. a node where it fits without evicting anything (`FITS`), chosen by a rendezvous hash of the model id over
   those nodes: every request for one cold model picks the same node, even from views a few pushes apart
   (Serve's multiplexing routed two requests 200 ms apart to two replicas, each loading the model: issue 13);
3. a node where it fits once idle models there stop (`EVICT`), by the same hash; the node's own scheduler picks
   which (least recently used, or clearly cheaper to bring back: scheduler.eviction_choice), as on one node;
4. a node where it could fit once busy models there finish (`WAIT`), by the same hash: the request waits in that
   node's queue, under its own max-wait, exactly as on one node;
else a refusal (`Refusal`): no node can ever hold it (TOO_BIG, naming the sizes), or every node that could has
its queue full (QUEUE_FULL, with the single node's Retry-After: scheduler.retry_after).

A request is sent only to a node that serves the model, is not draining, is not in `avoid` (the nodes that
already failed this request: its retry goes elsewhere), and has room in its queue (a model being granted
there at once needs none). Between two publications of a node the ingress keeps its own book of what it sent
there (`dispatched`), so that a burst placed from one view sees its own first load; a request counts in the book
only while the node's publication does not show it yet (`with_pending`), never twice. `replica_loads` says where
extra copies of a model whose preset asks for `replicas = N` start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from modelyard.errors import ErrorKind, ModelError
from modelyard.memory import describe
from modelyard.scheduler import (
    RUNNING,
    Board,
    Limits,
    ModelSnapshot,
    Room,
    Status,
    fits_beside,
    held_room,
    pinned_in_the_way,
    retry_after,
)


@dataclass(frozen=True)
class NodeState:
    """What one node's agent publishes: its id (Ray's node id), its limits, and every model it can serve
    (its catalog) as its scheduler sees it. `accepting` is False once the agent drains. `replicas`: the
    models whose preset there asks for more than one copy in the cluster (`replicas = N`), and N."""

    node: str
    limits: Limits
    models: Mapping[str, ModelSnapshot]
    accepting: bool = True
    replicas: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, node: str, board: Board, accepting: bool = True,
           replicas: Mapping[str, int] | None = None) -> NodeState:
        """A node's state from its manager's scheduler board (the queue itself stays on the node: each
        model's snapshot counts its waiting requests)."""
        return cls(node, board.limits, dict(board.models), accepting, dict(replicas or {}))

    @property
    def queued(self) -> int:
        return sum(m.queued for m in self.models.values())

    @property
    def busy(self) -> int:
        """Requests in flight and waiting on the node, over all its models."""
        return sum(m.in_flight + m.queued for m in self.models.values())

    @property
    def queue_full(self) -> bool:
        """The node refuses one more waiting request (scheduler: a request for a model not loaded there waits,
        and with `max_queue` already waiting it is refused)."""
        return self.queued >= self.limits.max_queue

    def others(self, model: str) -> list[ModelSnapshot]:
        return [m for name, m in self.models.items() if name != model]


class Choice(StrEnum):
    """Why a node was chosen (a few fixed words, for metrics labels and the decision log)."""

    LOADED = "loaded"
    LOADING = "loading"
    AWAITED = "awaited"  # requests already wait there for its load
    FITS = "fits"
    EVICT = "evict"
    WAIT = "wait"


COLD = (Choice.FITS, Choice.EVICT, Choice.WAIT)  # the choices that make the node load the model


@dataclass(frozen=True)
class Send:
    """Send the request to `node`; `reason` is a sentence for the decision log."""

    node: str
    model: str
    choice: Choice
    reason: str


@dataclass(frozen=True)
class Refusal:
    """Answer the request with this error (the single node's kinds and Retry-After)."""

    kind: ErrorKind
    message: str
    retry_after: float | None = None

    def error(self) -> ModelError:
        return ModelError(self.kind, self.message, self.retry_after)


def rendezvous(model: str, node: str) -> int:
    """The model's weight on the node (highest random weight hashing): the same on every process, unlike
    hash(), so that every ingress and every view of the cluster ranks the nodes alike for one model, and a node
    joining or leaving moves only the models it wins or held."""
    return int.from_bytes(hashlib.blake2b(f"{model}\0{node}".encode(), digest_size=8).digest(), "big")


def _ranked(model: str, nodes: Iterable[NodeState]) -> list[NodeState]:
    """`nodes` in the order the hash gives them for `model`, those where its last load did not fail first (a
    file broken on one node must not keep every request for it there)."""
    return sorted(nodes, key=lambda n: (n.models[model].status != Status.FAILED, rendezvous(model, n.node)),
                  reverse=True)


def _by_hash(model: str, nodes: Iterable[NodeState]) -> NodeState | None:
    return next(iter(_ranked(model, nodes)), None)


def _fits(node: NodeState, model: ModelSnapshot, freed: Room) -> bool:
    """Whether `model` fits beside what runs on `node` once `freed` is handed back (scheduler.fits_beside, the
    node's own admission rule). The model's own running instance, if any, is not counted twice."""
    return fits_beside((m for m in node.others(model.name) if m.status in RUNNING), model.room, freed, node.limits)


def _leaving(node: NodeState, model: ModelSnapshot) -> Room:
    """What children already stopping there will hand back (no new eviction needed), unless wanted again
    (scheduler.held_room: a stopping model's slot may already be free, its memory is not)."""
    return held_room((m for m in node.others(model.name) if m.status == Status.STOPPING and m.queued == 0),
                     model.room, node.limits)


def _fits_now(node: NodeState, model: str) -> bool:
    """It fits there with no new eviction (children already stopping count as gone)."""
    snapshot = node.models[model]
    return _fits(node, snapshot, _leaving(node, snapshot))


def _fits_evicting(node: NodeState, model: str) -> bool:
    """It fits there once the idle models there stop too."""
    snapshot = node.models[model]
    idle = sum((m.room for m in idle_models(node, model)), Room())  # all of it, as the scheduler's evictions free
    return _fits(node, snapshot, _leaving(node, snapshot) + idle)


def idle_models(node: NodeState, model: str) -> list[ModelSnapshot]:
    """The models the node's scheduler may stop to make room for `model` without waiting: loaded, no request
    in flight or waiting, not pinned; the least recently used first, as the scheduler ranks them."""
    idle = [m for m in node.others(model)
            if m.status == Status.LOADED and m.in_flight == 0 and m.queued == 0 and not m.pinned]
    return sorted(idle, key=lambda m: m.last_used)


def _never_fits(node: NodeState, model: ModelSnapshot) -> str:
    """Why `model` cannot be held on `node` however long it waits (pinned models there never make way), or
    "": the node-level form of the scheduler's too-big refusal (a model running there is never refused)."""
    if model.status in RUNNING:
        return ""
    pins, over = pinned_in_the_way(node.others(model.name), model.room, node.limits)
    if not over:
        return ""
    first = over[0]
    held = " with its pinned models" if pins else ""
    if first.kind == "model slots":
        return f"{node.node}: all {first.limit} model slots are held by pinned models"
    return f"{node.node}: needs {describe(first.need)} of {first.kind}{held}, budget {describe(first.limit)}"


def place(nodes: Sequence[NodeState], model: str, *, autoload: bool = True,
          avoid: frozenset[str] = frozenset()) -> Send | Refusal:
    """Where the request for `model` goes (the module's rule), or why it cannot go anywhere."""
    serving = [n for n in nodes if model in n.models]
    if not serving:
        return Refusal(ErrorKind.UNKNOWN_MODEL, f"model '{model}' not found")
    accepting = [n for n in serving if n.accepting]
    if not accepting:
        return Refusal(ErrorKind.SHUTTING_DOWN, f"model '{model}': every node that serves it is shutting down",
                       retry_after(ErrorKind.SHUTTING_DOWN))
    open_ = [n for n in accepting if n.node not in avoid]
    if not open_:
        tried = ", ".join(sorted(n.node for n in accepting))
        return Refusal(ErrorKind.UPSTREAM, f"model '{model}': every node that serves it failed this request ({tried})")

    loaded = [n for n in open_ if n.models[model].status == Status.LOADED]
    if loaded:
        # least busy: its requests for this model, then the node's in all, then the hash (a stable tie-break)
        best = min(loaded, key=lambda n: (n.models[model].in_flight + n.models[model].queued, n.busy,
                                          -rendezvous(model, n.node)))
        busy = best.models[model].in_flight + best.models[model].queued
        return Send(best.node, model, Choice.LOADED,
                    f"loaded there ({len(loaded)} node(s) have it), {busy} request(s) on it")
    # From here on the request waits on the node it goes to: that node's queue must have room.
    roomy = [n for n in open_ if not n.queue_full]
    chosen = _by_hash(model, (n for n in roomy if n.models[model].status == Status.LOADING))
    if chosen is not None:
        return Send(chosen.node, model, Choice.LOADING, "loading there")
    chosen = _by_hash(model, (n for n in roomy if n.models[model].queued > 0 and not _never_fits(n, n.models[model])))
    if chosen is not None:
        return Send(chosen.node, model, Choice.AWAITED, f"{chosen.models[model].queued} request(s) already wait for "
                                                        f"its load there")
    if not autoload:
        return Refusal(ErrorKind.NOT_LOADED, f"model '{model}' is loaded on no node and autoload is off; load it "
                                             f"with POST /models/load or add ?autoload=true")

    possible = [n for n in open_ if not _never_fits(n, n.models[model])]
    if not possible:
        sizes = "; ".join(_never_fits(n, n.models[model]) for n in sorted(open_, key=lambda n: n.node))
        return Refusal(ErrorKind.TOO_BIG, f"model '{model}' fits on no node: {sizes}")
    candidates = [n for n in possible if not n.queue_full]
    if not candidates:
        limits = ", ".join(f"{n.node} {n.limits.max_queue}" for n in sorted(possible, key=lambda n: n.node))
        return Refusal(ErrorKind.QUEUE_FULL, f"too many waiting requests on every node that could load '{model}' "
                                             f"({limits}); retry later", retry_after(ErrorKind.QUEUE_FULL))
    fits = [n for n in candidates if _fits_now(n, model)]
    chosen = _by_hash(model, fits)
    if chosen is not None:
        return Send(chosen.node, model, Choice.FITS, f"fits there without evicting ({len(fits)} node(s) would do)")
    evictable = [n for n in candidates if _fits_evicting(n, model)]
    chosen = _by_hash(model, evictable)
    if chosen is not None:
        idle = ", ".join(f"'{m.name}'" for m in idle_models(chosen, model))
        return Send(chosen.node, model, Choice.EVICT, f"fits there once idle models stop (idle: {idle})")
    chosen = _ranked(model, candidates)[0]
    return Send(chosen.node, model, Choice.WAIT,
                f"waits there for busy models to finish ({chosen.queued} request(s) already waiting)")


def dispatched(node: NodeState, model: str) -> NodeState:
    """The node as the ingress sees it once it has sent it one more request for `model`, until the node's next
    publication: one more request waiting for the model, which is loading if it was not running (a model that
    fits there starts loading at once; one waiting for room is still awaited, which `place` also honours)."""
    snapshot = node.models[model]
    status = snapshot.status
    if status in (Status.UNLOADED, Status.FAILED) and _fits_now(node, model):
        status = Status.LOADING
    models = dict(node.models)
    models[model] = replace(snapshot, queued=snapshot.queued + 1, status=status)
    return replace(node, models=models)


def replica_loads(nodes: Sequence[NodeState], model: str, replicas: int) -> list[Send]:
    """Where to start more copies of `model` so that `replicas` nodes hold it (a preset's `replicas = N`):
    nodes that do not run it, where it fits without evicting, then by evicting idle models, each by the hash.
    Never where it would have to wait for busy models: a replica is an optimisation, not a request."""
    open_ = [n for n in nodes if model in n.models and n.accepting]
    running = [n for n in open_ if n.models[model].status in (Status.LOADING, Status.LOADED)]
    missing = replicas - len(running)
    if missing <= 0:
        return []
    cold = _ranked(model, (n for n in open_ if n.models[model].status in (Status.UNLOADED, Status.FAILED)))
    fits = [n for n in cold if _fits_now(n, model)]
    evictable = [n for n in cold if n not in fits and _fits_evicting(n, model)]
    sends = [Send(n.node, model, Choice.FITS, f"replica {len(running) + i + 1} of {replicas}: fits there")
             for i, n in enumerate(fits[:missing])]
    sends += [Send(n.node, model, Choice.EVICT,
                   f"replica {len(running) + len(sends) + i + 1} of {replicas}: fits once idle models stop")
              for i, n in enumerate(evictable[:missing - len(sends)])]
    return sends


def with_pending(node: NodeState, pending: Mapping[str, int]) -> NodeState:
    """The node as the ingress sees it: its last publication, with the requests the ingress has sent there and
    not finished (`pending`: how many per model, from the send until the answer ends) that the publication does
    not show yet applied (`dispatched`). The node counts every request it has received and not finished under
    its model, waiting or in flight, and it takes requests from the ingress only (the cluster key), so the
    pending ones beyond that count are the ones still on their way: each request counts once, in the node's
    publication or in the book, never in both (counted twice, a node with room looked full: `queue_full`).
    What is left is the moment between the node's end of a request and the ingress's (its last bytes on the
    wire, a client gone whose cancel the node has not handled yet): for that moment one request is counted one
    time too many or too few, until the next publication or the answer's end; the hash still ranks the nodes
    alike for a cold model meanwhile."""
    for model, count in pending.items():
        shown = node.models.get(model)
        if shown is not None:
            for _ in range(count - shown.queued - shown.in_flight):
                node = dispatched(node, model)
    return node
