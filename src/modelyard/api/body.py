"""The one strict reader of JSON request bodies, for every route (inference, management, Ollama).

A fault campaign found `/models/load` and `/models/unload` (which used aiohttp's `request.json()`, i.e.
`json.loads`) answering 500 to 100,000-level nested JSON (RecursionError) and to an unknown `charset` in
Content-Type (LookupError). Here the body is parsed by orjson, which stops at 1,024 levels by itself, and the
charset is checked first. Every refusal is a ModelError, so each front-end answers in its own envelope:
400 for a body that is not JSON, not UTF-8 or nests too deeply; 415 for a charset other than UTF-8.
"""

from __future__ import annotations

import codecs
from typing import Any

import orjson
from aiohttp import web

from modelyard.errors import ErrorKind, ModelError

MAX_DEPTH = 1024  # orjson's own limit on nested arrays and objects
_UTF8_COMPATIBLE = frozenset({"utf-8", "ascii"})  # ASCII bodies are UTF-8 bodies


def charset_problem(charset: str | None) -> str | None:
    """Why a Content-Type charset is refused, or None: only UTF-8 (and its ASCII subset) is accepted."""
    if charset is None:
        return None
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return f"unknown charset {charset[:40]!r} in Content-Type; send the body as UTF-8 (charset=utf-8)"
    if name not in _UTF8_COMPATIBLE:
        return f"unsupported charset {charset[:40]!r} in Content-Type; send the body as UTF-8 (charset=utf-8)"
    return None


def parse_json_object(body: bytes, hint: str = "") -> dict[str, Any]:
    """The body as a JSON object, or a ModelError saying what to send. `hint` completes "must be a JSON
    object" (e.g. ' with a "model" field')."""
    if not body.strip():
        raise ModelError(ErrorKind.BAD_REQUEST, f"the request body is empty; it must be a JSON object{hint}")
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ModelError(ErrorKind.BAD_REQUEST, _decode_problem(body, exc)) from None
    if not isinstance(payload, dict):
        raise ModelError(ErrorKind.BAD_REQUEST, f"the request body must be a JSON object{hint}, not "
                                                f"{_kind(payload)}")
    return payload


def _decode_problem(body: bytes, exc: orjson.JSONDecodeError) -> str:
    # orjson says why in English only; these two cases deserve their own advice.
    if "depth limit exceeded" in str(exc) or "recursion" in str(exc):
        return f"the request body nests too deeply: at most {MAX_DEPTH} levels of arrays and objects"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"the request body is not UTF-8 (byte {bad.start}); send JSON encoded as UTF-8"
    return f"the request body is not valid JSON (invalid JSON: {exc})"


_KINDS: dict[type, str] = {type(None): "null", list: "an array", str: "a string", bool: "a boolean",
                           int: "a number", float: "a number"}


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


async def read_json_object(request: web.Request, hint: str = "") -> dict[str, Any]:
    """Read and parse the request's JSON object body; refusals are ModelErrors (see the module doc)."""
    problem = charset_problem(request.charset)
    if problem is not None:
        raise ModelError(ErrorKind.UNSUPPORTED_MEDIA, problem)
    return parse_json_object(await request.read(), hint)
