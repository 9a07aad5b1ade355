"""Model-routed inference endpoints: every POST llama-server serves, routed by the JSON `model` field (by the
`model` form field for the multipart transcription routes, whose bodies stream on to the child: api/multipart.py),
and the GET endpoints routed by `?model=`. Each request holds a lease on its model until the answer is sent; a
request with an `X-Conversation-Id` header also registers its conversation for the resumable-stream routes
(api/streams.py), which keep it going when its client leaves."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from modelyard.api import auth, loading, multipart, streams
from modelyard.api.activity import RECORD, acquire, names_model, router_metrics, tracked
from modelyard.api.body import read_json_object
from modelyard.api.context import CONTEXT
from modelyard.api.errors import error_response, from_model_error
from modelyard.config.catalog import ModelConfig
from modelyard.config.durations import parse_duration
from modelyard.errors import ErrorKind, ModelError
from modelyard.proxy import forward, upstream_headers
from modelyard.scheduler import Status

POST_ROUTES = (
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/completion",
    "/v1/embeddings", "/embeddings", "/embedding", "/v1/rerank", "/rerank", "/v1/reranking", "/reranking",
    "/v1/responses", "/responses", "/v1/messages", "/v1/messages/count_tokens", "/infill", "/tokenize",
    "/detokenize", "/apply-template", "/v1/chat/completions/input_tokens", "/v1/responses/input_tokens",
    "/slots/{id}", "/lora-adapters", "/props", "/chat/completions/input_tokens", "/responses/input_tokens",
    "/v1/chat/completions/control", "/v1/systemone",
)
MULTIPART_ROUTES = ("/v1/audio/transcriptions", "/audio/transcriptions")  # the model is a form field
GET_ROUTES = ("/slots", "/metrics", "/lora-adapters")
EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/embeddings", "/embedding"})


def check_embeddings(config: ModelConfig) -> None:
    """Refuse embeddings for a model whose child would answer llama-server's 501 "start it with
    `--embeddings`" (which a modelyard user cannot do), before loading it, naming the preset key instead."""
    if not config.serves_embeddings(os.environ):
        raise ModelError(ErrorKind.BAD_REQUEST, f"model '{config.name}' does not serve embeddings; add "
                         "`embeddings = true` to its section in the --models-preset file (or pass --embeddings)")


def autoload_flag(request: web.Request, default: bool) -> bool:
    """Router mode's rule: `?autoload=true|1` loads, any other value does not, absent means the default."""
    value = request.query.get("autoload")
    return default if value is None else value.lower() in ("true", "1")


def _forward_query(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.query.items() if k != "autoload"}


def _cancelled_by_admin(request: web.Request) -> bool:
    record = request.get(RECORD)
    return record is not None and record.cancelled


def _loading_messages(request: web.Request, model: str, autoload: bool, stream: bool) -> bool:
    """Whether the answer streams load messages while it waits (api/loading.py)."""
    context = request.app[CONTEXT]
    return (stream and autoload and request.path in loading.CHAT_PATHS
            and loading.wanted(request, context.settings.send_loading_state)
            and context.manager.status_of(model) != Status.LOADED)


async def _proxy(request: web.Request, model: str, body: bytes | AsyncIterable[bytes],
                 keep_alive: float | None = None, stream: bool = False) -> web.StreamResponse:
    context = request.app[CONTEXT]
    manager = context.manager
    autoload = autoload_flag(request, context.settings.autoload)
    try:
        auth.require_named(request, model, manager.resolve)
        conv_id = request.headers.get(streams.HEADER)
        if conv_id:
            return await _proxy_conversation(request, conv_id, model, body, keep_alive, stream, autoload)
        if _loading_messages(request, model, autoload, stream):
            return await _while_loading(request, model, body, keep_alive, stream, autoload)
        lease = await acquire(request, model, autoload, keep_alive, stream)
    except ModelError as error:
        return from_model_error(error)
    try:
        return await forward(request, lease.child, body, _forward_query(request))
    finally:
        manager.release(lease)


async def _while_loading(request: web.Request, model: str, body: bytes | AsyncIterable[bytes],
                         keep_alive: float | None, stream: bool, autoload: bool) -> web.StreamResponse:
    """The answer that streams the load's messages, then the model's own stream (api/loading.py)."""
    return await loading.stream_while_loading(
        request, request.app[CONTEXT].manager, model, acquire(request, model, autoload, keep_alive, stream),
        lambda lease, started: forward(request, lease.child, body, _forward_query(request), started))


