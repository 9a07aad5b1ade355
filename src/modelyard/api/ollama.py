"""Ollama's API on the same port: listings (which never wait on a load), chat, generate and embed, translated
to and from llama-server's OpenAI endpoints.

Names: `x`, `x:latest` and every alias name the same model; listings use the tagged form (`x:latest`), which
Open WebUI and the ollama clients expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from modelyard import __version__
from modelyard.activity import Record, token_counts
from modelyard.api import auth, downloads, ui
from modelyard.api.activity import RECORD, acquire, admins_cancel, cancel_message, names_model, tracked
from modelyard.api.body import read_json_object
from modelyard.api.context import CONTEXT
from modelyard.api.json import dumps, json_response
from modelyard.api.openai import check_embeddings
from modelyard.children import ChildError, Reply
from modelyard.config.catalog import ModelConfig
from modelyard.config.durations import parse_duration
from modelyard.config.options import TRUTHY
from modelyard.errors import ErrorKind, ModelError
from modelyard.hub import events as hub_events
from modelyard.manager import Lease, ModelManager, ModelView
from modelyard.memory import GgufFacts, model_files
from modelyard.proxy import NDJSON, ndjson_error
from modelyard.scheduler import Status

log = logging.getLogger(__name__)

_FOREVER = "9999-12-31T23:59:59Z"  # what a model kept loaded for ever expires at, as Ollama reports it
_UNSUPPORTED = {
    "/api/push": "modelyard does not push models to a registry",
    "/api/create": "modelyard does not create models; add a section to the --models-preset INI file instead",
    "/api/copy": "modelyard does not copy models; add an alias in the --models-preset INI file instead",
    "/api/blobs/{digest}": "modelyard has no blob store; models come from --models-dir and --models-preset",
}


def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _iso(timestamp: float) -> str:
    try:
        moment = datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, ValueError, OSError):  # past year 9999: /api/ps answered 500 for keep_alive 1e20
        return _FOREVER
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _files(config: ModelConfig) -> list[Path]:
    return model_files(config.settings)


def _stats(files: list[Path]) -> tuple[float, int]:
    """(newest mtime, total size) of the files that can still be read: a file removed or made unreadable
    since the last reload must not turn a listing into a 500."""
    mtimes, size = [], 0
    for path in files:
        try:
            stat = path.stat()
        except OSError as exc:
            log.warning("cannot stat %s: %s", path, exc.strerror or exc)
            continue
        mtimes.append(stat.st_mtime)
        size += stat.st_size
    return max(mtimes, default=time.time()), size


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
    modified, size = _stats(files)
    return {"name": tagged(config.name), "model": tagged(config.name),
            "modified_at": _iso(modified), "size": size, "digest": digest or "",
            "details": details(manager, config)}


def _ps_entry(manager: ModelManager, view: ModelView) -> dict[str, Any]:
    config = view.config
    entry = _tag_entry(manager, config)
    expires = _FOREVER if view.expires_in is None else _iso(time.time() + view.expires_in)
    measured = view.state.measured > 0
    gpu = view.state.measured_gpu if measured else view.state.estimated_gpu
    size = (view.state.measured if measured else view.state.estimated) + gpu
    return {"name": entry["name"], "model": entry["model"], "size": size,
            "digest": entry["digest"], "details": entry["details"], "expires_at": expires, "size_vram": gpu,
            "context_length": manager.served_context(config)}


async def version(request: web.Request) -> web.Response:
    return json_response({"version": __version__})


async def root(request: web.Request) -> web.StreamResponse:
    """A browser (it asks for HTML) gets llama.cpp's web UI, or the dashboard (api/ui.py); Ollama's clients probe
    this path for its text."""
    if "text/html" in request.headers.get("Accept", ""):
        return ui.browser_root(request)
    return web.Response(text="Ollama is running")


async def tags(request: web.Request) -> web.Response:
    manager = request.app[CONTEXT].manager
    models = [_tag_entry(manager, config) for config in manager.catalog.models.values()
              if auth.may_use(request, config)]
    return json_response({"models": models})


async def ps(request: web.Request) -> web.Response:
    manager = request.app[CONTEXT].manager
    running = [_ps_entry(manager, view) for view in manager.models()
               if view.status in (Status.LOADING, Status.LOADED) and auth.may_use(request, view.config)]
    return json_response({"models": running})


def _unsupported(message: str) -> Handler:
    async def answer(request: web.Request) -> web.Response:
        return json_response({"error": message}, status=400)

    return answer


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)  # GET also answers HEAD
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    for path, handler in (("/api/chat", chat), ("/api/generate", generate), ("/api/embed", embed),
                          ("/api/embeddings", embeddings)):
        app.router.add_post(path, tracked(path, handler, ollama=True))  # each one gets an activity record
    app.router.add_post("/api/pull", _ollama_errors(pull))
    app.router.add_delete("/api/delete", _ollama_errors(delete))
    for path, message in _UNSUPPORTED.items():
        app.router.add_route("*", path, _unsupported(message))


# --- pull and delete: Hugging Face models, on router mode's download machinery (api/downloads.py) ----------

_HUB_HOSTS = ("hf.co/", "huggingface.co/")


def hub_name(name: str) -> str:
    """Ollama's name of a Hugging Face model (`hf.co/org/repo:Q4_K_M`, `:latest` = the default quant) as
    modelyard names it (`org/repo:Q4_K_M`). Ollama's own library has no models here: say what to pull."""
    for host in _HUB_HOSTS:
        name = name.removeprefix(host)
    name = name.removesuffix(":latest")
    if "/" not in name:
        raise OllamaError(400, f"modelyard pulls GGUF models from Hugging Face, not Ollama's library: name a "
                               f"repository, e.g. hf.co/ggml-org/SmolLM2-135M-Instruct-GGUF:Q4_K_M (got '{name}'); "
                               f"local files are served from --models-dir or --models-preset")
    return downloads.hub_ref(name).name


