"""A tiny OpenAI-compatible engine for fast, deterministic timing tests (plugged in with a preset's `cmd`).

    python fake_engine.py --port 1234 [--load-delay 0.5] [--fail-load]

POST /v1/chat/completions answers after `fake_delay` seconds (from the JSON body, default 0), streaming
`fake_chunks` chunks when `stream` is true. Real-engine behaviour is tested against llama-server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from aiohttp import web

STARTED = time.time()


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    delay = float(body.get("fake_delay", 0))
    chunks = int(body.get("fake_chunks", 3))
    name = request.app["name"]
    if not body.get("stream"):
        await asyncio.sleep(delay)
        return web.json_response({"id": "fake", "object": "chat.completion", "created": int(STARTED),
                                  "model": body.get("model"), "served_by": name, "pid": os.getpid(),
                                  "received": sorted(body),
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "ok"}}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(chunks):
        await asyncio.sleep(delay / max(chunks, 1))
        chunk = {"id": "fake", "object": "chat.completion.chunk", "model": body.get("model"), "served_by": name,
                 "choices": [{"index": 0, "delta": {"content": f"c{i}"}, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--fail-load", action="store_true")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM, like a hung engine")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(args.load_delay)
    if args.fail_load:
        print("fake engine: cannot load the model (asked to fail)", file=sys.stderr)
        sys.exit(3)
    app = web.Application()
    app["name"] = args.name
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, handle_signals=not args.ignore_term)


if __name__ == "__main__":
    main()
