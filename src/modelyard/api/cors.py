"""Browser-facing security: which origins may call the API (CORS and the Origin check) and which Host names
are served (the DNS-rebinding check). The decisions are pure functions; api/app.py's middleware applies them.

The default is Ollama's: pages served from localhost, 127.0.0.1 or 0.0.0.0 (any port, http or https) and
desktop-app origins (app://, file://, tauri://, vscode-webview://, vscode-file://); `OLLAMA_ORIGINS` adds to
it. `--cors-origins` replaces it with llama-server's settings: `*` (echo any Origin, router mode's default),
`localhost` (only local origins), or a comma-separated list where `*` is a wildcard (`http://*.lan:*`).

A request whose Origin is not allowed is refused (403) before any handler runs: CORS headers only stop a page
from reading the answer, while a cross-origin `text/plain` POST (no preflight) is still executed, so a web page
could unload models or run generations. `Origin: null` (sandboxed iframes, some file pages) is refused unless
`null` is listed or the policy is `*`: any site can send it from a sandboxed iframe.

When bound to a loopback address, only Host values naming loopback (or listed in --allowed-hosts) are served:
a page on a domain that re-resolves to 127.0.0.1 (DNS rebinding) sends its own name as Host.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
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
        return _allows(self, origin)


# A browser's requests all carry its Origin, asked twice a request (the check, then the answer's headers):
# uncached, an origin matched only by a wildcard pattern of the default list (app://, vscode-webview://...)
# rebuilt each pattern's regex: 11.7 µs a call, the two about 8% of the router's CPU per proxied request.
# Bounded: a client sending ever new Origins only churns it.
@lru_cache(maxsize=256)
def _allows(policy: CorsPolicy, origin: str) -> bool:
    if policy.any_origin:
        return True
    if policy.local_only:
        host = urlsplit(origin).hostname or ""
        if host in ("localhost", "127.0.0.1", "::1") or host.endswith(".localhost"):
            return True
    return any(_matches(pattern, origin) for pattern in policy.patterns)


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


# --- the Origin and Host checks --------------------------------------------------------------------------

def origin_refusal(origin: str | None, policy: CorsPolicy) -> str | None:
    """Why a request from this Origin is refused, or None. No Origin: not a browser, allowed."""
    if origin is None or policy.allows(origin):
        return None
    return (f"origin {origin} is not allowed to call this server; allow it with --cors-origins "
            f"(or add it to OLLAMA_ORIGINS)")


def is_loopback_name(host: str) -> bool:
    """`localhost`, `*.localhost` (RFC 6761: always loopback, never delegated in DNS), 127.0.0.0/8 and ::1."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The name in a Host header, without its port (`[::1]:8080` -> `::1`); None if it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:] if end > 0 else "?"
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return header[1:end]
    name, _, port = header.partition(":")
    if not name or (port and not port.isdigit()) or any(c in name for c in "/@ \\"):
        return None
    return name.rstrip(".")


def parse_allowed_hosts(value: str | None) -> tuple[str, ...]:
    """`--allowed-hosts a.lan,*.example.org` / MODELYARD_ALLOWED_HOSTS: names without ports; `*` = any."""
    hosts = (h.strip().lower() for h in (value or "").split(","))
    return tuple(h[1:-1] if h.startswith("[") and h.endswith("]") else h for h in hosts if h)


# Every request asks it, with the same few Host values: uncached it parsed bind_host and the header as IP
# addresses each time (4.5 µs a request, 1.3% of the router's CPU per proxied /tokenize); bounded, so a client
# sending ever new Host values only churns it.
@lru_cache(maxsize=256)
def host_refusal(header: str | None, bind_host: str, allowed_hosts: tuple[str, ...]) -> str | None:
    """Why a request with this Host header is refused, or None.

    Bound to loopback: loopback names and --allowed-hosts are served. Bound elsewhere: any Host, unless
    --allowed-hosts is given (then loopback names and those). No Host header (HTTP/1.0): allowed."""
    if header is None or "*" in allowed_hosts:
        return None
    if not allowed_hosts and not is_loopback_name(bind_host):
        return None
    name = host_name(header)
    if name is not None and (is_loopback_name(name) or any(fnmatchcase(name, h) for h in allowed_hosts)):
        return None
    return (f"host {header!r} is not served here (a page on a foreign domain pointed at this server, as in "
            f"DNS rebinding, sends its own name); to serve it, add it to --allowed-hosts "
            f"(MODELYARD_ALLOWED_HOSTS), or `*` for any")


def exposure_warning(bind_host: str, has_keys: bool) -> str | None:
    """The start-up warning for a server any machine on the network can drive."""
    if has_keys or is_loopback_name(bind_host):
        return None
    return (f"listening on {bind_host or 'every address'} without an API key: anyone who can reach "
            f"this port can run and unload models; set LLAMA_API_KEY or --api-key-file")
