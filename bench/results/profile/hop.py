"""report.md's chat and stream section: the latency modelyard and floor_proxy.py add to a 1-token chat, to a
stream's first token and to a /tokenize, at concurrency 1, paired on one child.

    python hop.py SRC PORT [STEPS]     # `modelyard serve` from SRC/src over the demo SmolLM2, -c 2048 --threads 1
    PROFILE=prefix python hop.py ...   # then py-spy record (raw) of modelyard under 38 s of chats, then of streams
    CPU_N=300 python hop.py ...        # then each router's CPU per request, n requests of each kind alone
    SERVE_ARGS="--log-verbosity 2" ... # more `modelyard serve` arguments (here: the child prints no info lines)
    STAMPS=file python hop.py ...      # the client's stamps of each paired request, one JSON list a line; every
                                       # request carries X-Hop-Id, so a patched router can write its own beside
                                       # them (perf_counter is CLOCK_MONOTONIC: comparable across processes)

Both routers call the same child: modelyard's, on its Unix socket (the floor gets its socket and key). Each
step sends each kind once to each target (direct, floor, modelyard) in a rotating order; the added latency is
the median of the per-step differences with direct. Chats and /tokenize go on a kept-alive connection per
target, each stream on a new one (llama-server closes it after a chunked answer), for all three alike."""
# ruff: noqa: ASYNC220, ASYNC230, ASYNC240 -- processes and files are handled between timed phases, never in one

import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from measure import HERE, MODEL, MODELS, VENV, cpu_seconds  # this folder's, beside this file

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
STREAM = {**CHAT, "max_tokens": 4, "stream": True}
TOKENIZE = {"model": MODEL, "content": "rate"}
STAMPS: list[list[object]] = []


async def chat(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict, tag: str) -> float:
    started = time.perf_counter()
    async with session.post(url, json=body, headers={**headers, "X-Hop-Id": tag}) as response:
        await response.read()
        assert response.status == 200, response.status
    ended = time.perf_counter()
    STAMPS.append([tag, "client sent", started, "client read", ended])
    return ended - started


async def first_token(session: aiohttp.ClientSession, url: str, headers: dict[str, str], tag: str) -> float:
    started = time.perf_counter()
    found = None
    async with session.post(url, json=STREAM, headers={**headers, "X-Hop-Id": tag}) as response:
        assert response.status == 200, response.status
        headers_at = time.perf_counter()
        async for raw in response.content:
            line = raw.strip()
            if found is None and line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    found = time.perf_counter()
    assert found is not None
    STAMPS.append([tag, "client sent", started, "client headers", headers_at, "client first token", found])
    return found - started


class Target:
    def __init__(self, name: str, base: str, headers: dict[str, str], unix: str | None = None) -> None:
        def connector(force_close: bool) -> aiohttp.BaseConnector:
            if unix:
                return aiohttp.UnixConnector(unix, limit=1, force_close=force_close)
            return aiohttp.TCPConnector(limit=1, force_close=force_close)
        self.name, self.base, self.headers = name, base, headers
        self.kept = aiohttp.ClientSession(connector=connector(False))
        self.fresh = aiohttp.ClientSession(connector=connector(True))

    async def run(self, kind: str, tag: str) -> float:
        if kind == "stream":
            return await first_token(self.fresh, self.base + "/v1/chat/completions", self.headers, tag)
        body, path = (CHAT, "/v1/chat/completions") if kind == "chat" else (TOKENIZE, "/tokenize")
        return await chat(self.kept, self.base + path, self.headers, body, tag)

    async def close(self) -> None:
        await self.kept.close()
        await self.fresh.close()


async def paired(targets: list[Target], steps: int) -> dict:
    added: dict[str, dict[str, list[float]]] = {k: {t.name: [] for t in targets[1:]} for k in
                                                ("tokenize", "chat", "stream")}
    orders = itertools.cycle(itertools.permutations(targets))
    for step in range(steps):
        for kind in added:
            order = next(orders)
            took = {t.name: await t.run(kind, f"{kind}-{step}-{t.name}") for t in order}
            for name in added[kind]:
                added[kind][name].append(took[name] - took["direct"])
    return {kind: {name: {"added_p50_ms": round(statistics.median(d) * 1000, 3), "pairs": len(d)}
                   for name, d in by.items()} for kind, by in added.items()}


