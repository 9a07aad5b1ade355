"""Router mode's model downloads: `POST /models {"model": "org/repo[:quant]"}` fetches a model from the
Hugging Face hub into its cache (answered {"success": true} once the hub has listed the file; progress on
/models/sse as `download_progress`, then `download_finished` or `download_failed`; the model is then listed,
as `org/repo:QUANT` with source `cache`), and `DELETE /models?model=org/repo:QUANT` removes a cached model
(stopping it first) or cancels its download; `POST /models/unload` cancels one too, as in router mode.

Shared with Ollama's /api/pull and /api/delete (api/ollama.py): `begin_download` and `remove_cached`.
Errors: a bad reference 400, an existing model 400 (router mode's answer), and the hub's own (hub/fetch.py):
403 a refused token, 404 no such repo/file/quant, 502 unreachable, 503 offline, 507 a full disk.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from modelyard.api.body import read_json_object
from modelyard.api.context import CONTEXT, AppContext
from modelyard.api.errors import from_model_error
from modelyard.api.json import json_response
from modelyard.config.catalog import ModelConfig
from modelyard.errors import ErrorKind, ModelError
from modelyard.hub import cache, events
from modelyard.hub.downloads import Download
from modelyard.hub.refs import HubRef, RefError, parse_ref
from modelyard.manager import ModelManager
from modelyard.scheduler import Status


def hub_ref(name: str) -> HubRef:
    try:
        return parse_ref(name)
    except RefError as exc:
        raise ModelError(ErrorKind.BAD_REQUEST, str(exc)) from None


async def begin_download(context: AppContext, name: str, exists_ok: bool = False) -> Download:
    """Start (or join) the download of `name`, named as written (its events, its `downloading` entry and a
    cancel use that string, as in router mode); router mode refuses a model it already has, Ollama's pull
    (`exists_ok`) fetches it again (a no-op for files already whole in the cache)."""
    manager = context.manager
    ref = hub_ref(name)
    if not exists_ok and manager.downloads.find(name) is None:
        for candidate in (name, ref.name):
            if manager.catalog.resolve(candidate) is not None:
                raise ModelError(ErrorKind.BAD_REQUEST, f"model '{candidate}' already exists")
    return await manager.downloads.start(ref, name=name)


async def post_models(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    try:
        payload = await read_json_object(request, ' with a "model" field: a Hugging Face repo, org/repo[:quant]')
        name = payload.get("model")
        if not isinstance(name, str) or not name.strip():
            raise ModelError(ErrorKind.MISSING_MODEL, 'model must be a non-empty string: "model": '
                             '"org/repo[:quant]", a Hugging Face repository of GGUF files')
        await begin_download(context, name.strip())
    except ModelError as error:
        return from_model_error(error)
    return json_response({"success": True})


async def delete_models(request: web.Request) -> web.Response:
    name = request.query.get("model", "").strip()
    try:
        if not name:
            raise ModelError(ErrorKind.MISSING_MODEL, "model must be a non-empty string: DELETE "
                             "/models?model=org/repo:QUANT (a model whose source is the Hugging Face cache)")
        await remove_cached(request.app[CONTEXT], name)
    except ModelError as error:
        return from_model_error(error)
    return json_response({"success": True})


async def remove_cached(context: AppContext, name: str) -> None:
    """Cancel `name`'s download, or stop the cached model and delete its files; then it is no longer listed
    (router mode's server_models::remove). Only models whose source is the cache may be removed."""
    manager = context.manager
    download = manager.downloads.cancel(name)
    if download is not None:
        with contextlib.suppress(ModelError):
            await download.result()
        await download.stopped()  # no thread still writing what is deleted next
        await asyncio.to_thread(_delete, manager, download.ref, download)
    else:
        config = manager.resolve(name)
        if config.source != "cache" or config.hub is None:
            where = "--models-dir" if config.source == "models_dir" else "--models-preset"
            raise ModelError(ErrorKind.BAD_REQUEST, f"model '{config.name}' is not removable: modelyard removes "
                             f"only models from the Hugging Face cache, and this one comes from {where}; delete "
                             f"its file or preset section, then GET /models?reload=1")
        await _stopped(manager, config)
        await asyncio.to_thread(_delete, manager, config.hub.ref, None)
        name = config.name
    manager.reload(announce=False)  # router mode sends model_remove alone
    manager.notify(events.REMOVED, name)


def _delete(manager: ModelManager, ref: HubRef, download: Download | None) -> None:
    where = manager.downloads.hub().cache if download is None else download.hub.cache
    cache.remove(where, ref)
    for partial in download.partials() if download is not None else ():
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


async def _stopped(manager: ModelManager, config: ModelConfig) -> None:
    """Unload a running model and wait until its child is gone (router mode waits too)."""
    async with manager.subscribe() as feed:
        if manager.status_of(config.name) in (Status.UNLOADED, Status.FAILED):
            return
        with contextlib.suppress(ModelError):  # already stopping
            manager.unload(config.name)
        while manager.status_of(config.name) not in (Status.UNLOADED, Status.FAILED):
            if await feed.get() is None:
                return


def add_routes(app: web.Application) -> None:
    app.router.add_post("/models", post_models)
    app.router.add_delete("/models", delete_models)
