"""The markdown report and the PNG plots."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelyard import __version__
from modelyard.bench import soak
from modelyard.bench.phases import PHASES, swap_phases
from modelyard.bench.processes import MODELYARD, ROUTER_MODE
from modelyard.bench.scenarios import KINDS, SCALE_START_LIMIT_S, Plan, Results
from modelyard.bench.stats import median_interval, ratio_bounds
from modelyard.demo import SMOLLM2


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}"


def render(results: Results, plan: Plan, model: str, build: str, command: str) -> str:
    lines = [f"# modelyard vs llama-server router mode ({plan.name} mode)", "",
             f"- machine: {machine()}", f"- model: {model} (as models a, b, c)", f"- llama.cpp: {build}",
             f"- modelyard: {__version__}, Python {platform.python_version()}", f"- command: `{command}`",
             "- ratio = modelyard / router mode: below 1 means modelyard is faster or smaller.", ""]
    # A run restricted with --only has only some sections: each is written when its figures exist.
    sections: list[tuple[object, Callable[[], list[str]]]] = [
        (results.paired, lambda: _overhead(results, plan)), (results.streams, lambda: _streaming(results)),
        (results.cold, lambda: _cold(results)), (results.mixed, lambda: _mixed(results)),
        (results.rate, lambda: _cost(results)), (results.scale, lambda: _scale(results)),
        (results.starved_wait, lambda: _busy(results, plan)), (results.fresh, lambda: _fresh(results, plan)),
        (results.soak, lambda: _soak(results.soak, plan))]
    for figures, section in sections:
        if figures:
            lines += section()
    return "\n".join(lines) + "\n"


def _interval(values: Sequence[float]) -> str:
    i = median_interval(values)
    return f"[{i.low * 1000:+.2f}, {i.high * 1000:+.2f}] ms ({i.confidence:.1%})"


def _overhead(results: Results, plan: Plan) -> list[str]:
    out = ["## 1. Hot-path overhead (latency added over calling the child directly)", "",
           "Paired: at concurrency 1 each step sends, for each router, one request direct to its child (on the "
           "child's own endpoint: router mode's on a loopback port, modelyard's on its Unix socket) and one "
           "through the router, back to back (router order alternating every step, direct/via every two; each "
           "target on its own pool of one kept-alive connection, or for streams one new connection each, on "
           "all four alike, since llama-server closes it after a stream); the added latency is the median of the "
           "per-pair differences, with its distribution-free confidence interval (order statistics). At a "
           "higher concurrency requests cannot be paired: each step is a round of requests per target (direct "
           "and via adjacent, fresh pools), the difference that of the rounds' p50s, the interval over rounds "
           "(its confidence is what their count reaches). Steps go on until each interval is narrower than "
           "the plan's target or its time budget is spent. p99s are of all requests, unpaired.", "",
           "| endpoint | concurrency | router | steps | direct p50 | via p50 | added p50 (paired) | interval "
           "(confidence) | width | direct p99 | via p99 | added p99 |", "|---" * 12 + "|"]
    for (endpoint, conc), paired in sorted(results.paired.items()):
        for kind in sorted(paired.direct):
            added = paired.added(kind)
            direct = results.overhead.get((endpoint, conc, kind, "direct"), [])
            via = results.overhead.get((endpoint, conc, kind, "via router"), [])
            if not added:
                out.append(f"| {endpoint} | {conc} | {kind} | 0 {paired.unit} ({paired.errors} failed) |"
                           + " |" * 8)
                continue
            i = median_interval(added)
            out.append(f"| {endpoint} | {conc} | {kind} | {len(added)} {paired.unit} | {ms(pct(direct, .5))} | "
                       f"{ms(pct(via, .5))} | {ms(i.median)} | {_interval(added)} | {ms(i.width)} | "
                       f"{ms(pct(direct, .99))} | {ms(pct(via, .99))} | {ms(pct(via, .99) - pct(direct, .99))} |")
    wide = [f"{endpoint} at {conc}, {kind} ({ms(median_interval(paired.added(kind)).width)})"
            for (endpoint, conc), paired in sorted(results.paired.items()) if conc == 1
            for kind in sorted(paired.direct)
            if paired.added(kind) and median_interval(paired.added(kind)).width >= plan.ci_width_s]
    out += ["", f"Target width at concurrency 1: {ms(plan.ci_width_s)} (each within "
                f"{plan.paired_budget_s:g} s, at least {plan.paired_min} pairs): "
                + (f"not reached by {'; '.join(wide)}." if wide else "reached by every interval.")]
    out += ["", "Between the routers, per step: what modelyard adds minus what router mode adds (below 0: "
                "modelyard adds less); the ratio's range comes from both intervals (at least 90% together).", "",
            "| endpoint | concurrency | added p50, modelyard / router mode | ratio (range) | modelyard - router "
            "mode, median (interval) | measured in | failed steps |", "|---|---|---|---|---|---|---|"]
    for (endpoint, conc), paired in sorted(results.paired.items()):
        if not all(paired.direct.get(kind) for kind in KINDS):
            continue
        ours, theirs = median_interval(paired.added(MODELYARD)), median_interval(paired.added(ROUTER_MODE))
        bounds = ratio_bounds(ours, theirs)
        between = paired.between(MODELYARD, ROUTER_MODE)
        out.append(f"| {endpoint} | {conc} | {ms(ours.median)} / {ms(theirs.median)} | "
                   f"{ratio(ours.median, theirs.median)} ("
                   + (f"{bounds[0]:.2f} to {bounds[1]:.2f}" if bounds else "n/a") + ") | "
                   f"{ms(statistics.median(between))} {_interval(between)} | {paired.elapsed:.0f} s | "
                   f"{paired.errors} |")
    return [*out, ""]


def _streaming(results: Results) -> list[str]:
    together = max(concurrency for concurrency, _, _ in results.throughput)  # the plan's streams_together
    out = ["## 2. Streaming", "",
           "| router | route | time to first token p50 | inter-token gap p50 | gap p99 | tokens/s, 1 stream | "
           f"tokens/s, {together} streams |", "|---|---|---|---|---|---|---|"]
    for (kind, route), streams in sorted(results.streams.items()):
        gaps = [g for s in streams for g in s.gaps]
        out.append(f"| {kind} | {route} | {ms(statistics.median(s.first_token for s in streams))} | "
                   f"{ms(pct(gaps, .5))} | {ms(pct(gaps, .99))} | {results.throughput[(1, kind, route)]:.1f} | "
                   f"{results.throughput[(together, kind, route)]:.1f} |")
    return [*out, ""]


def _cold(results: Results) -> list[str]:
    ours, theirs = results.cold[MODELYARD], results.cold[ROUTER_MODE]
    swap_ours, swap_theirs = (statistics.median(results.swaps[k]) for k in KINDS)
    return ["## 3. Cold load and swap (request to first token, --models-max 1)", "",
            "| measure | modelyard | router mode | ratio |", "|---|---|---|---|",
            f"| cold load | {ours:.2f} s | {theirs:.2f} s | {ratio(ours, theirs)} |",
            f"| swap, from the replaced model idle (median of {len(results.swaps[MODELYARD])}) | {swap_ours:.2f} s | "
            f"{swap_theirs:.2f} s | {ratio(swap_ours, swap_theirs)} |", "", *_phases(results)]


# What ends each phase, for the report's table (phases.PHASES names the marks).
_PHASE_ENDS = {
    "drain": "the replaced model's in-flight stream ends (bench)",
    "stop": "its child process exits (/proc)",
    "handover": "the router's `loading` event for the new model (/models/sse)",
    "process start": "the new child's first log line",
    "weight load": "its `llama threadpool init` line (model and context in memory)",
    "warm-up": "its `model loaded` line (empty run, slots)",
    "ready": "the router's `loaded` event (/models/sse)",
    "first token": "the first streamed token reaches the bench",
}


def phase_medians(marks: list[dict[str, float]]) -> dict[str, float | None]:
    """Each phase's median over the swaps that saw its mark (None if none did)."""
    each = [swap_phases(m) for m in marks]
    medians: dict[str, float | None] = {}
    for phase, _ in PHASES:
        seen = [d for d in (e[phase] for e in each) if d is not None]
        medians[phase] = statistics.median(seen) if seen else None
    return medians


