"""The ingress's side of Ray (docs/cluster.md): joining a cluster, and one node agent for each node that serves.

`connect(address)` is `ray.init` for whatever `modelyard serve --ray ADDRESS` names (`auto`, `HOST:PORT`,
`ray://HOST:PORT`), or, for `local:N`, a local `ray.cluster_utils.Cluster` of N nodes on this machine (the head
among them, so `local:1` works) for a one-command trial. Its fake nodes share one machine, so each declares an
explicit Ray `memory` and object store (each would otherwise claim all the RAM), its part of the machine's
budget as `modelyard_memory_gib` (three nodes never promise the RAM three times) and a disjoint share of the
cores for its children while there are enough cores (`Connection.cpus`).

`Membership.run()` lists `ray.nodes()` every second (one GCS call, in a thread: it blocks) and gives each alive
node that declares `modelyard_node` one agent (cluster.agent.spawn), with the budgets that node declares; once
the agent's app is up, the node is added to the ingress's `Nodes` and followed (its first watch answer puts it
in placement). Node ids are never reused: a node back after a raylet restart is a new node with a new agent.

Ray is imported inside the functions that use it: without `--ray` nothing imports it, and without the extra
installed `--ray` is one error line naming the install (`RayMissing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from modelyard.cluster.agent import GIB, GPU_MEMORY_RESOURCE, MEMORY_RESOURCE, NODE_RESOURCE, NodeSettings, spawn
from modelyard.cluster.ingress import Nodes
from modelyard.cluster.placement import NodeState
from modelyard.config.presets import ConfigError
from modelyard.memory import system_memory
from modelyard.tasks import log_failure

log = logging.getLogger(__name__)

LIST_EVERY_S = 1.0
# An agent's close stops its children (the manager's own bound: a child's stop-timeout, 10 s by default, plus 5);
# past this one the actor is killed anyway, and PR_SET_PDEATHSIG ends the children with it
CLOSE_WAIT_S = 20.0
# Each fake node's object store: the agents pass only small values through it; Ray wants at least 75 MiB
OBJECT_STORE_BYTES = 100 * 2**20
LOCAL = "local:"


class RayMissing(ConfigError):
    """`--ray` without the extra installed."""


def import_ray() -> Any:
    try:
        import ray  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise RayMissing(f"--ray needs Ray, which is not installed here ({exc}): pip install 'modelyard[ray]'"
                         ) from None
    return ray


# --- a local cluster's nodes (pure) -------------------------------------------------------------------------

def local_count(address: str) -> int | None:
    """N for `local:N` (a local cluster of N nodes), None for an address `ray.init` takes as it is."""
    if not address.startswith(LOCAL):
        return None
    text = address.removeprefix(LOCAL)
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--ray {address!r}: local:N needs a whole number of nodes, 1 or more (local:3)")
    return int(text)


@dataclass(frozen=True)
class LocalNode:
    """One fake node of a local cluster: what it declares to Ray, and the cores its children may use."""

    cpus: frozenset[int]
    memory: int  # Ray's `memory` resource, bytes
    resources: Mapping[str, float]

    def ray_args(self) -> dict[str, Any]:
        return {"num_cpus": len(self.cpus), "memory": self.memory, "object_store_memory": OBJECT_STORE_BYTES,
                "resources": dict(self.resources)}


def local_nodes(count: int, *, memory_budget: int, gpu_memory_budget: int, total_memory: int,
                cores: Sequence[int]) -> list[LocalNode]:
    """The `count` nodes of a local cluster on a machine with `total_memory` bytes and `cores`: each serves
    models, with its share of the budgets (0: no limit, so none declared) in whole GiB, rounded down so that
    together they never promise more than the machine's budget (Ray takes whole numbers only), and its share of
    the cores, disjoint while there are at least as many cores as nodes (else one core each, in turn)."""
    resources: dict[str, float] = {NODE_RESOURCE: 1}
    for resource, budget, flag in ((MEMORY_RESOURCE, memory_budget, "--memory-budget"),
                                   (GPU_MEMORY_RESOURCE, gpu_memory_budget, "--gpu-memory-budget")):
        if budget > 0:
            share = budget // count // GIB
            if share < 1:
                raise ConfigError(f"{flag} of {budget / GIB:.1f} GiB split between {count} local nodes is under "
                                  f"1 GiB a node (a node declares whole GiB): use fewer nodes or a larger budget")
            resources[resource] = share
    ordered = sorted(cores)
    if len(ordered) >= count:
        size, extra = divmod(len(ordered), count)
        starts = [i * size + min(i, extra) for i in range(count + 1)]
        shares = [frozenset(ordered[starts[i]:starts[i + 1]]) for i in range(count)]
    else:
        shares = [frozenset({ordered[i % len(ordered)]}) for i in range(count)]
    return [LocalNode(share, total_memory // count, resources) for share in shares]


# --- joining a cluster --------------------------------------------------------------------------------------

@dataclass
class Connection:
    """This process's connection to Ray, and the local cluster it started for `local:N` (else None)."""

    ray: Any
    cluster: Any | None = None
    cpus: Mapping[str, frozenset[int]] = field(default_factory=dict)  # node id -> its cores (local:N only)

    def close(self) -> None:
        """Disconnect, and stop the local cluster if this started one (blocks for a few seconds)."""
        self.ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()


