"""The OpenAI error envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from modelyard.api.json import dumps
from modelyard.errors import ErrorKind, ModelError


def error_body(kind: ErrorKind, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def error_response(kind: ErrorKind, message: str, retry_after: float | None = None,
                   param: str | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return web.Response(status=kind.status, body=dumps(error_body(kind, message, param)),
                        content_type="application/json", headers=headers)


def from_model_error(error: ModelError) -> web.Response:
    return error_response(error.kind, error.message, error.retry_after)
