"""The cluster bench's cluster (bench/cluster.py): `python -m modelyard.bench.cluster_host` brings up `local:N` and
serves the cluster's front on a loopback port as `modelyard serve --ray local:N` does (membership.connect on the
main thread, a Membership over `Nodes`, build_front; cluster/serve.py), in a process of its own as the command
runs, and tells the bench, on a pipe of its own, what the command keeps to itself: the cluster key (the bench
calls a node's app directly with it: the baseline of the front's added latency), each node's app URL, whether
it is the head (the ingress's driver is attached to the head's raylet, so that node is not the one killed), and
its raylet's pid (the bench kills it mid-stream with SIGKILL, as ray.cluster_utils' kill_raylet does). The pipe,
not stdout: Ray relays its workers' output to the driver's stdout, which the bench does not read.

The raylets are this process's children, and kill_raylet reaps the one it kills at once: a node's workers notice
their raylet is gone only once it is, and a zombie raylet is not (measured: killed and never reaped, the node's
agent went on serving until the GCS declared the node dead, +13.5 s). So a thread here waits on each raylet, and
a raylet the bench kills is reaped as it dies.

Once every node's agent has published, one JSON line goes down the pipe, which is then closed; SIGTERM stops the
front, closes the agents (their children stop) and shuts the local cluster down, as `serve --ray` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from modelyard.api.context import ServerSettings
from modelyard.cluster.agent import NodeSettings
from modelyard.cluster.front import build_front
from modelyard.cluster.ingress import Nodes
from modelyard.cluster.membership import Connection, Membership, connect
from modelyard.scheduler import Limits
from modelyard.tasks import log_failure
from modelyard.watchdog import WatchdogSettings

log = logging.getLogger(__name__)

STALL_TIMEOUT_S = 120.0  # `serve`'s default --stall-timeout
GRACE_S = 5.0  # requests in flight at the stop: the bench has ended its own by then


class _Recorded(Nodes):
    """`Nodes` that also keeps each node's app URL, which the bench calls directly."""

    def __init__(self, key: str, session: aiohttp.ClientSession) -> None:
        super().__init__(key, session)
        self.urls: dict[str, str] = {}

    def add(self, name: str, base_url: str) -> None:
        super().add(name, base_url)
        self.urls[name] = base_url


def _raylets(connection: Connection) -> dict[str, dict[str, Any]]:
    """Each local node's raylet pid, and whether it is the head, by node id."""
    from ray._private import ray_constants  # type: ignore[import-not-found, unused-ignore]

    cluster = connection.cluster
    if cluster is None:
        raise RuntimeError("the bench's cluster is a local one (local:N)")
    found = {}
    for node in [cluster.head_node, *cluster.worker_nodes]:
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        # reaps it as it dies (see above); a daemon: the cluster's shutdown ends the raylets this waits on
        threading.Thread(target=raylet.wait, name=f"reap raylet {raylet.pid}", daemon=True).start()
        found[node.node_id] = {"raylet": raylet.pid, "head": node is cluster.head_node}
    return found


async def _host(connection: Connection, settings: NodeSettings, port: int, ready_fd: int) -> None:
    key = secrets.token_urlsafe(32)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    raylets = _raylets(connection)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        nodes = _Recorded(key, session)
        membership = Membership(nodes, key, settings, cpus=connection.cpus)
        runner = web.AppRunner(build_front(nodes, ServerSettings()), handler_cancellation=True, access_log=None,
                               shutdown_timeout=GRACE_S)
        await runner.setup()
        discovery = asyncio.create_task(membership.run())
        discovery.add_done_callback(log_failure)
        try:
            await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
            await nodes.until(lambda views: {view.node for view in views} >= set(raylets))
            ready = {"url": f"http://127.0.0.1:{port}", "key": key,
                     "nodes": {node: {**raylets[node], "url": nodes.urls[node]} for node in raylets}}
            with os.fdopen(ready_fd, "w") as pipe:
                pipe.write(json.dumps(ready) + "\n")
            await stop.wait()
        finally:
            await runner.cleanup()
            discovery.cancel()
            await membership.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--memory-budget", type=int, required=True, help="bytes, split between the nodes")
    parser.add_argument("--models-max", type=int, default=4)
    parser.add_argument("--engine-args", default="[]", help="a JSON list: every child's llama-server flags")
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    settings = NodeSettings(models_dir=args.models_dir, llama_server=args.llama_server,
                            engine_args=tuple(json.loads(args.engine_args)),
                            limits=Limits(max_models=args.models_max, memory_budget=args.memory_budget),
                            watchdog=WatchdogSettings.for_stall_timeout(STALL_TIMEOUT_S))
    connection = connect(f"local:{args.nodes}", memory_budget=args.memory_budget)  # the main thread: Ray needs it
    try:
        asyncio.run(_host(connection, settings, args.port, args.ready_fd))
    finally:
        connection.close()


if __name__ == "__main__":
    main()
