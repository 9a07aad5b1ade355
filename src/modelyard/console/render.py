"""Pure rendering for the console: the server's JSON (GET /models, /api/ps, /api/tags, /logs, /activity, the
/models/sse events) in, rows, lines, load steps and rich renderables out. No I/O here, so every view is
tested with tables of snapshots; commands.py, chat.py and top.py do the talking and the printing."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

SHOWN_IN_PS = ("loading", "loaded", "stopping")  # what `ps` lists, as `ollama ps` lists running models
RECENT_REQUESTS = 10  # finished requests `top` keeps on screen


# --- units ----------------------------------------------------------------------------------------------------

def human_bytes(size: int | None) -> str:
    """Decimal units, as `ollama ps` prints them: 98 MB, 1.2 GB."""
    if size is None or size <= 0:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if value >= 10 or unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def until(status: str, expires_in: float | None, keep_alive: float | None, busy: bool) -> str:
    """When an idle model unloads: `ollama ps`'s UNTIL column."""
    if status == "stopping":
        return "Stopping..."
    if status == "loading":
        return "-"
    if expires_in is not None:
        minutes = round(expires_in / 60)
        if expires_in < 90:
            return f"{expires_in:.0f} seconds from now"
        return f"{minutes} minutes from now"
    if keep_alive is not None and keep_alive < 0:
        return "Forever"
    return "while busy" if busy else "-"


def processor(size: int | None, size_vram: int | None) -> str:
    """The CPU/GPU split of a model's memory, as `ollama ps` shows it."""
    if not size:
        return "-"
    gpu = size_vram or 0
    if gpu == 0:
        return "100% CPU"
    if gpu >= size:
        return "100% GPU"
    cpu_share = round(100 * (size - gpu) / size)
    return f"{cpu_share}%/{100 - cpu_share}% CPU/GPU"


# --- ps and ls ------------------------------------------------------------------------------------------------

def _tagless(name: str) -> str:
    return name.removesuffix(":latest")