def _phases(results: Results) -> list[str]:
    if not all(results.swap_marks.get(kind) for kind in KINDS):
        return []
    medians = {kind: phase_medians(results.swap_marks[kind]) for kind in KINDS}
    totals = {kind: statistics.median(m["first token"] for m in results.swap_marks[kind] if "first token" in m)
              for kind in KINDS}

    def cell(value: float | None) -> str:
        return "n/a" if value is None else ms(value)

    out = [f"Each swap is asked for while the replaced model has a stream in flight (asked after its first "
           f"token). Its phases, median over {len(results.swap_marks[MODELYARD])} swaps per router; a phase runs "
           "from the end of the one before to its own end (work overlapping an earlier phase shortens it); the "
           "child's inner phases are from its own log stamps. Plot: swap-phases.png.", "",
           "| phase | ends when | modelyard | router mode | ratio |", "|---|---|---|---|---|"]
    for phase, _ in PHASES:
        ours, theirs = medians[MODELYARD][phase], medians[ROUTER_MODE][phase]
        out.append(f"| {phase} | {_PHASE_ENDS[phase]} | {cell(ours)} | {cell(theirs)} | "
                   + (ratio(ours, theirs) if ours is not None and theirs is not None else "n/a") + " |")
    out.append(f"| whole swap | asked to first token | {ms(totals[MODELYARD])} | {ms(totals[ROUTER_MODE])} | "
               f"{ratio(totals[MODELYARD], totals[ROUTER_MODE])} |")
    return [*out, ""]


