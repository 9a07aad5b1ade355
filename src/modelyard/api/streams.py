"""Resumable streams, routed as router mode b11434 routes them (server-models.cpp `router_stream_get`,
`router_streams_lookup`, `router_stream_delete`): a child keeps the output of each generation that carried an
`X-Conversation-Id` header in a session that outlives the client's connection (server-stream.cpp), and the
router remembers which model each conversation id went to, so that `GET /v1/stream?conv_id=&from=` (replay,
then live bytes), `POST /v1/streams/lookup` (which of these ids have a session) and `DELETE /v1/stream?conv_id=`
(the user's Stop) reach the one child that holds it.

As in router mode: an id that maps to no running model is 404 (503 while its model is still loading, so the
client retries); a stop is 204 whether or not anything was running, and a stop that comes while the request
waits for its model's load cancels that request; a request with a conversation id is not abandoned when its
client goes away (a page reload): the generation goes on into the child's session, here with the lease held
until the session is done, so the model is not unloaded or evicted under it. Unlike router mode: the map is
bounded (oldest ids forgotten first), a conversation is visible only to the API key that started it (and to
admin keys), and a lookup body that is not `{"conversation_ids": [strings]}` is a 400, not an empty list.

A generation that goes on without its client is a model request of its own: it gets an activity record (the
client's ended with "the client went away"), queued then running, with the child's status and tokens when it
reads the answer itself, and an admin's cancel of it stops the child's session too (as a stop does), since
closing the connection to the child does not.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web

from modelyard.activity import Activity, Record, tokens_in_body
from modelyard.api import auth
from modelyard.api.activity import admins_cancel, cancel_message
from modelyard.api.body import read_json_object
from modelyard.api.context import CONTEXT
from modelyard.api.errors import error_response, from_model_error
from modelyard.api.json import dumps, json_response
from modelyard.children import Child, ChildError
from modelyard.errors import ErrorKind, ModelError
from modelyard.manager import Lease, ModelManager
from modelyard.proxy import forward
from modelyard.scheduler import Status
from modelyard.tasks import log_failure

log = logging.getLogger(__name__)

HEADER = "X-Conversation-Id"
MAX_CONVERSATIONS = 4096  # router mode never forgets one; a conversation id is small, but clients are many
CHILD_TIMEOUT_S = 2.0  # a lookup or stop sent to a child (router mode: 250 ms, too tight on a busy machine)
POLL_S = 0.5  # how often a held lease asks its child whether the session is done
_TAIL = 16384  # the end of an answer read without its client: where its usage and timings are


# --- the map: pure ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    model: str
    ticket: int
    key: auth.ApiKey | None  # who started it
    waiting: bool = True  # its request has not reached the child yet (it waits for a lease)


@dataclass
class Conversations:
    """Which model serves each conversation id, as router mode's conv_model_tracker: `remember` gives a ticket
    that stays `alive` until the id is forgotten (a stop) or remembered again (a newer request)."""

    limit: int = MAX_CONVERSATIONS
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    _tickets: int = 0

    def remember(self, conv_id: str, model: str, key: auth.ApiKey | None) -> int:
        self._tickets += 1
        self._entries.pop(conv_id, None)
        self._entries[conv_id] = _Entry(model, self._tickets, key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)
        return self._tickets

    def alive(self, conv_id: str, ticket: int) -> bool:
        entry = self._entries.get(conv_id)
        return entry is not None and entry.ticket == ticket

    def settled(self, conv_id: str, ticket: int) -> None:
        """Its request got its lease or its refusal: it no longer waits."""
        entry = self._entries.get(conv_id)
        if entry is not None and entry.ticket == ticket:
            self._entries[conv_id] = replace(entry, waiting=False)

    def waiting(self, conv_id: str) -> bool:
        entry = self._entries.get(conv_id)
        return entry is not None and entry.waiting

    def owner(self, conv_id: str, key: auth.ApiKey | None) -> str | None:
        """The model of a conversation this key may see."""
        entry = self._entries.get(conv_id)
        if entry is None or not _visible(entry, key):
            return None
        return entry.model

    def forget(self, conv_id: str, key: auth.ApiKey | None) -> None:
        entry = self._entries.get(conv_id)
        if entry is not None and _visible(entry, key):
            del self._entries[conv_id]

    def __len__(self) -> int:
        return len(self._entries)


def _visible(entry: _Entry, key: auth.ApiKey | None) -> bool:
    return key is None or entry.key == key or key.has(auth.Scope.ADMIN)


def group_by_model(conv_ids: Iterable[str], owner: Mapping[str, str | None]) -> dict[str, list[str]]:
    """Router mode's lookup plan: each id under the model that holds it, ids that map to none dropped."""
    groups: dict[str, list[str]] = {}
    for conv_id in conv_ids:
        model = owner.get(conv_id)
        if model is not None and conv_id not in groups.get(model, ()):
            groups.setdefault(model, []).append(conv_id)
    return groups


