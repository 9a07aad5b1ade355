"""What the cluster bench's measurements come to, and its report, pure (bench/cluster.py measures).

Three measurements over `serve --ray local:N`: the latency the cluster's front adds, paired against the same
node's app called directly and against a single-node `modelyard serve` (bench/paired.py's steps and rounds, the
front being the "via" side of both pairs); a node's raylet killed mid-stream (when the cut stream's error event
came, and the first answer for the same model from another node: a probe sent while the killed node's worker
still runs may be answered there, so an answer counts as the other node's only once that node lists the model
loaded); and a burst of requests for a cold model (how many loads each node's feed said it started)."""

from __future__ import annotations

import platform
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelyard import __version__
from modelyard.bench.paired import VIA, Paired
from modelyard.bench.report import machine, ms
from modelyard.bench.stats import median_interval

FRONT, NODE, SINGLE = "cluster front", "the node's app", "single-node serve"
BASELINES = (NODE, SINGLE)  # the pairs' kinds: each is the "direct" side, the front the "via" side
CHAT, STREAM_FIRST = "chat, 1 token", "stream, first token"


@dataclass(frozen=True)
class ClusterPlan:
    name: str
    # Paired at concurrency 1 (bench/paired.py): at least `paired_min` steps per endpoint, then more until every
    # interval is narrower than `ci_width_s` or `paired_budget_s` is spent; at each of `concurrencies` rounds of
    # `round_requests` chats per target, at least `rounds_min` of them, for `rounds_budget_s`.
    paired_min: int
    paired_budget_s: float
    ci_width_s: float
    concurrencies: tuple[int, ...]
    round_requests: int
    rounds_min: int
    rounds_budget_s: float
    burst: int  # concurrent requests for the cold model (at most --max-queue: more would rightly load it twice)
    stream_tokens: int = 2000  # the stream cut by the raylet kill: long enough to be in flight when it comes
    probe_every_s: float = 0.05  # the pace of the probes for the same model after the kill
    failover_limit_s: float = 60.0  # probes stop after this, answered on the other node or not


PLANS = {
    "smoke": ClusterPlan("smoke", 4, 0.0, 0.0002, (4,), 8, 1, 0.0, 3),
    "quick": ClusterPlan("quick", 100, 20.0, 0.0002, (4, 16), 32, 4, 10.0, 8),
    "full": ClusterPlan("full", 300, 60.0, 0.0002, (4, 16), 48, 6, 30.0, 16),
}


@dataclass
class Probe:
    """One request for the failed-over model, on the bench's clock (perf_counter)."""

    sent: float
    ended: float
    ok: bool
    elsewhere: bool  # answered, and the other node listed the model loaded right after


@dataclass
class Failover:
    killed: str  # the node whose raylet was killed (the stream's)
    other: str
    model: str
    killed_at: float  # after the stream's first token
    error_at: float | None = None  # when the stream's error event came
    error: str = ""
    done: bool = False  # [DONE] after the error event
    tokens_after: int = 0
    probes: list[Probe] = field(default_factory=list)


@dataclass(frozen=True)
class FailoverFigures:
    error_after: float | None
    first_elsewhere_after: float | None
    last_on_killed_after: float | None  # the last answer the killed node gave after the kill
    failed: int
    sent: int


def failover_figures(run: Failover) -> FailoverFigures:
    """Seconds from the kill to the cut stream's error event, to the first answer from the other node, and to
    the last answer from the killed node (probes answered before the other node had the model)."""
    elsewhere = [p.ended for p in run.probes if p.ok and p.elsewhere]
    first = min(elsewhere) if elsewhere else None
    on_killed = [p.ended for p in run.probes if p.ok and not p.elsewhere and (first is None or p.ended < first)]
    return FailoverFigures(None if run.error_at is None else run.error_at - run.killed_at,
                           None if first is None else first - run.killed_at,
                           max(on_killed) - run.killed_at if on_killed else None,
                           sum(1 for p in run.probes if not p.ok), len(run.probes))


