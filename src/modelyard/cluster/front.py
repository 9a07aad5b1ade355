"""The routes `modelyard serve --ray` serves (docs/cluster.md, issue 13): the single node's API over a cluster.

A request that names a model (a JSON body's `model`, Ollama's `model` or `name`, or `?model=`) is placed
(cluster.placement through `Nodes.place`) and forwarded to its node's app as it came, through a `NodeChild`, so
that the node resolves aliases, translates Ollama's API and streams as on one node, and proxy.forward ends a
stream cut by a lost node with an error event. What describes every model is merged from the nodes: GET /models
and /v1/models (each entry as the node where it runs best lists it, plus `nodes`: where it runs, with its status
and requests there), /v1/models/{id}, Ollama's /api/tags and /api/ps, and the /models/sse feed (each event with
its `node`), and /metrics (each node's, every sample labelled with its node: cluster/exposition.py). POST
/models/load loads where placement says; /models/unload stops the model on every node.

The front checks the client's key (scopes and model patterns, the same middlewares and rules as one node) and
sends every node the cluster key instead. A model's names (its id and aliases) come from the nodes' listings,
fetched when a name is not a model id any node publishes. The nodes' activity, decisions and logs, merged, and
the dashboard at /ui are cluster/insight.py's. Transcriptions and resumable streams are not served here yet: they
answer 404 with the unknown-endpoint error. llama.cpp's web UI is, at `/` (it needs only the routes above).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from modelyard.api import auth, management, ollama, ui
from modelyard.api.app import guarded_app
from modelyard.api.body import read_json_object
from modelyard.api.context import ServerSettings
from modelyard.api.errors import error_response, from_model_error
from modelyard.api.json import dumps, json_response
from modelyard.api.ollama import ollama_error_response
from modelyard.api.openai import GET_ROUTES, POST_ROUTES, autoload_flag
from modelyard.cluster import exposition, insight
from modelyard.cluster.ingress import NodeChild, Nodes
from modelyard.cluster.placement import NodeState, Refusal
from modelyard.cluster.replicas import Replicas
from modelyard.errors import ErrorKind, ModelError
from modelyard.proxy import forward
from modelyard.scheduler import Status

log = logging.getLogger(__name__)

OLLAMA_MODEL_ROUTES = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show")
# Which status a merged entry shows when a model is on several nodes: the one nearest to serving at once
_BEST = (Status.LOADED, Status.LOADING, Status.STOPPING, Status.FAILED, Status.UNLOADED)


class Front:
    """What the front's handlers share: the nodes and the names of their models."""

    def __init__(self, nodes: Nodes, settings: ServerSettings) -> None:
        self.nodes = nodes
        self.settings = settings
        self.replicas = Replicas(nodes)  # a preset's replicas = N: the other copies, started after a placement
        self._names: dict[str, tuple[str, ...]] = {}  # model id -> its names (id, aliases), from the listings

    def known(self) -> set[str]:
        return {name for view in self.nodes.views() for name in view.models}

    def names(self, model: str) -> tuple[str, ...]:
        return self._names.get(model, (model,))

    async def resolve(self, name: str) -> str:
        """The model id a requested name means: an id some node publishes, else an alias from the listings
        (fetched again when the name is new); an unknown name stays as it is, for placement to refuse."""
        if name in self.known():
            return name
        for attempt in range(2):
            for model, names in self._names.items():
                if name in names or name.removesuffix(":latest") in names:
                    return model
            if attempt == 0:
                await self.listings()
        return name

    async def listings(self) -> dict[str, list[dict[str, Any]]]:
        """Each reachable node's GET /models entries (a node that fails to answer is left out, and logged)."""
        names = [view.node for view in self.nodes.views() if view.node not in self.nodes.unreachable()]
        answers = await asyncio.gather(*(self.nodes.get_json(node, "/models") for node in names),
                                       return_exceptions=True)
        found: dict[str, list[dict[str, Any]]] = {}
        for node, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("node %s did not list its models: %r", node, answer)
                continue
            entries = [e for e in answer.get("data", []) if isinstance(e, dict)]
            found[node] = entries
            for entry in entries:
                self._names[str(entry["id"])] = (str(entry["id"]), *map(str, entry.get("aliases") or ()))
        return found

    def may_use(self, request: web.Request, model: str) -> bool:
        key = request[auth.API_KEY]
        return key is None or key.may_use(self.names(model))

    def check(self, request: web.Request, model: str) -> None:
        """Raise the single node's 403 if the request's key may not use the model."""
        if not self.may_use(request, model):
            key = request[auth.API_KEY]
            assert key is not None
            raise ModelError(ErrorKind.FORBIDDEN, f"this API key ({key.label}) may not use model '{model}' "
                                                  f"(it may use: {', '.join(key.models)})")


