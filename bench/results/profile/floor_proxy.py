"""The least an aiohttp proxy does (report.md's floor): read the body, POST it to the child on a kept-alive
pool, answer its bytes. `FLOOR_UVLOOP=0`: asyncio's own loop.  Usage: floor_proxy.py PORT CHILD_URL"""

import asyncio
import os
import sys

import aiohttp
from aiohttp import web


async def main(port: int, child: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        async with session.post(child + request.path, data=body,
                                headers={"Content-Type": "application/json"}) as upstream:
            return web.Response(body=await upstream.read(), status=upstream.status, content_type="application/json")

    app = web.Application()
    app.router.add_post("/tokenize", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    factory = None
    if os.environ.get("FLOOR_UVLOOP", "1") == "1":
        import uvloop
        factory = uvloop.Loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(int(sys.argv[1]), sys.argv[2]))
