"""Model-routed inference endpoints: every POST llama-server serves, routed by the JSON `model` field, and
the GET endpoints routed by `?model=`. Each request holds a lease on its model until the answer is sent."""

from __future__ import annotations

import os

import orjson
from aiohttp import web

from modelyard.api import auth, loading
from modelyard.api.activity import acquire, names_model, router_metrics, tracked
from modelyard.api.body import read_json_object
from modelyard.api.context import CONTEXT
from modelyard.api.errors import error_response, from_model_error
from modelyard.config.catalog import ModelConfig
from modelyard.config.durations import parse_duration
from modelyard.errors import ErrorKind, ModelError
from modelyard.proxy import forward
from modelyard.scheduler import Status

POST_ROUTES = (
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/completion",
    "/v1/embeddings", "/embeddings", "/embedding", "/v1/rerank", "/rerank", "/v1/reranking", "/reranking",
    "/v1/responses", "/responses", "/v1/messages", "/v1/messages/count_tokens", "/infill", "/tokenize",
    "/detokenize", "/apply-template", "/v1/chat/completions/input_tokens", "/v1/responses/input_tokens",
    "/slots/{id}", "/lora-adapters", "/props",
)
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


async def _proxy(request: web.Request, model: str, body: bytes, keep_alive: float | None = None,
                 stream: bool = False) -> web.StreamResponse:
    context = request.app[CONTEXT]
    manager = context.manager
    autoload = autoload_flag(request, context.settings.autoload)
    try:
        auth.require_named(request, model, manager.resolve)
        if (stream and autoload and request.path in loading.CHAT_PATHS
                and loading.wanted(request, context.settings.send_loading_state)
                and manager.status_of(model) != Status.LOADED):
            return await loading.stream_while_loading(
                request, manager, model, acquire(request, model, autoload, keep_alive, stream),
                lambda lease, started: forward(request, lease.child, body, _forward_query(request), started))
        lease = await acquire(request, model, autoload, keep_alive, stream)
    except ModelError as error:
        return from_model_error(error)
    try:
        return await forward(request, lease.child, body, _forward_query(request))
    finally:
        manager.release(lease)


async def post_by_body_model(request: web.Request) -> web.StreamResponse:
    try:
        payload = await read_json_object(request, ' with a "model" field')
    except ModelError as error:
        return from_model_error(error)
    body = await request.read()  # aiohttp keeps the bytes it read: forwarded as they came
    model = payload.get("model")
    if model is None or model == "":
        model = request.query.get("model")
    if not model:
        return error_response(ErrorKind.MISSING_MODEL, "model name is missing from the request; "
                              "set \"model\" to one of the ids listed by GET /v1/models", param="model")
    if not isinstance(model, str):
        return error_response(ErrorKind.BAD_REQUEST, "\"model\" must be a string", param="model")
    names_model(request, model)
    if request.path in EMBEDDING_PATHS:
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
    return await _proxy(request, model, body, keep_alive, payload.get("stream") is True)


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
    for path in GET_ROUTES:
        app.router.add_get(path, metrics if path == "/metrics" else get_by_query_model)