def _mixed(results: Results) -> list[str]:
    out = ["## 4. Mixed workload (clients interleaving requests over 3 models)", "",
           "| setting | router | makespan | loads | p50 latency | p99 latency | errors |",
           "|---|---|---|---|---|---|---|"]
    summary: dict[tuple[str, str], float] = {}
    for (label, kind), runs in sorted(results.mixed.items()):
        latencies = [x for run in runs for x in run["latencies"]]
        makespan = statistics.median(run["makespan"] for run in runs)
        summary[(label, kind)] = makespan
        loads = "/".join(str(run["loads"]) for run in runs)
        out.append(f"| {label} | {kind} | {makespan:.2f} s | {loads} | {pct(latencies, .5):.2f} s | "
                   f"{pct(latencies, .99):.2f} s | {sum(run['errors'] for run in runs)} |")
    out += ["", "| setting | makespan, modelyard / router mode |", "|---|---|"]
    for label in sorted({label for label, _ in summary}):
        out.append(f"| {label} | {ratio(summary[(label, MODELYARD)], summary[(label, ROUTER_MODE)])} |")
    return [*out, ""]


def _cost(results: Results) -> list[str]:
    out = ["## 5. Router cost", "",
           "| router | peak RSS | CPU s per 1k proxied /tokenize | requests/s at concurrency 64 "
           "| same, direct to child |",
           "|---|---|---|---|---|"]
    for kind in KINDS:
        cost = results.cost[kind]
        out.append(f"| {kind} | {cost['peak_rss'] / 2**20:.0f} MiB | {cost['cpu_per_1k_requests']:.2f} | "
                   f"{results.rate[(kind, 'via router')]:.0f} | {results.rate[(kind, 'direct')]:.0f} |")
    ours, theirs = results.rate[(MODELYARD, "via router")], results.rate[(ROUTER_MODE, "via router")]
    return [*out, "", f"Requests/s, modelyard / router mode: {ratio(ours, theirs)}.", ""]


def _scale(results: Results) -> list[str]:
    out = ["## 6. Scale (registered models, presets pointing at one file)", "",
           "| models | router | startup | GET /v1/models | router RSS |", "|---|---|---|---|---|"]
    for (size, kind), row in sorted(results.scale.items()):
        if row["startup"] == float("inf"):
            out.append(f"| {size} | {kind} | not ready after {SCALE_START_LIMIT_S:.0f} s | | "
                       f"{row['rss'] / 2**20:.0f} MiB |")
            continue
        out.append(f"| {size} | {kind} | {row['startup']:.2f} s | {ms(row['list'])} | {row['rss'] / 2**20:.0f} MiB |")
    return [*out, ""]


def _busy(results: Results, plan: Plan) -> list[str]:
    from modelyard.bench.scenarios import MAX_WAIT_S

    ours, theirs = results.starved_wait[MODELYARD], results.starved_wait[ROUTER_MODE]
    return ["## 7. A request for another model while one model is kept busy", "",
            f"Four clients keep model a busy for {plan.busy_seconds:g} s with --models-max 1; a request for b "
            f"arrives after {plan.busy_ask_after_s:g} s. modelyard runs with --max-wait {MAX_WAIT_S:g}.", "",
            "| router | b's wait | ratio |", "|---|---|---|",
            f"| modelyard | {ours:.2f} s | {ratio(ours, theirs)} |", f"| llama-server router | {theirs:.2f} s | |", ""]


