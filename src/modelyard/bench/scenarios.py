"""The measurements. Each runs the same workload against modelyard and llama-server router mode (same binary,
same models, same flags), interleaved in rounds, and against each router's child directly where that is the
baseline."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, AsyncExitStack, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from modelyard.bench import SCENARIOS
from modelyard.bench.fresh import AFTER_HEALTH_S, EXTRA_COPIES, FreshSwap, fresh_swap
from modelyard.bench.load import POOL_IDLE_S, StatusRecorder, Stream, Timed, new_session, streamed_chat, timed_requests
from modelyard.bench.paired import DIRECT, VIA, Paired, Probe, Round, paired_requests, paired_rounds
from modelyard.bench.processes import MODELYARD, ROUTER_MODE, RouterProcess, Target, start_router, stop_all
from modelyard.bench.soak import MODELS_MAX, SETTLE_S, SoakResult, run_soak, write_sources
from modelyard.bench.swaps import measured_swap
from modelyard.demo import GEMMA3, SMOLLM2

KINDS = (MODELYARD, ROUTER_MODE)


@dataclass(frozen=True)
class Plan:
    name: str
    overhead_requests: int
    rounds: int
    stream_tokens: int
    stream_runs: int
    swaps: int
    mixed_clients: int
    mixed_per_client: int
    mixed_rounds: int
    rate_requests: int
    scale_sizes: tuple[int, ...]
    busy_seconds: float
    fresh_rounds: int
    soak_requests: int
    soak_kills: int
    # Pauses so that one target's idle pooled connections expire before the next is measured; the smoke
    # check of the harness (in the test suite) measures nothing and skips them.
    pool_idle_s: float = POOL_IDLE_S
    overhead_concurrency: tuple[int, ...] = (1, 32)  # the smoke check uses (1, 4): 32 x 2 chats per target are slow
    fresh_extra_copies: int = EXTRA_COPIES  # the smoke check copies none (each is 250 MB written and synced)
    # The smoke check runs the four scenarios over all-resident or one-at-a-time models on two router pairs
    # instead of four (see `run_all`): every pair costs two start-ups and its own loads.
    share_routers: bool = False
    streams_together: int = 8  # the throughput of this many concurrent streams (and of one); smoke: 2
    # The larger demo model: behind a, b and c, the fresh swap's B, the soak's embeddings and tokenize names.
    # The smoke check uses SmolLM2 there too (every scenario then runs SmolLM2 only: it loads in 0.5 s, not 1.8).
    model: str = GEMMA3
    # The scenarios' own pauses: when b is asked for while a is kept busy, how long after /health the fresh
    # swap's requests come, how long the soak waits for descriptors to come back. The smoke check shortens
    # them (it asserts no figure): 0.3 s, none, one reading.
    busy_ask_after_s: float = 1.0
    fresh_after_health_s: float = AFTER_HEALTH_S
    soak_settle_s: float = SETTLE_S
    # The paired hot-path measurements (bench/paired.py): at concurrency 1, at least `paired_min` steps per
    # endpoint, then more until the intervals (each router's added p50, and their difference) are narrower
    # than `ci_width_s` (a 0.2 ms difference then shows) or `paired_budget_s` is spent; at a higher
    # concurrency the same with rounds of `overhead_requests` requests per target, at least `rounds` of them,
    # for `rounds_budget_s`. The first streamed token is paired on streams of `stream_pair_tokens` tokens
    # (the inter-token gaps come from the `stream_runs` longer ones).
    paired_min: int = 200
    paired_budget_s: float = 60.0
    rounds_budget_s: float = 10.0
    ci_width_s: float = 0.0002
    stream_pair_tokens: int = 1
    # Each swap is asked for while the model it replaces has a stream of this many tokens in flight (asked
    # after its first token), so that the swap's phases include a drain.
    drain_tokens: int = 8


# The smoke plan checks that the harness runs end to end in the test suite: every scenario runs, as few loads
# and start-ups as that takes (a load is 1 to 2 s on 2 busy cores): one swap, three mixed clients with one
# request each (one per model), a 1 s busy phase, a 20-request soak, and only the smaller demo model.
# The paired budgets, from a quick run on this 2-core machine (others' tests running): /tokenize's intervals
# were 0.03-0.07 ms wide after 112 pairs (under a second), a 1-token chat's and a stream's first token's 0.75
# to 1.3 ms after about 110 (15 s): the width falls as 1/sqrt(pairs), so 0.2 ms takes about 2,800 pairs,
# 6 minutes, the full plan's budget (the run stops sooner where the intervals narrow sooner).
PLANS = {
    "smoke": Plan("smoke", 4, 1, 4, 1, 1, 3, 1, 1, 64, (10,), 1.0, 1, 20, 1, pool_idle_s=0.0,
                  overhead_concurrency=(1, 4), fresh_extra_copies=0, share_routers=True,
                  streams_together=2, model=SMOLLM2, busy_ask_after_s=0.3, fresh_after_health_s=0.0,
                  soak_settle_s=0.0, paired_min=4, paired_budget_s=0.0, rounds_budget_s=0.0, drain_tokens=3),
    "quick": Plan("quick", 64, 5, 32, 6, 4, 4, 6, 1, 600, (1000,), 12.0, 2, 1000, 5,
                  paired_min=100, paired_budget_s=15.0, rounds_budget_s=5.0),
    "full": Plan("full", 128, 9, 64, 20, 6, 4, 6, 3, 4000, (1000, 10000), 20.0, 3, 10000, 5,
                 paired_min=300, paired_budget_s=360.0, rounds_budget_s=30.0),
}



@dataclass
class Setup:
    binary: Path
    models_dir: Path
    workdir: Path
    engine_args: list[str]
    smollm2: Path
    larger: Path  # the plan's `model`
    models: tuple[str, ...] = ("a", "b", "c")
    default_threads_args: list[str] = field(default_factory=list)  # "resident-default": engine_args less --threads


@dataclass
class Results:
    overhead: dict[tuple[str, int, str, str], list[float]] = field(default_factory=dict)
    streams: dict[tuple[str, str], list[Stream]] = field(default_factory=dict)
    throughput: dict[tuple[int, str, str], float] = field(default_factory=dict)
    cold: dict[str, float] = field(default_factory=dict)
    swaps: dict[str, list[float]] = field(default_factory=dict)
    mixed: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    rate: dict[tuple[str, str], float] = field(default_factory=dict)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)
    scale: dict[tuple[int, str], dict[str, float]] = field(default_factory=dict)
    starved_wait: dict[str, float] = field(default_factory=dict)
    fresh: dict[str, list[FreshSwap]] = field(default_factory=dict)
    soak: SoakResult | None = None
    paired: dict[tuple[str, int], Paired] = field(default_factory=dict)  # (endpoint, concurrency)
    swap_marks: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # seconds since each swap's ask


RESIDENT_DEFAULT = "all resident, default threads"
MAX_WAIT_S = 3.0  # modelyard's --max-wait in the busy-model scenario (router mode has no such bound)
SCALE_START_LIMIT_S = 600.0  # a router not answering /v1/models by then is reported as "did not start"


@contextmanager
def routers(setup: Setup, max_models: int, source: list[str] | None = None,
            modelyard_args: tuple[str, ...] = (), engine_args: list[str] | None = None
            ) -> Iterator[dict[str, RouterProcess]]:
    started: dict[str, RouterProcess] = {}
    try:
        for kind in KINDS:
            started[kind] = start_router(kind, setup.binary, source or ["--models-dir", str(setup.models_dir)],
                                         max_models, setup.workdir, engine_args or setup.engine_args,
                                         modelyard_args)
        for router in started.values():
            router.wait_ready(120)
        yield started
    finally:
        stop_all([router.proc for router in started.values()])  # measured nothing: both at once


def chat_body(model: str, max_tokens: int = 1) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens,
            "temperature": 0}


Route = tuple[str, str, Target]  # router kind, "via router" or "direct", what is called


async def warm(router: RouterProcess, model: str) -> Target:
    async with new_session(1) as session, session.post(router.url + "/v1/chat/completions",
                                                        json=chat_body(model)) as response:
        response.raise_for_status()
        await response.read()
    return router.child_target(model)


# -- 1. hot-path overhead, 2. streaming, 5. requests/s at concurrency 64 ---------------------------------

TOKENIZE, CHAT, STREAM_FIRST = "tokenize", "chat, 1 token", "stream, first token"
Body = Callable[[int], dict[str, Any]]
ENDPOINTS: dict[str, tuple[str, Body]] = {
    TOKENIZE: ("/tokenize", lambda i: {"model": "a", "content": f"The quick brown fox {i % 7}"}),
    CHAT: ("/v1/chat/completions", lambda i: chat_body("a")),
}


# What makes one target's probe: from its pool, base URL and headers.
Maker = Callable[[aiohttp.ClientSession, str, dict[str, str]], Probe]


def _requests(path: str, body: Body) -> Maker:
    """POSTs to `path`, the i-th call of each target with body(i): a pair's two requests carry the same body."""
    def make(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> Probe:
        calls = itertools.count()
        sent = {"Content-Type": "application/json", **headers}

        async def probe() -> float | None:
            payload = json.dumps(body(next(calls))).encode()  # encoded before the clock starts
            started = time.perf_counter()
            try:
                async with session.post(base + path, data=payload, headers=sent) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            return time.perf_counter() - started if ok else None

        return probe

    return make


def _streams(tokens: int) -> Maker:
    """Streamed chats of `tokens` tokens; the figure is the time to the first."""
    def make(session: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> Probe:
        async def probe() -> float | None:
            try:
                return (await streamed_chat(session, base, "a", tokens, headers=headers)).first_token
            except (aiohttp.ClientError, RuntimeError):
                return None

        return probe

    return make


def _round_probe(target: Target, path: str, body: Body, count: int, concurrency: int) -> Round:
    # A fresh client per round: idle keep-alive connections left over from one target would otherwise hold
    # threads of the child that the next target needs (llama-server serves one connection per thread).
    async def probe() -> list[float]:
        async with target.session(concurrency) as session:
            return (await timed_requests(session, target.url + path, body, count, concurrency,
                                         target.headers)).latencies

    return probe


async def hot_path(running: dict[str, RouterProcess], plan: Plan, results: Results) -> None:
    targets: dict[str, dict[str, Target]] = {}
    for kind, router in running.items():
        targets[kind] = {VIA: Target(router.url), DIRECT: await warm(router, "a")}
    flat: list[Route] = [(kind, route, target) for kind, routes in targets.items() for route, target in routes.items()]

    async def paired_at_one(endpoint: str, make: Maker, force_close: bool = False) -> None:
        async with AsyncExitStack() as stack:  # one connection per target, the same policy on all four
            probes = {kind: {route: make(await stack.enter_async_context(target.session(1, force_close)),
                                         target.url, target.headers)
                             for route, target in routes.items()} for kind, routes in targets.items()}
            paired = await paired_requests(probes, plan.paired_min, plan.paired_budget_s, plan.ci_width_s)
        results.paired[(endpoint, 1)] = paired
        for kind in targets:
            results.overhead[(endpoint, 1, kind, DIRECT)] = paired.direct[kind]
            results.overhead[(endpoint, 1, kind, VIA)] = paired.via[kind]

    for endpoint, (path, body) in ENDPOINTS.items():
        await paired_at_one(endpoint, _requests(path, body))
        for concurrency in (c for c in plan.overhead_concurrency if c > 1):
            count = max(plan.overhead_requests, 2 * concurrency)
            rounds = {kind: {route: _round_probe(target, path, body, count, concurrency)
                             for route, target in routes.items()} for kind, routes in targets.items()}
            paired, latencies = await paired_rounds(rounds, plan.rounds, plan.rounds_budget_s, plan.ci_width_s)
            results.paired[(endpoint, concurrency)] = paired
            for (kind, route), values in latencies.items():
                results.overhead[(endpoint, concurrency, kind, route)] = values
    # llama-server closes a connection after a streamed answer without saying so beforehand: a kept-alive
    # pool would send the next request on a connection being closed (half of them failed). So every stream
    # opens its own connection, direct and via alike (a router opens one to its child for each stream too).
    await paired_at_one(STREAM_FIRST, _streams(plan.stream_pair_tokens), force_close=True)
    await streaming(flat, plan, results)
    await request_rate(running, flat, plan, results)


async def streaming(targets: list[Route], plan: Plan, results: Results) -> None:
    for _ in range(plan.stream_runs):
        for kind, route, target in targets:
            async with target.session(8) as session:
                stream = await streamed_chat(session, target.url, "a", plan.stream_tokens, headers=target.headers)
            results.streams.setdefault((kind, route), []).append(stream)
    for concurrency in (1, plan.streams_together):
        for kind, route, target in targets:
            async with target.session(8) as session:
                started = time.perf_counter()
                streams = await asyncio.gather(*(streamed_chat(session, target.url, "a", plan.stream_tokens,
                                                               prompt=f"Story number {i}.", headers=target.headers)
                                                 for i in range(concurrency)))
                wall = time.perf_counter() - started
            results.throughput[(concurrency, kind, route)] = sum(s.tokens for s in streams) / wall


async def request_rate(running: dict[str, RouterProcess], targets: list[Route], plan: Plan,
                       results: Results) -> None:
    def body(i: int) -> dict[str, Any]:
        return {"model": "a", "content": "rate"}

    for kind, route, target in targets:
        router = running[kind]
        await asyncio.sleep(plan.pool_idle_s)  # every idle connection of the previous target has been closed
        cpu_before = router.cpu_seconds()
        async with target.session(64) as session:
            timed: Timed = await timed_requests(session, target.url + "/tokenize", body, plan.rate_requests, 64,
                                                target.headers)
        results.rate[(kind, route)] = timed.rate
        if route == "via router":
            results.cost.setdefault(kind, {})["cpu_per_1k_requests"] = (
                (router.cpu_seconds() - cpu_before) * 1000 / max(1, len(timed.latencies)))


# -- 3. cold load and swaps, 4. mixed workloads ----------------------------------------------------------

async def cold_and_swaps(running: dict[str, RouterProcess], plan: Plan, results: Results) -> None:
    """A cold load of a, then `swaps` swaps between a and b (routers in turn, the first alternating), each
    asked for while the model it replaces has a stream in flight, and measured phase by phase (swaps.py).
    The swap figure of section 3 runs from the end of that stream (the replaced model idle) to the first
    token, as a swap asked for while the other model is idle would."""
    async with new_session(8) as session:
        for kind, router in running.items():
            stream = await streamed_chat(session, router.url, "a", 4)
            results.cold[kind] = stream.first_token
        async with AsyncExitStack() as stack:
            # The swap waits for its `loaded` event itself: nothing is left to wait for at the close.
            recorders = {kind: await stack.enter_async_context(StatusRecorder(router.url, linger_s=0))
                         for kind, router in running.items()}
            loaded = "a"
            for i in range(plan.swaps):
                new = "b" if loaded == "a" else "a"
                for kind, router in (list(running.items()) if i % 2 == 0 else list(reversed(running.items()))):
                    marks = await measured_swap(session, router, recorders[kind], loaded, new, plan.drain_tokens)
                    results.swap_marks.setdefault(kind, []).append(marks)
                    results.swaps.setdefault(kind, []).append(marks["first token"] - marks["drained"])
                loaded = new


async def mixed(running: dict[str, RouterProcess], plan: Plan, label: str, models: tuple[str, ...],
                results: Results, preload: bool) -> None:
    for round_no in range(plan.mixed_rounds):
        order = list(running.items()) if round_no % 2 == 0 else list(reversed(running.items()))
        for kind, router in order:
            if preload:
                for model in models:
                    await warm(router, model)
            results.mixed.setdefault((label, kind), []).append(await _mixed_once(router, plan, models))


async def _mixed_once(router: RouterProcess, plan: Plan, models: tuple[str, ...]) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0

    async def client(session: Any, index: int) -> None:
        nonlocal errors
        for j in range(plan.mixed_per_client):
            model = models[(index + j) % len(models)]
            started = time.perf_counter()
            try:
                async with session.post(router.url + "/v1/chat/completions", json=chat_body(model, 8)) as reply:
                    await reply.read()
                    ok = reply.status == 200
            except Exception:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    async with StatusRecorder(router.url) as recorder, new_session(plan.mixed_clients) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, i) for i in range(plan.mixed_clients)))
        makespan = time.perf_counter() - started
    return {"makespan": makespan, "loads": recorder.loads(), "latencies": latencies, "errors": errors,
            "timeline": [(t - (started - recorder.origin), m, s) for t, m, s in recorder.transitions]}


