"""The hot-path measurements of report.md: a router's CPU per proxied /tokenize (from /proc), requests/s at
concurrency 64 through it and straight to its child, the added p50 at concurrency 1, and its VmHWM.

    python measure.py modelyard SRC PORT [ROUNDS]   # `modelyard serve` from SRC/src over the demo SmolLM2
    python measure.py floor [ROUNDS]                 # floor_proxy.py (the least an aiohttp proxy does)
    PROFILE=out.txt python measure.py ...            # also py-spy record (raw) under 12,000 more requests

Not part of `modelyard bench`: an A/B tool, run back to back with a change on and off."""
# ruff: noqa: ASYNC220, ASYNC230, ASYNC240 -- processes and files are handled between timed phases, never in one

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).parent
VENV = Path(sys.executable).parent
ENGINE = next((Path.home() / ".cache/modelyard/engine").glob("llama.cpp-*/bin/llama-server"))
MODELS = Path.home() / ".local/share/modelyard/models"
MODEL = "smollm2-135m-instruct"
N = 3000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def load(url: str, concurrency: int, n: int, body: dict, headers: dict | None = None,
               unix: str | None = None) -> tuple[float, float]:
    """requests/s and p50 latency (s) of n POSTs by `concurrency` workers on a kept-alive pool."""
    latencies: list[float] = []
    connector = (aiohttp.UnixConnector(unix, limit=concurrency) if unix
                 else aiohttp.TCPConnector(limit=concurrency))
    async with aiohttp.ClientSession(connector=connector) as session:
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                started = time.perf_counter()
                async with session.post(url, json=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started), sorted(latencies)[len(latencies) // 2]


async def wait_up(url: str, body: dict) -> None:
    for _ in range(300):
        try:
            await load(url, 1, 1, body)
            return
        except (aiohttp.ClientError, AssertionError):
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


async def rounds(router: int, via: str, direct: str, body: dict, headers: dict, count: int,
                 unix: str | None = None) -> list[dict]:
    out = []
    for _ in range(count):
        before = cpu_seconds(router)
        rps, _ = await load(via, 64, N, body)
        cpu = cpu_seconds(router) - before
        _, p50 = await load(via, 1, 500, body)
        direct_rps, _ = await load(direct, 64, N, body, headers, unix)
        _, direct_p50 = await load(direct, 1, 500, body, headers, unix)
        out.append({"cpu_ms_per_request": round(cpu * 1000 / N, 4), "rps64": round(rps),
                    "direct_rps64": round(direct_rps), "ratio": round(rps / direct_rps, 3),
                    "added_p50_ms": round((p50 - direct_p50) * 1000, 3)})
    return out


async def profile(router: int, via: str, body: dict) -> None:
    if not os.environ.get("PROFILE"):
        return
    spy = subprocess.Popen([str(VENV / "py-spy"), "record", "--pid", str(router), "-o", os.environ["PROFILE"],
                            "-f", "raw", "-d", "12", "-r", "1000"])
    await asyncio.sleep(1)
    await load(via, 64, 12000, body)
    spy.wait()


async def modelyard(src: str, port: int, count: int) -> dict:
    log_path = Path(f"/tmp/measure-{port}.log")
    router = subprocess.Popen([sys.executable, "-m", "modelyard.cli", "serve", "--models-dir", str(MODELS),
                               "--port", str(port), "--models-max", "1", "--threads", "1"],
                              env={**os.environ, "PYTHONPATH": f"{src}/src"}, stdout=subprocess.DEVNULL,
                              stderr=log_path.open("w"))
    via = f"http://127.0.0.1:{port}/tokenize"
    body = {"model": MODEL, "content": "rate"}
    try:
        await wait_up(via, body)
        await load(via, 4, 200, body)
        text = log_path.read_text()  # the child's address and pid, as the manager logs them
        unix = text.split(" on unix://")[1].split(":")[0] if " on unix://" in text else None
        port_text = "" if unix else text.split(" on port ")[1].split(":")[0]
        direct = "http://child/tokenize" if unix else f"http://127.0.0.1:{port_text}/tokenize"
        child_pid = int(text.split("(pid ")[1].split(",")[0])
        environ = dict(e.split("=", 1) for e in Path(f"/proc/{child_pid}/environ").read_text().split("\0") if "=" in e)
        headers = {"Authorization": f"Bearer {environ['LLAMA_API_KEY']}"}  # each child has its own key
        out = await rounds(router.pid, via, direct, body, headers, count, unix)
        await profile(router.pid, via, body)
        return {"router": f"modelyard from {src}", "rounds": out, "peak_rss_mib": round(peak_rss_mib(router.pid), 1)}
    finally:
        router.terminate()
        router.wait(30)


async def floor(count: int) -> dict:
    child_port, proxy_port = 18470, 18471
    child = subprocess.Popen([str(ENGINE), "--model", str(MODELS / f"{MODEL}.gguf"), "--threads", "1",
                              "--threads-http", "64", "--host", "127.0.0.1", "--port", str(child_port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen([sys.executable, str(HERE / "floor_proxy.py"), str(proxy_port),
                              f"http://127.0.0.1:{child_port}"])
    via = f"http://127.0.0.1:{proxy_port}/tokenize"
    body = {"content": "rate"}
    try:
        await wait_up(via, body)
        await load(via, 4, 200, body)
        out = await rounds(proxy.pid, via, f"http://127.0.0.1:{child_port}/tokenize", body, {}, count)
        await profile(proxy.pid, via, body)
        return {"router": "floor_proxy.py", "uvloop": os.environ.get("FLOOR_UVLOOP", "1"), "rounds": out,
                "peak_rss_mib": round(peak_rss_mib(proxy.pid), 1)}
    finally:
        proxy.terminate()
        child.terminate()
        proxy.wait(30)
        child.wait(30)


if __name__ == "__main__":
    if sys.argv[1] == "floor":
        result = asyncio.run(floor(int(sys.argv[2]) if len(sys.argv) > 2 else 2))
    else:
        result = asyncio.run(modelyard(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 2))
    print(json.dumps(result))
