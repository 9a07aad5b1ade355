"""The least an aiohttp proxy does (report.md's floor): read the body, POST it to the child on a kept-alive
pool, answer its bytes; a streamed (SSE) answer is relayed chunk by chunk, on a new connection each time as
modelyard must (llama-server closes the connection after a chunked answer). `FLOOR_UVLOOP=0`: asyncio's own
loop.  Usage: floor_proxy.py PORT CHILD_URL [UNIX_SOCKET KEY] (a child on a Unix socket, with its key)"""

import asyncio
import os
import sys

import aiohttp
from aiohttp import web


async def main(port: int, child: str, unix: str | None, key: str | None) -> None:
    def connector(force_close: bool) -> aiohttp.BaseConnector:
        if unix:
            return aiohttp.UnixConnector(unix, limit=0, force_close=force_close)
        return aiohttp.TCPConnector(limit=0, force_close=force_close)

    session = aiohttp.ClientSession(connector=connector(False))
    streams = aiohttp.ClientSession(connector=connector(True))
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        via = streams if b'"stream":true' in body.replace(b" ", b"") else session
        async with via.post(child + request.path, data=body, headers=headers) as upstream:
            if upstream.content_length is not None:
                return web.Response(body=await upstream.read(), status=upstream.status,
                                    content_type="application/json")
            response = web.StreamResponse(status=upstream.status,
                                          headers={"Content-Type": upstream.headers["Content-Type"]})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_post("/tokenize", handle)
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    factory = None
    if os.environ.get("FLOOR_UVLOOP", "1") == "1":
        import uvloop
        factory = uvloop.Loop
    extra = sys.argv[3:5] if len(sys.argv) >= 5 else [None, None]
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(int(sys.argv[1]), sys.argv[2], extra[0], extra[1]))
