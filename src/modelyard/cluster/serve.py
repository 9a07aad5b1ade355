"""`modelyard serve --ray ADDRESS` (docs/cluster.md): this process joins the Ray cluster (or starts `local:N`),
gives each node that serves models its agent (cluster.membership) and serves the cluster's front
(cluster.front) on `--host`/`--port`, until SIGTERM or SIGINT.

On a stop signal the front takes no new connection and the requests in flight get `--shutdown-grace` to finish
(the same bound as one node's drain); then every agent closes, which stops its children, and the local cluster, if
this process started one, shuts down. The cluster key the agents accept is made here, fresh for each run, and
goes to them in the actors' constructor arguments (Ray's channel), never in argv or a log.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import ssl
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from modelyard.api.context import ServerSettings
from modelyard.cluster.agent import NodeSettings
from modelyard.cluster.front import build_front
from modelyard.cluster.ingress import Nodes
from modelyard.cluster.membership import Membership, connect
from modelyard.tasks import log_failure

log = logging.getLogger(__name__)


def serve_cluster(address: str, nodes: NodeSettings, settings: ServerSettings, host: str, port: int,
                  tls: ssl.SSLContext | None, grace: float) -> None:
    """Join (or start) the cluster, serve until a stop signal, then close everything. Blocks."""
    connection = connect(address, memory_budget=nodes.limits.memory_budget,
                         gpu_memory_budget=nodes.limits.gpu_memory_budget)  # on the main thread: Ray needs it
    try:
        asyncio.run(_serve(connection.cpus, nodes, settings, host, port, tls, grace))
    finally:
        connection.close()


async def _serve(cpus: Mapping[str, frozenset[int]], node_settings: NodeSettings, settings: ServerSettings,
                 host: str, port: int, tls: ssl.SSLContext | None, grace: float) -> None:
    key = secrets.token_urlsafe(32)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        nodes = Nodes(key, session)
        membership = Membership(nodes, key, node_settings, cpus=cpus)
        runner = web.AppRunner(build_front(nodes, settings), handler_cancellation=True, access_log=None,
                               shutdown_timeout=grace)
        await runner.setup()
        discovery = asyncio.create_task(membership.run())
        discovery.add_done_callback(log_failure)
        try:
            try:
                await web.TCPSite(runner, host, port, ssl_context=tls, reuse_address=True).start()
            except OSError as exc:
                raise SystemExit(f"Error: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            # a bad flag or preset fails every agent's start: refuse to run, as one node refuses to start
            first, stopped = asyncio.ensure_future(membership.first_node()), asyncio.ensure_future(stop.wait())
            await asyncio.wait({first, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if first.done():
                first.result()  # NodeStartFailed, a ConfigError: one line, exit 1
            else:
                first.cancel()
            await stopped
            log.info("stopping: requests in flight get up to %g s, then every node's agent closes", grace)
        finally:
            await runner.cleanup()  # stops listening, waits for the handlers in flight (grace)
            discovery.cancel()
            await membership.close()