# -- 7. a request for another model while one model is kept busy -----------------------------------------

async def busy_model(running: dict[str, RouterProcess], plan: Plan, results: Results) -> None:
    """Four clients keep model a busy for `busy_seconds`; one request for b arrives after `busy_ask_after_s`
    (1 s). How long does it wait? (llama.cpp's router evicts only an idle model, so b waits for a's traffic to stop.)"""
    async def keep_busy(session: Any, url: str, until: float, offset: float) -> None:
        await asyncio.sleep(offset)
        while time.perf_counter() < until:
            async with session.post(url + "/v1/chat/completions", json=chat_body("a", 16)) as reply:
                await reply.read()

    for kind, router in running.items():
        await warm(router, "a")
        until = time.perf_counter() + plan.busy_seconds
        async with new_session(8) as session:
            clients = [asyncio.create_task(keep_busy(session, router.url, until, i * 0.1)) for i in range(4)]
            await asyncio.sleep(plan.busy_ask_after_s)
            asked = time.perf_counter()
            async with session.post(router.url + "/v1/chat/completions", json=chat_body("b", 4)) as reply:
                await reply.read()
            results.starved_wait[kind] = time.perf_counter() - asked
            await asyncio.gather(*clients)


# -- 6. scale ---------------------------------------------------------------------------------------------

