"""Bytes in, bytes out: forward one HTTP request to a child and stream its answer back unbuffered.

Streaming (SSE) passes through chunk by chunk. If the client goes away, the handler is cancelled (the app
runs with handler_cancellation), which closes the upstream connection, and llama-server stops generating.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from aiohttp.connector import Connection
from multidict import CIMultiDict

from modelyard.api.errors import error_body, error_response
from modelyard.errors import ErrorKind

log = logging.getLogger(__name__)

_REQUEST_DROP = frozenset({"host", "content-length", "transfer-encoding", "accept-encoding", "connection",
                           "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"})
_RESPONSE_DROP = frozenset({"server", "date", "transfer-encoding", "connection", "keep-alive",
                            "content-encoding", "access-control-allow-origin",
                            "access-control-allow-credentials", "access-control-allow-methods",
                            "access-control-allow-headers"})


class _ChildResponse(aiohttp.ClientResponse):
    """llama-server closes a connection after a chunked (streamed) answer without a `Connection: close`
    header; reused, it fails the next request ("Server disconnected"). So such a connection is never pooled."""

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        response = await super().start(connection)
        if self.content_length is None and connection.protocol is not None:
            connection.protocol.force_close()
        return response


def new_upstream_session(max_connections: int = 0) -> aiohttp.ClientSession:
    """The pooled client of one child: keep-alive connections, at most `max_connections` (0 = no limit), no
    timeout on long generations. Idle connections are dropped before the child's own 5 s keep-alive timeout,
    so a request never goes out on a connection the child is closing."""
    connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=4)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                 skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                                 response_class=_ChildResponse)


async def forward(request: web.Request, session: aiohttp.ClientSession, base_url: str, body: bytes,
                  query: Mapping[str, str]) -> web.StreamResponse:
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP)
    url = base_url + request.path
    try:
        async with session.request(request.method, url, params=query, data=body or None, headers=headers,
                                   allow_redirects=False) as upstream:
            return await _relay(request, upstream)
    except aiohttp.ClientError as exc:  # _relay handles its own failures; this is the connect/headers phase
        return error_response(ErrorKind.UPSTREAM, f"could not reach the model's server: {exc}")


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP)
    is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    length = upstream.content_length
    if length is not None and length <= 1 << 20 and not is_sse:
        try:
            payload = await upstream.read()
        except aiohttp.ClientError as exc:
            return error_response(ErrorKind.UPSTREAM, f"the model's server failed mid-response: {exc}")
        return web.Response(status=upstream.status, body=payload, headers=headers)
    response = web.StreamResponse(status=upstream.status, headers=headers)
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except aiohttp.ClientError as exc:
        message = f"the model's server failed mid-stream: {exc!r}"
        log.warning("%s %s: %s", request.method, request.path, message)
        if is_sse:
            event = json.dumps(error_body(ErrorKind.UPSTREAM, message))
            # The llama.cpp web UI only finalises a message after [DONE].
            await response.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())
        else:
            # Not SSE: no in-band way to report it; cut the connection so the client sees a truncated body.
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    return response
