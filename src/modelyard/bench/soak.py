"""The soak (issue 9, point 11): many requests over four model names at concurrency 32 with `--models-max 2`,
while children are SIGKILLed at random moments, against modelyard alone. It is not a timed test: it records
what became of every request (a status code, or a hang, a reset before any status, a truncated answer), the
router's memory and descriptors before, at the peak and after, and its children afterwards, and says whether
the bar held: every request answered with a status, nothing truncated, memory and descriptors back to their
baseline. The decisions (the request mix, the kill schedule, how an answer is classified, the verdict) are
pure functions; `run_soak` only carries them out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from modelyard.bench.load import POOL_IDLE_S, new_session
from modelyard.bench.processes import RouterProcess, anon_bytes

log = logging.getLogger(__name__)

# Route -> model name. Each route has its own name, so the four names compete for two slots (--models-max 2)
# and the run swaps constantly: two names share SmolLM2's file, two Gemma's (one of them with embeddings on).
STREAM, CHAT, EMBED, TOKENIZE = "chat, streamed", "chat", "embeddings", "tokenize"
ROUTES: dict[str, str] = {STREAM: "soak-stream", CHAT: "soak-chat", EMBED: "soak-embed", TOKENIZE: "soak-tokenize"}

HANG = "hang"
RESET = "reset without a status"
TRUNCATED_STREAM = "truncated stream"
TRUNCATED_BODY = "truncated body"
ERROR_EVENT = "200, stream ended with an error event"

CONCURRENCY = 32
MODELS_MAX = 2
REQUEST_TIMEOUT_S = 120.0  # generous: a request may wait behind several swaps (--max-wait is 30 s)
MAX_TOKENS = 8  # small, so that 10,000 requests finish on 2 cores
SEED = 9  # the mix and the kills repeat from run to run
# "Back to baseline" allows for what is not a leak: the allocator keeps some of the peak (glibc arenas), and a
# descriptor or two may be transient (a cache file being written). Anything beyond this is reported as a leak.
RSS_SLACK_FRACTION = 0.15
RSS_SLACK_BYTES = 8 * 2**20
FD_SLACK = 2
SETTLE_S = 30.0  # after the load, how long descriptors may take to come back (pooled connections expire in 4 s)
SAMPLE_EVERY_S = 0.25
IDLE_LIMIT_S = 300.0  # after the load, a router with requests still in flight this long is reported broken


@dataclass(frozen=True)
class Footprint:
    rss: int  # VmRSS: what `top` shows, file pages included
    anon: int  # RssAnon: heap and stacks, where a leak would show
    descriptors: int


@dataclass
class SoakResult:
    requests: int
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)  # route -> outcome -> count
    kills: list[tuple[int, float, int]] = field(default_factory=list)  # (request index, seconds in, pid)
    before: Footprint = Footprint(0, 0, 0)
    peak: Footprint = Footprint(0, 0, 0)
    after: Footprint = Footprint(0, 0, 0)
    settled_after: float = 0.0
    idle_after: bool = True  # no request in flight or queued within IDLE_LIMIT_S of the last answer
    children_after: int = 0
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of the 2xx answers
    samples: list[str] = field(default_factory=list)  # one message per kind of non-2xx answer, for the report

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self.outcomes.values():
            total.update(counts)
        return total


# -- pure decisions -----------------------------------------------------------------------------------------

def request_mix(requests: int, seed: int = SEED) -> list[str]:
    """Which route each request takes: a seeded shuffle, so every route is interleaved with every other."""
    rng = random.Random(seed)
    return [rng.choice(list(ROUTES)) for _ in range(requests)]


def kill_schedule(requests: int, kills: int, seed: int = SEED) -> list[int]:
    """The request indices at whose dispatch a child is killed: seeded, in the middle 80% of the run (where
    the load is steady), never two at the same index."""
    low, high = requests // 10, max(requests // 10 + kills, requests * 9 // 10)
    return sorted(random.Random(seed + 1).sample(range(low, high), kills))


def classify(status: int | None, *, streamed: bool, done: bool = False, error_event: bool = False,
             body_complete: bool = True) -> str:
    """The outcome of one request. `status` None: no status line came (reset). A 200 stream must end with
    [DONE] or an error event; a 200 body must arrive whole and parse as JSON."""
    if status is None:
        return RESET
    if status != 200:
        return str(status)
    if streamed:
        if error_event:
            return ERROR_EVENT
        return "200" if done else TRUNCATED_STREAM
    return "200" if body_complete else TRUNCATED_BODY


def verdict(result: SoakResult, models_max: int = MODELS_MAX) -> list[str]:
    """What broke the bar (empty: it held)."""
    totals = result.totals()
    failures = [f"{totals[kind]} {kind}" for kind in (HANG, RESET, TRUNCATED_STREAM, TRUNCATED_BODY)
                if totals[kind]]
    # The bar is on anonymous memory: file pages mapped while reading GGUF files stay resident as cache.
    anon_limit = result.before.anon + max(RSS_SLACK_BYTES, int(result.before.anon * RSS_SLACK_FRACTION))
    if result.after.anon > anon_limit:
        failures.append(f"anonymous RSS {result.after.anon / 2**20:.0f} MiB after, "
                        f"{result.before.anon / 2**20:.0f} MiB before (allowed up to {anon_limit / 2**20:.0f} MiB)")
    if result.after.descriptors > result.before.descriptors + FD_SLACK:
        failures.append(f"{result.after.descriptors} descriptors after, {result.before.descriptors} before")
    if not result.idle_after:
        failures.append(f"requests still in flight or queued {IDLE_LIMIT_S:.0f} s after the last answer")
    if result.children_after > models_max:
        failures.append(f"{result.children_after} children after the run (--models-max {models_max})")
    return failures


# -- the shell ----------------------------------------------------------------------------------------------

def write_sources(directory: Path, smollm2: Path, gemma3: Path) -> list[str]:
    """The four names as symlinks in a models dir, and the preset section that turns embeddings on for one
    (with mean pooling: a causal model's own pooling is `none`, which /v1/embeddings refuses)."""
    models = directory / "soak-models"
    models.mkdir()
    for route, name in ROUTES.items():
        (models / f"{name}.gguf").symlink_to(smollm2 if route in (STREAM, CHAT) else gemma3)
    preset = directory / "soak.ini"
    preset.write_text(f"[{ROUTES[EMBED]}]\nembeddings = true\npooling = mean\n")
    return ["--models-dir", str(models), "--models-preset", str(preset)]


def _request(route: str, index: int) -> tuple[str, dict[str, Any]]:
    model = ROUTES[route]
    if route == EMBED:
        return "/v1/embeddings", {"model": model, "input": f"soak request {index}"}
    if route == TOKENIZE:
        return "/tokenize", {"model": model, "content": f"soak request {index}"}
    return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": f"Say {index}."}],
                                    "max_tokens": MAX_TOKENS, "temperature": 0, "stream": route == STREAM}