# --- a request that carries a conversation id (api/openai.py) --------------------------------------------------

@dataclass
class State:
    """The app's conversations and the background tasks that finish generations whose client left."""

    conversations: Conversations = field(default_factory=Conversations)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    activity: Activity = field(default_factory=Activity)  # the app's: the records of generations without client

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(log_failure)


STATE = web.AppKey("modelyard.streams", State)


@dataclass(frozen=True)
class Session:
    """One request's claim on its conversation id, and what a record of its generation without the client
    shows of the request (its client, its route as registered, its method)."""

    conv_id: str
    ticket: int
    state: State
    client: str | None = None
    route: str = ""
    method: str = "POST"

    def alive(self) -> bool:
        return self.state.conversations.alive(self.conv_id, self.ticket)

    def settled(self) -> None:
        self.state.conversations.settled(self.conv_id, self.ticket)


def begin(request: web.Request, conv_id: str, model: str) -> Session:
    """Remember the model of the request's conversation, before its load wait: a stop during the wait then
    cancels it."""
    state = request.app[STATE]
    resource = request.match_info.route.resource
    return Session(conv_id, state.conversations.remember(conv_id, model, request[auth.API_KEY]), state,
                   request.remote, resource.canonical if resource is not None else request.path, request.method)


STOPPED = "request cancelled by a stop while the model was loading"


def _record(session: Session) -> Record:
    """The record of a generation that goes on without its client (this task is the one an admin cancels)."""
    return session.state.activity.begin(session.client, session.route, session.method, asyncio.current_task())


async def _stop_session(session: Session, child: Child | None) -> None:
    """An admin cancelled a generation that has no client: stop the child's session, as a stop does."""
    session.state.conversations.forget(session.conv_id, None)
    if child is not None:
        await _child_stop(child, session.conv_id)


async def _child_stop(child: Child, conv_id: str) -> None:
    """Ask the child to stop and drop its session of `conv_id`; one that does not answer in time is left to
    its own end (a stop is best effort, as router mode's is)."""
    try:
        async with asyncio.timeout(CHILD_TIMEOUT_S), child.request(
                "DELETE", "/v1/stream", params={"conv_id": conv_id}) as reply:
            await reply.read()
    except (ChildError, TimeoutError) as exc:
        log.debug("could not stop conversation %s on its child: %r", conv_id, exc)