def _transitions(events: Iterable[Mapping[str, Any]], model: str) -> Iterator[tuple[str, str]]:
    """(node, status) for each change of `model`'s status on a node, in the front's merged /models/sse events
    (each with its `node`), a repeated status folded as the single-node bench folds it."""
    last: dict[str, str] = {}
    for event in events:
        node, status = event.get("node"), (event.get("data") or {}).get("status")
        if event.get("model") == model and isinstance(node, str) and isinstance(status, str) \
                and last.get(node) != status:
            last[node] = status
            yield node, status


def loads_by_node(events: Iterable[Mapping[str, Any]], model: str) -> Counter[str]:
    """How many loads of `model` each node started: its transitions into `loading`."""
    return Counter(node for node, status in _transitions(events, model) if status == "loading")


def still_loading(events: Iterable[Mapping[str, Any]], model: str) -> set[str]:
    """The nodes whose last status for `model` is `loading`: their loads have not said how they ended."""
    last = dict(_transitions(events, model))
    return {node for node, status in last.items() if status == "loading"}


@dataclass
class Burst:
    model: str
    answers: list[int]  # each request's HTTP status
    loads: Counter[str]  # per node, from the feed
    listed: dict[str, str]  # per node, the model's status in that node's own /models afterwards
    elapsed: float


@dataclass
class ClusterResults:
    paired: dict[tuple[str, int], Paired] = field(default_factory=dict)  # (endpoint, concurrency)
    rates: dict[tuple[int, str], list[float]] = field(default_factory=dict)  # (concurrency, target): per round
    failover: Failover | None = None
    burst: Burst | None = None
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> what it is (head or worker, its cores)
    up_after: float = 0.0  # the cluster's start to every node's agent published


def target_of(kind: str, route: str) -> str:
    """Which server a (pair kind, route) is: the front on the via side of either pair, else the baseline."""
    return FRONT if route == VIA else kind


# --- the report ---------------------------------------------------------------------------------------------

def _seconds(value: float | None) -> str:
    return "not seen" if value is None else f"{value:.2f} s"


def render(results: ClusterResults, plan: ClusterPlan, setup: Sequence[str], command: str) -> str:
    lines = [f"# modelyard bench: the cluster (`serve --ray local:{len(results.nodes) or 2}`, {plan.name} mode)", "",
             f"- machine: {machine()}", *(f"- {line}" for line in setup),
             f"- modelyard: {__version__}, Python {platform.python_version()}", f"- command: `{command}`",
             f"- cluster up (every node's agent published): {results.up_after:.1f} s; nodes: "
             + "; ".join(f"{node[:8]} ({what})" for node, what in results.nodes.items()), ""]
    if results.paired:
        lines += _latency(results, plan)
    if results.rates:
        lines += _rates(results)
    if results.burst is not None:
        lines += _burst(results.burst)
    if results.failover is not None:
        lines += _failover(results.failover, plan)
    return "\n".join(lines) + "\n"


def _latency(results: ClusterResults, plan: ClusterPlan) -> list[str]:
    out = ["## 1. Latency the cluster's front adds", "",
           f"Paired as the single-node bench pairs direct and via (bench/paired.py): each step sends one request "
           f"to a baseline and one through the front, back to back, for each baseline in turn (order alternating "
           f"every step, baseline/front every two), each target on its own pool of one kept-alive connection (a "
           f"new connection for each stream). Baselines: {NODE} (the node the model is loaded on, called with the "
           f"cluster key: the front's own hop) and {SINGLE} (its own child of the same model: the cluster against "
           "one node). At concurrency 1 the added latency is the median of per-pair differences with its "
           "distribution-free interval; at a higher concurrency each step is a round of chats per target, the "
           "difference that of the rounds' p50s, the interval over rounds. The p50s are of the pair's requests "
           "(at a higher concurrency: the median of its rounds' p50s).", "",
           "| endpoint | concurrency | baseline | steps | baseline p50 | front p50 | added p50 (paired) | interval "
           "(confidence) | width | failed steps |", "|---" * 10 + "|"]
    for (endpoint, conc), paired in sorted(results.paired.items()):
        for kind in BASELINES:
            added = paired.added(kind) if paired.direct.get(kind) else []
            if not added:
                out.append(f"| {endpoint} | {conc} | {kind} | 0 {paired.unit} | | | | | | {paired.errors} |")
                continue
            i = median_interval(added)
            out.append(f"| {endpoint} | {conc} | {kind} | {len(added)} {paired.unit} | "
                       f"{ms(statistics.median(paired.direct[kind]))} | {ms(statistics.median(paired.via[kind]))} | "
                       f"{ms(i.median)} | [{i.low * 1000:+.2f}, {i.high * 1000:+.2f}] ms "
                       f"({i.confidence:.1%}) | {ms(i.width)} | {paired.errors} |")
    out += ["", f"Target width at concurrency 1: {ms(plan.ci_width_s)} (within {plan.paired_budget_s:g} s an "
                f"endpoint, at least {plan.paired_min} steps).", ""]
    return out


