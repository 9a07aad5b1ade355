"""The node agent (docs/cluster.md): on each node of a Ray cluster, one actor that runs the unchanged single-node
modelyard (a `ModelManager` from the per-node flags the ingress sent, with that node's engine and files) and
serves its app on the node's address with the cluster key only (cluster.node). The ingress reaches it twice:
through Ray for its state (`watch`, a long-poll), `drain` and `close`; over HTTP for the requests themselves.

`NodeAgent` is a plain class, so that it runs without Ray too; `spawn` makes it a Ray actor pinned to one node:
`num_cpus=0` (llama-server's threads are placed by the node's own CPU placement, and Ray must not give those
cores to tasks), `resources={"modelyard_node": 1}` (only a node that declares it serves models: a head that only
routes leaves it out), `NodeAffinitySchedulingStrategy(node_id, soft=False)` (the ingress makes one per node and
knows where each runs) and `max_restarts=0` (the ingress decides about a replacement). Its async methods run on
the actor's one event-loop thread (`AsyncIO Thread: default`, measured), which forks the children and lives as
long as the actor process, so PR_SET_PDEATHSIG ends the children with it.

A node says what it may spend through its Ray resources: `modelyard_memory_gib` and `modelyard_gpu_memory_gib`
(whole numbers: Ray refuses fractional node resources) replace the flags' budgets on that node
(`NodeSettings.on_node`, from the node's `ray.nodes()` entry, which the ingress lists anyway: cluster.membership).
So a machine declares its own share, and `--ray local:N` splits one machine's budget between its fake nodes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from modelyard.cluster.node import node_app, watch_state
from modelyard.cluster.placement import NodeState
from modelyard.manager import ModelManager
from modelyard.memory import gpu_total_memory, parse_size, system_memory
from modelyard.scheduler import Limits
from modelyard.watchdog import WatchdogSettings

NODE_RESOURCE = "modelyard_node"  # a node serves models only if it declares it; one agent takes it
MEMORY_RESOURCE = "modelyard_memory_gib"  # the node's --memory-budget, in GiB
GPU_MEMORY_RESOURCE = "modelyard_gpu_memory_gib"  # its --gpu-memory-budget, in GiB
GIB = 2**30


@dataclass(frozen=True)
class NodeSettings:
    """The per-node flags the ingress sends every agent, each applied on its own node (paths on that node;
    `80%` of its own RAM)."""

    models_dir: Path | None = None
    models_preset: Path | None = None
    llama_server: str | None = None
    engine_args: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    watchdog: WatchdogSettings | None = None
    # The cores this node's children may use, where several nodes share one machine (`--ray local:N`); empty:
    # the agent's own affinity, as a single node reads it
    cpus: frozenset[int] = frozenset()
    # --memory-budget and --gpu-memory-budget as given ("80%", "16GiB"), each resolved by the agent against its
    # own node's memory (`resolved_limits`), so that 80% is 80% of each machine; empty: `limits`' byte value
    budget_texts: tuple[str, str] = ("", "")

    def on_node(self, resources: Mapping[str, float]) -> NodeSettings:
        """These settings on a node whose Ray resources are `resources`: the budgets it declares replace the
        flags' (`modelyard_memory_gib`, `modelyard_gpu_memory_gib`); without them the flags' apply."""
        limits, (memory_text, gpu_text) = self.limits, self.budget_texts
        if MEMORY_RESOURCE in resources:
            limits, memory_text = replace(limits, memory_budget=int(resources[MEMORY_RESOURCE] * GIB)), ""
        if GPU_MEMORY_RESOURCE in resources:
            limits, gpu_text = replace(limits, gpu_memory_budget=int(resources[GPU_MEMORY_RESOURCE] * GIB)), ""
        return replace(self, limits=limits, budget_texts=(memory_text, gpu_text))

    def resolved_limits(self, total_memory: Callable[[], int], total_gpu_memory: Callable[[], int]) -> Limits:
        """The limits on the node whose memory these read: each budget given as text is resolved against it (a
        percentage of that machine's RAM or GPU memory), the others as they are."""
        limits = self.limits
        memory_text, gpu_text = self.budget_texts
        if memory_text:
            limits = replace(limits, memory_budget=parse_size(memory_text, total_memory()))
        if gpu_text:
            limits = replace(limits, gpu_memory_budget=parse_size(gpu_text, total_gpu_memory()))
        return limits


class NodeAgent:
    """One node's modelyard: `start` it, then `watch` its state; `close` stops its children and its app."""

    def __init__(self, node: str, key: str, host: str, settings: NodeSettings) -> None:
        self._node, self._key, self._host, self._settings = node, key, host, settings
        self._manager: ModelManager | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Make the node's manager and serve its app on a free port of the node's address: the app's base URL.
        A bad flag or preset raises here (ConfigError, EngineNotFound), as `modelyard serve` refuses to start."""
        settings = self._settings
        if settings.cpus and hasattr(os, "sched_setaffinity"):
            # this thread's affinity (0: the calling thread), before the manager reads its topology from it:
            # the actor's loop thread forks every child, so they inherit it and placement divides these cores
            os.sched_setaffinity(0, settings.cpus)
        manager = ModelManager.create(models_dir=settings.models_dir, models_preset=settings.models_preset,
                                      llama_server=settings.llama_server, engine_args=settings.engine_args,
                                      limits=settings.resolved_limits(system_memory, gpu_total_memory),
                                      watchdog=settings.watchdog)
        manager.check_startup_loads()
        manager.check_pinned()
        runner = web.AppRunner(node_app(manager, self._key, self._host), handler_cancellation=True, access_log=None)
        await runner.setup()  # the app's startup starts the manager
        site = web.TCPSite(runner, self._host, 0)
        await site.start()
        self._manager, self._runner = manager, runner
        port = runner.addresses[0][1]
        return f"http://{self._host}:{port}"

    async def watch(self, version: int) -> tuple[int, NodeState]:
        return await watch_state(self._started(), self._node, version)

    async def drain(self) -> None:
        """Take nothing new, finish what runs (a single node's begin_drain): placement skips the node once its
        watch says so, and its answers are 503 shutting_down, which the ingress sends elsewhere."""
        self._started().begin_drain()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # the app's cleanup closes the manager: its children stop
            self._runner = None

    def _started(self) -> ModelManager:
        if self._manager is None:
            raise RuntimeError("the node agent has not been started")
        return self._manager


def spawn(node_id: str, key: str, host: str, settings: NodeSettings) -> Any:
    """A NodeAgent as a Ray actor on the node `node_id` (Ray's node id, which also names the node to placement);
    its handle. Ray is imported here only: nothing imports it without `--ray`."""
    import ray  # type: ignore[import-not-found, unused-ignore]
    from ray.util.scheduling_strategies import (  # type: ignore[import-not-found, unused-ignore]
        NodeAffinitySchedulingStrategy,
    )

    actor = ray.remote(NodeAgent).options(num_cpus=0, resources={NODE_RESOURCE: 1}, max_restarts=0,
                                          scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return actor.remote(node_id, key, host, settings)
