"""proxy.forward's end of a stream that breaks after its start (a child that dies, a cluster node cut): in-band
where the format has a way, SSE's error event and [DONE] or Ollama's NDJSON error line on a line of its own, a
cut connection otherwise. In-process, over an upstream that sends what the test says and then fails."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from modelyard.children import ChildError, Reply
from modelyard.proxy import forward


class BrokenReply:
    """A streamed answer: `parts`, then the failure a dying child or a cut node gives."""

    status = 200
    content_length = None

    def __init__(self, content_type: str, parts: list[bytes]) -> None:
        self.headers: Mapping[str, str] = {"Content-Type": content_type}
        self._parts = parts

    async def read(self) -> bytes:
        raise AssertionError("a streamed answer is relayed by chunks")

    async def chunks(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            yield part
        raise ChildError("the child died")

    def lines(self) -> AsyncIterator[bytes]:
        return self.chunks()


class Broken:
    def __init__(self, content_type: str, parts: list[bytes]) -> None:
        self.reply = BrokenReply(content_type, parts)

    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, *, body: bytes | AsyncIterable[bytes] | None = None,
                      headers: Mapping[str, str] | None = None,
                      params: Mapping[str, str] | None = None) -> AsyncIterator[Reply]:
        yield self.reply


async def answer(content_type: str, parts: list[bytes]) -> bytes:
    """What a client reads of the relayed answer (ClientPayloadError if the connection was cut)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return await forward(request, Broken(content_type, parts), b"", request.query)

    app = web.Application()
    app.router.add_post("/stream", handler)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/stream")
        assert response.status == 200
        return await response.read()


FAILED = "the model's server failed mid-stream: the child died"


@pytest.mark.parametrize(("parts", "before"), [
    pytest.param([b'{"response": "Once"}\n'], b'{"response": "Once"}\n', id="after-a-whole-line"),
    pytest.param([b'{"response": "Once"}\n{"resp'], b'{"response": "Once"}\n{"resp\n', id="mid-line"),
    pytest.param([], b"", id="before-any-line"),
])
async def test_an_ndjson_stream_ends_with_ollamas_error_line(parts: list[bytes], before: bytes) -> None:
    body = await answer("application/x-ndjson", parts)
    assert body.startswith(before)
    assert json.loads(body[len(before):]) == {"error": FAILED} and body.endswith(b"}\n")


async def test_an_sse_stream_ends_with_an_error_event_and_done() -> None:
    body = await answer("text/event-stream", [b'data: {"choices": []}\n\n'])
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["message"] == FAILED


async def test_another_stream_is_cut() -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        await answer("application/octet-stream", [b"some bytes"])