def _rates(results: ClusterResults) -> list[str]:
    concurrencies = sorted({conc for conc, _ in results.rates})
    out = ["## 2. Requests/s (1-token chats, median over rounds)", "",
           "| concurrency | " + " | ".join((FRONT, *BASELINES)) + " | front / node's app |",
           "|---" * (len(BASELINES) + 3) + "|"]
    for conc in concurrencies:
        medians = {target: statistics.median(results.rates[(conc, target)])
                   for target in (FRONT, *BASELINES) if results.rates.get((conc, target))}
        cells = [f"{medians[t]:.1f}" if t in medians else "n/a" for t in (FRONT, *BASELINES)]
        share = (f"{medians[FRONT] / medians[NODE]:.2f}x" if medians.get(NODE) and FRONT in medians else "n/a")
        out.append(f"| {conc} | " + " | ".join(cells) + f" | {share} |")
    return [*out, ""]


def _burst(burst: Burst) -> list[str]:
    total = sum(burst.loads.values())
    verdict = "one load, as placement promises" if total == 1 else f"{total} loads: expected exactly 1"
    return ["## 3. A cold burst", "",
            f"{len(burst.answers)} concurrent 1-token chats for `{burst.model}`, loaded on no node, through the "
            "front; loads counted from the front's merged /models/sse (each node's transitions into `loading`), "
            "and each node's own /models listing afterwards.", "",
            "| requests | answered 200 | loads, cluster-wide | loads per node | listed afterwards | burst took |",
            "|---|---|---|---|---|---|",
            f"| {len(burst.answers)} | {sum(1 for s in burst.answers if s == 200)} | {total} ({verdict}) | "
            + ", ".join(f"{n[:8]}: {c}" for n, c in sorted(burst.loads.items())) + " | "
            + ", ".join(f"{n[:8]}: {s}" for n, s in sorted(burst.listed.items()))
            + f" | {burst.elapsed:.2f} s |", ""]


def _failover(run: Failover, plan: ClusterPlan) -> list[str]:
    figures = failover_figures(run)
    return ["## 4. Failover: the raylet of the stream's node killed mid-stream", "",
            f"A stream of up to {plan.stream_tokens} tokens of `{run.model}` through the front, "
            f"on node {run.killed[:8]} (a worker: the front's driver is attached to the head's raylet, so the "
            f"head is never the one killed); after its first token its raylet got SIGKILL (what "
            f"ray.cluster_utils' kill_raylet sends). From then, 1-token chats for the same model through the "
            f"front, one at a time, one every {plan.probe_every_s * 1000:.0f} ms at most; an answer counts as "
            f"node {run.other[:8]}'s "
            "once that node's own /models lists the model loaded right after it (until its worker exits, the "
            "killed node can still answer).", "",
            "| measure | figure |", "|---|---|",
            f"| kill to the cut stream's error event | {_seconds(figures.error_after)} |",
            f"| the error event | {run.error or 'none'} |",
            f"| [DONE] after it | {'yes' if run.done else 'no'} |",
            f"| tokens the stream got after the kill | {run.tokens_after} |",
            f"| kill to the last answer from the killed node | {_seconds(figures.last_on_killed_after)} |",
            f"| kill to the first answer from the other node (the model loaded there on demand) | "
            f"{_seconds(figures.first_elsewhere_after)} |",
            f"| probes sent / failed | {figures.sent} / {figures.failed} |", ""]
