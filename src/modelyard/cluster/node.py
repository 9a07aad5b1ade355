"""What one node of a cluster serves the ingress (docs/cluster.md): its state by long-poll (`watch_state`, which
answers at least every few seconds, a heartbeat) and the unchanged single-node app, reachable with the cluster
key only (`node_app`).

The node agent (a Ray actor, cluster/agent.py) runs both over its own `ModelManager`; nothing here imports Ray,
so the same code runs in-process in the tests, each node an aiohttp server over a manager.
"""

from __future__ import annotations

from aiohttp import web

from modelyard.api.app import build_app
from modelyard.api.auth import ApiKey
from modelyard.api.context import AppContext, ServerSettings
from modelyard.cluster.placement import NodeState
from modelyard.manager import WATCH_HEARTBEAT_S, ModelManager


async def watch_state(manager: ModelManager, node: str, version: int,
                      heartbeat: float = WATCH_HEARTBEAT_S) -> tuple[int, NodeState]:
    """The node's state once its board has changed after `version` (ModelManager.watch), with the new version,
    or after `heartbeat` seconds with the same version (a heartbeat, which tells the ingress the node is there);
    a draining node says it no longer accepts, so that placement sends it nothing new. It says which models
    its presets want on several nodes (`replicas`), for the ingress to start the other copies."""
    version, board = await manager.watch(version, heartbeat)
    replicas = {name: config.replicas for name, config in manager.catalog.models.items() if config.replicas > 1}
    return version, NodeState.of(node, board, accepting=not manager.draining, replicas=replicas)


def node_app(manager: ModelManager, key: str, host: str) -> web.Application:
    """The single-node app over `manager`, bound to `host`, answering only requests with the cluster `key`:
    client keys and scopes are checked once, at the ingress, which forwards with this key instead (proxy.py
    drops the client's credentials), as children answer only modelyard's key."""
    settings = ServerSettings(api_keys=(ApiKey(key, label="the cluster key"),), bind_host=host)
    return build_app(AppContext(manager, settings))