def scale(setup: Setup, sizes: tuple[int, ...], results: Results) -> None:
    model_file = next(setup.models_dir.glob("a.gguf")).resolve()
    for size in sizes:
        preset = setup.workdir / f"scale-{size}.ini"
        preset.write_text("".join(f"[m{i:05d}]\nmodel = {model_file}\n" for i in range(size)))
        for kind in KINDS:
            router = start_router(kind, setup.binary, ["--models-preset", str(preset)], 4, setup.workdir,
                                  setup.engine_args)
            try:
                try:
                    ready = router.wait_ready(SCALE_START_LIMIT_S)
                except TimeoutError:
                    results.scale[(size, kind)] = {"startup": float("inf"), "list": float("inf"),
                                                   "rss": float(router.rss_bytes(peak=False))}
                    continue
                with httpx.Client(timeout=600) as client:
                    timings = []
                    for _ in range(5):
                        started = time.perf_counter()
                        listing = client.get(router.url + "/v1/models")
                        timings.append(time.perf_counter() - started)
                    assert len(listing.json()["data"]) == size, f"{kind} listed {len(listing.json()['data'])}"
                results.scale[(size, kind)] = {"startup": ready, "list": statistics.median(timings),
                                               "rss": float(router.rss_bytes(peak=False))}
            finally:
                router.stop()


