"""What the dashboard reads at the cluster's front (docs/cluster.md, Visibility): every node's activity,
decisions and logs as one, and the dashboard itself at /ui.

GET /activity, /decisions and /logs/{model} ask each reachable node the same question (the front's own query,
with the cluster key) and merge the answers (pure: `merged_activity`, `merged_decisions`, `merged_lines`): each
record gets its `node`, lists newest first (logs oldest first, as on one node) and cut to the asked limit.
/activity/sse, /decisions/sse and /logs/sse subscribe to every node before their answer starts, as
front.models_sse does, so no event made once the client has the headers is missed, and relay each event with its
node. Activity ids are per node, so the front's ids name their node: `NODE:ID` (`front_id`), a string the
dashboard passes back unchanged in POST /activity/{id}/cancel, which goes to that node with its own id.

Keys are as on one node: the scope table (api/auth.py) is the front's middleware too, and a key limited to some
models sees only their records (Front.may_use, over the names the nodes' listings give); nodes are asked with
the cluster key, which sees everything, so the filter is applied here. A node that does not answer is left out
of a listing and logged; a node's feed that ends is logged, and the stream ends once every node's has, so that
the dashboard reconnects (with the nodes there are then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import aiohttp
from aiohttp import web

from modelyard.activity import RING_SIZE
from modelyard.api import auth, ui
from modelyard.api import insight as api_insight
from modelyard.api.errors import error_response, from_model_error
from modelyard.api.json import dumps, json_response
from modelyard.api.sse import event_stream, query_count
from modelyard.cluster import front as cluster_front  # front.build_front adds these routes: read at call time
from modelyard.errors import ErrorKind, ModelError
from modelyard.logbook import LINES_PER_MODEL
from modelyard.manager import DECISIONS_KEPT
from modelyard.tasks import log_failure

if TYPE_CHECKING:
    from modelyard.cluster.front import Front

log = logging.getLogger(__name__)

Visible = Callable[[str | None], bool]
SEPARATOR = ":"  # in a front id, between the node and its own id: node names never end in digits after it


# --- pure: ids and merges ----------------------------------------------------------------------------------

def front_id(node: str, record_id: int) -> str:
    return f"{node}{SEPARATOR}{record_id}"


def node_record(raw: str) -> tuple[str, int] | None:
    """The node and its own id a front id names (`front_id`'s inverse), or None if it names none."""
    node, separator, number = raw.rpartition(SEPARATOR)
    if not separator or not node or not number.isdigit():
        return None
    return node, int(number)


def activity_record(node: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """A node's activity record as the front shows it: with its node, and an id that names it."""
    return {**record, "id": front_id(node, int(record["id"])), "node": node}


def _ended(record: Mapping[str, Any]) -> float:
    """When a finished request ended (a node lists its recent ones in that order, newest first)."""
    return float(record.get("time") or 0.0) + float(record.get("duration") or 0.0)


def merged_activity(answers: Mapping[str, Mapping[str, Any]], limit: int, visible: Visible) -> dict[str, Any]:
    """The nodes' GET /activity answers as one: in flight oldest first, recent newest first and cut to `limit`,
    only records of models `visible` says, each with its node and front id."""
    in_flight = [activity_record(node, r) for node, answer in answers.items() for r in answer.get("in_flight", [])
                 if visible(r.get("model"))]
    recent = [activity_record(node, r) for node, answer in answers.items() for r in answer.get("data", [])
              if visible(r.get("model"))]
    in_flight.sort(key=lambda r: float(r.get("time") or 0.0))
    recent.sort(key=_ended, reverse=True)
    return {"data": recent[:limit], "in_flight": in_flight}


def merged_decisions(answers: Mapping[str, Mapping[str, Any]], limit: int, visible: Visible) -> dict[str, Any]:
    """The nodes' GET /decisions answers as one: decisions newest first and cut to `limit`, the waiting requests
    node after node in each one's queue order, what blocks them only as far as `visible` lets the key see; each
    with its node (a request number is its node's scheduler's)."""
    data = [{**d, "node": node} for node, answer in answers.items() for d in answer.get("data", [])
            if visible(d.get("model"))]
    data.sort(key=lambda d: float(d.get("time") or 0.0), reverse=True)
    waiting = [{**w, "node": node, "blocked_by": [m for m in w.get("blocked_by", []) if visible(m)]}
               for node, answer in answers.items() for w in answer.get("waiting", []) if visible(w.get("model"))]
    return {"data": data[:limit], "waiting": waiting}


def merged_lines(answers: Mapping[str, Iterable[Mapping[str, Any]]], count: int) -> list[dict[str, Any]]:
    """The nodes' log lines of one model as one log, oldest first (lines of the same moment in node order), the
    last `count`, each with its node."""
    lines = [{**line, "node": node} for node, found in answers.items() for line in found]
    lines.sort(key=lambda line: float(line.get("time") or 0.0))
    return lines[-count:] if count > 0 else []


# --- asking the nodes ----------------------------------------------------------------------------------------

async def visibility(request: web.Request) -> Visible:
    """Which records the request's key may see, as on one node (api/activity.py): those of the models it may use
    by any of their names (a limited key's patterns may name an alias: the listings are read again for them);
    a record of no model (refused before it named one) only by a key limited to no models."""
    front = request.app[cluster_front.FRONT]
    key = request[auth.API_KEY]
    if key is None:
        return lambda model: True
    if key.models:
        await front.listings()

    def visible(model: str | None) -> bool:
        return key.may_use(()) if model is None else front.may_use(request, model)

    return visible


def _path(path: str, query: Mapping[str, str]) -> str:
    return f"{path}?{urlencode(query, quote_via=quote)}" if query else path


def _reachable(front: Front, only: Iterable[str] | None = None) -> list[str]:
    names = [view.node for view in front.nodes.views() if view.node not in front.nodes.unreachable()]
    if only is None:
        return names
    wanted = set(only)
    return [name for name in names if name in wanted]


async def _ask(front: Front, nodes: list[str], path: str) -> dict[str, Any]:
    """Each node's JSON answer to GET `path`; a node that fails to answer is left out, and logged."""
    answers = await asyncio.gather(*(front.nodes.get_json(node, path) for node in nodes), return_exceptions=True)
    found = {}
    for node, answer in zip(nodes, answers, strict=True):
        if isinstance(answer, Exception):
            log.warning("node %s did not answer GET %s: %r", node, path, answer)
        elif isinstance(answer, BaseException):  # cancelled: not ours to absorb
            raise answer
        else:
            found[node] = answer
    return found


def _serving(front: Front, model: str) -> list[str]:
    return [view.node for view in front.nodes.views() if model in view.models]


async def _named_model(request: web.Request, name: str) -> tuple[str, list[str]]:
    """The model a request names and the nodes that serve it (404 if none does, 403 if the key may not see it)."""
    front = request.app[cluster_front.FRONT]
    model = await front.resolve(name)
    nodes = _serving(front, model)
    if not nodes:
        raise ModelError(ErrorKind.UNKNOWN_MODEL, f"model '{name}' not found")
    front.check(request, model)
    return model, nodes


def _limited(request: web.Request, limit: int, most: int) -> int:
    """How many records to ask each node for: `limit`, or all it keeps when the key sees only some models (on
    one node the limit counts the visible records, so the hidden ones must not take the room)."""
    key = request[auth.API_KEY]
    return most if key is not None and key.models else limit


# --- the listings --------------------------------------------------------------------------------------------

async def list_activity(request: web.Request) -> web.Response:
    front = request.app[cluster_front.FRONT]
    try:
        limit = query_count(request, "limit", 100, RING_SIZE)
    except ModelError as error:
        return from_model_error(error)
    visible = await visibility(request)
    query = {**request.query, "limit": str(_limited(request, limit, RING_SIZE))}
    answers = await _ask(front, _reachable(front), _path("/activity", query))
    return json_response(merged_activity(answers, limit, visible))


async def list_decisions(request: web.Request) -> web.Response:
    front = request.app[cluster_front.FRONT]
    try:
        limit = query_count(request, "limit", 100, DECISIONS_KEPT)
    except ModelError as error:
        return from_model_error(error)
    visible = await visibility(request)
    answers = await _ask(front, _reachable(front),
                         _path("/decisions", {"limit": str(_limited(request, limit, DECISIONS_KEPT))}))
    return json_response(merged_decisions(answers, limit, visible))


async def model_logs(request: web.Request) -> web.Response:
    front = request.app[cluster_front.FRONT]
    try:
        model, nodes = await _named_model(request, request.match_info["model"])
        count = query_count(request, "lines", 200, LINES_PER_MODEL)
    except ModelError as error:
        return from_model_error(error)
    path = _path(f"/logs/{quote(model, safe='')}", {"lines": str(count)})
    answers = await _ask(front, _reachable(front, nodes), path)
    return json_response({"model": model, "lines": merged_lines(
        {node: answer.get("lines", []) for node, answer in answers.items()}, count)})


async def cancel(request: web.Request) -> web.Response:
    """A request in flight, by its front id: cancelled on its node, with the node's own id, if the key may see
    it there (the node, asked with the cluster key, would cancel anyone's)."""
    front = request.app[cluster_front.FRONT]
    raw = request.match_info["id"]
    named = node_record(raw)
    if named is None:
        return error_response(ErrorKind.BAD_REQUEST, f"request id must be a node and a number, NODE{SEPARATOR}ID "
                              f"as GET /activity lists it, not {raw[:80]!r}")
    node, number = named
    gone = error_response(ErrorKind.NOT_FOUND, f"request {raw} is not in flight (it has finished or never "
                          "existed); GET /activity lists the requests in flight")
    if node not in {view.node for view in front.nodes.views()}:
        return gone
    visible = await visibility(request)
    try:
        listing = await front.nodes.get_json(node, "/activity?limit=1")
        if not any(r.get("id") == number and visible(r.get("model")) for r in listing.get("in_flight", [])):
            return gone
        await front.nodes.post_json(node, f"/activity/{number}/cancel", {})
    except aiohttp.ClientResponseError as exc:
        if exc.status == ErrorKind.NOT_FOUND.status:  # it ended between the two calls
            return gone
        return error_response(ErrorKind.UPSTREAM, f"node {node} did not take the cancel: {exc.status} {exc.message}")
    except aiohttp.ClientError as exc:
        return error_response(ErrorKind.UPSTREAM, f"node {node} did not take the cancel: {exc or repr(exc)}")
    return json_response({"success": True})


# --- the streams ---------------------------------------------------------------------------------------------

Rewrite = Callable[[str, dict[str, Any]], dict[str, Any] | None]


async def _relay(request: web.Request, nodes: list[str], path: str, event: str,
                 rewrite: Rewrite) -> web.StreamResponse:
    """The nodes' SSE feeds at `path` as one stream of `event` events: every node subscribed before the answer
    starts, each record as `rewrite` makes it from its node and itself (None: not shown). It ends when every
    node's feed has ended (a node that could not be subscribed is logged and left out)."""
    front = request.app[cluster_front.FRONT]
    records: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
    name = event.encode()

    async def follow(node: str, feed: AsyncIterator[dict[str, Any]], left: list[str]) -> None:
        try:
            async for record in feed:
                records.put_nowait((node, record))
        except aiohttp.ClientError as exc:
            log.warning("node %s's %s ended: %r", node, path, exc)
        finally:
            left.remove(node)
            if not left:
                records.put_nowait(None)

    def frame(item: tuple[str, dict[str, Any]]) -> bytes | None:
        shown = rewrite(*item)
        return None if shown is None else b"event: " + name + b"\ndata: " + dumps(shown) + b"\n\n"

    async with contextlib.AsyncExitStack() as stack:
        feeds = {}
        for node in nodes:
            try:
                feeds[node] = await stack.enter_async_context(front.nodes.events(node, path))
            except aiohttp.ClientError as exc:
                log.warning("node %s's %s is not in this stream: %r", node, path, exc)
        if not feeds:
            records.put_nowait(None)
        left = list(feeds)
        tasks = [asyncio.create_task(follow(node, feed, left)) for node, feed in feeds.items()]
        for task in tasks:
            task.add_done_callback(log_failure)
        try:
            return await event_stream(request, records, frame)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)


async def activity_sse(request: web.Request) -> web.StreamResponse:
    front = request.app[cluster_front.FRONT]
    visible = await visibility(request)

    def shown(node: str, record: dict[str, Any]) -> dict[str, Any] | None:
        return activity_record(node, record) if visible(record.get("model")) else None

    return await _relay(request, _reachable(front), _path("/activity/sse", request.query), "request", shown)


def _tagged(visible: Visible) -> Rewrite:
    def shown(node: str, record: dict[str, Any]) -> dict[str, Any] | None:
        return {**record, "node": node} if visible(record.get("model")) else None

    return shown


async def decisions_sse(request: web.Request) -> web.StreamResponse:
    front = request.app[cluster_front.FRONT]
    return await _relay(request, _reachable(front), "/decisions/sse", "decision", _tagged(await visibility(request)))


async def logs_sse(request: web.Request) -> web.StreamResponse:
    """Every node's lines, or with ?model= those of one model from the nodes that serve it."""
    front = request.app[cluster_front.FRONT]
    wanted = request.query.get("model")
    nodes, query = _reachable(front), {}
    if wanted:
        try:
            model, serving = await _named_model(request, wanted)
        except ModelError as error:
            return from_model_error(error)
        nodes, query = _reachable(front, serving), {"model": model}
    visible = await visibility(request)
    return await _relay(request, nodes, _path("/logs/sse", query), "log", _tagged(visible))


def add_routes(app: web.Application) -> None:
    """The routes above, and the dashboard's page and files (api/ui.py's, which read only the settings)."""
    app.router.add_get("/activity", list_activity)
    app.router.add_get("/activity/sse", activity_sse)
    app.router.add_post("/activity/{id}/cancel", cancel)
    api_insight.add_routes(app, list_decisions=list_decisions, decisions_sse=decisions_sse, logs_sse=logs_sse,
                           model_logs=model_logs)
    ui.add_dashboard_routes(app)