def _memory(entry: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(host + GPU bytes, GPU bytes) from a /models entry: measured once the child runs, else the estimate."""
    memory = entry.get("memory") or {}
    measured = memory.get("measured")
    host = measured if measured else memory.get("estimated")
    gpu = memory.get("measured_gpu") if measured else memory.get("estimated_gpu")
    if host is None and gpu is None:
        return None, None
    return (host or 0) + (gpu or 0), gpu or 0


@dataclass(frozen=True)
class PsRow:
    name: str
    status: str
    size: int | None  # bytes, host + GPU
    size_vram: int | None
    context: int | None
    expires_in: float | None
    keep_alive: float | None
    in_flight: int
    queued: int
    node: str | None = None  # the cluster node it runs on (`serve --ray`: /models entries carry `nodes`)

    def as_json(self) -> dict[str, Any]:
        shown = {"name": self.name, "status": self.status, "size": self.size, "size_vram": self.size_vram,
                 "processor": processor(self.size, self.size_vram), "context": self.context,
                 "expires_in": self.expires_in, "keep_alive": self.keep_alive, "in_flight": self.in_flight,
                 "queued": self.queued}
        return shown if self.node is None else {**shown, "node": self.node}


def ps_rows(models: Mapping[str, Any], ps: Mapping[str, Any]) -> list[PsRow]:
    """Loaded (and loading, stopping) models, from GET /models joined with GET /api/ps by name."""
    running = {_tagless(str(m.get("name", ""))): m for m in ps.get("models") or []}
    rows = []
    for entry in models.get("data") or []:
        status = str((entry.get("status") or {}).get("value", ""))
        if status not in SHOWN_IN_PS:
            continue
        name = str(entry.get("id", ""))
        size, size_vram = _memory(entry)
        theirs = running.get(name, {})
        if theirs.get("size"):
            size, size_vram = int(theirs["size"]), int(theirs.get("size_vram") or 0)
        context = theirs.get("context_length") or (entry.get("meta") or {}).get("n_ctx")
        row = PsRow(name, status, size, size_vram, int(context) if context else None, entry.get("expires_in"),
                    entry.get("keep_alive"), int(entry.get("in_flight") or 0), int(entry.get("queued") or 0))
        nodes = entry.get("nodes")
        if isinstance(nodes, list):  # a cluster's front: one row for each node where the model runs
            rows += [replace(row, node=str(n.get("node")), status=str(n.get("status")),
                             in_flight=int(n.get("in_flight") or 0), queued=int(n.get("queued") or 0))
                     for n in nodes if isinstance(n, dict) and n.get("status") in SHOWN_IN_PS]
        else:
            rows.append(row)
    return rows


def _plain_table(*headers: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, no_wrap=True, overflow="ellipsis" if header != "NAME" else "fold")
    return table


_STATUS_STYLES = {"loaded": "green", "loading": "yellow", "stopping": "yellow", "failed": "red", "unloaded": "dim"}


def _status(status: str) -> Text:
    return Text(status, style=_STATUS_STYLES.get(status, ""))


NODE_ID_SHOWN = 8  # characters of a Ray node id in a table (56 hex digits in all; --json has them whole)


def ps_table(rows: Sequence[PsRow]) -> Table:
    clustered = any(row.node is not None for row in rows)
    table = _plain_table("NAME", *(("NODE",) if clustered else ()), "STATUS", "SIZE", "PROCESSOR", "CONTEXT",
                         "REQUESTS", "UNTIL")
    for row in rows:
        requests = str(row.in_flight) + (f" +{row.queued} queued" if row.queued else "")
        node = ((row.node or "-")[:NODE_ID_SHOWN],) if clustered else ()
        table.add_row(row.name, *node, _status(row.status), human_bytes(row.size),
                      processor(row.size, row.size_vram), str(row.context) if row.context else "-", requests,
                      until(row.status, row.expires_in, row.keep_alive, bool(row.in_flight or row.queued)))
    return table


@dataclass(frozen=True)
class LsRow:
    name: str
    aliases: tuple[str, ...]
    status: str
    parameters: str
    quantization: str
    file_size: int | None
    memory: int | None  # what it takes loaded (measured, else estimated)
    failure: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "aliases": list(self.aliases), "status": self.status,
                "parameters": self.parameters or None, "quantization": self.quantization or None,
                "file_size": self.file_size, "memory": self.memory, "failure": self.failure or None}


def ls_rows(models: Mapping[str, Any], tags: Mapping[str, Any]) -> list[LsRow]:
    """Every model, from GET /models joined with GET /api/tags (file size, GGUF details) by name."""
    files = {_tagless(str(m.get("name", ""))): m for m in tags.get("models") or []}
    rows = []
    for entry in models.get("data") or []:
        name = str(entry.get("id", ""))
        status = entry.get("status") or {}
        tag = files.get(name, {})
        details = tag.get("details") or {}
        rows.append(LsRow(name, tuple(str(a) for a in entry.get("aliases") or []), str(status.get("value", "")),
                          str(details.get("parameter_size") or ""), str(details.get("quantization_level") or ""),
                          int(tag["size"]) if tag.get("size") else None, _memory(entry)[0],
                          str(status.get("failure") or "")))
    return rows


def ls_table(rows: Sequence[LsRow]) -> Table:
    table = _plain_table("NAME", "STATUS", "PARAMS", "QUANT", "FILE", "MEMORY", "ALIASES")
    for row in rows:
        table.add_row(row.name, _status(row.status), row.parameters or "-", row.quantization or "-",
                      human_bytes(row.file_size), human_bytes(row.memory), ", ".join(row.aliases) or "-")
    return table


# --- load progress --------------------------------------------------------------------------------------------

# The /models/sse events that carry a model's status, router mode's names: `model_status` when a load starts,
# `status_change` for every later transition.
STATUS_EVENTS = frozenset({"model_status", "status_change"})


@dataclass(frozen=True)
class LoadStep:
    state: Literal["loading", "loaded", "failed"]
    fraction: float | None = None  # 0..1 while loading, when the child reports it
    stage: str = ""
    reason: str = ""


def load_step(message: Mapping[str, Any], model: str, seen_loading: bool) -> LoadStep | None:
    """What a /models/sse message means for a load of `model` (None: nothing). A model that goes back to
    `unloaded` after it was loading did not load (unloaded or killed meanwhile); before that, an `unloaded`
    is the end of an earlier unload that the load waits behind."""
    if message.get("event") not in STATUS_EVENTS or message.get("model") != model:
        return None
    data = message.get("data") or {}
    status = data.get("status")
    if status == "loading":
        progress = data.get("progress") or {}
        value = progress.get("value")
        fraction = min(1.0, max(0.0, float(value))) if isinstance(value, int | float) else None
        return LoadStep("loading", fraction, str(progress.get("current") or ""))
    if status == "loaded":
        return LoadStep("loaded", 1.0)
    if status == "failed":
        reason = str(data.get("reason") or "")
        if not reason and data.get("exit_code") is not None:
            reason = f"the engine exited with code {data['exit_code']}"
        return LoadStep("failed", reason=reason or "the load failed")
    if status == "unloaded" and seen_loading:
        return LoadStep("failed", reason=str(data.get("reason") or "it was unloaded before it finished loading"))
    return None


# --- logs -----------------------------------------------------------------------------------------------------

def log_line(entry: Mapping[str, Any], with_model: bool, utc: bool = False) -> str:
    """`HH:MM:SS line`, prefixed with the model when lines of several models mix."""
    moment = entry.get("time")
    stamp = ""
    if isinstance(moment, int | float):
        stamp = time.strftime("%H:%M:%S ", time.gmtime(moment) if utc else time.localtime(moment))
    prefix = f"[{entry.get('model', '?')}] " if with_model else ""
    return f"{stamp}{prefix}{entry.get('line', '')}"


# --- top ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TopState:
    """What `top` shows: the models (GET /models entries, statuses kept current by /models/sse) and the
    requests (in flight by id, and the last few finished), from /activity and /activity/sse."""

    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    progress: Mapping[str, float] = field(default_factory=dict)  # load progress by model
    in_flight: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    recent: tuple[Mapping[str, Any], ...] = ()
    activity: bool = True  # False: the server has no /activity (the request table says so)


def with_models(state: TopState, listing: Mapping[str, Any]) -> TopState:
    models = {str(e.get("id")): e for e in listing.get("data") or []}
    return replace(state, models=models, progress={k: v for k, v in state.progress.items() if k in models})


def with_model_event(state: TopState, message: Mapping[str, Any]) -> TopState:
    if message.get("event") not in STATUS_EVENTS:
        return state
    name = str(message.get("model"))
    data = message.get("data") or {}
    entry = dict(state.models.get(name) or {"id": name})
    entry["status"] = {**(entry.get("status") or {}), "value": data.get("status")}
    progress = dict(state.progress)
    step = load_step(message, name, seen_loading=True)
    if step is not None and step.state == "loading" and step.fraction is not None:
        progress[name] = step.fraction
    else:
        progress.pop(name, None)
    return replace(state, models={**state.models, name: entry}, progress=progress)


def with_activity(state: TopState, snapshot: Mapping[str, Any]) -> TopState:
    """GET /activity: its in-flight list and its newest finished records."""
    in_flight = {int(r["id"]): r for r in snapshot.get("in_flight") or [] if "id" in r}
    done = tuple(r for r in snapshot.get("data") or [] if r.get("state") == "done")[:RECENT_REQUESTS]
    return replace(state, in_flight=in_flight, recent=done)


def with_request(state: TopState, record: Mapping[str, Any]) -> TopState:
    """One /activity/sse record: a request that started or moved on (upsert), or one that ended."""
    if "id" not in record:
        return state
    rid = int(record["id"])
    in_flight = dict(state.in_flight)
    if record.get("state") == "done":
        in_flight.pop(rid, None)
        recent = (record, *(r for r in state.recent if r.get("id") != rid))[:RECENT_REQUESTS]
        return replace(state, in_flight=in_flight, recent=recent)
    in_flight[rid] = record
    return replace(state, in_flight=in_flight)


def _number(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) else "-"


def _seconds(value: Any) -> str:
    return human_seconds(float(value)) if isinstance(value, int | float) else "-"


def top_view(state: TopState, now: float, url: str) -> RenderableType:
    models = _plain_table("NAME", "STATUS", "MEMORY", "RUNNING", "QUEUED", "UNTIL")
    for name, entry in sorted(state.models.items()):
        status = str((entry.get("status") or {}).get("value", ""))
        shown = _status(status)
        if name in state.progress:
            shown.append(f" {state.progress[name]:.0%}")
        in_flight, queued = int(entry.get("in_flight") or 0), int(entry.get("queued") or 0)
        models.add_row(name, shown, human_bytes(_memory(entry)[0]) if status in SHOWN_IN_PS else "-",
                       str(in_flight), str(queued),
                       until(status, entry.get("expires_in"), entry.get("keep_alive"), bool(in_flight or queued)))
    requests = _plain_table("ID", "MODEL", "ROUTE", "STATE", "CLIENT", "AGE", "TTFT", "TOKENS", "TOK/S")
    for record in sorted(state.in_flight.values(), key=lambda r: r.get("id", 0)):
        started = record.get("time")
        age = human_seconds(max(0.0, now - started)) if isinstance(started, int | float) else "-"
        requests.add_row(str(record.get("id")), str(record.get("model") or "-"), str(record.get("route", "")),
                         str(record.get("state", "")), str(record.get("client") or "-"), age,
                         _seconds(record.get("ttft")), _tokens(record), _number(record.get("tokens_per_s"), "{:.1f}"))
    recent = _plain_table("ID", "MODEL", "ROUTE", "STATUS", "DURATION", "TTFT", "TOKENS", "TOK/S", "ERROR")
    for record in state.recent:
        recent.add_row(str(record.get("id")), str(record.get("model") or "-"), str(record.get("route", "")),
                       str(record.get("status") or "-"), _seconds(record.get("duration")),
                       _seconds(record.get("ttft")), _tokens(record),
                       _number(record.get("tokens_per_s"), "{:.1f}"), str(record.get("error") or ""))
    head = Text.assemble(("modelyard top", "bold"), f"  {url}  ", (time.strftime("%H:%M:%S", time.localtime(now)),
                                                                    "dim"), ("   q quits", "dim"))
    parts: list[RenderableType] = [head, Text(""), models, Text("")]
    if state.activity:
        parts += [Text(f"In flight: {len(state.in_flight)}", style="bold"), requests, Text(""),
                  Text("Recent", style="bold"), recent]
    else:
        parts.append(Text("(this server has no /activity: requests are not shown)", style="dim"))
    return Group(*parts)


def _tokens(record: Mapping[str, Any]) -> str:
    tokens_in, tokens_out = record.get("tokens_in"), record.get("tokens_out")
    if tokens_in is None and tokens_out is None:
        return "-"
    return f"{tokens_in if tokens_in is not None else '-'} > {tokens_out if tokens_out is not None else '-'}"


def top_json(state: TopState) -> dict[str, Any]:
    """`top --json`: one snapshot of the same state."""
    return {"models": [dict(e) for _, e in sorted(state.models.items())],
            "in_flight": [dict(r) for _, r in sorted(state.in_flight.items())],
            "recent": [dict(r) for r in state.recent]}
