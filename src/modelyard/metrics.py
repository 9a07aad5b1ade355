"""The router's Prometheus metrics (`GET /metrics` without `?model=`), in a registry of its own (no global).

State (each model's status, memory, in-flight and queued requests, the memory budgets) is read from the
manager's snapshots when Prometheus scrapes, by a custom collector, so nothing is kept in step by hand. What
happens (requests, their durations, queue waits, first tokens, tokens, loads, evictions, load failures) is
counted as it happens: requests as each activity record ends (modelyard.activity), loads, evictions and
failures from the manager's decisions (their `cause` is the reason label; the pure `classify` below), load
durations from its status feed. The per-request series are plain numbers turned into metric families at
scrape time: prometheus_client's own Counter and Histogram cost about 5 us a request in locks and label
checks, which the hot path's 5% budget does not allow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from modelyard.activity import Activity, Record
from modelyard.manager import Decision, ModelManager, StatusEvent
from modelyard.scheduler import DecisionKind, Status

log = logging.getLogger(__name__)

_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
_LOAD_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))


# --- the pure part: what a decision counts as -----------------------------------------------------------------

@dataclass(frozen=True)
class Counted:
    kind: str  # "load" (started), "eviction", "load_failure"
    reason: str = ""


_EVICTIONS = frozenset({DecisionKind.EVICT, DecisionKind.EXPIRE})  # lru, size, reload_cost, max_wait; keep_alive
_FAILURES = frozenset({DecisionKind.FAIL, DecisionKind.KILL})  # causes: load, exit; load_timeout, watchdog


def classify(decision: Decision) -> Counted | None:
    """What one of the scheduler's decisions adds to the counters (its `cause` is already a label word)."""
    if decision.kind == DecisionKind.LOAD:
        return Counted("load")
    if decision.kind in _EVICTIONS:
        return Counted("eviction", decision.cause)
    if decision.kind in _FAILURES:
        return Counted("load_failure", decision.cause)
    return None


# --- the collector of state, read at scrape time ---------------------------------------------------------------

class _StateCollector(Collector):
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def collect(self) -> Iterable[Metric]:
        status = GaugeMetricFamily("modelyard_model_status", "1 for the model's current status, 0 for the others",
                                   labels=["model", "status"])
        memory = GaugeMetricFamily("modelyard_model_memory_bytes", "memory a model uses (measured) or is expected "
                                   "to use (estimated), in host memory or on GPUs", labels=["model", "kind", "device"])
        in_flight = GaugeMetricFamily("modelyard_in_flight", "requests being answered by the model",
                                      labels=["model"])
        queued = GaugeMetricFamily("modelyard_queued", "requests waiting for the model", labels=["model"])
        for view in self._manager.models():
            name, state = view.config.name, view.state
            for value in Status:
                status.add_metric([name, value.value], 1.0 if value == state.status else 0.0)
            memory.add_metric([name, "estimated", "host"], state.estimated)
            memory.add_metric([name, "measured", "host"], state.measured)
            memory.add_metric([name, "estimated", "gpu"], state.estimated_gpu)
            memory.add_metric([name, "measured", "gpu"], state.measured_gpu)
            in_flight.add_metric([name], state.in_flight)
            queued.add_metric([name], state.queued)
        use = self._manager.memory()
        budget = GaugeMetricFamily("modelyard_memory_budget_bytes", "the memory budget (only where one is set)",
                                   labels=["device"])
        used = GaugeMetricFamily("modelyard_memory_used_bytes", "memory the running models use, as the scheduler "
                                 "counts it against the budget", labels=["device"])
        for device, limit, amount in (("host", use.budget, use.used), ("gpu", use.gpu_budget, use.gpu_used)):
            if limit:
                budget.add_metric([device], limit)
            used.add_metric([device], amount)
        return [status, memory, in_flight, queued, budget, used]