def _fresh(results: Results, plan: Plan) -> list[str]:
    out = ["## 8. Swap right after start-up, over files never seen before", "",
           f"Each router starts over fresh copies of {SMOLLM2} (model A) and {plan.model} (model B, and "
           f"{plan.fresh_extra_copies} more copies never requested), with an empty "
           f"cache directory and HOME; {plan.fresh_after_health_s:g} s after /health answers, a streamed request for A "
           "(a cold load), then one for B (a swap, --models-max 1). Median of the rounds "
           "(each round on new copies).", "",
           "| router | rounds | /health after | A: first token | B (the swap): first token | total, A's request "
           "to B's last token |", "|---|---|---|---|---|---|"]
    medians: dict[str, tuple[float, float]] = {}
    for kind in KINDS:
        runs = results.fresh.get(kind, [])
        if not runs:
            continue
        b_first = statistics.median(r.b_first_token for r in runs)
        total = statistics.median(r.total for r in runs)
        medians[kind] = (b_first, total)
        each = " / ".join(f"{r.b_first_token:.2f}" for r in runs)
        out.append(f"| {kind} | {len(runs)} | {statistics.median(r.health_after for r in runs):.2f} s | "
                   f"{statistics.median(r.a_first_token for r in runs):.2f} s | {b_first:.2f} s ({each}) | "
                   f"{total:.2f} s |")
    if len(medians) == len(KINDS):
        (ours_b, ours_total), (theirs_b, theirs_total) = medians[MODELYARD], medians[ROUTER_MODE]
        held = "held" if ours_b <= theirs_b * 1.1 else "not met"
        out += ["", f"Ratio modelyard / router mode: swap first token {ratio(ours_b, theirs_b)}, total "
                    f"{ratio(ours_total, theirs_total)}. Bar (the swap no slower than router mode's, 10% for "
                    f"noise): {held}."]
    return [*out, ""]


def _soak(result: soak.SoakResult | None, plan: Plan) -> list[str]:
    assert result is not None
    totals = result.totals()
    failures = soak.verdict(result)
    outcomes = sorted(totals, key=lambda o: (not o.startswith("2"), o))
    out = ["## 9. Soak (modelyard only)", "",
           f"{result.requests} requests over 4 model names ({SMOLLM2} and {plan.model} under two names each, one with "
           f"embeddings on), one route each, at concurrency {soak.CONCURRENCY} with --models-max "
           f"{soak.MODELS_MAX}; children SIGKILLed at seeded random moments: {len(result.kills)} (at requests "
           f"{', '.join(str(k[0]) for k in result.kills) or 'none'}). A request with no answer within "
           f"{soak.REQUEST_TIMEOUT_S:.0f} s is a hang. Wall time {result.wall:.0f} s, "
           f"p50 / p99 of the 2xx answers {pct(result.latencies, .5):.2f} / {pct(result.latencies, .99):.2f} s.",
           "", "| route | " + " | ".join(outcomes) + " |", "|---" * (len(outcomes) + 1) + "|"]
    for route, counts in [*result.outcomes.items(), ("all", totals)]:
        out.append(f"| {route} | " + " | ".join(str(counts[o]) for o in outcomes) + " |")
    mib = 2**20
    out += ["", "| router | before | peak | after |", "|---|---|---|---|",
            f"| RSS (VmRSS, file pages included) | {result.before.rss / mib:.1f} MiB | {result.peak.rss / mib:.1f} MiB "
            f"| {result.after.rss / mib:.1f} MiB |",
            f"| anonymous RSS (RssAnon: heap, stacks) | {result.before.anon / mib:.1f} MiB | "
            f"{result.peak.anon / mib:.1f} MiB | {result.after.anon / mib:.1f} MiB |",
            f"| open descriptors | {result.before.descriptors} | {result.peak.descriptors} | "
            f"{result.after.descriptors} |", "",
            f"After: measured once idle ({result.settled_after:.1f} s after the last answer); "
            f"{result.children_after} children left (--models-max {soak.MODELS_MAX}).", "",
            "Bar: 0 hangs, 0 resets without a status, 0 truncated answers, anonymous RSS back within "
            f"max({soak.RSS_SLACK_FRACTION:.0%}, {soak.RSS_SLACK_BYTES // mib} MiB) of the baseline, descriptors "
            f"within {soak.FD_SLACK}, no more children than --models-max: "
            + ("**held**." if not failures else f"**not met**: {'; '.join(failures)}.")]
    if totals["500"]:
        out += ["", f"{totals['500']} answers were 500: explicit, so within this bar, but issue 9 (point 4) wants a "
                    "child's death answered 502/503 with the cause, never 500."]
    if result.samples:
        out += ["", "One answer of each kind that was not a 2xx:", ""]
        out += [f"- {sample}" for sample in result.samples]
    return [*out, ""]