def finish_detached(manager: ModelManager, session: Session, model: str, autoload: bool,
                    keep_alive: float | None, stream: bool, method: str, path: str, body: bytes | None,
                    headers: Mapping[str, str], query: Mapping[str, str]) -> None:
    """The client left while its request waited for the model: load it anyway and send the request, reading
    the answer to its end, so that the child's session has the generation when the client comes back."""

    async def run() -> None:
        activity = session.state.activity
        record = _record(session)
        activity.queued(record, model, stream)
        lease: Lease | None = None
        try:
            try:
                lease = await manager.acquire(model, autoload, keep_alive)
            except ModelError as error:
                log.info("conversation %s: not sent after its client left: %s", session.conv_id[:80],
                         error.message)
                activity.end(record, error.kind.status, error.message)
                return
            finally:
                session.settled()
            activity.running(record, lease.model)
            if not session.alive():  # stopped while it waited
                activity.end(record, ErrorKind.BAD_REQUEST.status, STOPPED)
                return
            status, tail = await _read_through(lease.child, record, activity, method, path, body, headers, query)
            if status == 200:
                record.count(tokens_in_body(tail))
            activity.end(record, status, None if status < 400 else tail[-2000:].decode(errors="replace"))
        except ChildError as exc:
            log.info("conversation %s: generation without its client failed: %s", session.conv_id[:80], exc)
            activity.end(record, ErrorKind.UPSTREAM.status, str(exc))
        except asyncio.CancelledError:
            if not admins_cancel(record):
                activity.end(record, None, "modelyard is shutting down")
                raise
            await _stop_session(session, lease.child if lease is not None else None)
            activity.end(record, ErrorKind.CANCELLED.status, cancel_message(record.id))
        finally:
            if lease is not None:
                manager.release(lease)

    session.state.spawn(run())


async def _read_through(child: Child, record: Record, activity: Activity, method: str, path: str,
                        body: bytes | None, headers: Mapping[str, str], query: Mapping[str, str]
                        ) -> tuple[int, bytes]:
    """Send the request and read its answer to the end: its status and its last bytes."""
    tail = b""
    async with child.request(method, path, body=body, headers=headers, params=query) as reply:
        async for chunk in reply.chunks():
            activity.first_byte(record)
            tail = (tail + chunk)[-_TAIL:]
        return reply.status, tail


def hold_until_done(manager: ModelManager, session: Session, lease: Lease) -> None:
    """The client left mid-generation: the child goes on into its session; keep the lease until it is done.
    Its record runs until then: 200 once the session is done (the child keeps the answer; its tokens are not
    read here)."""

    async def run() -> None:
        activity = session.state.activity
        record = _record(session)
        activity.queued(record, lease.model, False)
        activity.running(record, lease.model)
        try:
            while True:
                found = await _child_lookup(lease.child, [session.conv_id])
                if found is None:
                    activity.end(record, None, "the model's server could not say whether the generation is done")
                    return
                if not any(s.get("conversation_id") == session.conv_id and not s.get("is_done") for s in found):
                    activity.end(record, 200)
                    return
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:
            if not admins_cancel(record):
                activity.end(record, None, "modelyard is shutting down")
                raise
            await _stop_session(session, lease.child)
            activity.end(record, ErrorKind.CANCELLED.status, cancel_message(record.id))
        finally:
            manager.release(lease)

    session.state.spawn(run())


# --- the routes -----------------------------------------------------------------------------------------------

def _conv_id(request: web.Request) -> str | web.Response:
    conv_id = request.query.get("conv_id", "")
    if not conv_id:
        return error_response(ErrorKind.BAD_REQUEST, "conv_id is missing; add ?conv_id=<the X-Conversation-Id "
                              "header of the chat request> to the URL", param="conv_id")
    return conv_id


def _not_found(conv_id: str) -> web.Response:
    return error_response(ErrorKind.NOT_FOUND, f"stream not found or expired: no running model holds "
                          f"conversation '{conv_id[:200]}'")


async def _running_lease(request: web.Request, model: str, waiting: bool = False) -> Lease | web.Response | None:
    """A lease on the conversation's model if it is loaded, without loading it; None if it is gone. While it
    loads, or while the conversation's request waits for it (`waiting`), a 503: retry later."""
    manager = request.app[CONTEXT].manager
    try:
        config = manager.resolve(model)
        auth.require_model(request, config)
        status = manager.status_of(model)
        if status == Status.LOADING or (waiting and status != Status.LOADED):
            return error_response(ErrorKind.LOADING, f"model '{model}', which holds this stream, is loading; "
                                  "retry later", retry_after=1)
        if status != Status.LOADED:
            return None
        return await manager.acquire(model, autoload=False)
    except ModelError as error:
        if error.kind in (ErrorKind.FORBIDDEN, ErrorKind.BUSY):
            return from_model_error(error)
        return None  # removed by a reload, or unloaded between the two looks


