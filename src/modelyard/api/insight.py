"""The "why" and the "what": GET /decisions (the scheduler's recent decisions with their reasons, and why each
waiting request still waits), GET /decisions/sse, GET /logs/{model}?lines=N and GET /logs/sse?model=M (what
the children printed, kept per model across restarts). Read scope (api/auth.py); a key limited to some models
sees only their decisions, waiting requests and logs. Shapes: docs/observability-api.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from modelyard.api import auth
from modelyard.api.context import CONTEXT
from modelyard.api.errors import from_model_error
from modelyard.api.json import dumps, json_response
from modelyard.api.sse import event_stream, query_count
from modelyard.decisions import Waiting
from modelyard.errors import ModelError
from modelyard.logbook import LINES_PER_MODEL, LogLine
from modelyard.manager import DECISIONS_KEPT, Decision


def decision_json(decision: Decision) -> dict[str, Any]:
    return {"time": round(decision.time, 3), "kind": decision.kind.value, "cause": decision.cause,
            "model": decision.model, "reason": decision.reason, "request": decision.request}


def waiting_json(waiting: Waiting, visible: Callable[[str], bool]) -> dict[str, Any]:
    return {"request": waiting.request_id, "model": waiting.model, "position": waiting.position,
            "waited": round(waiting.waited, 2), "reason": waiting.reason,
            "blocked_by": [name for name in waiting.blocked_by if visible(name)],
            "gives_up_in": None if waiting.gives_up_in is None else round(waiting.gives_up_in, 2)}


def _visible(request: web.Request) -> Callable[[str], bool]:
    """Which models the request's key may see (by canonical name)."""
    catalog = request.app[CONTEXT].manager.catalog
    return lambda model: auth.may_use_named(request, catalog, model)


def _named_model(request: web.Request, name: str) -> str:
    """The canonical name of a model the request names (404 if unknown, 403 if its key may not see it)."""
    config = request.app[CONTEXT].manager.resolve(name)
    auth.require_model(request, config)
    return config.name


async def list_decisions(request: web.Request) -> web.Response:
    manager = request.app[CONTEXT].manager
    try:
        limit = query_count(request, "limit", 100, DECISIONS_KEPT)
    except ModelError as error:
        return from_model_error(error)
    visible = _visible(request)
    data = [decision_json(d) for d in manager.decisions() if visible(d.model)][:limit]
    waiting = [waiting_json(w, visible) for w in manager.waiting() if visible(w.model)]
    return json_response({"data": data, "waiting": waiting})


async def model_logs(request: web.Request) -> web.Response:
    manager = request.app[CONTEXT].manager
    try:
        model = _named_model(request, request.match_info["model"])
        count = query_count(request, "lines", 200, LINES_PER_MODEL)
    except ModelError as error:
        return from_model_error(error)
    return json_response({"model": model, "lines": [{"time": round(line.time, 3), "line": line.line}
                                                    for line in manager.logbook.last(model, count)]})


async def decisions_sse(request: web.Request) -> web.StreamResponse:
    manager = request.app[CONTEXT].manager
    visible = _visible(request)

    def frame(decision: Decision) -> bytes | None:
        if not visible(decision.model):
            return None
        return b"event: decision\ndata: " + dumps(decision_json(decision)) + b"\n\n"

    async with manager.follow_decisions() as events:
        return await event_stream(request, events, frame)


async def logs_sse(request: web.Request) -> web.StreamResponse:
    manager = request.app[CONTEXT].manager
    wanted = request.query.get("model")
    try:
        only = _named_model(request, wanted) if wanted else None
    except ModelError as error:
        return from_model_error(error)
    visible = _visible(request)

    def frame(line: LogLine) -> bytes | None:
        if (only is not None and line.model != only) or not visible(line.model):
            return None
        return b"event: log\ndata: " + dumps({"model": line.model, "time": round(line.time, 3),
                                               "line": line.line}) + b"\n\n"

    async with manager.logbook.follow() as lines:
        return await event_stream(request, lines, frame)


def add_routes(app: web.Application, *, list_decisions: Handler = list_decisions,
               decisions_sse: Handler = decisions_sse, logs_sse: Handler = logs_sse,
               model_logs: Handler = model_logs) -> None:
    """The decisions and logs routes; the cluster's front (cluster/insight.py) serves the same paths with its
    own handlers."""
    app.router.add_get("/decisions", list_decisions)
    app.router.add_get("/decisions/sse", decisions_sse)
    app.router.add_get("/logs/sse", logs_sse)  # before /logs/{model}, which would take it for a model's name
    app.router.add_get("/logs/{model}", model_logs)
