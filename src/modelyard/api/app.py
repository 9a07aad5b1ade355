"""The aiohttp application: routes from every front-end plus the Origin/Host, CORS, API key and error-envelope
middlewares."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from modelyard.api import activity, auth, cors, downloads, gcp, insight, management, ollama, openai, ui
from modelyard.api.context import CONTEXT, AppContext
from modelyard.api.errors import error_response
from modelyard.api.json import json_response
from modelyard.errors import ErrorKind
from modelyard.tasks import log_failure

log = logging.getLogger(__name__)


@web.middleware
async def browser_guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse foreign Origins and Host names before anything else runs (preflights and the key check
    included): a cross-origin text/plain POST is executed even though the page cannot read the answer."""
    settings = request.app[CONTEXT].settings
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
    cors.add_origin_headers(request, response, request.app[CONTEXT].settings.cors)


@web.middleware
async def tolerant_path_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Serve `//api/tags` (a base URL ending in / plus `/api/tags`) and `/v1/models/` as their plain paths,
    without a redirect: not every client follows one, and a redirected POST may lose its body."""
    if not isinstance(request.match_info.http_exception, web.HTTPNotFound):
        return await handler(request)
    path = auth.canonical_path(request.path)
    if path == request.path:
        return await handler(request)
    retry = request.clone(rel_url=request.rel_url.with_path(path))
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
    decision = auth.authorise(request.app[CONTEXT].settings.api_keys, request.headers, request.method,
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
        return error_response(ErrorKind.NOT_FOUND, f"unknown endpoint {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        return error_response(ErrorKind.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on "
                              f"{request.path}; use {', '.join(sorted(exc.allowed_methods))}")
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONTEXT].settings.max_body_bytes
        return error_response(ErrorKind.TOO_LARGE, f"request body larger than {limit // 2**20} MiB")


def build_app(context: AppContext) -> web.Application:
    app = web.Application(middlewares=[browser_guard_middleware, preflight_middleware, error_middleware,
                                       api_key_middleware, tolerant_path_middleware],
                          client_max_size=context.settings.max_body_bytes)
    app.on_response_prepare.append(add_cors_headers)
    app[CONTEXT] = context
    management.add_routes(app)
    downloads.add_routes(app)
    openai.add_routes(app)
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