async def get_stream(request: web.Request) -> web.StreamResponse:
    conv_id = _conv_id(request)
    if isinstance(conv_id, web.Response):
        return conv_id
    conversations = request.app[STATE].conversations
    model = conversations.owner(conv_id, request[auth.API_KEY])
    lease = None if model is None else await _running_lease(request, model, conversations.waiting(conv_id))
    if lease is None:
        return _not_found(conv_id)
    if isinstance(lease, web.Response):
        return lease
    query = {"conv_id": conv_id}
    if "from" in request.query:
        query["from"] = request.query["from"]
    try:
        return await forward(request, lease.child, b"", query)
    finally:
        request.app[CONTEXT].manager.release(lease)


async def lookup_streams(request: web.Request) -> web.Response:
    try:
        payload = await read_json_object(request, ' like {"conversation_ids": ["<id>", ...]}')
    except ModelError as error:
        return from_model_error(error)
    ids = payload.get("conversation_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return error_response(ErrorKind.BAD_REQUEST, '"conversation_ids" must be an array of strings (the '
                              "X-Conversation-Id headers of chat requests)", param="conversation_ids")
    conversations, key = request.app[STATE].conversations, request[auth.API_KEY]
    groups = group_by_model(ids, {i: conversations.owner(i, key) for i in ids if i})
    answers = await asyncio.gather(*(_lookup_in(request, model, group) for model, group in groups.items()))
    return json_response([entry for answer in answers for entry in answer])


async def _lookup_in(request: web.Request, model: str, conv_ids: list[str]) -> list[dict[str, Any]]:
    lease = await _running_lease(request, model)
    if not isinstance(lease, Lease):
        return []
    try:
        return await _child_lookup(lease.child, conv_ids) or []
    finally:
        request.app[CONTEXT].manager.release(lease)


async def _child_lookup(child: Child, conv_ids: list[str]) -> list[dict[str, Any]] | None:
    """The child's sessions among `conv_ids`; None if it could not say."""
    try:
        async with asyncio.timeout(CHILD_TIMEOUT_S), child.request(
                "POST", "/v1/streams/lookup", body=dumps({"conversation_ids": conv_ids}),
                headers={"Content-Type": "application/json"}) as reply:
            body = await reply.read()
            if reply.status != 200:
                return None
        found = orjson.loads(body)
    except (ChildError, TimeoutError, orjson.JSONDecodeError):
        return None
    return [entry for entry in found if isinstance(entry, dict)] if isinstance(found, list) else None


async def delete_stream(request: web.Request) -> web.Response:
    conv_id = _conv_id(request)
    if isinstance(conv_id, web.Response):
        return conv_id
    conversations, key = request.app[STATE].conversations, request[auth.API_KEY]
    model = conversations.owner(conv_id, key)
    lease = None if model is None else await _running_lease(request, model)
    if isinstance(lease, Lease):
        try:
            await _child_stop(lease.child, conv_id)
        finally:
            request.app[CONTEXT].manager.release(lease)
    elif isinstance(lease, web.Response) and lease.status == ErrorKind.FORBIDDEN.status:
        return lease
    conversations.forget(conv_id, key)  # a request still waiting for its model's load is then cancelled
    return web.Response(status=204, content_type="application/json")


def add_routes(app: web.Application) -> None:
    state = State(activity=app[CONTEXT].activity)
    app[STATE] = state

    async def cancel_tasks(app: web.Application) -> None:
        for task in list(state.tasks):
            task.cancel()

    app.on_cleanup.append(cancel_tasks)
    app.router.add_get("/v1/stream", get_stream)
    app.router.add_delete("/v1/stream", delete_stream)
    app.router.add_post("/v1/streams/lookup", lookup_streams)
