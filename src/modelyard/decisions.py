"""Why each waiting request still waits: a pure function of a frozen copy of the scheduler's state (its
`board()`) and the time, for GET /decisions' `waiting` list and the loading messages of a streamed chat.

For each request in the queue it says where it stands in its model's queue, what stands in its way (the model
is loading; its previous instance is still stopping; the models that hold the slots or the memory it needs,
busy, loading, pinned or wanted by their own waiters, and which limit they fill: --models-max,
--memory-budget, --gpu-memory-budget; or another model first in line for that room) and, when busy models
are in its way, how long until --max-wait lets it drain them; behind a model that came later, the rule that
put that one first (its priority, or more requests waiting). It reads the same rules as the scheduler
(`overages` for the budgets, `load_order` for who gets room first), so an explanation never disagrees with the
decision it explains. The decisions themselves (why a model was loaded, evicted, killed...) are explained
where they are taken, in the scheduler (`Decided`).
"""

from __future__ import annotations

from dataclasses import dataclass

from modelyard.scheduler import (
    RUNNING,
    Board,
    InLine,
    ModelSnapshot,
    Overage,
    Room,
    Status,
    held,
    human_duration,
    load_order,
    overages,
)


@dataclass(frozen=True)
class Waiting:
    request_id: int
    model: str
    position: int  # 1 = the next of its model's requests to be served
    waited: float  # seconds
    reason: str
    blocked_by: tuple[str, ...]  # the models in its way
    gives_up_in: float | None  # seconds until --max-wait lets it drain the busy models in its way; None: no such wait


def explain_waiting(board: Board, now: float) -> list[Waiting]:
    """One explanation per waiting request, in queue order."""
    order = load_order(board.queue, lambda n: _needs_load(board, n), lambda n: board.models[n].priority, now,
                       board.limits.max_wait)
    oldest: dict[str, float] = {}
    positions: dict[str, int] = {}
    out = []
    for waiter in board.queue:
        oldest.setdefault(waiter.model, waiter.since)
        positions[waiter.model] = position = positions.get(waiter.model, 0) + 1
        model = board.models.get(waiter.model)
        if model is None:  # the core never keeps a waiter for a model it does not know; nothing to explain
            continue
        reason, blocked, gives_up = _obstacles(board, model, order, oldest[waiter.model], now)
        prefix = f"#{position} in the queue of '{model.name}': " if position > 1 else ""
        out.append(Waiting(waiter.request_id, waiter.model, position, max(0.0, now - waiter.since),
                           prefix + reason, blocked, gives_up))
    return out


def _needs_load(board: Board, name: str) -> bool:
    return board.models[name].status in (Status.UNLOADED, Status.FAILED)


def _obstacles(board: Board, model: ModelSnapshot, order: list[InLine], oldest: float, now: float
               ) -> tuple[str, tuple[str, ...], float | None]:
    name = model.name
    if model.status == Status.LOADING:
        return f"waiting for '{name}' to load (loading for {human_duration(now - model.since)})", (), None
    if model.status == Status.LOADED:
        return f"'{name}' is loaded: being served", (), None
    if model.status == Status.STOPPING:
        why = f" ({model.stopping_reason})" if model.stopping_reason else ""
        busy = f", finishing {model.in_flight} request(s)" if model.in_flight else ""
        return (f"waiting for the previous instance of '{name}' to stop{why}{busy}; it loads again then",
                (name,), None)
    names = [line.model for line in order]
    ahead = order[:names.index(name)] if name in names else []
    if ahead:
        first, mine = ahead[0], order[names.index(name)]
        why = ""
        if first.since > mine.since and not first.overdue:  # younger, but first: the rule that put it there
            why = (" (higher priority)" if board.models[first.model].priority > model.priority
                   else f" ({first.waiting} requests waiting against {mine.waiting})")
        return (f"waiting behind '{first.model}', first in line for room to load{why}",
                tuple(line.model for line in ahead), None)
    return _room_obstacles(board, model, oldest, now)


def _room_obstacles(board: Board, model: ModelSnapshot, oldest: float, now: float
                    ) -> tuple[str, tuple[str, ...], float | None]:
    """What holds the room that `model` (first in line) needs, and which limits that room fills."""
    others = [m for m in board.models.values() if m.status in RUNNING and m.name != model.name]
    need = sum((held(m.status, m.room, model.room, board.limits) for m in others), Room()) + model.room
    limits = overages(need, board.limits)
    if not limits:
        return f"about to load '{model.name}'", (), None
    blockers = [m for m in others if m.status != Status.LOADED or m.in_flight or m.pinned or m.queued]
    blockers = blockers or others  # idle ones too small to make room together: they are in its way as well
    busy = [m for m in blockers if m.status == Status.LOADED and m.in_flight and not m.pinned and not m.queued]
    gives_up = max(0.0, oldest + board.limits.max_wait - now) if busy else None
    reason = f"waiting for {', '.join(_describe(m) for m in blockers)} ({'; '.join(_limit(o) for o in limits)})"
    if gives_up is not None:
        reason += (f"; drains them in {human_duration(gives_up)} (--max-wait)" if gives_up > 0
                   else "; --max-wait has passed: they are being drained")
    return reason, tuple(m.name for m in blockers), gives_up


def _describe(m: ModelSnapshot) -> str:
    if m.status == Status.LOADING:
        return f"'{m.name}' to finish loading"
    if m.status == Status.STOPPING:
        busy = f" (finishing {m.in_flight} request(s))" if m.in_flight else ""
        return f"'{m.name}' to stop{busy}"
    if m.pinned:
        return f"'{m.name}' (pinned)"
    if m.in_flight:
        return f"'{m.name}' to finish {m.in_flight} request(s)"
    if m.queued:
        return f"'{m.name}' to serve its {m.queued} waiting request(s)"
    return f"'{m.name}' (idle)"


def _limit(over: Overage) -> str:
    if over.kind == "model slots":
        return f"{over.flag} {over.limit}"
    return f"{over.flag} {over.limit / 2**30:.2f} GiB, {over.need / 2**30:.2f} GiB needed"
