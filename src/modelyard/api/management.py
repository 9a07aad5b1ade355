"""llama-server router mode's management API: /models, /models/load, /models/unload, /models/sse, /props,
/health — same paths, same shapes, with router mode's gaps fixed (load queues instead of failing, 404 for an
unknown model, unload-all, `failed` only when a child really failed).

/models/sse sends router mode's events with its fields (`sse_message`): `model_status` when a load starts,
`status_change` for every later transition (`loading` with the child's progress, `loaded` with its info,
`sleeping`, `unloaded` with its exit code), `models_reload`, and the notices others publish (downloads).
modelyard's own statuses (`stopping`, `failed`) and a transition's `reason` ride along: router-mode clients
(its web UI) take any status value and ignore fields they do not know."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Handler

from modelyard import __version__
from modelyard.api import auth
from modelyard.api.body import read_json_object
from modelyard.api.context import CONTEXT
from modelyard.api.errors import error_response, from_model_error
from modelyard.api.json import dumps, json_response
from modelyard.api.openai import get_by_query_model
from modelyard.api.sse import event_stream
from modelyard.config.catalog import HubSource, ModelConfig
from modelyard.config.presets import ConfigError
from modelyard.errors import ErrorKind, ModelError
from modelyard.manager import FeedEvent, ModelNotice, ModelsReloaded, ModelView
from modelyard.placement import Placement, format_cpus
from modelyard.scheduler import ModelSnapshot, Status

LOAD_STARTED = "model_status"  # router mode's event when it spawns a child
STATUS_CHANGE = "status_change"  # every later transition


def model_entry(view: ModelView, created: int) -> dict[str, Any]:
    config = view.config
    status: dict[str, Any] = {"value": view.shown_status, "args": list(view.args), "preset": config.preset_text,
                              "failed": view.status == Status.FAILED}
    if view.state.exit_code is not None:
        status["exit_code"] = view.state.exit_code
    if view.state.failure:
        status["failure"] = view.state.failure
    entry: dict[str, Any] = {
        "id": config.name, "object": "model", "owned_by": "llamacpp", "created": created,
        "aliases": list(config.aliases), "tags": list(config.tags), "path": config.model_path,
        "source": config.source, "can_remove": config.source == "cache", "status": status,
        "architecture": _architecture(config),
        "in_flight": view.state.in_flight, "queued": view.state.queued,
        "memory": {"estimated": view.state.estimated or None, "measured": view.state.measured or None,
                   "estimated_gpu": view.state.estimated_gpu or None,
                   "measured_gpu": view.state.measured_gpu or None},
        "keep_alive": view.state.keep_alive, "expires_in": _round(view.expires_in), "idle_for": _round(view.idle_for),
        "pinned": config.pinned, "priority": config.priority, "placement": _placement(view.placement),
    }
    for key, value in view.info.items():
        entry.setdefault(key, value)
    return entry


def _placement(placement: Placement | None) -> dict[str, Any] | None:
    """The running child's threads and CPUs (modelyard.placement) and why; null when no child runs."""
    if placement is None:
        return None
    return {"threads": placement.threads, "threads_batch": placement.threads_batch,
            "cpus": format_cpus(placement.cpus) or None, "reason": placement.reason}


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _architecture(config: ModelConfig) -> dict[str, list[str]]:
    """What router mode reports offline: text in and out, plus images when the model has a projector."""
    inputs = ["text", "image"] if config.has_projector else ["text"]
    return {"input_modalities": inputs, "output_modalities": ["text"]}


