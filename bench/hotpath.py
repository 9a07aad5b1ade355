"""Quick figures for the core: cold load to first token, swap time, and the latency modelyard adds over
calling a model's child directly. (The full benchmark suite against llama-server router mode is issue #3.)

    .venv/bin/python bench/hotpath.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from modelyard.demo import GEMMA3, SMOLLM2, default_models_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(models_dir: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "modelyard.cli", "serve", "--models-dir", str(models_dir),
                             "--port", str(port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("modelyard did not start")


def first_token_seconds(client: httpx.Client, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "stream": True}
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    return time.perf_counter() - started
    raise RuntimeError("no token")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        (models / "a.gguf").symlink_to(default_models_dir() / f"{GEMMA3}.gguf")
        (models / "b.gguf").symlink_to(default_models_dir() / f"{GEMMA3}.gguf")
        (models / "smol.gguf").symlink_to(default_models_dir() / f"{SMOLLM2}.gguf")
        proc, url = start(models, "--models-max", "1")
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                cold = [first_token_seconds(client, "a")]
                hot = [first_token_seconds(client, "a") for _ in range(3)]
                swaps = []
                for model in ("b", "a", "b", "a"):
                    swaps.append(first_token_seconds(client, model))
                print(f"cold load to first token (gemma3-270m): {cold[0]:.2f} s")
                print(f"first token, model loaded: median {statistics.median(hot) * 1000:.0f} ms")
                print(f"swap (unload one, load the other) to first token: median {statistics.median(swaps):.2f} s "
                      f"(min {min(swaps):.2f}, max {max(swaps):.2f})")
                overhead(client, url, args.requests, args.rounds)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def overhead(client: httpx.Client, url: str, requests: int, rounds: int) -> None:
    client.post("/tokenize", json={"model": "smol", "content": "warm"}).raise_for_status()
    entry = next(m for m in client.get("/models").json()["data"] if m["id"] == "smol")
    argv = entry["status"]["args"]
    direct_url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
    body = {"model": "smol", "content": "The quick brown fox jumps over the lazy dog."}
    via: list[float] = []
    direct: list[float] = []
    with httpx.Client(base_url=url) as routed, httpx.Client(base_url=direct_url) as child:
        for _ in range(rounds):  # interleaved rounds: the machine is noisy
            for target, sink in ((routed, via), (child, direct)):
                for _ in range(requests // rounds):
                    started = time.perf_counter()
                    target.post("/tokenize", json=body).raise_for_status()
                    sink.append(time.perf_counter() - started)
    ms = 1000
    print(f"POST /tokenize, one keep-alive connection, {len(via)} requests each (pid {os.getpid()}):")
    print(f"  direct to child: p50 {percentile(direct, .5) * ms:.2f} ms, p99 {percentile(direct, .99) * ms:.2f} ms")
    print(f"  via modelyard:   p50 {percentile(via, .5) * ms:.2f} ms, p99 {percentile(via, .99) * ms:.2f} ms")
    print(f"  added:           p50 {(percentile(via, .5) - percentile(direct, .5)) * ms:+.2f} ms, "
          f"p99 {(percentile(via, .99) - percentile(direct, .99)) * ms:+.2f} ms")


if __name__ == "__main__":
    main()