async def _proxy_conversation(request: web.Request, conv_id: str, model: str, body: bytes | AsyncIterable[bytes],
                              keep_alive: float | None, stream: bool, autoload: bool) -> web.StreamResponse:
    """`_proxy` for a request with an X-Conversation-Id (api/streams.py): registered before it waits, cancelled
    by a stop while it waits, and, as in router mode, not abandoned when its client goes away (a JSON body is
    still sent once the model is loaded; a generation under way goes on into the child's session). Refusals
    are ModelErrors."""
    manager = request.app[CONTEXT].manager
    session = streams.begin(request, conv_id, manager.resolve(model).name)
    if _loading_messages(request, model, autoload, stream):
        try:
            return await _while_loading(request, model, body, keep_alive, stream, autoload)
        finally:
            session.settled()
    try:
        lease = await acquire(request, model, autoload, keep_alive, stream)
    except asyncio.CancelledError:
        if isinstance(body, bytes) and not _cancelled_by_admin(request):
            streams.finish_detached(manager, session, model, autoload, keep_alive, stream, request.method,
                                    request.path, body or None, upstream_headers(request), _forward_query(request))
        else:
            session.settled()
        raise
    except ModelError:
        session.settled()
        raise
    session.settled()
    if not session.alive():
        manager.release(lease)
        return error_response(ErrorKind.BAD_REQUEST, streams.STOPPED)
    held = False
    try:
        return await forward(request, lease.child, body, _forward_query(request))
    except asyncio.CancelledError:
        if not _cancelled_by_admin(request):
            streams.hold_until_done(manager, session, lease)
            held = True
        raise
    finally:
        if not held:
            manager.release(lease)


@dataclass(frozen=True)
class Planned:
    """A JSON model request checked and ready to send: its model, the body the child gets, its keep-alive."""

    model: str
    body: bytes
    keep_alive: float | None
    stream: bool


def plan(request: web.Request, path: str, payload: dict[str, Any], body: bytes) -> Planned | web.Response:
    """Which model a JSON request names (the body's `model`, else `?model=`) and what the child gets, or the
    refusal; shared by the routes and the Vertex AI predict route (api/gcp.py)."""
    model = payload.get("model")
    if model is None or model == "":
        model = request.query.get("model")
    if not model:
        return error_response(ErrorKind.MISSING_MODEL, "model name is missing from the request; "
                              "set \"model\" to one of the ids listed by GET /v1/models", param="model")
    if not isinstance(model, str):
        return error_response(ErrorKind.BAD_REQUEST, "\"model\" must be a string", param="model")
    names_model(request, model)
    if path in EMBEDDING_PATHS:
        try:
            check_embeddings(request.app[CONTEXT].manager.resolve(model))
        except ModelError as error:
            return from_model_error(error)
    keep_alive = None
    if "keep_alive" in payload:  # modelyard's extension, as Ollama has it; the engine never sees it
        try:
            keep_alive = parse_duration(payload.pop("keep_alive"))
        except ValueError as exc:
            return error_response(ErrorKind.BAD_REQUEST, str(exc), param="keep_alive")
        body = orjson.dumps(payload)
    return Planned(model, body, keep_alive, payload.get("stream") is True)


async def post_by_body_model(request: web.Request) -> web.StreamResponse:
    try:
        payload = await read_json_object(request, ' with a "model" field')
    except ModelError as error:
        return from_model_error(error)
    body = await request.read()  # aiohttp keeps the bytes it read: forwarded as they came
    planned = plan(request, request.path, payload, body)
    if isinstance(planned, web.Response):
        return planned
    return await _proxy(request, planned.model, planned.body, planned.keep_alive, planned.stream)


async def post_multipart(request: web.Request) -> web.StreamResponse:
    """A transcription: the model is the form's `model` field (router mode turns the form's text fields into
    its JSON body), else `?model=`. Any other body is taken as JSON, as router mode does."""
    if request.content_type != "multipart/form-data":
        return await post_by_body_model(request)
    try:
        read = await multipart.read_field(request, "model", request.app[CONTEXT].settings.max_body_bytes)
    except ModelError as error:
        return from_model_error(error)
    try:
        model = read.value or request.query.get("model")
        if not model:
            return error_response(ErrorKind.MISSING_MODEL, "model name is missing from the request; add a "
                                  "\"model\" form field naming one of the ids listed by GET /v1/models",
                                  param="model")
        names_model(request, model)
        response = await _proxy(request, model, multipart.replay(request, read))
    finally:
        read.close()
    if isinstance(read.error, multipart.BodyTooLarge):
        return error_response(ErrorKind.TOO_LARGE, str(read.error))
    if read.error is not None:
        raise read.error  # the client's own failure (a body deadline: 408), as a JSON route's read raises it
    return response


async def get_by_query_model(request: web.Request) -> web.StreamResponse:
    model = request.query.get("model")
    if not model:
        return error_response(ErrorKind.MISSING_MODEL, "model name is missing; add ?model=<id> to the URL",
                              param="model")
    return await _proxy(request, model, b"")


async def metrics(request: web.Request) -> web.StreamResponse:
    """The child's own metrics with `?model=`, the router's (Prometheus) without."""
    if request.query.get("model"):
        return await get_by_query_model(request)
    return await router_metrics(request)


def add_routes(app: web.Application) -> None:
    for path in POST_ROUTES:
        app.router.add_post(path, tracked(path, post_by_body_model))  # each one gets an activity record
    for path in MULTIPART_ROUTES:
        app.router.add_post(path, tracked(path, post_multipart))
    for path in GET_ROUTES:
        app.router.add_get(path, metrics if path == "/metrics" else get_by_query_model)