async def _pull_name(request: web.Request) -> tuple[str, bool]:
    payload = await read_json_object(request, ' with a "model" field')
    name = payload.get("model") or payload.get("name")
    if not isinstance(name, str) or not name.strip():
        raise OllamaError(400, 'missing "model": name the model to pull, e.g. hf.co/org/repo:Q4_K_M')
    stream = payload.get("stream", True)
    if not isinstance(stream, bool):
        raise OllamaError(400, '"stream" must be true or false')
    return hub_name(name.strip()), stream


async def pull(request: web.Request) -> web.StreamResponse:
    """Ollama's pull: NDJSON progress (`status`, `digest`, `total`, `completed`) ending in {"status":
    "success"}, or one JSON object with `stream: false`. A pull of a model already cached checks it against the
    hub and ends at once; a client that goes away leaves the download running (listed as downloading)."""
    name, stream = await _pull_name(request)
    download = await downloads.begin_download(request.app[CONTEXT], name, exists_ok=True)
    if not stream:
        await download.result()
        return json_response({"status": "success"})
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    await response.write(dumps(hub_events.OLLAMA_START) + b"\n")
    last: dict[str, int] = {}
    try:
        async for files in download.updates():
            for file in files:
                if last.get(file.url) != file.done:
                    last[file.url] = file.done
                    await response.write(dumps(hub_events.ollama_file_line(file)) + b"\n")
        await download.result()
        lines = hub_events.OLLAMA_END
    except ModelError as error:
        lines = (hub_events.ollama_error(error.message),)
    for line in lines:
        await response.write(dumps(line) + b"\n")
    await response.write_eof()
    return response


async def delete(request: web.Request) -> web.Response:
    """Ollama's delete: a cached Hugging Face model (or its download) goes; 200 with no body, as Ollama."""
    payload = await read_json_object(request, ' with a "model" field')
    name = payload.get("model") or payload.get("name")
    if not isinstance(name, str) or not name.strip():
        raise OllamaError(400, 'missing "model": name the model to delete')
    await downloads.remove_cached(request.app[CONTEXT], hub_name(name.strip()) if "/" in name else name.strip())
    return web.Response(status=200)


# --- chat, generate, embed ---------------------------------------------------------------------------------

