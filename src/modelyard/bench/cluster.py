"""`modelyard bench --only cluster` (docs/cluster.md, "Bench"): modelyard over a local two-node Ray cluster, on the
demo models (smol, smol-b: SmolLM2; gemma: Gemma 3), against the same node's app and a single-node `serve`.

The cluster runs as `modelyard serve --ray local:2` does, in a process of its own (bench/cluster_host.py), which
also tells the bench the cluster key and each node's raylet pid: `serve --ray` keeps the key to itself, and the
bench needs it to call a node's app directly (the baseline of the front's added latency), and the pid to kill a
node's raylet mid-stream. Driving the cluster in the bench's own process would give both too, but the front would
then share the bench client's event loop and interpreter, which a request rate at concurrency 16 would measure.

In order: 1. the latency the front adds, paired (bench/paired.py) against the node's app where the model runs and
against a single-node `modelyard serve` (a 1-token chat and a stream's first token at concurrency 1, rounds of
chats at higher concurrencies, with each target's requests/s); 2. a cold burst (N concurrent requests for a model
no node has: how many loads the nodes started); 3. failover, last since the node does not come back: a model
loaded on the worker node (not the head, whose raylet the front's driver is attached to), a stream of it through
the front, the worker's raylet killed after the first token; the time to the stream's error event, and to the
first answer for the same model from the other node. The report goes to <out>/cluster/report.md."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from modelyard.bench.cluster_figures import (
    BASELINES,
    CHAT,
    FRONT,
    NODE,
    PLANS,
    SINGLE,
    STREAM_FIRST,
    Burst,
    ClusterPlan,
    ClusterResults,
    Failover,
    Probe,
    loads_by_node,
    render,
    still_loading,
    target_of,
)
from modelyard.bench.load import new_session, streamed_chat, timed_requests
from modelyard.bench.paired import DIRECT, VIA, Round, paired_requests, paired_rounds
from modelyard.bench.paired import Probe as Measure
from modelyard.bench.processes import MODELYARD, Target, free_port, start_router, stop_gracefully
from modelyard.bench.run import ENGINE_ARGS
from modelyard.demo import GEMMA3, SMOLLM2, default_models_dir
from modelyard.engine.install import LLAMA_CPP_BUILD
from modelyard.memory import system_memory

NODES = 2
WARM, COLD, FAILED_OVER = "smol", "gemma", "smol-b"  # the latency's model, the burst's, the failover's
MODELS = {WARM: SMOLLM2, FAILED_OVER: SMOLLM2, COLD: GEMMA3}
BUDGET_SHARE = 0.8  # `serve`'s default --memory-budget, split between the nodes
UP_LIMIT_S = 180.0
STOP_GRACE_S = 90.0  # the host closes a dead node's agent (up to 20 s), then shuts the local cluster down
NEEDS_RAY = ("the cluster bench needs Ray, which is not installed here: pip install 'modelyard[ray]' "
             "(make test-cluster's .venv-ray has it: .venv-ray/bin/modelyard bench --only cluster)")


def require_ray() -> None:
    """One line naming the extra when Ray is missing (found without importing it: the host imports it)."""
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError(NEEDS_RAY)


@dataclass
class Host:
    """The cluster's process (bench/cluster_host.py) and what it told the bench."""

    proc: subprocess.Popen[bytes]
    url: str
    key: str
    nodes: dict[str, dict[str, Any]]  # node id -> {"url", "raylet", "head"}
    log: Path
    up_after: float

    def node(self, node: str) -> Target:
        return Target(self.nodes[node]["url"], {"Authorization": f"Bearer {self.key}"})

    def worker(self) -> str:
        return next(node for node, info in self.nodes.items() if not info["head"])


def start_host(binary: Path, models_dir: Path, workdir: Path) -> Host:
    port = free_port()
    log = workdir / f"cluster-{port}.log"
    ready, writer = os.pipe()
    command = [sys.executable, "-m", "modelyard.bench.cluster_host", "--nodes", str(NODES), "--port", str(port),
               "--models-dir", str(models_dir), "--llama-server", str(binary),
               "--memory-budget", str(int(system_memory() * BUDGET_SHARE)), "--engine-args", json.dumps(ENGINE_ARGS),
               "--ready-fd", str(writer)]
    launched = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=(writer,))
    os.close(writer)
    try:
        line = _read_line(ready, proc, log, launched + UP_LIMIT_S)
    except BaseException:
        stop_gracefully(proc, STOP_GRACE_S)
        raise
    finally:
        os.close(ready)
    told = json.loads(line)
    return Host(proc, told["url"], told["key"], told["nodes"], log, time.monotonic() - launched)


