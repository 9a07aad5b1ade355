"""The activity, capture and router-metrics routes, and the wrapper that gives each model request its record.

`tracked(route, handler)` wraps a model route's handler (api/openai.py and api/ollama.py register theirs
through it): it opens the request's record, ends it with the answer's status (or the error it met), keeps the
capture when capture is on, and turns an admin's cancel of a request that has not started answering into a
499 in the route's own envelope. Handlers get their lease through `acquire` here, which times the queue wait;
the proxy marks the first byte and the tokens on `request[RECORD]`.

Listings show only the records of models the key may use (auth.may_use_named), like /models/sse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeGuard

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from modelyard.activity import CaptureDraft, Record, body_part, redact_headers
from modelyard.api import auth
from modelyard.api.body import read_json_object
from modelyard.api.context import CONTEXT
from modelyard.api.errors import error_response, from_model_error
from modelyard.api.json import dumps, json_response
from modelyard.api.sse import event_stream, query_count
from modelyard.errors import ErrorKind, ModelError
from modelyard.manager import Lease

RECORD: web.RequestKey[Record] = web.RequestKey("modelyard.activity_record")
_MAX_BODY_LIMIT = 16 * 2**20


def cancel_message(request_id: int) -> str:
    return f"request {request_id} was cancelled by an admin (POST /activity/{request_id}/cancel)"


def admins_cancel(record: Record | None) -> TypeGuard[Record]:
    """Whether the CancelledError being handled is an admin's cancel of this request (POST
    /activity/{id}/cancel), which is then absorbed so that the handler can answer it; False: the client's
    (it went away), to be re-raised."""
    task = asyncio.current_task()
    if record is None or not record.cancelled or task is None:
        return False
    task.uncancel()
    return True


def _error_text(response: web.StreamResponse) -> str | None:
    """The message of an error answer (either envelope), for the record; error bodies are small."""
    if response.status < 400 or not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return None
    try:
        error = orjson.loads(response.body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return response.body[:200].decode(errors="replace") or response.reason
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error) if error is not None else response.reason


def tracked(route: str, handler: Handler, ollama: bool = False) -> Handler:
    """`handler` with an activity record; `ollama`: refusals are in Ollama's shape ({"error": "..."})."""

    async def serve(request: web.Request) -> web.StreamResponse:
        activity = request.app[CONTEXT].activity
        task = asyncio.current_task()
        record = activity.begin(request.remote, route, request.method, task)
        request[RECORD] = record
        capture = activity.capture
        if capture.enabled:
            record.capture = CaptureDraft(capture.max_body_bytes, redact_headers(request.headers.items()))
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            if not admins_cancel(record):
                activity.end(record, None, "the client went away")
                raise
            message = cancel_message(record.id)
            response = (json_response({"error": message}, status=ErrorKind.CANCELLED.status) if ollama
                        else error_response(ErrorKind.CANCELLED, message))
        except Exception as exc:
            activity.end(record, 500, f"internal error: {exc!r}")
            raise
        if record.capture is not None:
            await _finish_capture(request, response, record.capture)
        activity.end(record, response.status, _error_text(response))
        return response

    return serve


async def _finish_capture(request: web.Request, response: web.StreamResponse, draft: CaptureDraft) -> None:
    try:
        body = await request.read()  # already read by the handler: aiohttp keeps the bytes
    except (web.HTTPException, ConnectionError) as exc:
        draft.request = {"headers": draft.request_headers, "body": f"[unreadable: {exc}]", "truncated": False}
    else:
        draft.request = {"headers": draft.request_headers, **body_part(body, draft.limit)}
    draft.response_headers = redact_headers(response.headers.items())
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        draft.add(response.body)


def names_model(request: web.Request, model: str) -> None:
    """The request names its model (as asked; `acquire` puts the canonical name): a refusal before it queues
    (an unknown model, a bad option) is then recorded under that name."""
    record = request.get(RECORD)
    if record is not None:
        record.model = model


def _canonical(request: web.Request, model: str) -> str:
    try:
        return request.app[CONTEXT].manager.resolve(model).name
    except ModelError:
        return model


async def acquire(request: web.Request, model: str, autoload: bool = True, keep_alive: float | None = None,
                  stream: bool = False, record: Record | None = None) -> Lease:
    """manager.acquire, with the request's record (or `record`: one of several model requests in one HTTP
    request, a Vertex AI prediction's instances) showing it queued, then running with its queue wait."""
    context = request.app[CONTEXT]
    record = record or request.get(RECORD)
    if record is None:
        return await context.manager.acquire(model, autoload, keep_alive)
    context.activity.queued(record, _canonical(request, model), stream)
    lease = await context.manager.acquire(model, autoload, keep_alive)
    context.activity.running(record, lease.model)
    return lease