async def _one(session: aiohttp.ClientSession, url: str, route: str, index: int) -> tuple[str, str]:
    """Send one request; its outcome and, for a non-2xx answer, the start of its body."""
    path, body = _request(route, index)
    streamed = route == STREAM
    status: int | None = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with session.post(url + path, json=body) as response:
                status = response.status
                if status != 200:
                    return classify(status, streamed=streamed), (await response.text())[:300]
                if streamed:
                    done = error = False
                    async for raw in response.content:
                        line = raw.strip()
                        if line == b"data: [DONE]":
                            done = True
                        elif line.startswith(b"data: ") and b'"error"' in line:
                            error = error or "error" in json.loads(line[6:])
                    return classify(status, streamed=True, done=done, error_event=error), ""
                json.loads(await response.read())
                return classify(status, streamed=False), ""
    except TimeoutError:
        return HANG, ""
    except (aiohttp.ClientError, ValueError) as exc:
        # Before the status line: a reset. After it: the answer was cut (a stream or a body).
        if status is None:
            return RESET, repr(exc)[:300]
        return classify(status, streamed=streamed, body_complete=False), repr(exc)[:300]


def footprint(router: RouterProcess) -> Footprint:
    return Footprint(router.rss_bytes(peak=False), anon_bytes(router.pid), router.descriptors())


