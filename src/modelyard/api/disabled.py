"""Router mode's `/tools` and `/cors-proxy`, answered as router mode answers them when they are off: 403
"this feature is disabled" (type `feature_disabled`), which the llama.cpp web UI reads as "no server tools, no
MCP proxy" and carries on.

modelyard keeps them off. What turns them on in llama-server (`--tools`, `--agent`, `--mcp-servers-*`,
`--ui-mcp-proxy`) makes the router itself run shell commands and read, write and edit files on its host for
whoever may call it, and fetch any URL for them (an open proxy into the host's network): powers no API-key
scope here describes, on a server whose point is to be shared by many clients. A user who wants them runs
llama-server with them for that purpose.
"""

from __future__ import annotations

from aiohttp import web

from modelyard.api.errors import error_response
from modelyard.errors import ErrorKind

PATHS = ("/tools", "/cors-proxy")


async def feature_disabled(request: web.Request) -> web.Response:
    return error_response(ErrorKind.FEATURE_DISABLED, f"this feature is disabled: modelyard does not serve "
                          f"{request.path} (llama-server's --tools, --agent and --ui-mcp-proxy run commands, edit "
                          "files and fetch URLs on the server's host for any caller)")


def add_routes(app: web.Application) -> None:
    for path in PATHS:
        app.router.add_get(path, feature_disabled)
        app.router.add_post(path, feature_disabled)
