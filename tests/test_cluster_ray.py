"""The node agent on a real local Ray cluster (docs/cluster.md; needs the `ray` extra, so `make test` skips it):
a head that only routes and two worker nodes declaring `modelyard_node`, one NodeAgent actor on each, running
the real engine over the demo models; the ingress follows their watches through Ray and relays requests to
their apps over HTTP, as the in-process tests (test_cluster_ingress.py) do with fake children.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from modelyard.cluster.agent import NodeSettings, spawn
from modelyard.cluster.ingress import Nodes
from modelyard.cluster.placement import NodeState
from modelyard.scheduler import RUNNING, Limits, Status
from tests.test_cluster_ingress import by_hash, serve

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

MIB = 2**20


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[list[Any]]:
    """A local cluster: the head (the driver, no modelyard_node) and two workers that serve models."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # each fake node would otherwise claim the whole machine's memory
    sizes = {"memory": 400 * MIB, "object_store_memory": 80 * MIB}
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **sizes})
    workers = [cluster.add_node(num_cpus=1, resources={"modelyard_node": 1}, **sizes) for _ in range(2)]
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield workers
    finally:
        ray.shutdown()
        cluster.shutdown()


class Ingress:
    def __init__(self, nodes: Nodes, client: TestClient[Any, Any], agents: dict[str, Any]) -> None:
        self.nodes, self.client, self.agents = nodes, client, agents

    async def complete(self, model: str, **options: Any) -> aiohttp.ClientResponse:
        body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8,
                **options}
        return await self.client.post("/v1/chat/completions", data=json.dumps(body))


@pytest.fixture
async def ingress(ray_nodes: list[Any], module_models_dir: Path) -> AsyncIterator[Ingress]:
    key = secrets.token_urlsafe(24)
    settings = NodeSettings(models_dir=module_models_dir, engine_args=("-c", "1024"), limits=Limits(max_models=1))
    agents = {worker.node_id: spawn(worker.node_id, key, worker.node_ip_address, settings) for worker in ray_nodes}
    addresses = dict(zip(agents, await asyncio.gather(*(a.start.remote() for a in agents.values())), strict=True))
    session = aiohttp.ClientSession()
    nodes = Nodes(key, session)
    watches = {}
    for node_id, agent in agents.items():

        async def watch(version: int, agent: Any = agent) -> tuple[int, NodeState]:
            answer: tuple[int, NodeState] = await agent.watch.remote(version)
            return answer

        watches[node_id] = (addresses[node_id], watch)
    follows: list[asyncio.Task[None]] = []
    client = await serve(nodes, watches, follows)
    try:
        yield Ingress(nodes, client, agents)
    finally:
        for task in follows:
            task.cancel()
        await client.close()
        await session.close()
        for agent in agents.values():
            with contextlib.suppress(ray.exceptions.RayActorError):  # its node was killed
                await agent.close.remote()
            ray.kill(agent)


async def test_agents_serve_a_model_from_the_node_the_hash_picks_and_load_it_once(ingress: Ingress) -> None:
    answers = await asyncio.gather(*(ingress.complete("smol") for _ in range(3)))
    for answer in answers:
        assert answer.status == 200, await answer.text()
        assert (await answer.json())["choices"][0]["message"]["content"]
    views = await ingress.nodes.until(lambda views: all(v.models["smol"].in_flight == 0 for v in views))
    running = [v.node for v in views if v.models["smol"].status in RUNNING]
    assert running == [by_hash("smol", list(ingress.agents))[0]]
    assert next(v for v in views if v.node == running[0]).models["smol"].status == Status.LOADED
    again = await ingress.complete("smol")
    assert again.status == 200
    assert [v.node for v in ingress.nodes.views() if v.models["smol"].status in RUNNING] == running


def engines_of(parent: int) -> set[int]:
    """The llama-server processes whose parent is `parent` (an agent: its manager starts them)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name, rest = (entry / "stat").read_text().split(" (", 1)[1].rsplit(") ", 1)
            except (OSError, ValueError):
                continue
            if name == "llama-server" and int(rest.split()[1]) == parent:
                pids.add(int(entry.name))
    return pids


async def exited(pid: int) -> None:
    """Until the process `pid` (not ours) has exited: its pidfd becomes readable then (Linux 5.3)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, gone.set)
    try:
        await gone.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


# Last in the module: the killed node does not come back.
async def test_a_raylet_killed_mid_stream_ends_the_stream_in_band_and_its_children(ray_nodes: list[Any],
                                                                                     ingress: Ingress) -> None:
    first, second = by_hash("smol", list(ingress.agents))
    agent_pid = await ingress.agents[first].__ray_call__.remote(lambda agent: os.getpid())
    response = await ingress.complete("smol", stream=True, max_tokens=2000, ignore_eos=True)
    assert response.status == 200
    assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")
    children = engines_of(agent_pid)
    assert len(children) == 1  # smol's child on the first node
    next(w for w in ray_nodes if w.node_id == first).kill_raylet()
    events = [line[6:] for line in (await response.read()).decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "upstream_error" and first in error["message"]
    again = await ingress.complete("smol")  # the first node is unreachable: the model loads on the other
    assert again.status == 200, await again.text()
    assert [v.node for v in ingress.nodes.views() if v.models["smol"].status in RUNNING
            and v.node not in ingress.nodes.unreachable()] == [second]
    # no orphan: the killed node's child ends with its agent (a bound, not a timing: Ray measured +3.8 s)
    await asyncio.wait_for(asyncio.gather(*(exited(pid) for pid in children)), 60)