async def cpu(targets: list[Target], pids: dict[str, int], counts: dict[str, int]) -> dict:
    """CPU ms per request of each router, its requests sent alone; modelyard's counted less what it spends
    while the floor serves the same requests (it reads the child's log lines whoever sent the request)."""
    spent: dict[str, dict[str, float]] = {}
    for kind, n in counts.items():
        for target in targets:
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            for _ in range(n):
                await target.run(kind, f"{kind}-cpu")
            spent.setdefault(kind, {})[target.name] = {name: (cpu_seconds(pid) - before[name]) * 1000 / n
                                                       for name, pid in pids.items()}
    return {kind: {"floor": round(by["floor"]["floor"], 3),
                   "modelyard": round(by["modelyard"]["modelyard"] - by["floor"]["modelyard"], 3),
                   "modelyard_while_floor_serves": round(by["floor"]["modelyard"], 3)} for kind, by in spent.items()}


async def profile(target: Target, pid: int, prefix: str) -> None:
    for kind in ("chat", "stream"):
        spy = subprocess.Popen([str(VENV / "py-spy"), "record", "--pid", str(pid), "-o", f"{prefix}-{kind}.txt",
                                "-f", "raw", "-r", "1000", "-d", "40"])
        await asyncio.sleep(1)
        started = time.perf_counter()
        while time.perf_counter() - started < 38:
            await target.run(kind, f"{kind}-profile")
        spy.wait()


async def main(src: str, port: int, steps: int) -> dict:
    log_path = Path(f"/tmp/hop-{port}.log")
    router = subprocess.Popen([sys.executable, "-m", "modelyard.cli", "serve", "--models-dir", str(MODELS),
                               "--port", str(port), "--models-max", "1", "--threads", "1", "-c", "2048",
                               *os.environ.get("SERVE_ARGS", "").split()],
                              env={**os.environ, "PYTHONPATH": f"{src}/src"}, stdout=subprocess.DEVNULL,
                              stderr=log_path.open("w"))
    floor = None
    targets: list[Target] = []
    try:
        via = Target("modelyard", f"http://127.0.0.1:{port}", {})
        for _ in range(300):
            try:
                await via.run("tokenize", "warm")
                break
            except (aiohttp.ClientError, AssertionError):
                await asyncio.sleep(0.2)
        text = log_path.read_text()  # the child's socket and pid, as the manager logs them
        unix = text.split(" on unix://")[1].split(":")[0]
        child_pid = int(text.split("(pid ")[1].split(",")[0])
        environ = dict(e.split("=", 1) for e in Path(f"/proc/{child_pid}/environ").read_text().split("\0") if "=" in e)
        key = environ["LLAMA_API_KEY"]
        floor = subprocess.Popen([sys.executable, str(HERE / "floor_proxy.py"), str(port + 1), "http://child",
                                  unix, key])
        targets = [Target("direct", "http://child", {"Authorization": f"Bearer {key}"}, unix),
                   Target("floor", f"http://127.0.0.1:{port + 1}", {}), via]
        for _ in range(100):
            try:
                await targets[1].run("tokenize", "warm")
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        for t in targets:
            for kind in ("tokenize", "chat", "stream", "chat", "stream"):
                await t.run(kind, "warm")
        STAMPS.clear()
        out = await paired(targets, steps) if steps else {}
        counts = {"tokenize": int(os.environ.get("CPU_N", "0")) * 3, "chat": int(os.environ.get("CPU_N", "0")),
                  "stream": int(os.environ.get("CPU_N", "0"))}
        if counts["chat"]:
            out["cpu_ms_per_request"] = await cpu(targets[1:], {"floor": floor.pid, "modelyard": router.pid}, counts)
        if os.environ.get("STAMPS"):
            Path(os.environ["STAMPS"]).write_text("\n".join(json.dumps(s) for s in STAMPS))
        if os.environ.get("PROFILE"):
            await profile(via, router.pid, os.environ["PROFILE"])
        return {"router": f"modelyard from {src}", "steps": steps, "added": out}
    finally:
        for t in targets:
            await t.close()
        for proc in (floor, router):
            if proc is not None:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 300))))