_OPTION_MAP = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
               "num_predict": "max_tokens", "stop": "stop", "seed": "seed", "repeat_penalty": "repeat_penalty",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
               "typical_p": "typical_p", "repeat_last_n": "repeat_last_n"}
# Allocation options would reload the model on every call (Aider changes num_ctx each time): presets decide them.
_THINK_LEVELS = ("low", "medium", "high")
_IGNORED_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "num_thread", "main_gpu", "use_mmap", "use_mlock",
                              "numa", "low_vram", "num_keep"})


class OllamaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamError(Exception):
    """An error event in the child's stream."""


def _ollama_errors(handler: Handler) -> Handler:
    """Answer a refused request in Ollama's shape, whichever step refused it."""
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OllamaError as exc:
            return _error(exc.status, exc.message)
        except ModelError as error:
            return ollama_error_response(error)

    return answer


def _error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


def ollama_error_response(error: ModelError) -> web.Response:
    """Ollama's shape: {"error": "..."}; an unknown model is 404 `model 'x' not found` as Ollama answers."""
    status = 404 if error.kind == ErrorKind.UNKNOWN_MODEL else error.kind.status
    headers = {"Retry-After": str(round(error.retry_after))} if error.retry_after else None
    return json_response({"error": error.message}, status=status, headers=headers)


def _now_iso() -> str:
    return _iso(time.time())


async def _read_request(request: web.Request) -> dict[str, Any]:
    payload = await read_json_object(request)  # its ModelErrors answer in Ollama's shape (_ollama_errors)
    model = payload.get("model") or payload.get("name")
    if not model:
        raise OllamaError(400, "model is required")
    if not isinstance(model, str):
        raise OllamaError(400, "model must be a string (a name listed by GET /api/tags)")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise OllamaError(400, "stream must be true or false")
    payload["model"] = model
    names_model(request, model)
    return payload


def _keep_alive(payload: dict[str, Any]) -> float | None:
    if payload.get("keep_alive") is None:
        return None
    try:
        return parse_duration(payload["keep_alive"])
    except ValueError as exc:
        raise OllamaError(400, str(exc)) from None