FRONT = web.AppKey("modelyard.cluster.front", Front)


# --- requests for one model --------------------------------------------------------------------------------

async def _send(request: web.Request, name: str, body: bytes) -> web.StreamResponse:
    """Place the request's model and forward the request there (ModelError: the refusal, for the caller's
    envelope)."""
    front = request.app[FRONT]
    model = await front.resolve(name)
    front.check(request, model)
    autoload = autoload_flag(request, front.settings.autoload)
    send = front.nodes.place(model, autoload=autoload)
    if isinstance(send, Refusal):
        raise send.error()
    log.debug("%s %s for '%s' -> node %s (%s)", request.method, request.path, model, send.node, send.reason)
    front.replicas.placed(send)
    return await forward(request, NodeChild(front.nodes, send, autoload=autoload), body, request.query)


def _named(payload: dict[str, Any], request: web.Request, *fields: str) -> str:
    for field in fields:
        value = payload.get(field)
        if value not in (None, ""):
            if not isinstance(value, str):
                raise ModelError(ErrorKind.BAD_REQUEST, f'"{field}" must be a string')
            return value
    if request.query.get("model"):
        return request.query["model"]
    raise ModelError(ErrorKind.MISSING_MODEL, "model name is missing from the request; set \"model\" to one of "
                                              "the ids listed by GET /v1/models")


async def post_by_body_model(request: web.Request) -> web.StreamResponse:
    try:
        payload = await read_json_object(request, ' with a "model" field')
        return await _send(request, _named(payload, request, "model"), await request.read())
    except ModelError as error:
        return from_model_error(error)


async def get_by_query_model(request: web.Request) -> web.StreamResponse:
    model = request.query.get("model")
    if not model:
        if request.path == "/props":
            return await router_props(request)
        if request.path == "/metrics":
            return await cluster_metrics(request)
        return error_response(ErrorKind.MISSING_MODEL, "model name is missing; add ?model=<id> to the URL",
                              param="model")
    try:
        return await _send(request, model, b"")
    except ModelError as error:
        return from_model_error(error)


async def ollama_by_body_model(request: web.Request) -> web.StreamResponse:
    """Ollama's routes: its error shape for a refusal here; the node translates and answers the rest."""
    try:
        payload = await read_json_object(request)
        return await _send(request, _named(payload, request, "model", "name"), await request.read())
    except ModelError as error:
        return ollama_error_response(error)


