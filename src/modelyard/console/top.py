"""`modelyard top`: a live view of the models and the requests in flight. Two threads follow /models/sse and
/activity/sse, a third re-reads GET /models every few seconds (memory, counts and keep-alive timers are not in
the events); they all post to one queue, and the main loop folds what arrives into render.TopState (pure) and
redraws. `q` or Ctrl-C quits. A server without /activity still shows its models."""

from __future__ import annotations

import contextlib
import os
import queue
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live

from modelyard.console.client import Client
from modelyard.console.errors import ConsoleError, ExitCode, RouteMissing
from modelyard.console.render import TopState, top_json, top_view, with_activity, with_model_event, with_models
from modelyard.console.render import with_request as with_request_record

_RELIST_S = 2.0
_TICK_S = 0.25  # redraw at least this often: ages and the clock move

Post = Callable[[tuple[str, Any]], None]


def snapshot(client: Client) -> TopState:
    state = with_models(TopState(), client.get("/models"))
    try:
        return with_activity(state, client.get("/activity", {"limit": 20}))
    except RouteMissing:
        return TopState(models=state.models, activity=False)


def _follow(client: Client, path: str, kind: str, post: Post) -> None:
    try:
        with client.events(path) as frames:
            for frame in frames:
                with contextlib.suppress(orjson.JSONDecodeError):
                    post((kind, orjson.loads(frame.data)))
        post(("error", ConsoleError(f"modelyard at {client.conn.url} ended {path} (shutting down?)",
                                    ExitCode.UNREACHABLE)))
    except ConsoleError as exc:
        post(("error", exc))


def _relist(client: Client, post: Post, stop: threading.Event) -> None:
    while not stop.wait(_RELIST_S):
        try:
            post(("models", client.get("/models")))
        except ConsoleError as exc:
            post(("error", exc))
            return


def _start(target: Callable[..., None], *args: Any) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (keys arrive one by one, Ctrl-C still interrupts); None when not a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    if fd is None:
        time.sleep(timeout)
        return False
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.read(fd, 32).lower().startswith(b"q")


def fold(state: TopState, kind: str, payload: Any) -> TopState:
    if kind == "model":
        return with_model_event(state, payload)
    if kind == "request":
        return with_request_record(state, payload)
    if kind == "models":
        return with_models(state, payload)
    return state


def run_top(client: Client, out: Console) -> int:
    state = snapshot(client)
    inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    stop = threading.Event()
    _start(_follow, client, "/models/sse", "model", inbox.put)
    if state.activity:
        _start(_follow, client, "/activity/sse", "request", inbox.put)
    _start(_relist, client, inbox.put, stop)
    try:
        with _keys() as fd, Live(top_view(state, time.time(), client.conn.url), console=out, screen=out.is_terminal,
                                 auto_refresh=False) as live:
            while not _quit_pressed(fd, _TICK_S):
                while True:
                    try:
                        kind, payload = inbox.get_nowait()
                    except queue.Empty:
                        break
                    if kind == "error":
                        raise payload
                    state = fold(state, kind, payload)
                live.update(top_view(state, time.time(), client.conn.url), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
    return int(ExitCode.OK)


def print_snapshot(client: Client, out: Console) -> int:
    """`top --json`: the same state, once."""
    out.file.write(orjson.dumps(top_json(snapshot(client))).decode() + "\n")
    return int(ExitCode.OK)
