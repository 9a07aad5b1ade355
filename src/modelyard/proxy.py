"""Bytes in, bytes out: forward one HTTP request to a child and stream its answer back unbuffered.

Every request to a child, OpenAI-shaped or translated from Ollama's API, goes through the child's own
`request()` (modelyard.children), which adds the child's key, records activity for the watchdog and turns the
child's failures into ChildError with their cause. Streaming (SSE) passes through chunk by chunk. If the client
goes away, the handler is cancelled (the app runs with handler_cancellation), which closes the upstream
connection, and llama-server stops generating.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict

from modelyard.api.errors import error_body, error_response
from modelyard.api.json import dumps
from modelyard.children import Child, ChildError, Reply
from modelyard.errors import ErrorKind

log = logging.getLogger(__name__)

# Hop-by-hop headers, and the client's credentials for modelyard: the child gets its own key instead.
_REQUEST_DROP = frozenset({"host", "content-length", "transfer-encoding", "accept-encoding", "connection",
                           "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection",
                           "authorization", "x-api-key"})
_RESPONSE_DROP = frozenset({"server", "date", "transfer-encoding", "connection", "keep-alive",
                            "content-encoding", "access-control-allow-origin",
                            "access-control-allow-credentials", "access-control-allow-methods",
                            "access-control-allow-headers"})


async def forward(request: web.Request, child: Child, body: bytes, query: Mapping[str, str]) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP}
    try:
        async with child.request(request.method, request.path, params=query, body=body or None,
                                 headers=headers) as upstream:
            return await _relay(request, upstream)
    except ChildError as exc:  # _relay reports failures once it has started answering; this is before
        return error_response(ErrorKind.UPSTREAM, str(exc))


async def _relay(request: web.Request, upstream: Reply) -> web.StreamResponse:
    headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP)
    is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    length = upstream.content_length
    if length is not None and length <= 1 << 20 and not is_sse:
        payload = await upstream.read()  # a ChildError here is answered by forward(): nothing was sent yet
        return web.Response(status=upstream.status, body=payload, headers=headers)
    response = web.StreamResponse(status=upstream.status, headers=headers)
    await response.prepare(request)
    try:
        async for chunk in upstream.chunks():
            await response.write(chunk)
    except ChildError as exc:
        message = f"the model's server failed mid-stream: {exc}"
        log.warning("%s %s: %s", request.method, request.path, message)
        if is_sse:
            event = dumps(error_body(ErrorKind.UPSTREAM, message))
            # The llama.cpp web UI only finalises a message after [DONE].
            await response.write(b"data: " + event + b"\n\ndata: [DONE]\n\n")
        else:
            # Not SSE: no in-band way to report it; cut the connection so the client sees a truncated body.
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    return response