async def list_models(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    if request.query.get("reload") in ("1", "true"):
        try:
            context.manager.reload()
        except ConfigError as exc:
            return error_response(ErrorKind.BAD_REQUEST, f"reload failed, keeping the current models: {exc}")
    created = int(context.settings.started_at)
    data = [model_entry(view, created) for view in context.manager.models() if auth.may_use(request, view.config)]
    data = with_downloads(request, data, created)
    memory = context.manager.memory()
    return json_response({"object": "list", "data": data,
                              "memory": {"used": memory.used, "budget": memory.budget or None,
                                         "gpu_used": memory.gpu_used, "gpu_budget": memory.gpu_budget or None}})


def with_downloads(request: web.Request, data: list[dict[str, Any]], created: int) -> list[dict[str, Any]]:
    """The listing with the Hugging Face downloads in flight: a hub model fetched for its first load shows
    `downloading`; a model that POST /models is fetching, not listed yet, is listed as router mode lists it
    meanwhile (status `downloading`, source `cache`; the cache's own `org/repo:QUANT` entry replaces it)."""
    manager = request.app[CONTEXT].manager
    active = {download.name: download for download in manager.downloads.active()}
    if not active:  # the usual case: nothing to add or mark
        return data
    for entry in data:
        config = manager.catalog.resolve(entry["id"])
        if config is not None and config.needs_download and config.hub is not None and config.hub.ref.name in active:
            entry["status"]["value"] = "downloading"
    for download in active.values():
        config = ModelConfig(download.name, {}, "cache", "download", hub=HubSource(download.ref))
        if manager.catalog.resolve(download.name) is not None or not auth.may_use(request, config):
            continue
        state = ModelSnapshot(download.name, Status.UNLOADED, 0, 0, 0.0, None, "", 0, 0, 0, 0, -1.0, None)
        entry = model_entry(ModelView(config, state), created)
        entry["status"]["value"] = "downloading"
        data.append(entry)
    return data


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one model, by id, alias or `id:latest`."""
    context = request.app[CONTEXT]
    try:
        config = context.manager.resolve(request.match_info["model"])
        auth.require_model(request, config)
        name = config.name
    except ModelError as error:
        return from_model_error(error)
    view = next((v for v in context.manager.models() if v.config.name == name), None)
    if view is None:  # removed by a reload between the two reads
        return error_response(ErrorKind.UNKNOWN_MODEL, f"model '{name}' is no longer served")
    return json_response(model_entry(view, int(context.settings.started_at)))


async def _model_from_body(request: web.Request) -> str:
    # The strict reader: request.json() gave 500s (RecursionError on deep nesting, LookupError on a charset).
    payload = await read_json_object(request, ' with a "model" field')
    model = payload.get("model")
    if model is None or model == "":
        raise ModelError(ErrorKind.MISSING_MODEL, "model name is missing from the request; "
                         "set \"model\" to one of the ids listed by GET /models")
    if not isinstance(model, str):
        raise ModelError(ErrorKind.BAD_REQUEST, "\"model\" must be a string")
    auth.require_named(request, model, request.app[CONTEXT].manager.resolve)
    return model


async def load_model(request: web.Request) -> web.Response:
    """Queue a load and answer at once, as router mode does; progress shows in /models and /models/sse."""
    manager = request.app[CONTEXT].manager
    try:
        model = await _model_from_body(request)
        manager.load_in_background(model)
    except ModelError as error:
        return from_model_error(error)
    return json_response({"success": True})


async def unload_model(request: web.Request) -> web.Response:
    """One model (`{"model": "x"}`), or every running model the key may use (`{"all": true}`)."""
    manager = request.app[CONTEXT].manager
    try:
        payload = await read_json_object(request, ' with a "model" field or "all": true')
        if "all" in payload:
            if payload["all"] is not True or payload.get("model") not in (None, ""):
                raise ModelError(ErrorKind.BAD_REQUEST, 'give either "model" or "all": true, not both; '
                                 '"all" takes only true')
            unloaded = manager.unload_all(lambda config: auth.may_use(request, config))
            return json_response({"success": True, "unloaded": unloaded})
        manager.unload(await _model_from_body(request))
    except ModelError as error:
        return from_model_error(error)
    return json_response({"success": True})


def sse_message(event: FeedEvent) -> dict[str, Any]:
    """One /models/sse message, as router mode b11434 writes it (server-models.cpp notify_sse)."""
    if isinstance(event, ModelsReloaded):
        return {"model": "*", "event": "models_reload"}
    if isinstance(event, ModelNotice):
        notice: dict[str, Any] = {"model": event.model, "event": event.event}
        if event.data is not None:
            notice["data"] = event.data
        return notice
    data: dict[str, Any] = {"status": "sleeping" if event.sleeping else event.status.value}
    if event.status == Status.UNLOADED:
        data["exit_code"] = event.exit_code or 0  # router mode always says; none = it never ran
    elif event.exit_code is not None:
        data["exit_code"] = event.exit_code
    if event.reason:
        data["reason"] = event.reason
    if event.progress is not None:
        data["progress"] = event.progress
    if event.info:
        data["info"] = event.info
    started = event.status == Status.LOADING and event.progress is None  # the scheduler's start, not the child's
    return {"model": event.model, "event": LOAD_STARTED if started else STATUS_CHANGE, "data": data}


async def models_sse(request: web.Request) -> web.StreamResponse:
    manager = request.app[CONTEXT].manager

    def frame(event: FeedEvent) -> bytes | None:
        if not isinstance(event, ModelsReloaded) and not auth.may_use_named(request, manager.catalog, event.model):
            return None
        return b"data: " + dumps(sse_message(event)) + b"\n\n"

    async with manager.subscribe() as events:
        # mypy cannot solve T | None against a union's Queue: the frame function fixes T
        return await event_stream(request, cast("asyncio.Queue[Any]", events), frame)


async def props(request: web.Request) -> web.StreamResponse:
    if request.query.get("model"):
        return await get_by_query_model(request)
    context = request.app[CONTEXT]
    return json_response({
        "role": "router",
        "max_instances": context.manager.max_models,
        "models_autoload": context.settings.autoload,
        "model_alias": "modelyard",
        "model_path": "none",
        "default_generation_settings": {"params": None, "n_ctx": 0},  # router mode's null (its json{} is one)
        "ui_settings": {},
        "build_info": context.settings.build_info,
        "cors_proxy_enabled": False,
        "modelyard_version": __version__,
    })


async def health(request: web.Request) -> web.Response:
    """503 while draining (shutting down), so load balancers and supervisors stop sending model requests."""
    if request.app[CONTEXT].manager.draining:
        return json_response({"status": "draining"}, status=503)
    return json_response({"status": "ok"})


def add_routes(app: web.Application, *, health: Handler = health, list_models: Handler = list_models,
               get_model: Handler = get_model, load_model: Handler = load_model,
               unload_model: Handler = unload_model, models_sse: Handler = models_sse,
               props: Handler = props) -> None:
    """Router mode's management routes; the cluster's front (cluster/front.py) serves the same paths with its
    own handlers."""
    app.router.add_get("/health", health)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/models", list_models)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/models/load", load_model)
    app.router.add_post("/models/unload", unload_model)
    app.router.add_get("/models/sse", models_sse)
    app.router.add_get("/props", props)


