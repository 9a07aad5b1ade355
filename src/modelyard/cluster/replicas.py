"""A preset's `replicas = N` on a cluster (docs/cluster.md, "Placement"): the ingress keeps N nodes holding a
model once it is used. Each request placed for such a model asks `more_copies` where the missing copies start
(placement.replica_loads over the views as they are once the request has reached its node: where the model fits
without evicting, then where idle models can make room, by the hash, never where it would wait) and `Replicas`
POSTs /models/load to those nodes in the background: a replica is an optimisation, the request does not wait
for it, and a node that refuses it answers the load, not the request.

Copies follow use, not publications: a model nobody asks for is not loaded again after its keep-alive ended it
somewhere, and a copy a node evicted for another model comes back with the model's next request, not at its
next publication (that would fight the node's own scheduler over its room). No copy starts on a node that is
unreachable, or where the model's last load failed (a broken file there must not be loaded on every request; a
request placed there still loads it, as on one node). N is what the nodes' presets say, the largest where they
differ (`NodeState.replicas`, which a node publishes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

import aiohttp

from modelyard.cluster.ingress import Nodes
from modelyard.cluster.placement import NodeState, Send, replica_loads
from modelyard.scheduler import Status
from modelyard.tasks import log_failure

log = logging.getLogger(__name__)


def wanted(views: Sequence[NodeState], model: str) -> int:
    """How many nodes should hold `model`: the largest `replicas` of the nodes that serve it (1: one copy)."""
    return max((view.replicas.get(model, 1) for view in views if model in view.models), default=1)


def _holding(view: NodeState, model: str) -> NodeState:
    """`view` once the model is on its way there (a request or a load sent to it): loading, if not loaded."""
    snapshot = view.models[model]
    if snapshot.status in (Status.LOADING, Status.LOADED):
        return view
    return replace(view, models={**view.models, model: replace(snapshot, status=Status.LOADING)})


def more_copies(views: Sequence[NodeState], send: Send, *, starting: frozenset[str] = frozenset(),
                unreachable: frozenset[str] = frozenset()) -> list[Send]:
    """Where to start copies of `send.model` once `send` has been placed (pure): the model counts as held on
    `send.node` and on the nodes in `starting` (a copy is being started there), and no copy starts where its
    last load failed or on an `unreachable` node, which does not count as holding it either."""
    model = send.model
    copies = wanted(views, model)
    if copies <= 1:
        return []
    seen = [_holding(view, model) if view.node == send.node or view.node in starting else view
            for view in views if model in view.models and view.node not in unreachable
            and (view.models[model].status != Status.FAILED or view.node == send.node)]
    return replica_loads(seen, model, copies)


class Replicas:
    """Starts the copies `more_copies` asks for after each placement: POST /models/load on their node (the
    node loads it as router mode does, in the background, and answers at once), booked on that node while the
    POST is on its way, so that the views show the copy coming. A copy being started is not asked for again
    until its POST has answered; one asked for once more before the node's next publication shows it loading
    costs one more POST, which joins the load there."""

    def __init__(self, nodes: Nodes) -> None:
        self._nodes = nodes
        self._starting: set[tuple[str, str]] = set()  # (model, node) whose load is being sent
        self._tasks: set[asyncio.Task[None]] = set()

    def placed(self, send: Send) -> None:
        """`send` has been placed: start the copies of its model that its `replicas` asks for."""
        starting = frozenset(node for model, node in self._starting if model == send.model)
        for load in more_copies(self._nodes.views(), send, starting=starting, unreachable=self._nodes.unreachable()):
            self._starting.add((load.model, load.node))
            task = asyncio.create_task(self._start(load))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(log_failure)

    async def _start(self, load: Send) -> None:
        try:
            with self._nodes.booked(load):
                await self._nodes.post_json(load.node, "/models/load", {"model": load.model})
            log.info("a copy of '%s' starts on node %s (%s)", load.model, load.node, load.reason)
        except aiohttp.ClientError as exc:  # the node refused or was lost: the model's next request asks again
            log.warning("a copy of '%s' did not start on node %s: %r", load.model, load.node, exc)
        finally:
            self._starting.discard((load.model, load.node))

    async def close(self) -> None:
        """Cancel the loads still being sent (the front's cleanup)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
