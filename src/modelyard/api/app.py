"""The aiohttp application: routes from every front-end plus the Origin/Host, CORS, API key and error-envelope
middlewares, all served under `--api-prefix` when one is given.

The prefix is router mode's (server-http.cpp prepends `params.api_prefix` to every route it registers, the web
UI's included): every route is served under it, modelyard's own ones too (Ollama's API, the dashboard, the
activity and metrics routes), since a prefix is there for a reverse proxy that forwards only what is under it.
One middleware strips it and runs the others on the stripped path, so the route table, api/auth.py's scope
table and every handler stay prefix-free; redirects get it back. Children never see it (router mode passes it to
them and forwards the full path; here they are reached only through modelyard, with the stripped path)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from functools import partial, update_wrapper

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from modelyard.api import (
    activity,
    auth,
    cors,
    disabled,
    downloads,
    gcp,
    insight,
    management,
    ollama,
    openai,
    streams,
    ui,
)
from modelyard.api.context import CONTEXT, SETTINGS, AppContext, ServerSettings
from modelyard.api.errors import error_response
from modelyard.api.json import json_response
from modelyard.config.presets import ConfigError
from modelyard.errors import ErrorKind
from modelyard.tasks import log_failure

log = logging.getLogger(__name__)

PREFIX: web.RequestKey[str] = web.RequestKey("modelyard.api_prefix")  # set on a request served under it


@web.middleware
async def browser_guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse foreign Origins and Host names before anything else runs (preflights and the key check
    included): a cross-origin text/plain POST is executed even though the page cannot read the answer."""
    settings = request.app[SETTINGS]
    refusal = (cors.origin_refusal(request.headers.get("Origin"), settings.cors)
               or cors.host_refusal(request.headers.get("Host"), settings.bind_host, settings.allowed_hosts))
    if refusal is not None:
        log.warning("refused %s %s: %s", request.method, request.path, refusal)
        return error_response(ErrorKind.FORBIDDEN, refusal)
    return await handler(request)


@web.middleware
async def preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every CORS preflight, on any path, before authentication (browsers send no key with it)."""
    if request.method != "OPTIONS":
        return await handler(request)
    return cors.preflight(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Runs as each response is prepared, so streamed answers (SSE) carry the headers too."""
    cors.add_origin_headers(request, response, request.app[SETTINGS].cors)


@web.middleware
async def tolerant_path_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Serve `//api/tags` (a base URL ending in / plus `/api/tags`) and `/v1/models/` as their plain paths,
    without a redirect: not every client follows one, and a redirected POST may lose its body."""
    if not isinstance(request.match_info.http_exception, web.HTTPNotFound):
        return await handler(request)
    path = auth.canonical_path(request.path)
    if path == request.path:
        return await handler(request)
    retry = request.clone(rel_url=request.rel_url.with_path(path, keep_query=True))  # `?model=` stays
    match = await request.app.router.resolve(retry)
    if match.http_exception is not None:
        return await handler(request)
    match.add_app(request.app)
    match.freeze()
    retry._match_info = match  # what aiohttp's own dispatch does with a resolved route
    return await match.handler(retry)


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate the request and check its route's scope (api/auth.py's table); handlers that know the
    model check the key's model patterns through `request[auth.API_KEY]`. The key is never logged."""
    decision = auth.authorise(request.app[SETTINGS].api_keys, request.headers, request.method,
                              request.path, request.query, public=request.app.get(ui.PUBLIC, frozenset()))
    if isinstance(decision, auth.Refusal):
        if decision.status == 403:
            return error_response(ErrorKind.FORBIDDEN, decision.message)
        # llama-server's own 401 body, which its clients recognise
        return json_response({"error": {"message": decision.message, "type": "authentication_error",
                                        "code": 401}}, status=401)
    request[auth.API_KEY] = decision
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error_response(ErrorKind.NOT_FOUND, f"unknown endpoint {request.method} {_as_asked(request)}")
    except web.HTTPMethodNotAllowed as exc:
        return error_response(ErrorKind.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on "
                              f"{_as_asked(request)}; use {', '.join(sorted(exc.allowed_methods))}")
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        return error_response(ErrorKind.TOO_LARGE, f"request body larger than {limit // 2**20} MiB")


def _as_asked(request: web.Request) -> str:
    """The path as the client wrote it (with the --api-prefix the app strips)."""
    prefix: str = request.get(PREFIX, "")
    return prefix + request.path


MIDDLEWARES: tuple[Middleware, ...] = (browser_guard_middleware, preflight_middleware, error_middleware,
                                       api_key_middleware, tolerant_path_middleware)
# Outside the prefix: refused origins and preflights are answered as anywhere, every other request is a 404
_OUTSIDE: tuple[Middleware, ...] = (browser_guard_middleware, preflight_middleware, error_middleware)
# Router mode takes any string, and serves nothing at all when it lacks the leading slash or has a trailing one
_PREFIX_RE = re.compile(r"(/[A-Za-z0-9._~-]+)+")