def connect(address: str, *, memory_budget: int = 0, gpu_memory_budget: int = 0) -> Connection:
    """Join the Ray cluster at `address`, or start `local:N` on this machine with the budgets (bytes, 0: no limit)
    split between its nodes. Blocks (seconds: a local cluster's nodes start one after another), on the main
    thread: a local node registers signal handlers, which Ray refuses from any other (measured)."""
    count = local_count(address)
    if count is not None:
        # Read as Ray is imported: with it, a local cluster's nodes take loopback for their address, so its Ray
        # ports and the agents' apps (which listen on their node's address) are reachable from this machine
        # only, as one node binds loopback by default. Set later, the nodes took the machine's network address
        # (measured: 192.0.2.2 here).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = import_ray()
    if count is None:
        ray.init(address=address)
        return Connection(ray)
    from ray import cluster_utils  # type: ignore[import-not-found, unused-ignore]

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    wanted = local_nodes(count, memory_budget=memory_budget, gpu_memory_budget=gpu_memory_budget,
                         total_memory=system_memory(), cores=list(cores))
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args=wanted[0].ray_args())
    try:
        started = [cluster.head_node, *(cluster.add_node(**node.ray_args()) for node in wanted[1:])]
        ray.init(address=cluster.address)
    except BaseException:
        cluster.shutdown()
        raise
    return Connection(ray, cluster, {node.node_id: want.cpus for node, want in zip(started, wanted, strict=True)})


# --- one agent per node -------------------------------------------------------------------------------------

class NodeStartFailed(ConfigError):
    """No node's agent started; the message is the first one's reason, in one line."""


