"""The aiohttp application: routes from every front-end plus CORS, API key and error-envelope middlewares."""

from __future__ import annotations

import hmac
import logging
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from modelyard.api import cors, ollama, openai, router
from modelyard.api.context import CONTEXT, AppContext
from modelyard.api.errors import error_response
from modelyard.errors import ErrorKind

log = logging.getLogger(__name__)

_OPEN_PATHS = frozenset({"/health", "/v1/health"})
_SLASHES = re.compile(r"//+")


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
    path = _SLASHES.sub("/", request.path)
    path = path.rstrip("/") or "/"
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


def _authorised(request: web.Request, keys: tuple[str, ...]) -> bool:
    auth = request.headers.get("Authorization", "")
    offered = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("X-Api-Key", "")
    return any(hmac.compare_digest(offered.encode(), key.encode()) for key in keys)


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = request.app[CONTEXT].settings.api_keys
    if keys and request.path not in _OPEN_PATHS and not _authorised(request, keys):
        return web.json_response({"error": {"message": "Invalid API Key", "type": "authentication_error",
                                            "code": 401}}, status=401)
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
    app = web.Application(middlewares=[preflight_middleware, error_middleware, api_key_middleware,
                                       tolerant_path_middleware],
                          client_max_size=context.settings.max_body_bytes)
    app.on_response_prepare.append(add_cors_headers)
    app[CONTEXT] = context
    router.add_routes(app)
    openai.add_routes(app)
    ollama.add_routes(app)

    async def start_manager(app: web.Application) -> None:
        await context.manager.start()

    async def close_manager(app: web.Application) -> None:
        await context.manager.close()

    async def end_streams(app: web.Application) -> None:
        context.manager.end_subscriptions()  # long-lived /models/sse streams must not hold up shutdown

    app.on_startup.append(start_manager)
    app.on_shutdown.append(end_streams)
    app.on_cleanup.append(close_manager)
    return app