class Metrics:
    """The registry, its counters and histograms, and the bookkeeping of loads from the status feed."""

    def __init__(self, manager: ModelManager, activity: Activity, clock: Callable[[], float] = time.monotonic) -> None:
        self._manager = manager
        self._clock = clock
        self.registry = CollectorRegistry()  # not auto_describe: that would read the manager at construction
        r = self.registry
        self.loads = Counter("modelyard_loads", "loads started", ["model"], registry=r)
        self.evictions = Counter("modelyard_evictions", "models stopped by the scheduler (lru, size, reload_cost, "
                                 "max_wait, keep_alive)", ["model", "reason"], registry=r)
        self.load_failures = Counter("modelyard_load_failures", "children that failed or were killed (load, exit, "
                                     "load_timeout, watchdog)", ["model", "reason"], registry=r)
        self.load_duration = Histogram("modelyard_load_duration_seconds", "from the start of a load to ready",
                                       ["model"], buckets=_LOAD_BUCKETS, registry=r)
        r.register(_StateCollector(manager))
        self.requests = _RequestStats()
        r.register(self.requests)
        self._loading_since: dict[str, float] = {}
        activity.listeners.append(self.requests.observe)

    def exposition(self, visible: Callable[[str], bool] | None = None) -> bytes:
        """The text format; `visible` keeps only the samples of the models it accepts (a key's patterns)."""
        if visible is None:
            return generate_latest(self.registry)
        return generate_latest(_Filtered(self.registry, visible))

    # -- the manager's feeds --
    def on_decision(self, decision: Decision) -> None:
        counted = classify(decision)
        if counted is None:
            return
        if counted.kind == "load":
            self.loads.labels(decision.model).inc()
        elif counted.kind == "eviction":
            self.evictions.labels(decision.model, counted.reason).inc()
        else:
            self.load_failures.labels(decision.model, counted.reason).inc()

    def on_status(self, event: StatusEvent) -> None:
        """Load durations: from the first `loading` of a model to its `loaded`."""
        model = event.model
        if event.status == Status.LOADING:
            self._loading_since.setdefault(model, self._clock())
        elif model in self._loading_since:
            since = self._loading_since.pop(model)
            if event.status == Status.LOADED:
                self.load_duration.labels(model).observe(self._clock() - since)

    async def follow(self) -> None:
        """Count from the manager's decision and status feeds until they close."""
        await asyncio.gather(self._follow_decisions(), self._follow_status())

    async def _follow_decisions(self) -> None:
        async with self._manager.follow_decisions() as decisions:
            while (decision := await decisions.get()) is not None:
                self.on_decision(decision)
        log.debug("metrics: the decision feed closed")

    async def _follow_status(self) -> None:
        async with self._manager.subscribe() as events:
            while (event := await events.get()) is not None:
                if isinstance(event, StatusEvent):
                    self.on_status(event)
        log.debug("metrics: the status feed closed")


class _Buckets:
    """One histogram series, kept as plain numbers (prometheus_client's Histogram takes a lock and checks its
    labels on every observation: half of what activity added per request, measured)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_REQUEST_BUCKETS)  # per bucket, not cumulative (made cumulative at scrape)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_REQUEST_BUCKETS, value)] += 1  # the first bound >= value: Prometheus' `le`
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, list[tuple[str, float]]()
        for bound, count in zip(_REQUEST_BUCKETS, self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class _ModelStats:
    __slots__ = ("duration", "queue_wait", "tokens_in", "tokens_out", "ttft")

    def __init__(self) -> None:
        self.duration, self.queue_wait, self.ttft = _Buckets(), _Buckets(), _Buckets()
        self.tokens_in = self.tokens_out = 0


class _RequestStats(Collector):
    """The per-request counters and histograms: updated as each record ends, exposed as counter and histogram
    families when scraped."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, int | None], int] = {}
        self._models: dict[str, _ModelStats] = {}

    def observe(self, record: Record) -> None:
        model = record.model or ""
        key = (model, record.route, record.status)
        self._requests[key] = self._requests.get(key, 0) + 1
        if not model:
            return
        stats = self._models.get(model)
        if stats is None:
            stats = self._models[model] = _ModelStats()
        if record.duration is not None:
            stats.duration.observe(record.duration)
        if record.queue_wait is not None:
            stats.queue_wait.observe(record.queue_wait)
        if record.ttft is not None:
            stats.ttft.observe(record.ttft)
        stats.tokens_in += record.tokens_in or 0
        stats.tokens_out += record.tokens_out or 0

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily("modelyard_requests", "model requests answered",
                                       labels=["model", "route", "status"])
        for (model, route, status), count in self._requests.items():
            requests.add_metric([model, route, str(status or "none")], count)
        tokens = CounterMetricFamily("modelyard_tokens", "prompt (in) and generated (out) tokens",
                                     labels=["model", "direction"])
        histograms = [HistogramMetricFamily(name, help_text, labels=["model"]) for name, help_text in (
            ("modelyard_request_duration_seconds", "from arrival to the last byte"),
            ("modelyard_queue_wait_seconds", "time waiting for the model (its load included)"),
            ("modelyard_time_to_first_token_seconds", "from arrival to the child's first byte"))]
        for model, stats in self._models.items():
            tokens.add_metric([model, "in"], stats.tokens_in)
            tokens.add_metric([model, "out"], stats.tokens_out)
            for family, series in zip(histograms, (stats.duration, stats.queue_wait, stats.ttft), strict=True):
                family.add_metric([model], series.cumulative(), series.total)
        return [requests, tokens, *histograms]


class _Filtered:
    """A registry view with only some models' samples (those without a model label are kept)."""

    def __init__(self, registry: CollectorRegistry, visible: Callable[[str], bool]) -> None:
        self._registry = registry
        self._visible = visible

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if "model" not in s.labels or self._visible(s.labels["model"])]
            yield kept