async def unload_model(request: web.Request) -> web.Response:
    """`{"model": "x"}`: stopped on every node where it runs; `{"all": true}`: every model the key may use, on
    every node (the node answers which it unloads)."""
    front = request.app[FRONT]
    try:
        payload = await read_json_object(request, ' with a "model" field or "all": true')
        if payload.get("all") is True and payload.get("model") in (None, ""):
            unloaded: set[str] = set()
            for view in front.nodes.views():
                models = [m for m, s in view.models.items() if s.status != Status.UNLOADED
                          and front.may_use(request, m)]
                for model in models:
                    await front.nodes.post_json(view.node, "/models/unload", {"model": model})
                    unloaded.add(model)
            return json_response({"success": True, "unloaded": sorted(unloaded)})
        model = await front.resolve(_named(payload, request, "model"))
        front.check(request, model)
        serving = [view for view in front.nodes.views() if model in view.models]
        if not serving:
            raise ModelError(ErrorKind.UNKNOWN_MODEL, f"model '{model}' not found")
        for view in serving:
            if view.models[model].status != Status.UNLOADED:
                await front.nodes.post_json(view.node, "/models/unload", {"model": model})
        return json_response({"success": True})
    except ModelError as error:
        return from_model_error(error)
    except aiohttp.ClientError as exc:
        return error_response(ErrorKind.UPSTREAM, f"a node did not take the unload: {exc or repr(exc)}")


# --- what describes every model ----------------------------------------------------------------------------

def _where(views: Iterable[NodeState], model: str) -> list[dict[str, Any]]:
    return [{"node": view.node, "status": view.models[model].status.value,
             "in_flight": view.models[model].in_flight, "queued": view.models[model].queued}
            for view in views if model in view.models]


def merged(listings: dict[str, list[dict[str, Any]]], views: list[NodeState]) -> list[dict[str, Any]]:
    """One entry per model over the nodes' listings: the entry of the node where its status is best (loaded,
    then loading, ...; ties to the first node listed), with `nodes` saying where it runs (pure)."""
    best: dict[str, tuple[int, dict[str, Any]]] = {}
    for entries in listings.values():
        for entry in entries:
            try:
                rank = _BEST.index(Status(entry["status"]["value"]))
            except (KeyError, TypeError, ValueError):
                rank = len(_BEST)
            model = str(entry["id"])
            if model not in best or rank < best[model][0]:
                best[model] = (rank, entry)
    return [{**entry, "nodes": _where(views, model)} for model, (_, entry) in best.items()]


async def list_models(request: web.Request) -> web.Response:
    front = request.app[FRONT]
    data = [entry for entry in merged(await front.listings(), front.nodes.views())
            if front.may_use(request, str(entry["id"]))]
    return json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    front = request.app[FRONT]
    model = await front.resolve(request.match_info["model"])
    found = [e for e in merged(await front.listings(), front.nodes.views()) if e["id"] == model]
    if not found or not front.may_use(request, model):
        return error_response(ErrorKind.UNKNOWN_MODEL, f"model '{request.match_info['model']}' not found")
    return json_response(found[0])


