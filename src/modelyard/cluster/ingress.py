"""The cluster's ingress (docs/cluster.md, issue 13): its view of each node, and the requests it sends them.

Each node's agent publishes its state by long-poll: `watch(version)` answers with the node's `NodeState` once its
board has changed after `version` (cluster.node.watch_state). `Nodes.follow` keeps one watch outstanding per
node, so changes that come while the ingress is busy coalesce into its next answer and nothing is polled. Between
two answers the ingress keeps its own book of the requests it sent each node and that have not finished (from
the send until the answer ends: `Nodes.booked`, which NodeChild holds), so that a burst placed from one view
sees its own first load; a request counts there only while the node's last publication does not show it yet
(placement.with_pending: the node counts each one it has received, waiting or in flight), so never twice.
`Nodes.place` is placement.place over those views.

A request goes to its node's app over HTTP with the cluster key (`NodeChild`, which proxy.forward drives like a
child: the client's own credentials were checked here and are not forwarded). While nothing of the answer has
started (the connection failed or was cut before the headers, or the node answered 503 shutting_down) it is sent
again where placement says once that node is avoided: each node is tried at most once. Once started, a cut raises
ChildError, which proxy.forward ends with an error event and [DONE] for SSE. A node whose connection fails, or
whose watch fails, is unreachable: placement skips it at once, without waiting for Ray's verdict (+14 s for the GCS,
measured), until a watch asked after that answers; an idle node's watch answers within its heartbeat
(ModelManager.watch), so a transient error costs a healthy node seconds, and a failed watch is asked again with a
bounded backoff unless its agent is dead (`follow`'s `dead`).

The transport is a seam: a watch is any awaitable call (a Ray actor's method, or a manager in-process) and a node's
address any HTTP base URL, so that all of this is tested in-process with real single-node apps as the nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from modelyard.children import ChildError, Reply
from modelyard.cluster.placement import NodeState, Refusal, Send, place, with_pending
from modelyard.errors import ErrorKind

log = logging.getLogger(__name__)

Watch = Callable[[int], Awaitable[tuple[int, NodeState]]]
Sleep = Callable[[float], Awaitable[None]]

# A watch that failed is asked again after this, doubling up to the cap: a transient failure (Ray's
# ActorUnavailableError while a node is unreachable for a moment) must not end the following for good, and a
# node that stays unreachable must not be asked in a tight loop.
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 2.0


def _never_dead(exc: BaseException) -> bool:
    return False


@dataclass
class _Node:
    name: str
    base_url: str  # where its app listens, e.g. http://10.0.0.7:8080
    state: NodeState | None = None  # its last publication; None before the first
    version: int = -1
    pending: Counter[str] = field(default_factory=Counter)  # requests sent there and not finished, per model
    reachable: bool = True
    losses: int = 0  # how many times it was found unreachable: an answer to a watch asked before the last is stale


class Nodes:
    """The ingress's nodes: their views, placement over them, and the HTTP client that reaches their apps."""

    def __init__(self, key: str, session: aiohttp.ClientSession, *, sleep: Sleep = asyncio.sleep) -> None:
        """`sleep`: how a failed watch waits before it is asked again (a seam for the tests)."""
        self._key = key
        self._session = session
        self._sleep = sleep
        self._nodes: dict[str, _Node] = {}
        self._published = asyncio.Condition()  # notified on every watch answer (and every node lost)

    def add(self, name: str, base_url: str) -> None:
        self._nodes[name] = _Node(name, base_url.rstrip("/"))

    def views(self) -> list[NodeState]:
        """What placement sees of each node that has published: its state with the book applied (the requests
        sent there that it does not show yet)."""
        return [with_pending(n.state, n.pending) for n in self._nodes.values() if n.state is not None]

    def unreachable(self) -> frozenset[str]:
        return frozenset(n.name for n in self._nodes.values() if not n.reachable)

    def place(self, model: str, *, autoload: bool = True, avoid: frozenset[str] = frozenset()) -> Send | Refusal:
        """placement.place over the views, unreachable nodes avoided as if they had failed the request (so that
        a model they alone serve is an upstream error, not an unknown model)."""
        return place(self.views(), model, autoload=autoload, avoid=avoid | self.unreachable())

    async def follow(self, name: str, watch: Watch, *, dead: Callable[[BaseException], bool] = _never_dead) -> None:
        """Keep one watch outstanding on the node until the task is cancelled, or until a watch fails with an
        error that `dead` says the node never comes back from (the Ray caller: ActorDiedError; a new agent is a
        new follow). Any other failure makes the node unreachable, and its watch is asked again after a backoff
        (0.1 s, doubling to 2 s). An unreachable node is reachable again once a watch asked after it was lost
        answers, which an idle node's heartbeat does within seconds (ModelManager.watch); an answer to a watch
        asked before proves nothing about the node since. Run it as a background task per node
        (modelyard.tasks logs its failure)."""
        node = self._nodes[name]
        delay = _RETRY_FIRST_S
        while True:
            losses = node.losses
            try:
                version, state = await watch(node.version)
            except Exception as exc:  # a Ray actor error, a closed manager, a bug: logged once per loss
                if dead(exc):
                    await self._lose(node, f"its agent is dead, removed: {exc!r}", final=True)
                    self.remove(name)
                    return
                await self._lose(node, f"its watch failed, asked again after {delay:g} s: {exc!r}")
                await self._sleep(delay)
                delay = min(2 * delay, _RETRY_MAX_S)
                continue
            delay = _RETRY_FIRST_S
            node.version, node.state = version, state
            if not node.reachable and node.losses == losses:
                node.reachable = True
                log.info("node %s is reachable again", name)
            async with self._published:
                self._published.notify_all()

    def remove(self, name: str) -> None:
        """Forget a node whose agent is gone for good (its models are placed on the nodes left; a node that comes
        back has a new id and a new agent). Requests it is answering end as a cut would end them."""
        self._nodes.pop(name, None)

    async def until(self, holds: Callable[[list[NodeState]], bool]) -> list[NodeState]:
        """The views once `holds` is true of them (checked after each watch answer)."""
        async with self._published:
            await self._published.wait_for(lambda: holds(self.views()))
        return self.views()

    async def _lose(self, node: _Node, why: str, *, final: bool = False) -> None:
        """Take the node out of placement; said once per loss (and once more if it is `final`: its agent died)."""
        if node.reachable or final:
            log.warning("node %s is unreachable: %s", node.name, why)
        node.reachable = False
        node.losses += 1
        async with self._published:
            self._published.notify_all()

    @contextlib.contextmanager
    def booked(self, send: Send) -> Iterator[None]:
        """The request counts in its node's book while this is entered: from before it is sent until its answer
        has ended, or it failed to start (placement.with_pending applies those the node does not show yet)."""
        node = self._nodes.get(send.node)
        pending = node.pending if node is not None else Counter[str]()  # removed since it was placed
        pending[send.model] += 1
        try:
            yield
        finally:
            pending[send.model] -= 1
            if pending[send.model] <= 0:
                del pending[send.model]

    async def open(self, send: Send, method: str, path: str, body: bytes | AsyncIterable[bytes] | None,
                   headers: Mapping[str, str], params: Mapping[str, str] | None) -> aiohttp.ClientResponse | str:
        """Send the request to its node: the response once its answer has started, or why it has not (a
        connection failure, or a node that drains), for the retry. The caller books it (`booked`)."""
        node = self._nodes.get(send.node)
        if node is None:
            return f"node {send.node} has left the cluster"
        try:
            response = await self._session.request(method, node.base_url + path, params=params, data=body,
                                                   headers={**headers, "Authorization": f"Bearer {self._key}"},
                                                   allow_redirects=False)
        except aiohttp.ClientError as exc:
            await self._lose(node, f"{exc!r}")
            return f"node {node.name}: {exc or repr(exc)}"
        if response.status == ErrorKind.SHUTTING_DOWN.status and await _says(response, ErrorKind.SHUTTING_DOWN):
            response.release()
            return f"node {node.name} is shutting down"
        return response

    async def cut(self, name: str, exc: BaseException) -> ChildError:
        """The error of an answer from `name` that broke after its start (the node is unreachable until its
        watch answers again)."""
        node = self._nodes.get(name)
        if node is not None:
            await self._lose(node, f"{exc!r}")
        return ChildError(f"node {name} failed mid-answer: {exc or repr(exc)}")

    # --- the front's own calls to a node's app (cluster/front.py: listings, unloads, feeds) ---------------

    async def get_json(self, name: str, path: str) -> Any:
        async with self._session.get(self._nodes[name].base_url + path, headers=self._auth) as response:
            response.raise_for_status()
            return await response.json()

    async def get_text(self, name: str, path: str) -> str:
        async with self._session.get(self._nodes[name].base_url + path, headers=self._auth) as response:
            response.raise_for_status()
            return await response.text()

    async def post_json(self, name: str, path: str, payload: Any) -> Any:
        async with self._session.post(self._nodes[name].base_url + path, json=payload,
                                      headers=self._auth) as response:
            response.raise_for_status()
            return await response.json()

    @contextlib.asynccontextmanager
    async def events(self, name: str, path: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A node's SSE route, subscribed once this is entered (its answer has started, so every later event
        comes): its JSON `data:` records as they come, until the node ends the stream."""
        async with self._session.get(self._nodes[name].base_url + path, headers=self._auth,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
            response.raise_for_status()
            yield _records(response.content)

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}


async def _records(lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if line.startswith(b"data: "):
            with contextlib.suppress(ValueError):  # a record that is not JSON is not an event
                event = json.loads(line[6:])
                if isinstance(event, dict):
                    yield event


async def _says(response: aiohttp.ClientResponse, kind: ErrorKind) -> bool:
    """Whether an answer is the API's error envelope for `kind` (its body is read, and kept for the relay)."""
    try:
        error = json.loads(await response.read()).get("error", {})
    except (aiohttp.ClientError, ValueError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("code") == kind.code


class NodeReply:
    """A node's answer, as proxy.py relays a child's: a failure after its start is a ChildError."""

    def __init__(self, nodes: Nodes, node: str, response: aiohttp.ClientResponse) -> None:
        self._nodes = nodes
        self.node = node
        self._response = response
        self.status: int = response.status
        self.headers: Mapping[str, str] = response.headers
        self.content_length: int | None = response.content_length

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except aiohttp.ClientError as exc:
            raise await self._nodes.cut(self.node, exc) from exc

    def chunks(self) -> AsyncIterator[bytes]:
        return self._guarded(self._response.content.iter_any())

    def lines(self) -> AsyncIterator[bytes]:
        return self._guarded(self._response.content)

    async def _guarded(self, parts: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        try:
            async for part in parts:
                yield part
        except aiohttp.ClientError as exc:
            raise await self._nodes.cut(self.node, exc) from exc


class NodeChild:
    """The node a request was placed on, as proxy.forward drives a child (`request()`, the Child interface's):
    it sends the request there and, while nothing of the answer has started, to the next node placement picks
    with the failed ones avoided. A body streamed from the client cannot be sent twice: it is not retried.
    Where placement refuses the retry (every node failed it, or those left have full queues: QUEUE_FULL with
    its Retry-After), `request()` raises that refusal as a ModelError, which proxy.forward lets through to the
    route, to answer in its API's envelope (cluster.front's routes do); a node's own refusal is an answer,
    relayed as it came."""

    def __init__(self, nodes: Nodes, send: Send, *, autoload: bool = True) -> None:
        self._nodes = nodes
        self.send = send  # where it went last
        self._autoload = autoload
        self.tried: list[str] = []  # the nodes that failed it, in order

    @contextlib.asynccontextmanager
    async def request(self, method: str, path: str, *, body: bytes | AsyncIterable[bytes] | None = None,
                      headers: Mapping[str, str] | None = None,
                      params: Mapping[str, str] | None = None) -> AsyncIterator[Reply]:
        send: Send | Refusal = self.send
        while True:
            if isinstance(send, Refusal):  # no node left for the retry: the API's own refusal (kind, Retry-After)
                raise send.error()
            self.send = send
            with self._nodes.booked(send):
                opened = await self._nodes.open(send, method, path, body, headers or {}, params)
                if not isinstance(opened, str):
                    try:
                        yield NodeReply(self._nodes, send.node, opened)
                    finally:
                        opened.release()
                    return
            self.tried.append(send.node)
            if not (body is None or isinstance(body, bytes)):
                raise ChildError(f"{opened} (a streamed body is not sent twice)")
            log.info("%s %s for '%s' not started on %s, sent elsewhere: %s", method, path, send.model, send.node,
                     opened)
            send = self._nodes.place(send.model, autoload=self._autoload, avoid=frozenset(self.tried))