def _read_line(fd: int, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> str:
    """The host's line on the pipe `fd`, once it has written it (every node published), or why not."""
    data = b""
    while not data.endswith(b"\n"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster was not up after {UP_LIMIT_S:.0f} s (log: {log})")
        readable, _, _ = select.select([fd], [], [], 0.5)
        chunk = os.read(fd, 65536) if readable else b""
        if readable and not chunk:  # the host closed the pipe without a line: it failed
            proc.wait(30)
            raise RuntimeError(f"the cluster's process exited with {proc.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        data += chunk
    return data.decode()


# --- 1. the latency the front adds ----------------------------------------------------------------------------

def _chat(model: str, max_tokens: int = 1, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


async def _post(session: aiohttp.ClientSession, target: Target, path: str, body: dict[str, Any]) -> Any:
    async with session.post(target.url + path, json=body, headers=target.headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{target.url}{path} answered {response.status}: {await response.text()}")
        return await response.json()


async def _get(session: aiohttp.ClientSession, target: Target, path: str) -> Any:
    async with session.get(target.url + path, headers=target.headers) as response:
        response.raise_for_status()
        return await response.json()


def _chat_probe(session: aiohttp.ClientSession, target: Target) -> Measure:
    payload = json.dumps(_chat(WARM)).encode()
    sent = {"Content-Type": "application/json", **target.headers}

    async def probe() -> float | None:
        started = time.perf_counter()
        try:
            async with session.post(target.url + "/v1/chat/completions", data=payload, headers=sent) as response:
                await response.read()
                ok = response.status == 200
        except aiohttp.ClientError:
            ok = False
        return time.perf_counter() - started if ok else None

    return probe


def _stream_probe(session: aiohttp.ClientSession, target: Target) -> Measure:
    async def probe() -> float | None:
        try:
            return (await streamed_chat(session, target.url, WARM, 1, headers=target.headers)).first_token
        except (aiohttp.ClientError, RuntimeError):
            return None

    return probe


async def latency(targets: dict[str, Target], plan: ClusterPlan, results: ClusterResults) -> None:
    """`targets`: the front, and each baseline (the node's app where WARM is loaded, the single node)."""
    pairs = {kind: {DIRECT: targets[kind], VIA: targets[FRONT]} for kind in BASELINES}
    for endpoint, make, force_close in ((CHAT, _chat_probe, False), (STREAM_FIRST, _stream_probe, True)):
        async with AsyncExitStack() as stack:  # one pool of one connection per (pair, side): the front's two too
            probes = {kind: {route: make(await stack.enter_async_context(target.session(1, force_close)), target)
                             for route, target in routes.items()} for kind, routes in pairs.items()}
            paired = await paired_requests(probes, plan.paired_min, plan.paired_budget_s, plan.ci_width_s)
        results.paired[(endpoint, 1)] = paired
    for concurrency in plan.concurrencies:
        count = max(plan.round_requests, 2 * concurrency)
        rounds = {kind: {route: _round(target, target_of(kind, route), count, concurrency, results)
                         for route, target in routes.items()} for kind, routes in pairs.items()}
        results.paired[(CHAT, concurrency)], _ = await paired_rounds(rounds, plan.rounds_min, plan.rounds_budget_s,
                                                                     plan.ci_width_s)


def _round(target: Target, name: str, count: int, concurrency: int, results: ClusterResults) -> Round:
    """`count` 1-token chats at `concurrency` on a fresh pool (idle kept-alive connections of one target would
    hold the threads of a child another target needs); its requests/s go to `results.rates`."""
    async def measured() -> list[float]:
        async with target.session(concurrency) as session:
            timed = await timed_requests(session, target.url + "/v1/chat/completions", lambda i: _chat(WARM),
                                         count, concurrency, target.headers)
        results.rates.setdefault((concurrency, name), []).append(timed.rate)
        return timed.latencies

    return measured


# --- 2. a cold burst, and the feed that counts loads -----------------------------------------------------------

class Feed:
    """The front's merged /models/sse (each event with its node), kept from the moment the answer starts: the
    front subscribes to every node before that, so no later event is missed."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def follow(self, response: aiohttp.ClientResponse) -> None:
        async for raw in response.content:
            line = raw.strip()
            if line.startswith(b"data: "):
                self.events.append(json.loads(line[6:]))
                async with self._changed:
                    self._changed.notify_all()

    async def until(self, holds: Callable[[list[dict[str, Any]]], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: holds(self.events))


@contextlib.asynccontextmanager
async def feed(session: aiohttp.ClientSession, front: str) -> AsyncIterator[Feed]:
    kept = Feed()
    async with session.get(front + "/models/sse") as response:
        response.raise_for_status()
        task = asyncio.create_task(kept.follow(response))
        try:
            yield kept
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def reached(model: str, node: str, status: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(e.get("model") == model and e.get("node") == node
                              and (e.get("data") or {}).get("status") == status for e in events)


async def listed(session: aiohttp.ClientSession, host: Host, model: str) -> dict[str, str]:
    """The model's status in each node's own /models."""
    found = {}
    for node in host.nodes:
        listing = await _get(session, host.node(node), "/models")
        found[node] = next(e["status"]["value"] for e in listing["data"] if e["id"] == model)
    return found


async def burst(session: aiohttp.ClientSession, host: Host, plan: ClusterPlan) -> Burst:
    front = Target(host.url)
    async with feed(session, host.url) as events, new_session(plan.burst) as clients:
        started = time.perf_counter()

        async def one() -> int:
            async with clients.post(front.url + "/v1/chat/completions", json=_chat(COLD)) as response:
                await response.read()
                return response.status

        answers = await asyncio.gather(*(one() for _ in range(plan.burst)))
        elapsed = time.perf_counter() - started
        # every node that started a load has said how it ended before the count is taken
        async with asyncio.timeout(30):
            await events.until(lambda seen: bool(loads_by_node(seen, COLD)) and not still_loading(seen, COLD))
        loads = loads_by_node(events.events, COLD)
    return Burst(COLD, list(answers), loads, await listed(session, host, COLD), elapsed)


# --- 3. failover -------------------------------------------------------------------------------------------------

async def failover(session: aiohttp.ClientSession, host: Host, plan: ClusterPlan) -> Failover:
    killed = host.worker()
    other = next(node for node in host.nodes if node != killed)
    worker = host.node(killed)
    async with feed(session, host.url) as events:
        await _post(session, worker, "/models/load", {"model": FAILED_OVER})  # there, whatever the hash says
        async with asyncio.timeout(60):
            await events.until(reached(FAILED_OVER, killed, "loaded"))
    front = Target(host.url)
    body = _chat(FAILED_OVER, plan.stream_tokens, stream=True, ignore_eos=True)
    async with new_session(4) as clients, clients.post(front.url + "/v1/chat/completions", json=body) as stream:
        stream.raise_for_status()
        lines = stream.content.__aiter__()
        first = 0
        while not first:
            line = (await lines.__anext__()).strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                first = _tokens(json.loads(line[6:]))
        where = await listed(session, host, FAILED_OVER)
        if where[killed] != "loaded":
            raise RuntimeError(f"{FAILED_OVER} is not loaded on {killed} as the stream starts: {where}")
        run = Failover(killed, other, FAILED_OVER, time.perf_counter())
        os.kill(host.nodes[killed]["raylet"], signal.SIGKILL)
        probing = asyncio.create_task(_probe(clients, session, host, run, plan))
        try:
            async for raw in lines:
                line = raw.strip()
                if line == b"data: [DONE]":
                    run.done = run.error_at is not None
                elif line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if "error" in event and run.error_at is None:
                        run.error_at = time.perf_counter()
                        run.error = f"{event['error'].get('code')}: {event['error'].get('message')}"
                    run.tokens_after += _tokens(event)
        except aiohttp.ClientError as exc:  # cut without an error event: the report says "not seen"
            run.error = f"the stream was cut without an error event: {exc!r}"
        await probing
    return run


def _tokens(event: dict[str, Any]) -> int:
    """1 for an SSE chunk that carries content."""
    choices = event.get("choices") or [{}]
    return 1 if choices[0].get("delta", {}).get("content") else 0


async def _probe(clients: aiohttp.ClientSession, session: aiohttp.ClientSession, host: Host, run: Failover,
                 plan: ClusterPlan) -> None:
    """1-token chats for the model through the front, one at a time, until one is answered from the other node
    (that node's own /models lists the model loaded right after the answer) or the limit."""
    other = host.node(run.other)
    while time.perf_counter() - run.killed_at < plan.failover_limit_s:
        sent = time.perf_counter()
        try:
            async with clients.post(host.url + "/v1/chat/completions", json=_chat(run.model)) as response:
                await response.read()
                ok = response.status == 200
        except aiohttp.ClientError:
            ok = False
        ended = time.perf_counter()
        elsewhere = False
        if ok:
            listing = await _get(session, other, "/models")
            elsewhere = any(e["id"] == run.model and e["status"]["value"] == "loaded" for e in listing["data"])
        run.probes.append(Probe(sent, ended, ok, elsewhere))
        if elsewhere:
            return
        await asyncio.sleep(max(0.0, plan.probe_every_s - (time.perf_counter() - sent)))


# --- the whole run -----------------------------------------------------------------------------------------------

async def measure(host: Host, single: Target, plan: ClusterPlan, results: ClusterResults,
                  log: Callable[[str], None]) -> None:
    async with new_session(8) as session:
        await _post(session, Target(host.url), "/v1/chat/completions", _chat(WARM))  # loads it where the hash says
        await _post(session, single, "/v1/chat/completions", _chat(WARM))
        where = await listed(session, host, WARM)
        node = next(n for n, status in where.items() if status == "loaded")
        targets = {FRONT: Target(host.url), NODE: host.node(node), SINGLE: single}
        log(f"1: the front's added latency ({WARM} loaded on {node[:8]}), paired against its app and a single node")
        await latency(targets, plan, results)
        log(f"2: a burst of {plan.burst} requests for {COLD}, cold")
        results.burst = await burst(session, host, plan)
        log(f"3: failover: {FAILED_OVER} streaming on {host.worker()[:8]}, its raylet killed")
        results.failover = await failover(session, host, plan)


def run_cluster_benchmark(mode: str, out: Path, binary: Path, log: Callable[[str], None]) -> Path:
    """Measure and write <out>/cluster/report.md; its path."""
    require_ray()
    plan = PLANS[mode]
    sources = {name: default_models_dir() / f"{file}.gguf" for name, file in MODELS.items()}
    for path in sources.values():
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: run `modelyard demo install`")
    directory = out / "cluster"
    directory.mkdir(parents=True, exist_ok=True)
    results = ClusterResults()
    with tempfile.TemporaryDirectory(prefix="modelyard-bench-cluster-") as tmp:
        models_dir = Path(tmp) / "models"
        models_dir.mkdir()
        for name, path in sources.items():
            (models_dir / f"{name}.gguf").symlink_to(path)
        started = time.monotonic()
        log(f"starting serve --ray local:{NODES} and a single-node serve over {', '.join(MODELS)}")
        single = start_router(MODELYARD, binary, ["--models-dir", str(models_dir)], 4, Path(tmp), ENGINE_ARGS)
        try:
            host = start_host(binary, models_dir, Path(tmp))
            try:
                single.wait_ready(120)
                results.up_after = host.up_after
                results.nodes = {node: ("head" if info["head"] else "worker") for node, info in host.nodes.items()}
                asyncio.run(measure(host, Target(single.url), plan, results, log))
            finally:
                stop_gracefully(host.proc, STOP_GRACE_S)
        finally:
            single.stop()
        log(f"measured in {time.monotonic() - started:.0f} s")
    given = sys.argv[1:]  # `modelyard bench ...` or `python -m modelyard.bench ...`
    command = shlex.join(["modelyard", "bench", *(given[1:] if given[:1] == ["bench"] else given)])
    setup = [f"models: {', '.join(f'{name} ({file})' for name, file in MODELS.items())}",
             f"llama.cpp: {LLAMA_CPP_BUILD} ({binary}), every child `{shlex.join(ENGINE_ARGS)}`",
             f"cluster: `serve --ray local:{NODES}` as bench/cluster_host.py runs it (the same connect, Membership "
             f"and front), --memory-budget {BUDGET_SHARE:.0%} split between the nodes, --models-max 4; the "
             "single node: `modelyard serve` with the same flags"]
    report = directory / "report.md"
    report.write_text(render(results, plan, setup, command))
    return report
