"""Loading a model from the console: resolve its name, subscribe to /models/sse, POST /models/load, then
follow its status until it is loaded or failed, drawing a progress bar (on stderr, so that `--json` output on
stdout stays clean). `load` and `chat` share it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

from modelyard.console.client import Client
from modelyard.console.errors import ConsoleError, ExitCode
from modelyard.console.render import LoadStep, load_step


def resolve(client: Client, model: str) -> dict[str, Any]:
    """The /v1/models entry of a model named by id, alias or `id:latest` (ConsoleError, exit 4, if unknown)."""
    entry = client.get(f"/v1/models/{model}")
    if not isinstance(entry, dict) or "id" not in entry:
        raise ConsoleError(f"GET /v1/models/{model} answered no model", ExitCode.SERVER)
    return entry


def status_of(entry: dict[str, Any]) -> str:
    return str((entry.get("status") or {}).get("value", ""))


def follow_load(client: Client, name: str) -> Iterator[LoadStep]:
    """Ask for the load of `name` (a canonical id) and yield its steps, the last one loaded or failed."""
    with client.events("/models/sse") as frames:  # subscribed before asking, so no transition is missed
        client.post("/models/load", {"model": name})
        if status_of(resolve(client, name)) == "loaded":
            yield LoadStep("loaded", 1.0)
            return
        seen_loading = False
        for frame in frames:
            try:
                message = orjson.loads(frame.data)
            except orjson.JSONDecodeError:
                continue
            step = load_step(message, name, seen_loading)
            if step is None:
                continue
            seen_loading = seen_loading or step.state == "loading"
            yield step
            if step.state != "loading":
                return
    raise ConsoleError(f"modelyard ended the event stream before '{name}' was loaded (shutting down?)",
                       ExitCode.SERVER)


def load_with_progress(client: Client, name: str, err: Console, show: bool) -> float:
    """Load `name`, with a progress bar when `show`; the seconds it took. ConsoleError (exit 1) with the
    server's reason when the load fails."""
    started = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("loading {task.fields[model]} {task.fields[stage]}"),
               BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not show) as progress:
        task = progress.add_task("load", total=None, model=name, stage="")
        for step in follow_load(client, name):
            if step.state == "failed":
                raise ConsoleError(f"'{name}' failed to load: {step.reason}", ExitCode.SERVER)
            if step.fraction is not None:
                progress.update(task, total=1.0, completed=step.fraction, stage=step.stage)
    return time.monotonic() - started