def parse_api_prefix(value: str) -> str:
    """`--api-prefix`: "" (none) or `/name[/name...]`, without the trailing slash. ConfigError otherwise."""
    if value == "":
        return ""
    fixed = "/" + value.strip("/")
    if fixed == "/":
        problem = "leave it out to serve at the root"
    elif not value.startswith("/"):
        problem = f"start it with a slash: --api-prefix {fixed}"
    elif value.endswith("/"):
        problem = f"write it without the trailing slash: --api-prefix {fixed}"
    elif not _PREFIX_RE.fullmatch(value) or {".", ".."} & set(value.split("/")):
        problem = "use path segments of letters, digits and . _ ~ - (for example /llm or /api/v2)"
    else:
        return value
    raise ConfigError(f"--api-prefix {value[:80]!r} is not a path prefix: {problem}")


def strip_prefix(prefix: str, raw_path: str) -> str | None:
    """The path the routes know for `raw_path` (as sent, percent-encoded), or None when it is outside the
    prefix. `/llm` alone is outside, as in router mode (its root is `/llm/`)."""
    if raw_path.startswith(prefix + "/"):
        return raw_path[len(prefix):]
    return None


def _chain(middlewares: Sequence[Middleware], handler: Handler) -> Handler:
    """`handler` behind `middlewares`, the first outermost, as aiohttp builds an app's chain."""
    for middleware in reversed(middlewares):
        handler = update_wrapper(partial(middleware, handler=handler), handler)
    return handler


def _with_prefix(prefix: str, response: web.StreamResponse) -> None:
    """A redirect to one of our own paths (`/` -> `/ui`) must stay under the prefix."""
    location = response.headers.get("Location", "")
    if location.startswith("/") and not location.startswith("//") and not response.prepared:
        response.headers["Location"] = prefix + location


def prefix_middleware(prefix: str) -> Middleware:
    """Serve the app under `prefix`: the only middleware of the app, it runs the others on the stripped path."""

    async def outside(request: web.Request) -> web.StreamResponse:
        path = request.path
        hint = prefix + ("/" if path == prefix else path)
        return error_response(ErrorKind.NOT_FOUND, f"unknown endpoint {request.method} {path}: this server "
                              f"serves under --api-prefix {prefix}; try {hint}")

    outside_chain = _chain(_OUTSIDE, outside)

    @web.middleware
    async def serve_under_prefix(request: web.Request, handler: Handler) -> web.StreamResponse:
        # `handler` is the route of the whole path, which aiohttp resolved before any middleware ran: unused
        path = strip_prefix(prefix, request.rel_url.raw_path)
        if path is None:
            return await outside_chain(request)
        inner = request.clone(rel_url=request.rel_url.with_path(path, encoded=True, keep_query=True))
        inner[PREFIX] = prefix
        match = await request.app.router.resolve(inner)
        match.add_app(request.app)
        match.freeze()
        inner._match_info = match  # what aiohttp's own dispatch does with a resolved route
        try:
            response = await _chain(MIDDLEWARES, match.handler)(inner)
        except web.HTTPRedirection as redirect:
            _with_prefix(prefix, redirect)
            raise
        _with_prefix(prefix, response)
        return response

    return serve_under_prefix


def guarded_app(settings: ServerSettings) -> web.Application:
    """An app with no routes yet behind the Origin/Host, CORS, API key and error middlewares, under
    `--api-prefix`: a single node's (build_app) and the cluster's front (cluster/front.py), which has no
    manager of its own, so the middlewares read only `SETTINGS`."""
    prefix = settings.api_prefix
    app = web.Application(middlewares=[prefix_middleware(prefix)] if prefix else MIDDLEWARES,
                          client_max_size=settings.max_body_bytes)
    app.on_response_prepare.append(add_cors_headers)
    app[SETTINGS] = settings
    return app


def build_app(context: AppContext) -> web.Application:
    app = guarded_app(context.settings)
    app[CONTEXT] = context
    management.add_routes(app)
    downloads.add_routes(app)
    openai.add_routes(app)
    streams.add_routes(app)
    disabled.add_routes(app)
    ollama.add_routes(app)
    activity.add_routes(app)
    ui.add_routes(app)
    insight.add_routes(app)
    vertex = gcp.Vertex.from_environ(os.environ)
    if vertex is not None:  # last: it must not take a path another front-end serves
        gcp.add_routes(app, vertex)

    async def start_manager(app: web.Application) -> None:
        await context.manager.start()

    async def close_manager(app: web.Application) -> None:
        await context.manager.close()

    async def end_streams(app: web.Application) -> None:
        context.manager.end_subscriptions()  # long-lived /models/sse streams must not hold up shutdown
        context.activity.end_followers()  # and /activity/sse ones

    async def count_status_changes(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(context.metrics.follow())
        task.add_done_callback(log_failure)
        yield
        task.cancel()

    app.on_startup.append(start_manager)
    app.on_shutdown.append(end_streams)
    app.cleanup_ctx.append(count_status_changes)
    app.on_cleanup.append(close_manager)
    return app