# --- listings -----------------------------------------------------------------------------------------------

def _visibility(request: web.Request) -> Callable[[str | None], bool]:
    """Which records the request's key may see: those of the models it may use; one of no known model (refused
    before it named one) only by a key limited to no models."""
    key = request[auth.API_KEY]
    if key is None:
        return lambda model: True
    catalog = request.app[CONTEXT].manager.catalog

    def visible(model: str | None) -> bool:
        return key.may_use(()) if model is None else auth.may_use_named(request, catalog, model)

    return visible


def _filter(request: web.Request) -> Callable[[str | None], bool]:
    visible = _visibility(request)
    wanted = request.query.get("model")
    if not wanted:
        return visible
    name = _canonical(request, wanted)
    return lambda model: model == name and visible(model)


async def list_activity(request: web.Request) -> web.Response:
    activity = request.app[CONTEXT].activity
    try:
        limit = query_count(request, "limit", 100, activity.size)
    except ModelError as error:
        return from_model_error(error)
    wanted = _filter(request)
    return json_response({"data": [r.as_json() for r in activity.recent(limit, lambda r: wanted(r.model))],
                          "in_flight": [r.as_json() for r in activity.in_flight(lambda r: wanted(r.model))]})


async def activity_sse(request: web.Request) -> web.StreamResponse:
    context = request.app[CONTEXT]
    wanted = _filter(request)

    def frame(record: dict[str, Any]) -> bytes | None:
        if not wanted(record["model"]):
            return None
        return b"event: request\ndata: " + dumps(record) + b"\n\n"

    async with context.activity.follow() as frames:
        return await event_stream(request, frames, frame)


async def cancel(request: web.Request) -> web.Response:
    activity = request.app[CONTEXT].activity
    raw = request.match_info["id"]
    if not raw.isdigit():
        return error_response(ErrorKind.BAD_REQUEST, f"request id must be a number (the id in GET /activity), "
                              f"not {raw[:40]!r}")
    request_id = int(raw)
    visible = _visibility(request)
    found = activity.in_flight(lambda r: r.id == request_id and visible(r.model))
    if not found or not activity.cancel(request_id, cancel_message(request_id)):
        return error_response(ErrorKind.NOT_FOUND, f"request {request_id} is not in flight (it has finished or "
                              "never existed); GET /activity lists the requests in flight")
    return json_response({"success": True})


# --- capture --------------------------------------------------------------------------------------------------

def _capture_state(request: web.Request) -> dict[str, Any]:
    store = request.app[CONTEXT].activity.capture
    return {"enabled": store.enabled, "max_bytes": store.max_bytes, "max_body_bytes": store.max_body_bytes}


async def get_capture(request: web.Request) -> web.Response:
    store = request.app[CONTEXT].activity.capture
    visible = _visibility(request)
    return json_response({**_capture_state(request), "data": [c for c in store.items() if visible(c["model"])]})


async def set_capture(request: web.Request) -> web.Response:
    store = request.app[CONTEXT].activity.capture
    try:
        payload = await read_json_object(request, ' like {"enabled": true, "max_body_bytes": 65536}')
    except ModelError as error:
        return from_model_error(error)
    unknown = sorted(set(payload) - {"enabled", "max_body_bytes"})
    if unknown:
        return error_response(ErrorKind.BAD_REQUEST, f"unknown field(s) {', '.join(unknown)}; the fields are "
                              "enabled and max_body_bytes")
    enabled = payload.get("enabled")
    if not isinstance(enabled, bool):
        return error_response(ErrorKind.BAD_REQUEST, '"enabled" must be true or false', param="enabled")
    limit = payload.get("max_body_bytes", store.max_body_bytes)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= _MAX_BODY_LIMIT:
        return error_response(ErrorKind.BAD_REQUEST, f'"max_body_bytes" must be a whole number from 0 to '
                              f"{_MAX_BODY_LIMIT}", param="max_body_bytes")
    store.enabled, store.max_body_bytes = enabled, limit
    return json_response({"success": True, **_capture_state(request)})


# --- the router's metrics -------------------------------------------------------------------------------------

async def router_metrics(request: web.Request) -> web.Response:
    """Prometheus' text format; a key limited to some models sees only their series."""
    context = request.app[CONTEXT]
    key = request[auth.API_KEY]
    visible = None
    if key is not None and key.models:
        catalog = context.manager.catalog
        visible = lambda model: auth.may_use_named(request, catalog, model)  # noqa: E731
    return web.Response(body=context.metrics.exposition(visible), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/activity", list_activity)
    app.router.add_get("/activity/sse", activity_sse)
    app.router.add_post("/activity/{id}/cancel", cancel)
    app.router.add_get("/capture", get_capture)
    app.router.add_post("/capture", set_capture)