def _ollama_list(field: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """/api/tags and /api/ps: the nodes' `models` lists, each model once."""

    async def merged_list(request: web.Request) -> web.Response:
        front = request.app[FRONT]
        nodes = [view.node for view in front.nodes.views() if view.node not in front.nodes.unreachable()]
        answers = await asyncio.gather(*(front.nodes.get_json(node, request.path) for node in nodes),
                                       return_exceptions=True)
        seen: dict[str, dict[str, Any]] = {}
        for answer in answers:
            if isinstance(answer, BaseException):
                continue
            for entry in answer.get(field, []):
                name = str(entry.get("model") or entry.get("name"))
                model = await front.resolve(name)
                if name not in seen and front.may_use(request, model):
                    seen[name] = entry
        return json_response({field: list(seen.values())})

    return merged_list


async def cluster_metrics(request: web.Request) -> web.Response:
    """Every reachable node's router metrics as one exposition, each sample labelled with its node (a node
    that does not answer is left out, and logged)."""
    front = request.app[FRONT]
    nodes = [view.node for view in front.nodes.views() if view.node not in front.nodes.unreachable()]
    answers = await asyncio.gather(*(front.nodes.get_text(node, "/metrics") for node in nodes),
                                   return_exceptions=True)
    texts = {}
    for node, answer in zip(nodes, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("node %s did not give its metrics: %r", node, answer)
        else:
            texts[node] = answer
    key = request[auth.API_KEY]
    visible = (lambda model: front.may_use(request, model)) if key is not None and key.models else None
    return web.Response(body=exposition.merged(texts, visible).encode(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def router_props(request: web.Request) -> web.Response:
    front = request.app[FRONT]
    views = front.nodes.views()
    return json_response({
        "role": "router", "max_instances": sum(view.limits.max_models for view in views),
        "models_autoload": front.settings.autoload, "model_alias": "modelyard", "model_path": "none",
        "default_generation_settings": {"params": None, "n_ctx": 0}, "ui_settings": {},
        "build_info": front.settings.build_info, "cors_proxy_enabled": False,
        "nodes": [view.node for view in views]})


async def health(request: web.Request) -> web.Response:
    """200 while some node takes requests; 503 before any has joined, or when every one drains or is lost."""
    front = request.app[FRONT]
    taking = [v.node for v in front.nodes.views() if v.accepting and v.node not in front.nodes.unreachable()]
    if not taking:
        return json_response({"status": "no node takes requests yet"}, status=503)
    return json_response({"status": "ok", "nodes": len(taking)})


async def models_sse(request: web.Request) -> web.StreamResponse:
    """The nodes' /models/sse feeds as one, each event with its `node`: subscribed to every node that has
    published before the answer starts, so that an event made after the client has the headers is never missed
    (a node that joins later is not in this stream; a node's feed that ends is logged, the others go on)."""
    front = request.app[FRONT]
    frames: asyncio.Queue[bytes] = asyncio.Queue()

    async def follow(node: str, events: AsyncIterator[dict[str, Any]]) -> None:
        async for event in events:
            model = event.get("model")
            if model == "*" or (isinstance(model, str) and front.may_use(request, model)):
                frames.put_nowait(b"data: " + dumps({**event, "node": node}) + b"\n\n")

    async with contextlib.AsyncExitStack() as stack:
        feeds = {}
        for view in front.nodes.views():
            try:
                feeds[view.node] = await stack.enter_async_context(front.nodes.events(view.node, "/models/sse"))
            except aiohttp.ClientError as exc:
                log.warning("node %s's /models/sse is not in this stream: %r", view.node, exc)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        tasks = [asyncio.create_task(follow(node, events)) for node, events in feeds.items()]
        for task in tasks:
            task.add_done_callback(_log_end)
        try:
            while True:
                await response.write(await frames.get())
        finally:
            for task in tasks:
                task.cancel()


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a node's /models/sse feed ended: %r", task.exception())


def build_front(nodes: Nodes, settings: ServerSettings) -> web.Application:
    """The front's app: the single node's middlewares (api/app.py) and the routes above."""
    app = guarded_app(settings)
    front = app[FRONT] = Front(nodes, settings)

    async def close_replicas(app: web.Application) -> None:
        await front.replicas.close()

    app.on_cleanup.append(close_replicas)
    management.add_routes(app, health=health, list_models=list_models, get_model=get_model,
                          load_model=post_by_body_model, unload_model=unload_model, models_sse=models_sse,
                          props=get_by_query_model)
    app.router.add_get("/api/tags", _ollama_list("models"))
    app.router.add_get("/api/ps", _ollama_list("models"))
    insight.add_routes(app)  # activity, decisions, logs and the dashboard (cluster/insight.py)
    for path in POST_ROUTES:
        app.router.add_post(path, post_by_body_model)
    for path in GET_ROUTES:
        app.router.add_get(path, get_by_query_model)
    for path in OLLAMA_MODEL_ROUTES:
        app.router.add_post(path, ollama_by_body_model)
    # llama.cpp's web UI needs only the routes above; `/` is Ollama's probe, and the UI for a browser
    app.router.add_get("/", ollama.root)
    ui.add_webui_routes(app, settings.webui)
    return app
