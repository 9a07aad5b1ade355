"""Ollama's API on the same port (first part: the listing and version endpoints, which never wait on a load).

Names: `x`, `x:latest` and every alias name the same model; listings use the tagged form (`x:latest`), which
Open WebUI and the ollama clients expect. Chat, generate, embed and show come next (issue #5).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from modelyard import __version__
from modelyard.api.context import CONTEXT
from modelyard.config.catalog import ModelConfig
from modelyard.manager import ModelManager, ModelView
from modelyard.memory import model_files, serving_context
from modelyard.scheduler import Status

_FOREVER = "9999-12-31T23:59:59Z"  # what a model kept loaded for ever expires at, as Ollama reports it
_UNSUPPORTED = {
    "/api/pull": "modelyard serves the models in --models-dir and --models-preset; put the .gguf file there and "
                 "call GET /models?reload=1 instead of pulling",
    "/api/push": "modelyard does not push models to a registry",
    "/api/create": "modelyard does not create models; add a section to the --models-preset INI file instead",
    "/api/copy": "modelyard does not copy models; add an alias in the --models-preset INI file instead",
    "/api/delete": "modelyard does not delete model files; remove the file or its preset section and call "
                   "GET /models?reload=1",
    "/api/blobs/{digest}": "modelyard has no blob store; models come from --models-dir and --models-preset",
}


def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _files(config: ModelConfig) -> list[Path]:
    return model_files(config.settings)


def details(manager: ModelManager, config: ModelConfig) -> dict[str, Any]:
    facts = manager.gguf_facts(config)
    main = facts[0] if facts else None
    family = main.architecture if main else ""
    size = main.size_label if main and main.size_label else (f"{main.parameters / 1e6:.0f}M" if main else "")
    return {"parent_model": "", "format": "gguf" if config.model_path else "", "family": family,
            "families": [family] if family else [], "parameter_size": size,
            "quantization_level": main.quantization if main else ""}


def _tag_entry(manager: ModelManager, config: ModelConfig) -> dict[str, Any]:
    files = _files(config)
    digest = manager.digests.get(files[0]) if files else None
    return {"name": tagged(config.name), "model": tagged(config.name),
            "modified_at": _iso(max((f.stat().st_mtime for f in files), default=time.time())),
            "size": sum(f.stat().st_size for f in files), "digest": digest or "",
            "details": details(manager, config)}


def _ps_entry(manager: ModelManager, view: ModelView) -> dict[str, Any]:
    config = view.config
    entry = _tag_entry(manager, config)
    facts = manager.gguf_facts(config)
    expires = _FOREVER if view.expires_in is None else _iso(time.time() + view.expires_in)
    return {"name": entry["name"], "model": entry["model"], "size": view.measured_memory or view.estimated_memory,
            "digest": entry["digest"], "details": entry["details"], "expires_at": expires, "size_vram": 0,
            "context_length": serving_context(config.settings, facts[0]) if facts else 0}


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def tags(request: web.Request) -> web.Response:
    manager = request.app[CONTEXT].manager
    models = [_tag_entry(manager, config) for config in manager.catalog.models.values()]
    return web.json_response({"models": models})


async def ps(request: web.Request) -> web.Response:
    manager = request.app[CONTEXT].manager
    running = [_ps_entry(manager, view) for view in manager.models()
               if view.status in (Status.LOADING, Status.LOADED)]
    return web.json_response({"models": running})


def _unsupported(message: str) -> Handler:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"error": message}, status=400)

    return answer


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)  # GET also answers HEAD
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    for path, message in _UNSUPPORTED.items():
        app.router.add_route("*", path, _unsupported(message))