# -- 8. a swap right after start-up over never-seen files -------------------------------------------------

def fresh_swaps(setup: Setup, plan: Plan, results: Results) -> None:
    """Rounds alternate which router goes first; each measurement starts a router over its own copies."""
    for round_no in range(plan.fresh_rounds):
        for kind in KINDS if round_no % 2 == 0 else tuple(reversed(KINDS)):
            results.fresh.setdefault(kind, []).append(
                fresh_swap(kind, setup.binary, setup.workdir, setup.smollm2, setup.larger, setup.engine_args,
                           plan.fresh_extra_copies, plan.fresh_after_health_s))


# -- 9. soak (modelyard only) ----------------------------------------------------------------------------------

def soak(setup: Setup, plan: Plan, results: Results, log: Any) -> None:
    sources = write_sources(setup.workdir, setup.smollm2, setup.larger)
    router = start_router(MODELYARD, setup.binary, sources, MODELS_MAX, setup.workdir, setup.engine_args)
    try:
        router.wait_ready(120)
        results.soak = asyncio.run(run_soak(router, plan.soak_requests, plan.soak_kills, log, plan.pool_idle_s,
                                        plan.soak_settle_s))
    finally:
        router.stop()


# -- everything, in one run ---------------------------------------------------------------------------------

Pair = AbstractContextManager[dict[str, RouterProcess]]