class Membership:
    """The cluster's nodes as the ingress's `Nodes`: `run()` gives each node that serves its agent and follows
    it; `close()` closes the agents (their children stop) and kills them."""

    def __init__(self, nodes: Nodes, key: str, settings: NodeSettings, *,
                 cpus: Mapping[str, frozenset[int]] | None = None) -> None:
        self._nodes, self._key, self._settings = nodes, key, settings
        self._cpus = cpus or {}  # Connection.cpus: each local node's cores
        self._agents: dict[str, Any] = {}  # node id -> its agent, while its node is alive
        self._seen: set[str] = set()  # every node given an agent: never a second (a failed start is not retried)
        self._tasks: set[asyncio.Task[None]] = set()  # agents starting, and the nodes followed
        self._closed = asyncio.Event()
        self._joined = 0
        self._failures: list[str] = []  # why agents did not start, in order
        self._outcomes = asyncio.Condition()  # notified as each agent's start ends

    @property
    def agents(self) -> Mapping[str, Any]:
        """Each alive node's agent (its Ray actor handle), by node id."""
        return dict(self._agents)

    async def first_node(self) -> None:
        """Return once a node has joined; raise NodeStartFailed when every node given an agent so far failed to
        start (a bad flag or preset: `serve --ray` then refuses to run, as a single node refuses to start)."""
        async with self._outcomes:
            await self._outcomes.wait_for(lambda: self._joined > 0 or 0 < len(self._seen) == len(self._failures))
        if self._joined == 0:
            raise NodeStartFailed(self._failures[0])

    async def run(self) -> None:
        """List the cluster's nodes every second until `close()`, giving each new one that serves its agent."""
        ray = import_ray()
        while not self._closed.is_set():
            listing = await asyncio.to_thread(ray.nodes)
            if self._closed.is_set():
                return
            self._update(listing)
            with contextlib.suppress(TimeoutError):  # the next listing is due; close() ends the wait early
                await asyncio.wait_for(self._closed.wait(), LIST_EVERY_S)

    def _update(self, listing: list[dict[str, Any]]) -> None:
        alive = {entry["NodeID"]: entry for entry in listing if entry.get("Alive")}
        for node_id in [n for n in self._agents if n not in alive]:
            # its agent died with it; its watch fails, which takes it out of placement (Nodes.follow)
            log.warning("node %s is gone from the Ray cluster", node_id)
            del self._agents[node_id]
        for node_id, entry in alive.items():
            resources = entry.get("Resources", {})
            if resources.get(NODE_RESOURCE, 0) >= 1 and node_id not in self._seen:
                self._seen.add(node_id)
                self._background(self._join(node_id, entry["NodeManagerAddress"], resources))

    async def _join(self, node_id: str, host: str, resources: Mapping[str, float]) -> None:
        ray = import_ray()
        settings = self._settings.on_node(resources)
        if node_id in self._cpus:
            settings = replace(settings, cpus=self._cpus[node_id])
        # spawn only submits the actor's creation, which Ray carries out asynchronously
        agent = spawn(node_id, self._key, host, settings)
        self._agents[node_id] = agent
        try:
            base_url: str = await agent.start.remote()
        except Exception as exc:  # a bad flag or preset on that node, or the node lost: said in one line
            self._agents.pop(node_id, None)
            ray.kill(agent)
            why = f"node {node_id}'s agent did not start: {getattr(exc, 'cause', None) or exc}"
            log.error("%s", why)
            async with self._outcomes:
                self._failures.append(why)
                self._outcomes.notify_all()
            return
        budget = settings.limits.memory_budget
        log.info("node %s joined: %s, memory budget %s", node_id, base_url,
                 f"{budget / GIB:.1f} GiB" if budget else "unlimited")
        self._nodes.add(node_id, base_url)
        async with self._outcomes:
            self._joined += 1
            self._outcomes.notify_all()

        async def watch(version: int) -> tuple[int, NodeState]:
            answer: tuple[int, NodeState] = await agent.watch.remote(version)
            return answer

        # ActorUnavailableError (a raylet killed, a partition) may pass, and follow asks again; a dead actor never
        # comes back (max_restarts=0), and its node, if it returns, is a new node with a new agent
        self._background(self._nodes.follow(node_id, watch,
                                            dead=lambda exc: isinstance(exc, ray.exceptions.ActorDiedError)))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        task.add_done_callback(log_failure)
        task.add_done_callback(self._tasks.discard)
        self._tasks.add(task)

    async def close(self) -> None:
        """Stop listing, stop following, close every agent (bounded: CLOSE_WAIT_S), then kill them all."""
        self._closed.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        agents, self._agents = self._agents, {}
        if not agents:
            return
        ray = import_ray()
        closing = {asyncio.ensure_future(_result(agent.close.remote())): node for node, agent in agents.items()}
        done, late = await asyncio.wait(closing, timeout=CLOSE_WAIT_S)
        for future in late:
            log.warning("node %s's agent did not close within %.0f s: killed", closing[future], CLOSE_WAIT_S)
            future.cancel()
        for future in done:
            if future.exception() is not None:
                log.warning("node %s's agent failed to close: %r", closing[future], future.exception())
        for agent in agents.values():
            ray.kill(agent)


async def _result(ref: Any) -> Any:
    """A Ray ObjectRef's value, as a coroutine (asyncio.wait takes futures and tasks)."""
    return await ref