def plot(results: Results, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    if results.overhead:  # a run restricted with --only may have measured neither plot's figures
        paths.append(_latency_cdf(plt, results, directory))
    if all(("--models-max 1", kind) in results.mixed for kind in KINDS):
        paths.append(_mixed_timeline(plt, results, directory))
    if all(results.swap_marks.get(kind) for kind in KINDS):
        paths.append(_swap_phases(plt, results, directory))
    return paths


_PHASE_COLOURS = ("#9aa5b1", "#e12d39", "#f0b429", "#8e6ad8", "#2f80ed", "#27ab83", "#0b6e79", "#1f2933")


def _swap_phases(plt: Any, results: Results, directory: Path) -> Path:
    """One stacked bar per router: the median of each phase, in order, along the swap."""
    figure, axis = plt.subplots(figsize=(12, 3.2))
    for row, kind in enumerate(KINDS):
        left = 0.0
        for (phase, _), colour in zip(PHASES, _PHASE_COLOURS, strict=True):
            width = (phase_medians(results.swap_marks[kind])[phase] or 0.0) * 1000
            axis.barh(row, width, left=left, color=colour, height=0.55, label=phase if row == 0 else None)
            if width > 40:
                axis.text(left + width / 2, row, f"{width:.0f}", ha="center", va="center", fontsize=8,
                          color="white")
            left += width
    axis.set_yticks(range(len(KINDS)), list(KINDS))
    axis.invert_yaxis()
    axis.set_xlabel("milliseconds since the swap was asked for (median of each phase)")
    axis.set_title("A swap, phase by phase (--models-max 1, the replaced model draining a stream)")
    axis.legend(ncol=len(PHASES), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.32))
    figure.tight_layout()
    path = directory / "swap-phases.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _latency_cdf(plt: Any, results: Results, directory: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, endpoint in zip(axes, ("tokenize", "chat, 1 token"), strict=True):
        for (name, conc, kind, route), values in sorted(results.overhead.items()):
            if name == endpoint and conc == 1:
                ordered = sorted(v * 1000 for v in values)
                axis.plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=f"{kind}, {route}")
        axis.set_xscale("log")
        axis.set_xlabel("latency (ms, log scale)")
        axis.set_ylabel("fraction of requests")
        axis.set_title(f"{endpoint}, concurrency 1")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = directory / "latency-cdf.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _mixed_timeline(plt: Any, results: Results, directory: Path) -> Path:
    runs = {kind: results.mixed[("--models-max 1", kind)][0] for kind in KINDS}
    figure, axes = plt.subplots(len(runs), 1, figsize=(12, 2.2 * len(runs)), sharex=True)
    for axis, (kind, run) in zip(axes, runs.items(), strict=True):
        _timeline(axis, run)
        axis.set_title(f"{kind}: makespan {run['makespan']:.1f} s, {run['loads']} loads")
    axes[-1].set_xlabel("seconds since the workload started")
    figure.tight_layout()
    path = directory / "mixed-timeline.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _timeline(axis: Any, run: dict[str, Any]) -> None:
    colours = {"loading": "#f0b429", "loaded": "#2f80ed", "stopping": "#bbbbbb"}
    models = sorted({m for _, m, _ in run["timeline"]})
    end = run["makespan"]
    for row, model in enumerate(models):
        events = [(t, s) for t, m, s in run["timeline"] if m == model]
        for (t, status), nxt in zip(events, [*events[1:], (end, "end")], strict=True):
            if status in colours:
                axis.barh(row, max(nxt[0] - t, 0.01), left=t, color=colours[status], height=0.6)
    axis.set_yticks(range(len(models)), models)
    axis.set_xlim(left=0)
