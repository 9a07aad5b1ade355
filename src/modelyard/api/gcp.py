"""Google Cloud Vertex AI's custom-container protocol, as llama-server's `register_gcp_compat`
(server-http.cpp) serves it: on when `AIP_MODE=PREDICTION`; `AIP_HTTP_PORT` (default 8080) replaces the
listening port, `AIP_HEALTH_ROUTE` adds a GET alias of /health, and `AIP_PREDICT_ROUTE` (default /predict)
takes `{"instances": [...]}` (at most 128), each instance a request body plus `@requestFormat`: the route,
as a path (`/v1/chat/completions`) or its camelCase alias (`chatCompletions`: the path without `/v1`, with `/`,
`-` and `_` dropped and the next letter capitalised). The instances run concurrently, never streamed (a
`stream` field is set to false), and the answer is `{"predictions": [...]}`, one per instance in order: the
route's JSON answer, or `{"error": {...}}` in its place.

What modelyard does beyond router mode: router mode's predictions of model routes all fail, since its proxy
answers are streams ("predict route does not support streaming responses") and its children, which inherit
AIP_MODE, move to AIP_HTTP_PORT and fail to load; here they reach the model (the children never see AIP_*:
engine/command.py). The router's own routes served as predictions are /health, /v1/health, /props, /models and
/v1/models (router mode's alias `models` is its POST /models, a download, when its hash map says so); an alias
shared by two paths means the /v1 one (`completions`: /v1/completions). Each instance sent to a model route is a
model request of its own, with its own activity record under that route (llama-server dispatches it as an
internal request to the route's handler), which an admin's cancel ends alone; the router's own routes get none,
as elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from modelyard.activity import Record, tokens_in_body
from modelyard.api import auth, management, openai
from modelyard.api.activity import acquire, admins_cancel, cancel_message
from modelyard.api.body import read_json_object
from modelyard.api.context import CONTEXT
from modelyard.api.errors import error_body, error_response, from_model_error
from modelyard.api.json import json_response
from modelyard.children import ChildError
from modelyard.config.presets import ConfigError
from modelyard.errors import ErrorKind, ModelError

MAX_INSTANCES = 128


async def _router_props(request: web.Request) -> web.StreamResponse:
    """The router's own /props: a model's (`?model=` on the predict route) would be a proxied GET."""
    if request.query.get("model"):
        return error_response(ErrorKind.BAD_REQUEST, "/props of a model is not served as a prediction; "
                              "GET /props?model=<id> instead")
    return await management.props(request)


_ROUTER_OWN: Mapping[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
    "/health": management.health, "/v1/health": management.health, "/props": _router_props,
    "/models": management.list_models, "/v1/models": management.list_models,
}


@dataclass(frozen=True)
class Vertex:
    port: int
    health_route: str  # "" = none
    predict_route: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Vertex | None:
        """The settings when AIP_MODE=PREDICTION, else None. ConfigError: AIP_HTTP_PORT is not a port."""
        if environ.get("AIP_MODE", "") != "PREDICTION":
            return None
        raw = environ.get("AIP_HTTP_PORT") or "8080"
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise ConfigError(f"AIP_HTTP_PORT={raw[:40]!r} is not a port number (1-65535)")
        return cls(int(raw), _route(environ.get("AIP_HEALTH_ROUTE", "")),
                   _route(environ.get("AIP_PREDICT_ROUTE", "")) or "/predict")


def _route(value: str) -> str:
    return value if not value or value.startswith("/") else "/" + value


def request_format(path: str) -> str:
    """llama-server's `path_to_gcp_format`: `/v1/chat/completions` -> `chatCompletions`."""
    text = path[3:] if path.startswith("/v1") and len(path) > 3 else path
    text = text.removeprefix("/")
    out, capital = [], False
    for char in text:
        if char == ":" or char == "{":  # a path parameter
            break
        if char in "/-_":
            capital = True
        else:
            out.append(char.upper() if capital else char)
            capital = False
    return "".join(out)


def aliases(paths: Iterable[str]) -> dict[str, str]:
    """alias -> path; on a collision the /v1 path wins."""
    table: dict[str, str] = {}
    for path in paths:
        alias = request_format(path)
        if alias not in table or path.startswith("/v1/"):
            table[alias] = path
    return table


DISPATCHED = (*openai.POST_ROUTES, *_ROUTER_OWN)
ALIASES = aliases(p for p in DISPATCHED if "{" not in p)


def target(request_format_value: str) -> str | None:
    """The path an instance's @requestFormat names, or None."""
    if request_format_value in ALIASES:
        return ALIASES[request_format_value]
    return request_format_value if request_format_value in DISPATCHED else None


