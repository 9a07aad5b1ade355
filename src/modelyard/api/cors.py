"""CORS: which browser origins may call the API, and the headers that tell the browser so.

The default is Ollama's: pages served from localhost, 127.0.0.1 or 0.0.0.0 (any port, http or https) and
desktop-app origins (app://, file://, tauri://, vscode-webview://, vscode-file://); `OLLAMA_ORIGINS` adds to
it. `--cors-origins` replaces it with llama-server's settings: `*` (echo any Origin, router mode's default),
`localhost` (only local origins), or a comma-separated list where `*` is a wildcard (`http://*.lan:*`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0")
OLLAMA_DEFAULT_ORIGINS = (
    *(f"{scheme}://{host}{port}" for host in _LOCAL_HOSTS for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
_METHODS = "GET, POST, DELETE, OPTIONS"


@dataclass(frozen=True)
class CorsPolicy:
    patterns: tuple[str, ...] = ()
    any_origin: bool = False
    local_only: bool = False  # llama-server's `localhost`: reflect the Origin only if its host is local

    @classmethod
    def from_settings(cls, cors_origins: str | None = None, ollama_origins: str = "") -> CorsPolicy:
        """`cors_origins` None means Ollama's default list; `ollama_origins` (OLLAMA_ORIGINS) adds to it."""
        extra = tuple(o.strip() for o in ollama_origins.split(",") if o.strip())
        setting = (cors_origins or "").strip()
        if setting == "*" or "*" in extra:
            return cls(any_origin=True)
        if setting == "localhost":
            return cls(extra, local_only=True)
        base = tuple(o.strip() for o in setting.split(",") if o.strip()) if cors_origins else OLLAMA_DEFAULT_ORIGINS
        return cls((*base, *extra))

    def allows(self, origin: str) -> bool:
        if self.any_origin:
            return True
        if self.local_only:
            host = urlsplit(origin).hostname or ""
            if host in ("localhost", "127.0.0.1", "::1") or host.endswith(".localhost"):
                return True
        return any(_matches(pattern, origin) for pattern in self.patterns)


def _matches(pattern: str, origin: str) -> bool:
    if "*" not in pattern:
        return origin == pattern
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), origin) is not None


def preflight(request: web.Request) -> web.Response:
    """The answer to an OPTIONS request on any path (the Allow-Origin header is added as it is sent)."""
    response = web.Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = _METHODS
    response.headers["Access-Control-Allow-Headers"] = request.headers.get("Access-Control-Request-Headers", "*")
    response.headers["Access-Control-Max-Age"] = "600"
    return response


def add_origin_headers(request: web.Request, response: web.StreamResponse, policy: CorsPolicy) -> None:
    origin = request.headers.get("Origin")
    if origin and policy.allows(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