def _sampling(payload: dict[str, Any]) -> dict[str, Any]:
    options = payload.get("options") or {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be a JSON object")
    _check_options(options)
    mapped = {_OPTION_MAP[k]: v for k, v in options.items() if k in _OPTION_MAP and k not in _IGNORED_OPTIONS}
    fmt = payload.get("format")
    if fmt == "json":
        mapped["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        mapped["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    elif fmt not in (None, ""):
        raise OllamaError(400, 'format must be "json" or a JSON schema object')
    think = payload.get("think")
    if isinstance(think, bool):
        mapped["chat_template_kwargs"] = {"enable_thinking": think}
    elif think in _THINK_LEVELS:  # gpt-oss style levels
        mapped["chat_template_kwargs"] = {"enable_thinking": True, "reasoning_effort": think}
        mapped["reasoning_effort"] = think
    elif think is not None:
        raise OllamaError(400, 'think must be true, false, "low", "medium" or "high"')
    tools = payload.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise OllamaError(400, "tools must be a list of tool objects")
    return mapped


_NUMBER_OPTIONS = frozenset(_OPTION_MAP) - {"stop"}


def _check_options(options: dict[str, Any]) -> None:
    """The options modelyard passes on must have their type: llama-server answers 500 to some wrong ones."""
    for key in _NUMBER_OPTIONS & options.keys():
        value = options[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise OllamaError(400, f"options.{key} must be a number")
    stop = options.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise OllamaError(400, "options.stop must be a string or a list of strings")


_TOOL_CALL_SHAPE = '{"function": {"name": "...", "arguments": {...}}}'


def _openai_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's; every shape error is a 400 naming the message and field (a wrongly
    shaped tool_calls gave 500 in a fault campaign)."""
    converted = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OllamaError(400, f"{where}: each message must be an object with a role (a string) and content")
        content = message.get("content")
        content = "" if content is None else content
        if not isinstance(content, str):
            raise OllamaError(400, f"{where}.content must be a string")
        out: dict[str, Any] = {"role": message["role"], "content": content}
        images = message.get("images")
        images = [] if images is None else images
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise OllamaError(400, f"{where}.images must be a list of base64-encoded images (strings)")
        if images:
            out["content"] = [{"type": "text", "text": out["content"]}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}} for image in images]
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise OllamaError(400, f"{where}.tool_calls must be a list of {_TOOL_CALL_SHAPE}")
        if calls:
            out["tool_calls"] = [_openai_tool_call(f"{where}.tool_calls[{i}]", i, call)
                                 for i, call in enumerate(calls)]
        tool_name = message.get("tool_name")
        if tool_name is not None and not isinstance(tool_name, str):
            raise OllamaError(400, f"{where}.tool_name must be a string (the name of the tool that answered)")
        if tool_name:
            out["name"] = tool_name
        converted.append(out)
    return converted


def _openai_tool_call(where: str, index: int, call: object) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise OllamaError(400, f"{where} must be an object like {_TOOL_CALL_SHAPE}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise OllamaError(400, f"{where}.function.name must be the tool's name (a string)")
    arguments = function.get("arguments")
    arguments = {} if arguments is None else arguments
    if not isinstance(arguments, dict | str):
        raise OllamaError(400, f"{where}.function.arguments must be an object (or a JSON string)")
    text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
    return {"type": "function", "id": f"call_{index}", "function": {"name": name, "arguments": text}}


def _ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    result = []
    for call in calls:
        function = call.get("function") or {}
        arguments: Any = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = orjson.loads(arguments)
            except orjson.JSONDecodeError:
                arguments = {"raw": arguments}
        result.append({"function": {"name": function.get("name", ""), "arguments": arguments}})
    return result


def _final_fields(started: float, load_ns: int, finish: str | None, timings: dict[str, Any],
                  usage: dict[str, Any]) -> dict[str, Any]:
    # Ollama counts every prompt token; llama-server's prompt_n leaves out those its prompt cache already had.
    counts = token_counts(usage, timings)
    prompt_n, predicted_n = counts.tokens_in or 0, counts.tokens_out or 0
    return {"done": True, "done_reason": "length" if finish == "length" else "stop",
            "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": load_ns,
            "prompt_eval_count": prompt_n, "prompt_eval_duration": int(float(timings.get("prompt_ms", 0)) * 1e6),
            "eval_count": predicted_n, "eval_duration": int(float(timings.get("predicted_ms", 0)) * 1e6)}


async def _lifecycle(manager: ModelManager, model: str, keep_alive: float | None, kind: str) -> web.Response:
    """A request with no prompt or messages loads the model, or with keep_alive 0 unloads it; one JSON object
    either way, whatever `stream` says (Open WebUI reads it with resp.json())."""
    name = manager.resolve(model).name
    body: dict[str, Any] = {"model": model, "created_at": _now_iso(), "done": True}
    if keep_alive == 0:
        if manager.status_of(name) in (Status.LOADING, Status.LOADED):
            manager.unload(name)
        body["done_reason"] = "unload"
    else:
        manager.release(await manager.acquire(name, keep_alive=keep_alive))
        body["done_reason"] = "load"
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return json_response(body)


@_ollama_errors
async def chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


@_ollama_errors
async def generate(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "generate")


async def _complete(request: web.Request, kind: str) -> web.StreamResponse:
    started = time.perf_counter()
    manager = request.app[CONTEXT].manager
    payload = await _read_request(request)
    keep_alive = _keep_alive(payload)
    model = payload["model"]
    auth.require_named(request, model, manager.resolve)
    asked = payload.get("messages") if kind == "chat" else payload.get("prompt") or payload.get("suffix")
    if not asked:
        return await _lifecycle(manager, model, keep_alive, kind)
    path, upstream_body = _upstream_request(payload, kind)
    _check_images(manager.resolve(model), payload, kind)
    acquired = time.perf_counter()
    lease = await acquire(request, model, keep_alive=keep_alive, stream=payload.get("stream", True) is not False)
    load_ns = int((time.perf_counter() - acquired) * 1e9)
    try:
        return await _relay(request, lease, path, upstream_body, kind, payload, started, load_ns)
    finally:
        manager.release(lease)


def _check_images(config: ModelConfig, payload: dict[str, Any], kind: str) -> None:
    """llama-server answers 500 to an image for a model without a projector: say what to change instead."""
    carriers = payload["messages"] if kind == "chat" else [payload]
    has_images = any(isinstance(m, dict) and m.get("images") for m in carriers)
    if has_images and config.command is None and not config.has_projector:
        raise OllamaError(400, f"model '{config.name}' cannot read images: it has no projector "
                               "(put its mmproj file beside it in --models-dir, or `mmproj = ...` in its preset)")


def _upstream_request(payload: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    stream = payload.get("stream", True) is not False
    body: dict[str, Any] = {**_sampling(payload), "stream": stream}
    if kind == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list):
            raise OllamaError(400, "messages must be a list")
        body["messages"] = _openai_messages(messages)
        if payload.get("tools"):
            body["tools"] = payload["tools"]
        return "/v1/chat/completions", _with_usage(body)
    prompt = payload.get("prompt") or ""
    if not isinstance(prompt, str):
        raise OllamaError(400, "prompt must be a string")
    if not isinstance(payload.get("suffix") or "", str):
        raise OllamaError(400, "suffix must be a string")
    if payload.get("suffix"):
        return "/infill", {**body, "input_prefix": prompt, "input_suffix": payload["suffix"],
                           "n_predict": body.pop("max_tokens", -1)}
    if payload.get("raw"):
        return "/completion", {**body, "prompt": prompt, "n_predict": body.pop("max_tokens", -1)}
    if not isinstance(payload.get("system") or "", str):
        raise OllamaError(400, "system must be a string")
    messages = [{"role": "system", "content": payload["system"]}] if payload.get("system") else []
    images = payload.get("images") or []
    messages.append({"role": "user", "content": prompt, "images": images})
    body["messages"] = _openai_messages(messages)
    return "/v1/chat/completions", _with_usage(body)


def _with_usage(body: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat answer ends with a usage chunk: the prompt token count, cached tokens included."""
    return {**body, "stream_options": {"include_usage": True}} if body["stream"] else body


async def _relay(request: web.Request, lease: Lease, path: str, body: dict[str, Any], kind: str,
                 payload: dict[str, Any], started: float, load_ns: int) -> web.StreamResponse:
    model = payload["model"]
    async with _upstream(lease, path, body) as upstream:
        if not body["stream"]:
            reply = orjson.loads(await upstream.read())
            record = request.get(RECORD)
            if record is not None:
                request.app[CONTEXT].activity.first_byte(record)
                record.count(token_counts(reply.get("usage"), reply.get("timings")))
            return json_response(_whole_answer(reply, path, kind, model, started, load_ns))
        return await _stream(request, upstream, path, kind, model, started, load_ns)


@contextlib.asynccontextmanager
async def _upstream(lease: Lease, path: str, body: dict[str, Any]) -> AsyncIterator[Reply]:
    """POST `body` to the child (through the same child.request path as every forwarded request); a refusal
    becomes an OllamaError with the child's own words, a failure before anything was sent to the client a 502
    (once a stream has started, `_stream` reports failures in-band)."""
    try:
        async with lease.child.request("POST", path, body=dumps(body),
                                       headers={"Content-Type": "application/json"}) as upstream:
            if upstream.status != 200:
                text = (await upstream.read()).decode(errors="replace")
                raise OllamaError(upstream.status, _upstream_message(text))
            yield upstream
    except ChildError as exc:
        raise OllamaError(502, str(exc)) from None


async def _stream(request: web.Request, upstream: Reply, path: str, kind: str, model: str,
                  started: float, load_ns: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    record = request.get(RECORD)
    capture = record.capture if record is not None else None
    first = record is not None
    try:
        async for line in _ndjson_lines(upstream, path, kind, model, started, load_ns, record):
            if first and record is not None:  # the first token, as the client sees it
                request.app[CONTEXT].activity.first_byte(record)
                first = False
            if capture is not None:
                capture.add(line)
            await response.write(line)
    except (ChildError, UpstreamError) as exc:
        # Ollama's in-band error: clients raise it (ollama-python, Continue) instead of a cut stream.
        log.warning("%s %s: the model's server failed mid-stream: %s", request.method, request.path, exc)
        message = f"the model's server failed mid-stream: {exc}"
        if record is not None:
            record.error = message
        await response.write(ndjson_error(message))
    except asyncio.CancelledError:
        if not admins_cancel(record):
            raise
        # an admin's cancel, not the client's: end the stream with Ollama's error line
        await response.write(ndjson_error(cancel_message(record.id)))
    await response.write_eof()
    return response


def _upstream_message(text: str) -> str:
    try:
        return str(orjson.loads(text)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return text


def _whole_answer(reply: dict[str, Any], path: str, kind: str, model: str, started: float,
                  load_ns: int) -> dict[str, Any]:
    timings = reply.get("timings") or {}
    if path == "/v1/chat/completions":
        choice = (reply.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        text, thinking = message.get("content") or "", message.get("reasoning_content")
        finish = choice.get("finish_reason")
        calls = _ollama_tool_calls(message.get("tool_calls") or [])
    else:
        text, thinking, calls = reply.get("content", ""), None, []
        finish = "length" if reply.get("stop_type") == "limit" else "stop"
    out: dict[str, Any] = {"model": model, "created_at": _now_iso()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": text}
        if thinking:
            out["message"]["thinking"] = thinking
        if calls:
            out["message"]["tool_calls"] = calls
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    return {**out, **_final_fields(started, load_ns, finish, timings, reply.get("usage") or {})}


async def _ndjson_lines(upstream: Reply, path: str, kind: str, model: str, started: float,
                        load_ns: int, record: Record | None = None) -> Any:
    """`record`: the request's activity record, which gets the token counts."""
    finish: str | None = None
    timings: dict[str, Any] = {}
    usage: dict[str, Any] = {}
    calls: dict[int, dict[str, Any]] = {}
    async for raw in upstream.lines():
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = orjson.loads(line[6:])
        if chunk.get("error"):
            error = chunk["error"]
            raise UpstreamError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
        timings = chunk.get("timings") or timings
        usage = chunk.get("usage") or usage
        if path == "/v1/chat/completions":
            choices = chunk.get("choices") or []
            if not choices:
                continue
            delta = choices[0].get("delta") or {}
            finish = choices[0].get("finish_reason") or finish
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(int(call.get("index", 0)), {"function": {"name": "", "arguments": ""}})
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            text, thinking = delta.get("content") or "", delta.get("reasoning_content") or ""
        else:
            text, thinking = chunk.get("content", ""), ""
            if chunk.get("stop"):
                finish = "length" if chunk.get("stop_type") == "limit" else "stop"
        if text or thinking:
            yield _line(kind, model, text, thinking)
    if calls:
        tool_calls = _ollama_tool_calls([calls[i] for i in sorted(calls)])
        yield orjson.dumps({"model": model, "created_at": _now_iso(), "done": False,
                            "message": {"role": "assistant", "content": "", "tool_calls": tool_calls}}) + b"\n"
    final: dict[str, Any] = {"model": model, "created_at": _now_iso()}
    if kind == "chat":
        final["message"] = {"role": "assistant", "content": ""}
    else:
        final["response"] = ""
    if record is not None:
        record.count(token_counts(usage, timings))
    yield orjson.dumps({**final, **_final_fields(started, load_ns, finish, timings, usage)}) + b"\n"


def _line(kind: str, model: str, text: str, thinking: str) -> bytes:
    out: dict[str, Any] = {"model": model, "created_at": _now_iso(), "done": False}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": text, **({"thinking": thinking} if thinking else {})}
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    return orjson.dumps(out) + b"\n"


@_ollama_errors
async def show(request: web.Request) -> web.Response:
    """Model details for Continue, Aider and the ollama clients: `model_info` is always there and reports the
    context the instance really serves (-c), not the trained one, so clients do not overfill it."""
    manager = request.app[CONTEXT].manager
    payload = await _read_request(request)
    config = manager.resolve(payload["model"])
    auth.require_model(request, config)
    facts = manager.gguf_facts(config)
    info: dict[str, Any] = {}
    if facts:
        main = facts[0]
        arch = main.architecture
        info = {"general.architecture": arch, "general.parameter_count": main.parameters,
                "general.size_label": main.size_label, "general.file_type_name": main.quantization,
                f"{arch}.context_length": manager.served_context(config),
                f"{arch}.block_count": main.block_count, f"{arch}.attention.head_count_kv": main.head_count_kv}
    capabilities = _capabilities(config, facts[0] if facts else None)
    context = info.get(f"{facts[0].architecture}.context_length", 0) if facts else 0
    # Clients search the template text: "Tools" tells them tool calling works, ".Suffix" that FIM does.
    template = "{{ .System }}{{ .Prompt }}"
    template += "{{ if .Tools }}{{ .Tools }}{{ end }}" if "tools" in capabilities else ""
    template += "{{ if .Suffix }}{{ .Suffix }}{{ end }}" if "insert" in capabilities else ""
    files = _files(config)
    return json_response({
        "modelfile": f"# served by modelyard from {config.model_path or config.command}\n",
        "parameters": f"num_ctx {context}" if context else "",
        "template": template, "details": details(manager, config), "model_info": info,
        "capabilities": capabilities,
        "modified_at": _iso(_stats(files)[0]),
    })


def _capabilities(config: ModelConfig, facts: GgufFacts | None) -> list[str]:
    """What Ollama's capabilities would say: from the preset (embeddings, a projector, jinja templates) and
    the GGUF (does its chat template take tools or thinking; does its vocabulary have FIM tokens)."""
    settings = config.settings
    if config.command is None and config.serves_embeddings(os.environ):
        return ["embedding"]
    capabilities = ["completion"]
    jinja = settings.get("--jinja", "true").lower() in TRUTHY
    if jinja and facts is not None and facts.tools:
        capabilities.append("tools")
    if jinja and facts is not None and facts.thinking:
        capabilities.append("thinking")
    if facts is not None and facts.fill_in_middle:
        capabilities.append("insert")
    if config.has_projector:
        capabilities.append("vision")
    return capabilities


@_ollama_errors
async def embed(request: web.Request) -> web.Response:
    return await _embed(request, legacy=False)


@_ollama_errors
async def embeddings(request: web.Request) -> web.Response:
    return await _embed(request, legacy=True)


async def _embed(request: web.Request, legacy: bool) -> web.Response:
    started = time.perf_counter()
    manager = request.app[CONTEXT].manager
    payload = await _read_request(request)
    auth.require_named(request, payload["model"], manager.resolve)
    keep_alive = _keep_alive(payload)
    raw = payload.get("prompt") if legacy else payload.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if inputs is None or (isinstance(inputs, list) and not inputs):
        return await _lifecycle(manager, payload["model"], keep_alive, "embed")
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise OllamaError(400, "input must be a string or a list of strings")
    check_embeddings(manager.resolve(payload["model"]))  # before loading: llama-server would answer 501
    acquired = time.perf_counter()
    lease = await acquire(request, payload["model"], keep_alive=keep_alive)
    load_ns = int((time.perf_counter() - acquired) * 1e9)
    try:
        async with _upstream(lease, "/v1/embeddings", {"input": inputs}) as upstream:
            reply = orjson.loads(await upstream.read())
    finally:
        manager.release(lease)
    record = request.get(RECORD)
    if record is not None:
        request.app[CONTEXT].activity.first_byte(record)
        record.count(token_counts(reply.get("usage"), None))
    vectors = [item["embedding"] for item in sorted(reply["data"], key=lambda d: d["index"])]
    if legacy:
        return json_response({"embedding": vectors[0]})
    return json_response({"model": payload["model"], "embeddings": vectors,
                              "total_duration": int((time.perf_counter() - started) * 1e9),
                              "load_duration": load_ns,
                              "prompt_eval_count": int((reply.get("usage") or {}).get("prompt_tokens", 0))})
