"""Bytes in, bytes out: forward one HTTP request to a child and stream its answer back unbuffered.

Every request to a child, OpenAI-shaped or translated from Ollama's API, goes through the child's own
`request()` (modelyard.children), which adds the child's key, records activity for the watchdog and turns the
child's failures into ChildError with their cause. Streaming (SSE) passes through chunk by chunk. If the client
goes away, the handler is cancelled (the app runs with handler_cancellation), which closes the upstream
connection, and llama-server stops generating. A stream that breaks after its start ends in-band where its format
has a way (SSE's error event and [DONE], Ollama's NDJSON error line), else by a cut connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Mapping

from aiohttp import web
from multidict import CIMultiDict

from modelyard.activity import Record, tokens_in_body
from modelyard.api.activity import RECORD, admins_cancel, cancel_message
from modelyard.api.context import CONTEXT
from modelyard.api.errors import error_body, error_response
from modelyard.api.json import dumps
from modelyard.children import ChildError, Reply, Upstream
from modelyard.errors import ErrorKind
from modelyard.hub import events as hub_events

log = logging.getLogger(__name__)

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"  # Ollama's streams

# Hop-by-hop headers, and the client's credentials for modelyard: the child gets its own key instead.
_REQUEST_DROP = frozenset({"host", "content-length", "transfer-encoding", "accept-encoding", "connection",
                           "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection",
                           "authorization", "x-api-key"})
_RESPONSE_DROP = frozenset({"server", "date", "transfer-encoding", "connection", "keep-alive",
                            "content-encoding", "access-control-allow-origin",
                            "access-control-allow-credentials", "access-control-allow-methods",
                            "access-control-allow-headers"})


def upstream_headers(request: web.Request) -> dict[str, str]:
    """The client's headers a child gets."""
    return {k: v for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP}


async def forward(request: web.Request, child: Upstream, body: bytes | AsyncIterable[bytes], query: Mapping[str, str],
                  started: web.StreamResponse | None = None) -> web.StreamResponse:
    """`started`: an SSE answer already sent (api/loading.py's load messages), which the child's stream
    continues; a child's error then ends it in-band. `body` as an iterable: a body streamed on as the client
    sends it (api/multipart.py), with the client's length when it declared one (else sent chunked). A
    ModelError the upstream raises before it has sent the request anywhere (a cluster's NodeChild whose retry
    placement refuses) goes through to the caller, which answers it in its API's envelope (OpenAI's, Ollama's)
    as it answers its own refusals, with the kind's status and Retry-After."""
    headers = upstream_headers(request)
    if not isinstance(body, bytes) and request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    try:
        async with child.request(request.method, request.path, params=query, body=body or None,
                                 headers=headers) as upstream:
            return await _relay(request, upstream, started)
    except ChildError as exc:  # _relay reports failures once it has started answering; this is before
        if started is not None:
            return await _end_early(request, started, SSE, ErrorKind.UPSTREAM, str(exc))
        return error_response(ErrorKind.UPSTREAM, str(exc))


async def _relay(request: web.Request, upstream: Reply, started: web.StreamResponse | None = None
                 ) -> web.StreamResponse:
    headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP)
    content_type = upstream.headers.get("Content-Type", "")
    is_sse = content_type.startswith(SSE)
    length = upstream.content_length
    record = request.get(RECORD)
    if started is not None and (upstream.status != 200 or not is_sse):
        payload = await upstream.read()  # the child refused (a bad parameter): say so in the stream
        kind = ErrorKind.BAD_REQUEST if 400 <= upstream.status < 500 else ErrorKind.UPSTREAM
        message = f"the model's server answered {upstream.status}: {payload[:2000].decode(errors='replace')}"
        if record is not None:
            record.error = message
        return await _end_early(request, started, SSE, kind, message)
    if length is not None and length <= 1 << 20 and not is_sse and started is None:
        payload = await upstream.read()  # a ChildError here is answered by forward(): nothing was sent yet
        if record is not None:
            _account(request, record, payload if upstream.status == 200 else b"")
        return web.Response(status=upstream.status, body=payload, headers=headers)
    response = started or web.StreamResponse(status=upstream.status, headers=headers)
    if started is None:
        await response.prepare(request)
    capture = record.capture if record is not None else None
    # The last three chunks hold the final events (timings, then usage with include_usage, then [DONE]):
    # only they are searched for the token counts, once the stream is over.
    first, older, old, last = True, b"", b"", b""
    try:
        async for chunk in upstream.chunks():
            if first and record is not None:
                request.app[CONTEXT].activity.first_byte(record)
                first = False
            older, old, last = old, last, chunk
            if capture is not None:
                capture.add(chunk)
            await response.write(chunk)
    except ChildError as exc:
        message = f"the model's server failed mid-stream: {exc}"
        log.warning("%s %s: %s", request.method, request.path, message)
        if record is not None:
            record.error = message
        return await _end_early(request, response, content_type, ErrorKind.UPSTREAM, message, last)
    except asyncio.CancelledError:
        if not admins_cancel(record):
            raise
        # an admin's cancel, not the client's: end the stream in-band
        return await _end_early(request, response, content_type, ErrorKind.CANCELLED, cancel_message(record.id),
                                last)
    if record is not None and upstream.status == 200:
        record.count(tokens_in_body(older + old + last))
    await response.write_eof()
    return response


def _account(request: web.Request, record: Record, payload: bytes) -> None:
    request.app[CONTEXT].activity.first_byte(record)
    record.count(tokens_in_body(payload))


def ndjson_error(message: str) -> bytes:
    """Ollama's error in a stream (NDJSON): a last line of its own, which its clients (ollama-python, Continue)
    raise, where a cut stream would leave them guessing."""
    return dumps(hub_events.ollama_error(message)) + b"\n"


async def _end_early(request: web.Request, response: web.StreamResponse, content_type: str, kind: ErrorKind,
                     message: str, tail: bytes = b"") -> web.StreamResponse:
    """End a stream that has started (its Content-Type; `tail`: the last bytes sent) in-band where its format
    has a way: an error event and [DONE] for SSE; Ollama's error line for NDJSON (a cluster's ingress relays a
    node's Ollama stream as it came), on a line of its own if the stream broke mid-line. Otherwise by cutting
    the connection, so that the client sees a truncated body."""
    if content_type.startswith(SSE):
        # The llama.cpp web UI only finalises a message after [DONE].
        await response.write(b"data: " + dumps(error_body(kind, message)) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
    elif content_type.startswith(NDJSON):
        await response.write((b"\n" if tail and not tail.endswith(b"\n") else b"") + ndjson_error(message))
        await response.write_eof()
    elif request.transport is not None:
        # no in-band way to report it: cut the connection
        request.transport.close()
    return response
