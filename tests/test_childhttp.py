"""childhttp.ChildClient, the client modelyard forwards to its children with, in-process: against an aiohttp
server on a Unix socket (what a real child's answers look like) and a scripted server that answers exactly the
bytes a test gives, for the framings, the pool's rules (reuse, never after a chunked answer, the spare, the
idle limit, the connection limit), the one resend, and every malformed answer as a ChildHTTPError.
The same client against llama-server itself: tests/test_real_engine_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from modelyard.childhttp import ChildClient, ChildHTTPError, target
from tests.fakes import settle

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A Unix-socket server that runs `script` for each connection; counts them and says when each one opens."""

    def __init__(self, path: Path, script: Script) -> None:
        self.path = path
        self.script = script
        self.connections = 0
        self.opened: asyncio.Queue[int] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.opened.put_nowait(self.connections)
        try:
            await self.script(reader, writer)
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request with a Content-Length or no body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def answering(*answers: bytes, keep_open: bool = True) -> Script:
    """Answer each request on a connection with the next of `answers`; then wait for the client to go."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
        if keep_open:
            await reader.read()
    return script


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "child.sock"


async def test_a_plain_answer_is_read_and_its_connection_reused(sock: Path) -> None:
    async with Scripted(sock, answering(OK, OK, OK)) as server:
        client = ChildClient(sock)
        for _ in range(3):
            response = await client.request("POST", "/tokenize", body=b'{"content": "x"}')
            assert (response.status, response.content_length, await response.read()) == (200, 2, b"{}")
            assert response.headers["content-type"] == "application/json"
            response.release()
        assert server.connections == 1
        await client.close()


async def test_a_chunked_answer_comes_as_it_arrives_and_its_connection_is_never_reused(sock: Path) -> None:
    async with Scripted(sock, answering(CHUNKED)) as server:
        client = ChildClient(sock)
        response = await client.request("POST", "/v1/chat/completions", body=b"{}")
        assert response.content_length is None
        assert [part async for part in response.chunks()] == [b"hello", b" world"]
        response.release()
        # the spare opened as that connection went is the next request's
        assert await server.opened.get() == 1 and await server.opened.get() == 2
        response = await client.request("POST", "/v1/chat/completions", body=b"{}")
        assert await response.read() == b"hello world"
        response.release()
        assert await server.opened.get() == 3  # the second stream's connection went too, and a spare came again
        await client.close()


async def test_the_spare_is_not_used_once_idle_past_the_limit(sock: Path) -> None:
    now = [0.0]
    async with Scripted(sock, answering(CHUNKED, keep_open=True)) as server:
        client = ChildClient(sock, clock=lambda: now[0])
        response = await client.request("POST", "/s", body=b"{}")
        await response.read()
        response.release()
        await server.opened.get()
        await server.opened.get()  # the spare
        await settle()  # ... in the pool
        assert client.open_connections == 1
        now[0] += 4.0  # the child would close it in a second
        response = await client.request("POST", "/s", body=b"{}")
        assert await server.opened.get() == 3  # a new connection, not the stale spare
        await response.read()
        response.release()
        await client.close()


async def test_lines_splits_the_body_on_newlines_across_chunks(sock: Path) -> None:
    body = b'{"a": 1}\n{"b"' + b': 2}\n{"c": 3}'
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\n\r\n")
    async with Scripted(sock, answering(answer)):
        client = ChildClient(sock)
        response = await client.request("GET", "/api")
        assert [line async for line in response.lines()] == [b'{"a": 1}\n', b'{"b": 2}\n', b'{"c": 3}']
        response.release()
        await client.close()


async def test_a_body_that_ends_with_the_connection_is_read_to_its_end(sock: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
    async with Scripted(sock, script) as server:
        client = ChildClient(sock)
        response = await client.request("GET", "/x")
        assert (response.content_length, await response.read()) == (None, b"all of it")
        response.release()
        response = await client.request("GET", "/x")  # that connection could not be reused
        await response.read()
        response.release()
        assert server.connections == 2
        await client.close()


async def test_interim_answers_are_skipped_and_head_and_204_have_no_body(sock: Path) -> None:
    answers = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
               b"HTTP/1.1 204 No Content\r\n\r\n", OK)
    async with Scripted(sock, answering(*answers)) as server:
        client = ChildClient(sock)
        for expected in (b"ok", b"", b"{}"):
            response = await client.request("POST", "/x", body=b"{}")
            assert await response.read() == expected
            response.release()
        assert server.connections == 1
        await client.close()


async def test_a_connection_the_child_closed_idle_is_not_used_and_a_request_caught_by_the_close_is_sent_again(
        sock: Path) -> None:
    served: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = len(served)
        served.append(b"")
        if connection == 0:  # answers one request, then reads the next one's bytes and closes unanswered
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            return
        _head, body = await read_request(reader)
        served[connection] = body
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async with Scripted(sock, script) as server:
        client = ChildClient(sock)
        response = await client.request("POST", "/x", body=b"first")
        await response.read()
        response.release()
        response = await client.request("POST", "/x", body=b"second")  # the reused connection closes under it
        assert await response.read() == b"{}"
        response.release()
        assert served[1:] == [b"second"] and server.connections == 2
        await client.close()


async def test_a_streamed_upload_is_sent_chunked_and_never_sent_twice(sock: Path) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        body = b""
        while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        await reader.read()

    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b""
        yield b"cd"

    async with Scripted(sock, script):
        client = ChildClient(sock)
        response = await client.request("POST", "/upload", body=parts())
        assert await response.read() == b"abcd"
        response.release()
        await client.close()


@pytest.mark.parametrize("answer, message", [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "did not answer in HTTP/1.x"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n", "over 65536 bytes"),
])
async def test_what_is_not_an_answer_this_client_reads_is_a_child_http_error(
        sock: Path, answer: bytes, message: str) -> None:
    async with Scripted(sock, answering(answer)):
        client = ChildClient(sock)
        with pytest.raises(ChildHTTPError, match=message):
            await client.request("GET", "/x")
        assert client.open_connections == 0
        await client.close()


@pytest.mark.parametrize("answer, message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "before its answer ended"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "no chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "before its answer ended"),
])
async def test_a_body_cut_or_broken_is_a_child_http_error(sock: Path, answer: bytes, message: str) -> None:
    async with Scripted(sock, answering(answer, keep_open=False)):
        client = ChildClient(sock)
        response = await client.request("GET", "/x")
        with pytest.raises(ChildHTTPError, match=message):
            await response.read()
        response.release()
        assert client.open_connections == 0
        await client.close()


async def test_a_child_that_is_not_there_is_a_child_http_error(sock: Path) -> None:
    client = ChildClient(sock)
    with pytest.raises(ChildHTTPError, match="cannot connect"):
        await client.request("GET", "/health")
    await client.close()


async def test_at_most_limit_connections_are_open_and_a_request_beyond_waits_for_one(sock: Path) -> None:
    async with Scripted(sock, answering(OK, OK)) as server:
        client = ChildClient(sock, limit=1)
        first = await client.request("GET", "/a")
        second = asyncio.ensure_future(client.request("GET", "/b"))
        await asyncio.sleep(0)  # let it reach the wait (no connection can open: the limit holds)
        assert not second.done() and client.open_connections == 1
        await first.read()
        first.release()
        response = await second
        assert await response.read() == b"{}"
        response.release()
        assert server.connections == 1
        await client.close()


async def test_a_request_cancelled_mid_answer_closes_its_connection(sock: Path) -> None:
    received = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        received.set()
        assert await reader.read() == b""  # the client closed it: a child stops generating here

    async with Scripted(sock, script):
        client = ChildClient(sock)
        request = asyncio.ensure_future(client.request("POST", "/v1/chat/completions", body=b"{}"))
        await received.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert client.open_connections == 0
        await client.close()


async def test_close_fails_the_requests_in_flight(sock: Path) -> None:
    received = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        received.set()
        await reader.read()

    async with Scripted(sock, script):
        client = ChildClient(sock)
        request = asyncio.ensure_future(client.request("GET", "/slow"))
        await received.wait()
        await client.close()
        with pytest.raises(ChildHTTPError):
            await request
        with pytest.raises(ChildHTTPError, match="closed"):
            await client.request("GET", "/x")


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(sock: Path) -> None:
    client = ChildClient(sock)
    with pytest.raises(ChildHTTPError, match="line break"):
        await client.request("GET", "/x", headers={"X-Evil": "a\r\nX-Injected: 1"})
    assert client.open_connections == 0


def test_the_target_encodes_the_decoded_path_and_keeps_every_query_pair() -> None:
    from multidict import MultiDict
    assert target("/v1/models/a b/ü") == "/v1/models/a%20b/%C3%BC"
    assert target("/props", MultiDict([("model", "a&b"), ("x", "1"), ("x", "2")])) == "/props?model=a%26b&x=1&x=2"
    assert target("/a:b@c") == "/a:b@c"


async def test_against_aiohttp_the_headers_body_and_query_arrive_as_sent(sock: Path) -> None:
    seen: list[tuple[str, str, str, bytes]] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, request.path_qs, request.headers.get("X-Key", ""), await request.read()))
        if request.query.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(b"data: %d\n\n" % i)
            await response.write_eof()
            return response
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(sock)).start()
    client = ChildClient(sock)
    try:
        response = await client.request("POST", "/v1/x y", headers={"X-Key": "k"}, body=b"payload",
                                        params={"q": "1"})
        assert response.status == 200 and await response.read() == b'{"ok": true}'
        response.release()
        response = await client.request("GET", "/s", params={"stream": "1"})
        assert b"".join([part async for part in response.chunks()]) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        response.release()
        assert seen[0] == ("POST", "/v1/x%20y?q=1", "k", b"payload")
        assert seen[1][:2] == ("GET", "/s?stream=1")
    finally:
        await client.close()
        await runner.cleanup()
