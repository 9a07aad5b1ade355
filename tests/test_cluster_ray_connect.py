"""`modelyard serve --ray local:N`'s cluster, for real (docs/cluster.md "Local cluster, one command"; needs the
`ray` extra, so `make test` skips it): `connect("local:2")` starts a head and a worker on this machine, each
serving models with its half of the memory budget and its own share of the cores, and a Membership over it
serves a request on one of them with a child kept to that node's cores. Its own module: a process joins one
Ray cluster at a time, and test_cluster_ray.py's is another.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path

import aiohttp
import pytest

from modelyard.cluster.agent import GIB, MEMORY_RESOURCE, NODE_RESOURCE, NodeSettings
from modelyard.cluster.ingress import Nodes
from modelyard.cluster.membership import Membership, connect
from modelyard.scheduler import Limits, Status
from modelyard.tasks import log_failure
from tests.test_cluster_ray import engines_of, relaying

ray = pytest.importorskip("ray")


async def test_a_local_cluster_splits_the_machine_between_its_nodes_and_serves(module_models_dir: Path) -> None:
    connection = connect("local:2", memory_budget=4 * GIB)  # the main thread: Ray sets signal handlers
    try:
        alive = [node for node in ray.nodes() if node["Alive"]]
        assert [(n["Resources"][NODE_RESOURCE], n["Resources"][MEMORY_RESOURCE]) for n in alive] == [(1, 2)] * 2
        cores = set(os.sched_getaffinity(0))
        shares = [connection.cpus[node["NodeID"]] for node in alive]
        if len(cores) >= 2:
            assert not shares[0] & shares[1] and shares[0] | shares[1] == cores

        key = secrets.token_urlsafe(24)
        async with aiohttp.ClientSession() as session:
            nodes = Nodes(key, session)
            membership = Membership(nodes, key, NodeSettings(models_dir=module_models_dir, engine_args=("-c", "1024"),
                                                             limits=Limits(max_models=1)), cpus=connection.cpus)
            running = asyncio.ensure_future(membership.run())
            running.add_done_callback(log_failure)
            client = await relaying(nodes)
            try:
                views = await nodes.until(lambda views: len(views) == 2)
                assert {v.node: v.limits.memory_budget for v in views} == {n["NodeID"]: 2 * GIB for n in alive}
                body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                answer = await client.post("/v1/chat/completions", data=json.dumps(body))
                assert answer.status == 200, await answer.text()
                views = await nodes.until(lambda views: any(v.models["smol"].status == Status.LOADED for v in views))
                node = next(v.node for v in views if v.models["smol"].status == Status.LOADED)
                agent_pid = await membership.agents[node].__ray_call__.remote(lambda _: os.getpid())
                (child,) = engines_of(agent_pid)
                assert os.sched_getaffinity(child) <= connection.cpus[node]
            finally:
                await client.close()
                await membership.close()
                await running
    finally:
        connection.close()
    assert not ray.is_initialized()
