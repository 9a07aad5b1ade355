"""A swap broken into its phases, pure: which moment ends each phase, where in a child's log those moments
are, and how long each phase took.

A swap (`--models-max 1`, a request for b while a is loaded with a request in flight) goes: drain (a's
in-flight answer ends), stop (a's process exits), handover (b's process is spawned), process start (b's
first log line), weight load (the model and its context are in memory: llama.cpp's "llama threadpool init"
comes right after), warm-up (llama-server's empty run and its slots: "model loaded"), ready (the router
says b is loaded: its /models/sse event), first token (b's first streamed token reaches the client).

Each moment is a mark, in seconds on one clock. A phase lasts from the end of the one before (the latest
mark so far) to its own mark, never less than nothing: work that overlaps an earlier phase (b spawned before
a has exited, as modelyard does when its memory budget holds both: scheduler.held) shows as a shorter phase,
and the phases always add up to the whole swap. A mark that was not seen gives its phase no figure, and its
time goes to the next phase.

llama-server b11434 stamps every log line with the time since its logger started ("0.01.234.567 I srv ...":
minutes, seconds, milliseconds, microseconds). Those stamps give the child's inner phases to the
microsecond; where they lie on the bench's clock comes from when each line was received (by the router,
or the bench): no line is received before it is printed, so the smallest (received - stamp) over a child's
lines is the closest bound on when its clock started."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# (phase, the mark that ends it), in the order a swap goes through them; a swap starts at "asked".
PHASES: tuple[tuple[str, str], ...] = (
    ("drain", "drained"),
    ("stop", "exited"),
    ("handover", "spawned"),
    ("process start", "first line"),
    ("weight load", "weights loaded"),
    ("warm-up", "warmed up"),
    ("ready", "ready"),
    ("first token", "first token"),
)
START = "asked"

# The child's log lines that end the inner phases (llama-server b11434 at its default verbosity).
CHILD_LINES: tuple[tuple[str, str], ...] = (
    ("weights loaded", "llama threadpool init"),
    ("warmed up", ": model loaded"),
)

# "[40493] " is router mode's prefix on a child's line it forwards (the child's port); the stamp follows.
_STAMP = re.compile(r"^(?:\[\s*(?P<port>\d+)\]\s)?(?P<m>\d+)\.(?P<s>\d{2})\.(?P<ms>\d{3})\.(?P<us>\d{3})\s")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def stamp(line: str) -> tuple[int | None, float, str] | None:
    """A child's log line as (router mode's port prefix or None, llama.cpp's stamp in seconds, the text after
    it); None for a line without a stamp (a continuation, or another program's output)."""
    plain = _ANSI.sub("", line)
    match = _STAMP.match(plain)
    if match is None:
        return None
    seconds = int(match["m"]) * 60 + int(match["s"]) + int(match["ms"]) / 1e3 + int(match["us"]) / 1e6
    port = int(match["port"]) if match["port"] else None
    return port, seconds, plain[match.end():]


def child_marks(received: Sequence[tuple[float, str]], port: int | None = None) -> dict[str, float]:
    """The marks one child's log gives, on the clock of `received` ((time received, line) pairs, in order):
    its first line, and each of CHILD_LINES' first occurrence. With `port`, only router mode's lines
    forwarded from that child count (the router's log holds every child's)."""
    stamped = [(at, parsed[1], parsed[2]) for at, line in received
               if (parsed := stamp(line)) is not None and (port is None or parsed[0] == port)]
    if not stamped:
        return {}
    origin = min(at - seconds for at, seconds, _ in stamped)
    marks = {"first line": origin + stamped[0][1]}
    for mark, text in CHILD_LINES:
        found = next((seconds for _, seconds, rest in stamped if text in rest), None)
        if found is not None:
            marks[mark] = origin + found
    return marks


def swap_phases(marks: Mapping[str, float]) -> dict[str, float | None]:
    """Each phase's duration (PHASES' order) from the marks of one swap; None for a phase whose mark is
    missing. Needs the START mark."""
    cursor = marks[START]
    durations: dict[str, float | None] = {}
    for phase, mark in PHASES:
        end = marks.get(mark)
        if end is None:
            durations[phase] = None
            continue
        durations[phase] = max(0.0, end - cursor)
        cursor = max(cursor, end)
    return durations
