"""`modelyard pull org/repo[:quant]`: a Hugging Face model fetched by the server into its cache, over router
mode's API only (subscribe to /models/sse, then POST /models), with a rich progress bar of the bytes on stderr
until `download_finished`, or the server's reason on `download_failed` (exit 1). Ctrl-C stops following; the
server keeps downloading (POST /models/unload or DELETE /models cancels it). `pull_step` reads the events
(pure)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from modelyard.console.client import Client
from modelyard.console.errors import ConsoleError, ExitCode
from modelyard.hub.refs import RefError, parse_ref


@dataclass(frozen=True)
class PullStep:
    state: Literal["downloading", "done", "failed"]
    done: int = 0
    total: int = 0
    reason: str = ""


def pull_step(message: Mapping[str, Any], name: str) -> PullStep | None:
    """What a /models/sse message means for the download of `name` (None: nothing)."""
    if message.get("model") != name:
        return None
    event, data = message.get("event"), message.get("data") or {}
    if event == "download_progress":
        files = [f for f in (data.get("progress") or {}).values() if isinstance(f, dict)]
        return PullStep("downloading", sum(int(f.get("done") or 0) for f in files),
                        sum(int(f.get("total") or 0) for f in files))
    if event == "download_finished":
        return PullStep("done")
    if event == "download_failed":
        return PullStep("failed", reason=str(data.get("error") or "the server gave no reason"))
    return None


@dataclass(frozen=True)
class Pulled:
    model: str
    bytes: int
    seconds: float
    already: bool = False


def pull_with_progress(client: Client, reference: str, err: Console, show: bool) -> Pulled:
    try:
        name = parse_ref(reference).name  # the name the server's events use
    except RefError as exc:
        raise ConsoleError(str(exc), ExitCode.USAGE) from None
    started = time.monotonic()
    listing = client.get("/models")
    if any(isinstance(m, dict) and m.get("id") == name for m in listing.get("data", [])):
        return Pulled(name, 0, 0.0, already=True)
    columns = (SpinnerColumn(), TextColumn("pulling {task.fields[model]}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    last = PullStep("downloading")
    with client.events("/models/sse") as frames, \
            Progress(*columns, console=err, transient=True, disable=not show) as progress:
        # subscribed first: no event falls between; the server names the events by the string posted
        client.post("/models", {"model": name})
        task = progress.add_task("pull", total=None, model=name)
        try:
            for frame in frames:
                try:
                    step = pull_step(orjson.loads(frame.data), name)
                except orjson.JSONDecodeError:
                    continue
                if step is None:
                    continue
                if step.state == "failed":
                    raise ConsoleError(f"pulling {name} failed: {step.reason}", ExitCode.SERVER)
                if step.state == "done":
                    return Pulled(name, last.total, time.monotonic() - started)
                last = step
                progress.update(task, total=step.total or None, completed=step.done)
        except KeyboardInterrupt:
            raise ConsoleError(f"stopped following; modelyard goes on downloading {name} (POST /models/unload "
                               f"cancels it)", ExitCode.SERVER) from None
    raise ConsoleError(f"modelyard ended the event stream before {name} was downloaded (shutting down?)",
                       ExitCode.SERVER)