async def predict(request: web.Request) -> web.Response:
    try:
        payload = await read_json_object(request, ' with an array field named "instances"')
    except ModelError as error:
        return from_model_error(error)
    instances = payload.get("instances")
    if not isinstance(instances, list):
        return error_response(ErrorKind.BAD_REQUEST, 'the request body must include an array field named '
                              '"instances"', param="instances")
    if len(instances) > MAX_INSTANCES:
        return error_response(ErrorKind.BAD_REQUEST, f"instances array exceeds maximum size of {MAX_INSTANCES}",
                              param="instances")
    predictions = await asyncio.gather(*(_predict_one(request, instance) for instance in instances))
    return json_response({"predictions": predictions})


async def _predict_one(request: web.Request, instance: Any) -> Any:
    if not isinstance(instance, dict):
        return error_body(ErrorKind.BAD_REQUEST, "each instance must be a JSON object")
    fmt = instance.get("@requestFormat")
    if not isinstance(fmt, str):
        return error_body(ErrorKind.BAD_REQUEST, "each instance must include a string @requestFormat")
    path = target(fmt)
    if path is None:
        return error_body(ErrorKind.BAD_REQUEST, f"no handler registered for @requestFormat: {fmt[:200]}; use a "
                          f"model route's path or alias (chatCompletions, completions, embeddings, tokenize, ...)")
    method = "GET" if path in _ROUTER_OWN else "POST"
    scope = auth.required_scope(method, path, request.query)
    key = request[auth.API_KEY]
    lacking = None if key is None or scope is None else auth.scope_refusal(key, scope, method, path)
    if lacking is not None:
        return error_body(ErrorKind.FORBIDDEN, lacking)
    if path in _ROUTER_OWN:
        return _json(await _ROUTER_OWN[path](request))
    body = {k: v for k, v in instance.items() if k != "@requestFormat"}
    if "stream" in body:
        body["stream"] = False
    return await _model_request(request, path, body)


async def _model_request(request: web.Request, path: str, body: dict[str, Any]) -> Any:
    """One instance for a model route, under its own record; this task (one of the gather's) is the one an
    admin's cancel ends, and its prediction then says so."""
    activity = request.app[CONTEXT].activity
    record = activity.begin(request.remote, path, "POST", asyncio.current_task())
    model = body.get("model")
    record.model = model if isinstance(model, str) and model else None
    try:
        status, prediction = await _ask_model(request, path, body, record)
    except asyncio.CancelledError:
        if not admins_cancel(record):
            activity.end(record, None, "the client went away")
            raise
        status, prediction = ErrorKind.CANCELLED.status, error_body(ErrorKind.CANCELLED, cancel_message(record.id))
    except Exception as exc:
        activity.end(record, 500, f"internal error: {exc!r}")
        raise
    activity.end(record, status, _message(prediction) if status >= 400 else None)
    return prediction


async def _ask_model(request: web.Request, path: str, body: dict[str, Any], record: Record) -> tuple[int, Any]:
    """The instance's status and prediction."""
    planned = openai.plan(request, path, body, orjson.dumps(body))
    if isinstance(planned, web.Response):
        return planned.status, _json(planned)
    context = request.app[CONTEXT]
    manager = context.manager
    try:
        auth.require_named(request, planned.model, manager.resolve)
        lease = await acquire(request, planned.model, openai.autoload_flag(request, context.settings.autoload),
                              planned.keep_alive, record=record)
    except ModelError as error:
        return error.kind.status, error_body(error.kind, error.message)
    try:
        async with lease.child.request("POST", path, body=planned.body,
                                       headers={"Content-Type": "application/json"}) as reply:
            answer = await reply.read()
            status = reply.status
    except ChildError as exc:
        return ErrorKind.UPSTREAM.status, error_body(ErrorKind.UPSTREAM, str(exc))
    finally:
        manager.release(lease)
    context.activity.first_byte(record)
    if status == 200:
        record.count(tokens_in_body(answer))
    return status, _parsed(answer)


def _message(prediction: Any) -> str | None:
    """An error prediction's message, for its record."""
    error = prediction.get("error") if isinstance(prediction, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return None if error is None else str(error)


def _json(response: web.StreamResponse) -> Any:
    body = response.body if isinstance(response, web.Response) else None
    return _parsed(body if isinstance(body, bytes) else b"")


def _parsed(body: bytes) -> Any:
    """As llama-server's parse_gcp_predict_response: JSON, else the text, null when empty."""
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace")


def add_routes(app: web.Application, vertex: Vertex) -> None:
    """ConfigError if AIP_PREDICT_ROUTE is a path modelyard already serves (router mode exits)."""
    taken = {resource.canonical for resource in app.router.resources()}
    if vertex.predict_route in taken:
        raise ConfigError(f"AIP_PREDICT_ROUTE={vertex.predict_route} is a route modelyard already serves; "
                          f"choose another path")
    if vertex.health_route and vertex.health_route not in taken:
        app.router.add_get(vertex.health_route, management.health)
    app.router.add_post(vertex.predict_route, predict)
