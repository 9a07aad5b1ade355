"""What a cluster node publishes of itself (docs/cluster.md): ModelManager.board() and its long-poll watch(version),
in-process over fake children and a fake clock. A watcher must see every step placement reads (a request queued,
a grant, a release, a load's status change) as it happens, woken by the step itself, never by polling; and an
idle node must still answer within the heartbeat, with the same board, so that the ingress hears it is there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from modelyard.config.options import OptionTable
from modelyard.engine.command import Engine
from modelyard.manager import WATCH_HEARTBEAT_S, ModelManager
from modelyard.memory import GgufCache
from modelyard.scheduler import Board, Limits, Status
from tests.fakes import FakeChild, FakeClock, FakeFleet, FakeReply, StaticSource, app_client, catalog, settle


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[ModelManager, FakeFleet]]:
    clock = FakeClock()
    fleet = FakeFleet(clock)
    source = StaticSource(catalog("a", "b"))
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                           limits=Limits(max_models=1, max_wait=1000.0), clock=clock, gguf_cache=GgufCache(tmp_path),
                           child_factory=fleet)
    await manager.start()
    yield manager, fleet
    await manager.close()


class Watcher:
    """One outstanding watch at a time, as the ingress keeps per agent."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.version = -1
        self.answers = 0

    async def next(self) -> Board:
        self.version, board = await self.manager.watch(self.version)
        self.answers += 1
        return board

    async def until(self, holds: Callable[[Board], bool]) -> Board:
        """The first answer whose board `holds`; each answer is one scheduler step (or several, coalesced)."""
        while not holds(board := await self.next()):
            pass
        return board

    def pending(self) -> asyncio.Task[Board]:
        return asyncio.get_running_loop().create_task(self.next())


async def test_a_watcher_sees_a_queue_a_grant_a_release_and_status_changes(
        node: tuple[ModelManager, FakeFleet]) -> None:
    manager, fleet = node
    watcher = Watcher(manager)
    board = await watcher.next()  # a first watch answers at once with the board as it is
    assert board.models["a"].status == Status.UNLOADED and board.models["a"].queued == 0
    assert board.limits.max_models == 1

    waiting = watcher.pending()
    await settle()
    assert not waiting.done()  # nothing happened: the watch waits
    lease = asyncio.get_running_loop().create_task(manager.acquire("a"))
    await waiting  # woken by a step: the request's, or one before it (the manager estimating memory)
    board = await watcher.until(lambda b: b.models["a"].queued == 1)
    assert board.models["a"].status == Status.LOADING

    child = await fleet.child("a")
    child.become_ready()
    board = await watcher.until(lambda b: b.models["a"].status == Status.LOADED)
    assert board.models["a"].in_flight == 1 and board.models["a"].queued == 0  # the grant, in the same step
    held = await lease

    other = asyncio.get_running_loop().create_task(manager.acquire("b"))  # no slot: it waits for a's
    board = await watcher.until(lambda b: b.models["b"].queued == 1)
    assert board.models["b"].status == Status.UNLOADED and [w.model for w in board.queue] == ["b"]

    manager.release(held)  # the release frees a, which is evicted for b
    board = await watcher.until(lambda b: b.models["a"].in_flight == 0)
    assert board.models["a"].status == Status.STOPPING  # in the release's own step
    board = await watcher.until(lambda b: b.models["b"].status == Status.LOADING)
    (await fleet.child("b")).become_ready()
    board = await watcher.until(lambda b: b.models["b"].status == Status.LOADED)
    assert board.models["a"].status == Status.UNLOADED and board.models["b"].in_flight == 1
    manager.release(await other)
    assert manager.board() == (await watcher.next())  # the copy the watcher got is the board as it is now


async def test_steps_while_the_watcher_is_away_coalesce_into_one_answer(node: tuple[ModelManager, FakeFleet]) -> None:
    manager, fleet = node
    watcher = Watcher(manager)
    await watcher.next()
    tasks = [asyncio.get_running_loop().create_task(manager.acquire("a")) for _ in range(3)]
    await settle()
    child = await fleet.child("a")
    child.become_ready()
    leases = await asyncio.gather(*tasks)
    before = watcher.answers
    board = await watcher.next()  # four steps or more happened: one answer, the latest board, at once
    assert watcher.answers == before + 1
    assert board.models["a"].status == Status.LOADED and board.models["a"].in_flight == 3
    for lease in leases:
        manager.release(lease)
    board = await watcher.next()
    assert board.models["a"].in_flight == 0


async def test_an_idle_node_answers_after_the_heartbeat_with_the_same_board(
        node: tuple[ModelManager, FakeFleet]) -> None:
    manager, fleet = node
    watcher = Watcher(manager)
    board = await watcher.next()
    version = watcher.version
    waiting = watcher.pending()
    await settle()  # the watch is waiting, its heartbeat due in WATCH_HEARTBEAT_S by the manager's clock
    await fleet.clock.advance(WATCH_HEARTBEAT_S - 0.5)
    assert not waiting.done()
    await fleet.clock.advance(0.5)
    assert await waiting == board and watcher.version == version  # nothing changed: the same board and version
    # the caller sets the bound; a step before it answers at once, as ever
    short = asyncio.get_running_loop().create_task(manager.watch(version, heartbeat=0.25))
    await settle()
    await fleet.clock.advance(0.2)
    assert not short.done()
    await fleet.clock.advance(0.05)
    assert await short == (version, board)
    stepped = asyncio.get_running_loop().create_task(manager.watch(version, heartbeat=60.0))
    lease = asyncio.get_running_loop().create_task(manager.acquire("a"))
    newer, _ = await stepped
    assert newer > version
    (await fleet.child("a")).become_ready()
    manager.release(await lease)


def streaming(child: FakeChild, method: str, path: str, body: bytes | None) -> FakeReply:
    return FakeReply(child, headers={"Content-Type": "text/event-stream"})


async def test_a_request_through_the_app_is_seen_in_flight_until_its_stream_ends(
        node: tuple[ModelManager, FakeFleet]) -> None:
    manager, fleet = node
    fleet.prepare = lambda child: setattr(child, "handler", streaming)
    watcher = Watcher(manager)
    await watcher.next()
    client = await app_client(manager)
    try:
        body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        response = asyncio.get_running_loop().create_task(client.post("/v1/chat/completions", data=json.dumps(body)))
        child = await fleet.child("a")
        child.become_ready()
        board = await watcher.until(lambda b: b.models["a"].in_flight == 1)
        assert board.models["a"].status == Status.LOADED
        while not child.replies:
            await settle(1)
        child.replies[0].send(b'data: {"choices": []}\n\n')
        child.replies[0].send(b"data: [DONE]\n\n")
        child.replies[0].finish()
        answer = await response
        assert "[DONE]" in await answer.text()
        board = await watcher.until(lambda b: b.models["a"].in_flight == 0)
        assert board.models["a"].status == Status.LOADED
    finally:
        await client.close()