async def wait_idle(router: RouterProcess) -> bool:
    """Until no model has a request in flight or queued (a bounded poll of the router's own listing); False
    if that did not happen within IDLE_LIMIT_S."""
    deadline = time.monotonic() + IDLE_LIMIT_S
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < deadline:
            listing = (await client.get(router.url + "/models")).json()["data"]
            if all(not m.get("in_flight") and not m.get("queued") for m in listing):
                return True
            await asyncio.sleep(0.2)
    return False


async def settle(router: RouterProcess, baseline: Footprint,
                 limit_s: float = SETTLE_S) -> tuple[Footprint, float, bool]:
    """The footprint once idle connections have expired: polls until descriptors are back within the slack
    of the baseline, or `limit_s` passed (then the last reading is the answer). Also whether it became idle."""
    started = time.monotonic()
    idle = await wait_idle(router)
    while True:
        now = footprint(router)
        waited = time.monotonic() - started
        if now.descriptors <= baseline.descriptors + FD_SLACK or waited > limit_s:
            return now, waited, idle
        await asyncio.sleep(0.5)


async def run_soak(router: RouterProcess, requests: int, kills: int, log_line: Any,
                   pool_idle_s: float = POOL_IDLE_S, settle_s: float = SETTLE_S) -> SoakResult:
    """`pool_idle_s`: the pause after the warm-up (the smoke check of the harness passes 0: its baseline may
    then count the warm-up's pooled connections, which only loosens a bar it does not assert). `settle_s`:
    how long the footprints may take to come back (the smoke check passes 0: one reading)."""
    result = SoakResult(requests, {route: Counter() for route in ROUTES})
    async with new_session(4) as session:  # warm-up: every route once, so the baseline has its imports done
        for route in ROUTES:
            outcome, detail = await _one(session, router.url, route, -1)
            if outcome != "200":
                raise RuntimeError(f"soak warm-up: {route} answered {outcome}: {detail}")
    await asyncio.sleep(pool_idle_s)  # the warm-up's pooled connections expire, so the baseline holds none
    result.before, _, _ = await settle(router, footprint(router), settle_s)
    result.peak = result.before
    mix = request_mix(requests)
    pending = kill_schedule(requests, kills)
    victims = random.Random(SEED + 2)
    indices = iter(range(requests))
    started = time.perf_counter()

    def kill_due(index: int) -> None:
        if not pending or index < pending[0]:
            return
        children = router.children()
        if not children:  # nothing running right now: try again at the next dispatch
            return
        pending.pop(0)
        victim = victims.choice(children)
        with contextlib.suppress(ProcessLookupError):  # it exited between the scan and the kill: still one
            os.kill(victim, signal.SIGKILL)
        result.kills.append((index, time.perf_counter() - started, victim))
        log_line(f"  soak: SIGKILL child {victim} at request {index}")

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in indices:
            kill_due(index)
            route = mix[index]
            asked = time.perf_counter()
            outcome, detail = await _one(session, router.url, route, index)
            result.outcomes[route][outcome] += 1
            if outcome.startswith("2") and outcome != ERROR_EVENT:
                result.latencies.append(time.perf_counter() - asked)
            elif detail and not any(s.startswith(f"{route}: {outcome}:") for s in result.samples):
                result.samples.append(f"{route}: {outcome}: {detail}")

    async def sample(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                now = footprint(router)
            except OSError as exc:  # the router died: the run will say so through its requests
                log.warning("soak: cannot read the router's footprint: %s", exc)
                return
            result.peak = Footprint(max(result.peak.rss, now.rss), max(result.peak.anon, now.anon),
                                    max(result.peak.descriptors, now.descriptors))
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
            except TimeoutError:
                continue

    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(stop))
    try:
        async with new_session(CONCURRENCY) as session:
            await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    finally:
        stop.set()
        await sampler
    result.wall = time.perf_counter() - started
    if pending:
        log_line(f"  soak: {len(pending)} kills never found a child to kill")
    if router.proc.poll() is not None:
        raise RuntimeError(f"modelyard exited with {router.proc.returncode} during the soak: "
                           f"{router.log.read_text(errors='replace')[-2000:]}")
    result.after, result.settled_after, result.idle_after = await settle(router, result.before, settle_s)
    result.children_after = len(router.children())
    return result