def _pairs(setup: Setup, plan: Plan, shared: ExitStack) -> Callable[..., Pair]:
    """What starts the router pair of a scenario: a pair of its own, stopped after it; with the smoke plan's
    `share_routers`, one of two pairs kept in `shared` (stopped when it closes): --models-max 4 for the
    scenarios with every model resident, --models-max 1 and modelyard's --max-wait for those with one at a
    time (the first scenario on a pair still finds it fresh: the hot path, then the cold load)."""
    kept: dict[int, dict[str, RouterProcess]] = {}

    def pair(max_models: int, modelyard_args: tuple[str, ...] = ()) -> Pair:
        if not plan.share_routers:
            return routers(setup, max_models, modelyard_args=modelyard_args)
        resident = max_models > 1
        key = 4 if resident else 1
        if key not in kept:
            flags = () if resident else ("--max-wait", str(MAX_WAIT_S))
            kept[key] = shared.enter_context(routers(setup, key, modelyard_args=flags))
            # Closed first (last in): every kept router stopped at once; the pairs' own stops are then no-ops.
            shared.callback(lambda: stop_all([r.proc for pair in kept.values() for r in pair.values()]))
        return nullcontext(kept[key])

    return pair


def run_all(setup: Setup, plan: Plan, log: Any, only: frozenset[str] = frozenset(SCENARIOS)) -> Results:
    """Every scenario named in `only` (all by default), in SCENARIOS' order."""
    results = Results()
    with ExitStack() as shared:
        pair = _pairs(setup, plan, shared)
        if "hot-path" in only:
            log("1-2, 5: hot path, streaming and request rate (all models resident)")
            with pair(4) as running:
                asyncio.run(hot_path(running, plan, results))
                for kind, router in running.items():
                    results.cost.setdefault(kind, {})["peak_rss"] = float(router.rss_bytes())
        if "swaps" in only:
            log("3-4: cold load, swaps and mixed workload with --models-max 1")
            with pair(1) as running:
                asyncio.run(cold_and_swaps(running, plan, results))
                asyncio.run(mixed(running, plan, "--models-max 1", setup.models, results, preload=False))
                for kind, router in running.items():
                    results.cost.setdefault(kind, {})["cpu_seconds_models_max_1"] = router.cpu_seconds()
        if "busy" in only:
            log(f"7: a request for b while a is kept busy (--models-max 1, modelyard --max-wait {MAX_WAIT_S:g})")
            with pair(1, ("--max-wait", str(MAX_WAIT_S))) as running:
                asyncio.run(busy_model(running, plan, results))
        if "resident" in only:
            log("4: mixed workload with all three models resident")
            with pair(len(setup.models)) as running:
                asyncio.run(mixed(running, plan, "all resident", setup.models, results, preload=True))
        if "resident-default" in only and setup.default_threads_args:
            log("4b: the same with llama-server's default threads (modelyard places each child's threads)")
            with routers(setup, len(setup.models), engine_args=setup.default_threads_args) as running:
                asyncio.run(mixed(running, plan, RESIDENT_DEFAULT, setup.models, results, preload=True))
    if "scale" in only:
        log(f"6: scale ({', '.join(str(s) for s in plan.scale_sizes)} registered models)")
        scale(setup, plan.scale_sizes, results)
    if "fresh-swap" in only:
        log(f"8: a swap {plan.fresh_after_health_s:g} s after start-up over never-seen copies "
            f"({plan.fresh_rounds} rounds)")
        fresh_swaps(setup, plan, results)
    if "soak" in only:
        log(f"9: soak, modelyard only ({plan.soak_requests} requests, {plan.soak_kills} children killed)")
        soak(setup, plan, results, log)
    return results
