"""Every JSON body modelyard writes goes through `dumps` here, so no response can contain `NaN` or `Infinity`.

aiohttp's `web.json_response` uses `json.dumps`, which writes them (allow_nan=True): a fault campaign saw
`/models` emit `Infinity`/`NaN` after `keep_alive: "inf"`, and strict clients (JavaScript's JSON.parse, Go,
orjson) then fail on the whole listing. orjson writes null for a non-finite float instead of raising (as
`json.dumps(allow_nan=False)` would): one bad number must not turn a listing into a 500. It is also what the
request side already uses, and several times faster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

_OPTIONS = orjson.OPT_NON_STR_KEYS  # json.dumps accepted int keys; keep that rather than fail


def dumps(value: Any) -> bytes:
    """Strict JSON (non-finite floats become null), UTF-8."""
    return orjson.dumps(value, option=_OPTIONS)


def json_response(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """`web.json_response`, strict."""
    return web.Response(body=dumps(value), status=status, headers=headers, content_type="application/json")
