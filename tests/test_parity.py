"""Parity with llama-server router mode b11434: the same llama-server binary runs in router mode and under
modelyard, over the same models directory (SmolLM2 as `smol` and `smol-b`, -c 2048, --models-max 1), and both
get the same requests: every route router mode serves (tools/server/server.cpp) with good and bad input, the
management API through a load, a swap and an unload, and /models/sse during them. Answers are compared by
status code, media type and shape (tests/shapes.py: field names and JSON types, not values); /models/sse by
each model's sequence of event names and data shapes.

Every difference must be explained: DELIBERATE lists modelyard's deliberate differences, each with its
reason; NOT_YET would list what work in progress is about to serve (its cases xfail, saying who adds it, and
fail once they match, so that the list only shrinks; it is empty: every route is served). Anything else fails.

Routers are started once per module: the main pair, a pair with the Vertex AI variables (`AIP_MODE`), a
pair with --sleep-idle-seconds 1, and a pair over a fake Hugging Face hub (tests/fake_hub.py, HF_ENDPOINT:
router mode's own downloader speaks plain HTTP to it) with a filled cache each and `-hf` on a preset
repository, for the cache's listing, the repository's presets, POST /models downloads with their
/models/sse events (finished, failed, cancelled), the downloads refused at once, and DELETE /models. Each
pair gets its requests at once, each router in order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import threading
import time
import wave
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelyard.bench.processes import (
    MODELYARD,
    ROUTER_MODE,
    RouterProcess,
    children_of,
    free_port,
    start_router,
    stop_all,
)
from modelyard.demo import SMOLLM2
from modelyard.engine.command import Endpoint
from tests.fake_hub import COMMIT, FakeHub, running
from tests.shapes import Shape, differences, shape

SMOL, SMOL_B = "smol", "smol-b"
ENGINE_ARGS = ["-c", "2048"]
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
TIMEOUT = 60.0


# --- what is compared ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    status: int
    media: str  # the Content-Type without its parameters
    body: Shape  # the JSON body's shape; "text" or "empty"; an event stream's data lines as an array


def answer_of(response: httpx.Response) -> Answer:
    media = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return Answer(response.status_code, media, body_shape(media, response.content))


def body_shape(media: str, content: bytes) -> Shape:
    if not content.strip():
        return "empty"
    if media == "text/event-stream":
        lines = [line[5:].strip() for line in content.decode(errors="replace").splitlines()
                 if line.startswith("data:")]
        return shape([_json_or_text(line) for line in lines])
    decoded = _json_or_text(content.decode(errors="replace"))
    return "text" if decoded == "text" else shape(decoded)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return "text"


def compare(router: Answer, modelyard: Answer) -> list[str]:
    """The differences of modelyard's answer from router mode's, as lines (see shapes.differences)."""
    found = [] if router.status == modelyard.status else [f"status {router.status} != {modelyard.status}"]
    if router.media != modelyard.media:
        found.append(f"content-type {router.media or 'none'} != {modelyard.media or 'none'}")
    return found + differences(router.body, modelyard.body)


@dataclass(frozen=True)
class Explained:
    """Differences that are known: `where` matches the case's name, `what` the difference (regular
    expressions, matched in full)."""

    where: str
    what: str
    why: str

    def covers(self, case: str, difference: str) -> bool:
        return re.fullmatch(self.where, case) is not None and re.fullmatch(self.what, difference) is not None


def _each(*fields: str) -> str:
    return "(" + "|".join(re.escape(f) for f in fields) + ")"


LISTING_EXTRAS = _each("path", "in_flight", "queued", "memory", "keep_alive", "expires_in", "idle_for",
                       "pinned", "priority", "placement")

DELIBERATE: tuple[Explained, ...] = (
    Explained(r".*", r"type \$(\.predictions\[\])?\.error\.code: number != string",
              "modelyard's errors are OpenAI's envelope: `code` names the error (model_not_found), the HTTP "
              "status says the rest; router mode repeats the status there as a number"),
    Explained(r".*", r"extra \$(\.predictions\[\])?\.error\.(param|code)",
              "OpenAI's error envelope has `param` and `code` (router mode's 403 for a disabled feature has no "
              "`code`)"),
    Explained(r".*: unknown model.*", r"status 400 != 404", "an unknown model is 404, as OpenAI and Ollama answer"),
    Explained(r"POST /models/(load|unload): (missing model|model not a string|body not an object)",
              r"status 404 != 400",
              "a body without a usable \"model\" is a bad request (400), not router mode's 404 File Not Found"),
    Explained(r"POST /models/load: already loaded.*", r"status 400 != 200",
              "a load is queued like a request: a model already loaded answers success (router mode: 400)"),
    Explained(r"POST /models/load: already loaded.*", r"(missing|extra) \$\.(error|success)",
              "a success answer instead of an error"),
    Explained(r"POST /(v1/)?embeddings?: good", r"status 501 != 400",
              "a model started without --embeddings is refused before it is loaded, with a 400 that names the "
              "preset key to set (router mode loads it and forwards the child's 501 \"start it with --embeddings\")"),
    Explained(r"POST /models/unload: all", r"status 400 != 200|(missing|extra) \$\.(error|success|unloaded)",
              "unload-all ({\"all\": true}) is modelyard's: router mode's unload_all() has no route (it runs "
              "only at shutdown), so it reads the body as a missing model"),
    Explained(r"GET /metrics\?model: missing model", r"status 400 != 200|content-type .*|type \$: object != text",
              "/metrics without ?model= is modelyard's own Prometheus metrics (router mode has none of its own: "
              "it wants a model to forward to); with one it is the child's, as in router mode"),
    Explained(r"GET /(v1/)?models.*", rf"extra \$\.data\[\]\.{LISTING_EXTRAS}",
              "modelyard's own fields (its path, requests in flight and queued, memory, keep-alive, pin, "
              "priority, its child's threads and CPUs)"),
    Explained(r"GET /models: one loaded", r"status\.args listen on port != socket",
              "modelyard's llama-server children listen on a Unix socket (`--host <dir>/<n>.sock`, no --port) in a "
              "directory only its user may enter: no other local user can connect, and the new connection every "
              "stream opens (llama-server closes it after a chunked answer) costs less than over loopback TCP; "
              "router mode's children listen on loopback ports"),
    Explained(r"GET /(v1/)?models.*", r"extra \$\.data\[\]\.status\.failed",
              "modelyard always says whether a model failed (router mode only when it did)"),
    Explained(r"GET /(v1/)?models.*", r"extra \$\.memory(\..*)?", "modelyard's memory budget and use"),
    Explained(r"GET /props", r"extra \$\.modelyard_version", "modelyard's version"),
    Explained(r"GET /no/such/route", r".*error.*", "modelyard's error envelope, with the method and path"),
    Explained(r"GET /( \(.*\)|index\.html)", r".*",
              "router mode serves llama.cpp's web UI only when its build embeds it, and this engine is built "
              "without (router mode's build fetches it from a hub bucket): it answers 404. modelyard serves the "
              "UI that `modelyard engine install` builds from tools/ui (test_webui.py drives it in Chromium), "
              "and to a client that is no browser Ollama's \"Ollama is running\""),
    Explained(r"DELETE /models: (unknown model|a model not from the cache|removed already)", r"status 500 != (404|400)",
              "a name it does not have (404) or a model it cannot remove (400, not from the Hugging Face cache) is "
              "the caller's error; router mode's exception wrapper answers both with 500"),
    Explained(r"POST /v1/streams/lookup: (no ids|malformed JSON)", r"status 200 != 400|type \$: array != object",
              "a lookup body that is not {\"conversation_ids\": [strings]} is a 400 that says so (router mode "
              "answers an empty list), see api/streams.py"),
    Explained(r"SSE .*", r"#\d+ .*: extra \$\.data\.reason", "why the transition happened (an eviction, an unload)"),
    Explained(r"POST /models: (no such repo|no such quant|a gated repo, no token)",
              r"status 200 != (404|403)|(missing|extra) \$\.(error|success)",
              "a download that cannot start is the caller's error at once, with what to fix (404 no such repo or "
              "quant, 403 a refused token); router mode answers success and its download child, finding no "
              "file, reports download_finished"),
    Explained(r"SSE download (org/missing-GGUF|org/tiny-GGUF:Q8_0|org/gated-GGUF|org/presets)", r"events .* != \[\]",
              "refused at once (above), so there is no download to report; router mode's child reports "
              "model_status downloading then download_finished although nothing was fetched"),
    Explained(r"POST /models: a preset repository", r"status 200 != 404|(missing|extra) \$\.(error|success)",
              "a repository whose preset.ini names other models has no model to download: the 404 says to serve "
              "it with `modelyard serve -hf org/repo`; router mode fetches its preset.ini, which nothing then "
              "reads, and lists nothing new"),
    Explained(r"POST /models: being downloaded", r"status 400 != 200|(missing|extra) \$\.(error|success)",
              "a second POST /models of a model being downloaded joins its download (so do `modelyard pull` "
              "and Ollama's /api/pull run twice), where router mode refuses it as existing"),
    Explained(r"SSE download .*", r"#\d+ download_failed: extra \$\.data",
              "download_failed says why ({\"error\": message}); router mode's has no data"),
)

# Statuses modelyard reports on /models/sse that router mode has not; left out before the sequences are
# compared. Router-mode clients (its web UI) take any status value.
MODELYARD_ONLY_STATUSES = {
    "stopping": "a model drains its requests before it is stopped (router mode goes straight to unloaded)",
}

# What work in progress will serve, with who adds it: a case it explains is an xfail that says so, and fails
# once it matches router mode (then remove the entry). Empty: everything router mode serves is served.
NOT_YET: tuple[Explained, ...] = ()  # e.g. Explained(r"POST /models: .*", r".*", "Hugging Face downloads, issue 11")


def judge(case: str, found: list[str]) -> None:
    """Fail on a difference nothing explains, and on a NOT_YET entry that no longer explains one; xfail
    (saying who adds it) on a difference that is not served yet."""
    unexplained = [d for d in found if not any(e.covers(case, d) for e in DELIBERATE)]
    pending = {e for d in unexplained for e in NOT_YET if e.covers(case, d)}
    wrong = [d for d in unexplained if not any(e.covers(case, d) for e in pending)]
    assert not wrong, f"{case}: modelyard differs from router mode:\n  " + "\n  ".join(wrong)
    landed = [e for e in NOT_YET if re.fullmatch(e.where, case) and e not in pending]
    assert not landed, f"{case} is served now: remove from NOT_YET " + "; ".join(e.where for e in landed)
    if pending:
        pytest.xfail(f"not yet served ({'; '.join(sorted({e.why for e in pending}))}): " + "; ".join(unexplained))


# --- the routers ---------------------------------------------------------------------------------------------

@dataclass
class Pair:
    """Router mode and modelyard started alike; `router` and `modelyard` are clients of each."""

    processes: list[RouterProcess]
    router: httpx.Client = field(init=False)
    modelyard: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        # A new connection per request: router mode was seen to close a kept-alive connection without an answer
        # under concurrent requests (httpx then fails the request it sent on it).
        self.router, self.modelyard = (httpx.Client(base_url=p.url, timeout=TIMEOUT,
                                                    limits=httpx.Limits(max_keepalive_connections=0))
                                       for p in self.processes)

    def both(self, send: Callable[[httpx.Client], Any]) -> tuple[Any, Any]:
        """`send` against both at once (each router's part runs in its own thread)."""
        with ThreadPoolExecutor(2) as pool:
            router, modelyard = pool.map(send, (self.router, self.modelyard))
        return router, modelyard

    def stop(self) -> None:
        modelyard = self.processes[1]
        self.router.close()
        self.modelyard.close()
        stop_all([p.proc for p in self.processes])
        assert not children_of(modelyard.pid), "modelyard's children outlived it"


def _environment(tmp: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The same environment for both: an empty Hugging Face cache (router mode lists what it finds there), and
    no network use."""
    hub = tmp / "hf-hub"
    hub.mkdir(exist_ok=True)
    return {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp / "hf-home"), "HF_HUB_OFFLINE": "1",
            **extra}


def _start_pair(binary: Path, models: Path, workdir: Path, args: tuple[str, ...] = (), aip: bool = False,
                env: Callable[[str], dict[str, str]] | None = None) -> Pair:
    """Both routers, started at once. `aip`: with Vertex AI's variables (AIP_MODE=PREDICTION); router mode
    then listens on AIP_HTTP_PORT, so each gets its own port there. `env(kind)`: each router's own environment
    instead of the shared offline one."""
    started = []
    for kind in (ROUTER_MODE, MODELYARD):
        port = free_port() if aip else 0
        extra = {"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": "/gcp/health"} if aip else {}
        started.append(start_router(kind, binary, ["--models-dir", str(models)], 1, workdir, [*ENGINE_ARGS, *args],
                                    env=env(kind) if env else _environment(workdir, extra), port=port))
    try:
        for process in started:
            process.wait_ready(30)
    except BaseException:
        stop_all([p.proc for p in started])
        raise
    return Pair(started)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path]) -> Path:
    directory = tmp_path_factory.mktemp("parity-models")
    for name in (SMOL, SMOL_B):
        (directory / f"{name}.gguf").symlink_to(demo_models[SMOLLM2])
    return directory


@pytest.fixture(scope="module")
def pair(llama_server: Path, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    started = _start_pair(llama_server, models, tmp_path_factory.mktemp("parity"))
    yield started
    started.stop()


# --- the management API and /models/sse through a load, a swap and an unload ------------------------------

class EventLog:
    """A /models/sse stream read in a thread until a message satisfies `until`: its messages, and waits for
    one (a blocked read cannot be interrupted from another thread, so the reader ends itself)."""

    def __init__(self, client: httpx.Client, until: Callable[[dict[str, Any]], bool]) -> None:
        self.messages: list[dict[str, Any]] = []
        self.media = ""
        self._until = until
        self._changed = threading.Condition()
        self._client = httpx.Client(base_url=client.base_url, timeout=httpx.Timeout(TIMEOUT, read=None))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        # Router mode sends the stream's headers with its first event, so the subscription is known to be
        # live once an event comes through: a reload (GET /models?reload=1) sends models_reload.
        self.wait_for(lambda m: m.get("event") == "models_reload",
                      nudge=lambda: client.get("/models", params={"reload": "1"}))

    def _read(self) -> None:
        try:
            with self._client.stream("GET", "/models/sse") as response:
                self.media = response.headers.get("content-type", "").split(";")[0]
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    message = json.loads(line[5:])
                    with self._changed:
                        self.messages.append(message)
                        self._changed.notify_all()
                    if self._until(message):
                        return
        finally:
            with self._changed:
                self._changed.notify_all()

    def wait_for(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 30,
                 nudge: Callable[[], object] | None = None) -> None:
        """Until a message satisfies `wanted`; `nudge` is called every 0.2 s meanwhile."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(wanted(m) for m in self.messages):
                assert self._thread.is_alive(), f"the event stream ended: {self.messages}"
                left = deadline - time.monotonic()
                assert left > 0, f"no such event in {timeout} s: {self.messages}"
                if nudge is not None:
                    self._changed.release()
                    try:
                        nudge()
                    finally:
                        self._changed.acquire()
                self._changed.wait(min(left, 0.2))

    def close(self) -> list[dict[str, Any]]:
        """The messages, once the reader has seen its last one."""
        self._thread.join(TIMEOUT)
        self._client.close()
        return self.messages


def status_of(client: httpx.Client, model: str) -> str:
    entry = next(e for e in client.get("/models").json()["data"] if e["id"] == model)
    return str(entry["status"]["value"])


def wait_status(client: httpx.Client, model: str, wanted: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (status := status_of(client, model)) != wanted:
        assert time.monotonic() < deadline, f"{model} is {status}, never {wanted}"
        time.sleep(0.05)


def status_event(model: str, status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("model") == model and (m.get("data") or {}).get("status") == status


BAD_BODIES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("missing model", {"json": {}}),
    ("unknown model", {"json": {"model": "nope"}}),
    ("model not a string", {"json": {"model": 5}}),
    ("malformed JSON", {"content": b'{"model": "smol",', "headers": {"Content-Type": "application/json"}}),
    ("body not an object", {"json": [{"model": SMOL}]}),
)


@dataclass
class Run:
    """What one router answered in a scripted run (by step label), and the /models/sse messages it sent."""

    answers: dict[str, Answer] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    event_media: str = ""
    seen: dict[str, Any] = field(default_factory=dict)  # values a step checks besides the shapes

    def ask(self, client: httpx.Client, label: str, method: str, path: str, **request: Any) -> httpx.Response:
        response = client.request(method, path, **request)
        self.answers[label] = answer_of(response)
        return response


LISTENS = "listens on"  # Run.seen: what the loaded model's status.args say its child listens on


def lifecycle(client: httpx.Client) -> Run:
    """Listings with nothing loaded, bad loads and unloads, a load, a swap (--models-max 1), an unload."""
    run = Run()
    feed = EventLog(client, until=status_event(SMOL_B, "unloaded"))
    run.ask(client, "GET /models?reload=1", "GET", "/models", params={"reload": "1"})
    for path in ("/models", "/v1/models", "/props", "/health", "/v1/health"):
        run.ask(client, f"GET {path}", "GET", path)
    for route in ("load", "unload"):
        for label, request in BAD_BODIES:
            run.ask(client, f"POST /models/{route}: {label}", "POST", f"/models/{route}", **request)
    run.ask(client, "POST /models/unload: not running", "POST", "/models/unload", json={"model": SMOL})
    run.ask(client, "POST /models/load: good", "POST", "/models/load", json={"model": SMOL})
    wait_status(client, SMOL, "loaded")
    run.ask(client, "POST /models/load: already loaded", "POST", "/models/load", json={"model": SMOL})
    listed = run.ask(client, "GET /models: one loaded", "GET", "/models").json()["data"]
    endpoint = Endpoint.of_args(next(e for e in listed if e["id"] == SMOL)["status"]["args"])
    run.seen[LISTENS] = "none" if endpoint is None else "socket" if endpoint.socket is not None else "port"
    run.ask(client, "GET /v1/models: one loaded", "GET", "/v1/models")
    run.ask(client, "POST /models/load: another, a swap", "POST", "/models/load", json={"model": SMOL_B})
    wait_status(client, SMOL_B, "loaded")
    wait_status(client, SMOL, "unloaded")
    run.ask(client, "POST /models/unload: good", "POST", "/models/unload", json={"model": SMOL_B})
    wait_status(client, SMOL_B, "unloaded")
    run.ask(client, "POST /models/unload: all", "POST", "/models/unload", json={"all": True})
    feed.wait_for(status_event(SMOL_B, "unloaded"))
    run.event_media = feed.media
    run.events = feed.close()
    return run


LIFECYCLE_STEPS = (
    "GET /models?reload=1", "GET /models", "GET /v1/models", "GET /props", "GET /health", "GET /v1/health",
    *(f"POST /models/{route}: {label}" for route in ("load", "unload") for label, _ in BAD_BODIES),
    "POST /models/unload: not running", "POST /models/load: good", "POST /models/load: already loaded",
    "GET /models: one loaded", "GET /v1/models: one loaded", "POST /models/load: another, a swap",
    "POST /models/unload: good", "POST /models/unload: all",
)


@pytest.fixture(scope="module")
def lifecycle_runs(pair: Pair) -> tuple[Run, Run]:
    """The scripted run on both routers at once; first of the module's uses of the main pair, so that both
    start from nothing loaded."""
    router, modelyard = pair.both(lifecycle)
    assert list(router.answers) == list(modelyard.answers) == list(LIFECYCLE_STEPS)
    return router, modelyard


@pytest.mark.parametrize("step", LIFECYCLE_STEPS)
def test_management(step: str, lifecycle_runs: tuple[Run, Run]) -> None:
    router, modelyard = lifecycle_runs
    judge(step, compare(router.answers[step], modelyard.answers[step]))


def test_where_a_loaded_model_s_child_listens(lifecycle_runs: tuple[Run, Run]) -> None:
    """What the loaded model's status.args say its child listens on (a port or a Unix socket)."""
    router, modelyard = lifecycle_runs
    assert router.seen[LISTENS] == "port"  # router mode's, as /models lists it
    found = [f"status.args listen on {router.seen[LISTENS]} != {modelyard.seen[LISTENS]}"]
    judge("GET /models: one loaded", found if router.seen[LISTENS] != modelyard.seen[LISTENS] else [])


def event_sequence(messages: list[dict[str, Any]], model: str, modelyard: bool) -> list[tuple[str, Shape]]:
    """One model's /models/sse messages as (event and status, shape), repeats in a row counted once (how
    many progress reports a load sends depends on timing), modelyard's own statuses left out."""
    sequence: list[tuple[str, Shape]] = []
    for message in messages:
        data = message.get("data")
        status = data.get("status", "") if isinstance(data, dict) else ""
        if message.get("model") != model or (modelyard and status in MODELYARD_ONLY_STATUSES):
            continue
        item = (f"{message.get('event')} {status}".strip(), shape(message))
        if not sequence or sequence[-1] != item:
            sequence.append(item)
    return sequence


def compare_events(router: list[dict[str, Any]], modelyard: list[dict[str, Any]], model: str) -> list[str]:
    ours, theirs = event_sequence(modelyard, model, True), event_sequence(router, model, False)
    if [name for name, _ in ours] != [name for name, _ in theirs]:
        return [f"events {[n for n, _ in theirs]} != {[n for n, _ in ours]}"]
    pairs = enumerate(zip(theirs, ours, strict=True))
    return [f"#{i} {name}: {difference}" for i, ((name, expected), (_, actual)) in pairs
            for difference in differences(expected, actual)]


@pytest.mark.parametrize("model", [SMOL, SMOL_B, "*"])
def test_models_sse(model: str, lifecycle_runs: tuple[Run, Run]) -> None:
    """The events of a load, a swap and an unload (and a reload's, model "*"), model by model."""
    router, modelyard = lifecycle_runs
    assert router.event_media == modelyard.event_media == "text/event-stream"
    judge(f"SSE {model}", compare_events(router.events, modelyard.events, model))


# --- every route, good and bad input -------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: Any = None  # sent as JSON
    raw: bytes | None = None  # sent as is, as application/json
    params: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] | None = None  # multipart/form-data fields, with a small WAV file as `file`
    headers: Mapping[str, str] = field(default_factory=dict)

    def send(self, client: httpx.Client) -> Answer:
        request: dict[str, Any] = {"params": self.params, "headers": dict(self.headers)}
        if self.form is not None:
            request.update(data=dict(self.form), files={"file": ("hi.wav", _wav(), "audio/wav")})
        elif self.raw is not None:
            request.update(content=self.raw)
            request["headers"]["Content-Type"] = "application/json"
        else:
            request.update(json=self.body)
        return answer_of(client.request(self.method, self.path, **request))


def _wav() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(16000)
        sound.writeframes(b"\0\0" * 1600)
    return out.getvalue()


# POST routes that router mode forwards to the child named by the body's "model", with a body the child takes.
BODY_ROUTES: dict[str, dict[str, Any]] = {
    "/completion": {"prompt": "Hi", "n_predict": 2},
    "/completions": {"prompt": "Hi", "n_predict": 2},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
    "/chat/completions": CHAT,
    "/v1/chat/completions": CHAT,
    "/v1/chat/completions/control": {"id": "nope", "action": "reasoning_end"},
    "/v1/responses": {"input": "Hi", "max_output_tokens": 2},
    "/responses": {"input": "Hi", "max_output_tokens": 2},
    "/v1/messages": CHAT,
    "/v1/messages/count_tokens": CHAT,
    "/infill": {"input_prefix": "def f(", "input_suffix": ")", "n_predict": 2},
    "/embedding": {"content": "Hi"},
    "/embeddings": {"content": "Hi"},
    "/v1/embeddings": {"input": "Hi"},
    "/rerank": {"query": "a", "documents": ["b"]},
    "/reranking": {"query": "a", "documents": ["b"]},
    "/v1/rerank": {"query": "a", "documents": ["b"]},
    "/v1/reranking": {"query": "a", "documents": ["b"]},
    "/v1/systemone": {"questions": []},
    "/tokenize": {"content": "Hi"},
    "/detokenize": {"tokens": [1, 2]},
    "/apply-template": {"messages": CHAT["messages"]},
    "/chat/completions/input_tokens": CHAT,
    "/v1/chat/completions/input_tokens": CHAT,
    "/responses/input_tokens": {"input": "Hi"},
    "/v1/responses/input_tokens": {"input": "Hi"},
    "/props": {},
    "/lora-adapters": {},
    "/slots/0": {},
}
# GET routes forwarded to the child named by ?model=.
QUERY_ROUTES = ("/metrics", "/props", "/lora-adapters", "/slots")


def route_cases() -> list[Case]:
    cases: list[Case] = []
    for path, good in BODY_ROUTES.items():
        cases += [
            Case(f"POST {path}: good", "POST", path, {"model": SMOL, **good}),
            Case(f"POST {path}: missing model", "POST", path, good),
            Case(f"POST {path}: unknown model", "POST", path, {"model": "nope", **good}),
            Case(f"POST {path}: model not a string", "POST", path, {**good, "model": 5}),
            Case(f"POST {path}: malformed JSON", "POST", path, raw=b'{"model": "smol",'),
            Case(f"POST {path}: body not an object", "POST", path, [good]),
        ]
    for path in QUERY_ROUTES:
        cases += [Case(f"GET {path}?model: good", "GET", path, params={"model": SMOL}),
                  Case(f"GET {path}?model: unknown model", "GET", path, params={"model": "nope"})]
        if path != "/props":  # without a model, /props is the router's own (compared in the lifecycle)
            cases.append(Case(f"GET {path}?model: missing model", "GET", path))
    for path in ("/v1/audio/transcriptions", "/audio/transcriptions"):
        cases += [Case(f"POST {path}: good", "POST", path, form={"model": SMOL}),
                  Case(f"POST {path}: missing model", "POST", path, form={}),
                  Case(f"POST {path}: unknown model", "POST", path, form={"model": "nope"}),
                  Case(f"POST {path}: unknown model, JSON body", "POST", path, {"model": "nope"})]
    cases += [
        Case("POST /v1/chat/completions: streamed", "POST", "/v1/chat/completions",
             {"model": SMOL, **CHAT, "stream": True}),
        Case("POST /v1/chat/completions?autoload=false: model not loaded", "POST", "/v1/chat/completions",
             {"model": SMOL_B, **CHAT}, params={"autoload": "false"}),
        Case("GET /v1/stream: no conversation", "GET", "/v1/stream"),
        Case("GET /v1/stream: unknown conversation", "GET", "/v1/stream", params={"conv_id": "nope"}),
        Case("DELETE /v1/stream: no conversation", "DELETE", "/v1/stream"),
        Case("DELETE /v1/stream: unknown conversation", "DELETE", "/v1/stream", params={"conv_id": "nope"}),
        Case("POST /v1/streams/lookup: no ids", "POST", "/v1/streams/lookup", {}),
        Case("POST /v1/streams/lookup: unknown ids", "POST", "/v1/streams/lookup", {"conversation_ids": ["nope"]}),
        Case("POST /v1/streams/lookup: malformed JSON", "POST", "/v1/streams/lookup", raw=b"{"),
        Case("GET /tools", "GET", "/tools"),
        Case("POST /tools", "POST", "/tools", {}),
        Case("GET /cors-proxy", "GET", "/cors-proxy", params={"url": "http://127.0.0.1:1/"}),
        Case("POST /cors-proxy", "POST", "/cors-proxy", {}),
        # no download is ever started: each of these is refused before router mode asks the hub
        Case("POST /models: missing model", "POST", "/models", {}),
        Case("POST /models: empty model", "POST", "/models", {"model": ""}),
        Case("POST /models: model not a string", "POST", "/models", {"model": 5}),
        Case("POST /models: malformed JSON", "POST", "/models", raw=b"{"),
        Case("DELETE /models: missing model", "DELETE", "/models"),
        Case("DELETE /models: unknown model", "DELETE", "/models", params={"model": "nope"}),
        Case("DELETE /models: a model not from the cache", "DELETE", "/models", params={"model": SMOL}),
        Case("GET /no/such/route", "GET", "/no/such/route"),
        Case("GET / (a browser)", "GET", "/", headers={"Accept": "text/html"}),
        Case("GET /index.html", "GET", "/index.html"),
        Case("GET / (not a browser)", "GET", "/"),
    ]
    return cases


ROUTE_CASES = route_cases()


@pytest.fixture(scope="module")
def route_answers(pair: Pair, lifecycle_runs: tuple[Run, Run]) -> dict[str, tuple[Answer, Answer]]:
    """Every route case sent to both routers at once, in order on each: one model's child answers concurrent
    generations 5 to 10 times slower here (2 cores) than the same requests one by one. After the scripted run,
    which needs nothing loaded; the first good case loads `smol`."""
    router, modelyard = pair.both(lambda client: [case.send(client) for case in ROUTE_CASES])
    return {case.name: answers for case, *answers in zip(ROUTE_CASES, router, modelyard, strict=True)}


@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c.name for c in ROUTE_CASES])
def test_route(case: Case, route_answers: dict[str, tuple[Answer, Answer]]) -> None:
    router, modelyard = route_answers[case.name]
    judge(case.name, compare(router, modelyard))


# --- Vertex AI (AIP_MODE=PREDICTION): the predict route and the health alias ----------------------------------

def _predict(name: str, instances: Any = None, raw: bytes | None = None, body: Any = None) -> Case:
    return Case(f"POST /predict: {name}", "POST", "/predict",
                body if body is not None else {"instances": instances}, raw=raw)


# No instance needs a child: under AIP_MODE router mode's children would inherit the variables and take
# AIP_HTTP_PORT themselves.
GCP_CASES = (
    Case("GET /gcp/health", "GET", "/gcp/health"),
    _predict("malformed JSON", raw=b"{"),
    _predict("body not an object", body=[1]),
    _predict("no instances", body={}),
    _predict("instances not an array", body={"instances": {}}),
    _predict("too many instances", [{"@requestFormat": "health"}] * 129),
    _predict("a health instance", [{"@requestFormat": "health"}]),
    _predict("an instance by path", [{"@requestFormat": "/health"}]),
    _predict("an unknown model", [{"@requestFormat": "chatCompletions", "model": "nope", **CHAT}]),
    _predict("an unknown format", [{"@requestFormat": "nope"}]),
    _predict("an instance without a format", [{}]),
    _predict("an instance not an object", [1]),
)


@pytest.fixture(scope="module")
def gcp_answers(llama_server: Path, models: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Answer, Answer]]]:
    gcp = _start_pair(llama_server, models, tmp_path_factory.mktemp("parity-gcp"), aip=True)
    try:
        router, modelyard = gcp.both(lambda client: [case.send(client) for case in GCP_CASES])
        yield {case.name: answers for case, *answers in zip(GCP_CASES, router, modelyard, strict=True)}
    finally:
        gcp.stop()


@pytest.mark.parametrize("case", GCP_CASES, ids=[c.name for c in GCP_CASES])
def test_vertex_ai_route(case: Case, gcp_answers: dict[str, tuple[Answer, Answer]]) -> None:
    router, modelyard = gcp_answers[case.name]
    judge(case.name, compare(router, modelyard))


# --- --sleep-idle-seconds on the router's command line --------------------------------------------------------

def sleep_and_wake(client: httpx.Client) -> Run:
    """A model loads, sleeps after 1 s idle, is listed sleeping, and a request wakes it."""
    run = Run()
    slept = threading.Event()

    def woke(message: dict[str, Any]) -> bool:  # loaded after it slept (called in order, from either thread)
        if status_event(SMOL, "sleeping")(message):
            slept.set()
        return slept.is_set() and status_event(SMOL, "loaded")(message)

    feed = EventLog(client, until=woke)
    run.ask(client, "POST /models/load: good", "POST", "/models/load", json={"model": SMOL})
    feed.wait_for(status_event(SMOL, "sleeping"))
    run.ask(client, "GET /models: sleeping", "GET", "/models")
    run.ask(client, "POST /models/load: already loaded, sleeping", "POST", "/models/load", json={"model": SMOL})
    run.ask(client, "POST /v1/chat/completions: wakes it", "POST", "/v1/chat/completions",
            json={"model": SMOL, **CHAT})
    feed.wait_for(woke)
    run.event_media = feed.media
    run.events = feed.close()
    return run


SLEEP_STEPS = ("POST /models/load: good", "GET /models: sleeping", "POST /models/load: already loaded, sleeping",
               "POST /v1/chat/completions: wakes it")


@pytest.fixture(scope="module")
def sleep_runs(llama_server: Path, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Run, Run]]:
    sleepy = _start_pair(llama_server, models, tmp_path_factory.mktemp("parity-sleep"),
                         ("--sleep-idle-seconds", "1"))
    try:
        router, modelyard = sleepy.both(sleep_and_wake)
        assert list(router.answers) == list(modelyard.answers) == list(SLEEP_STEPS)
        yield router, modelyard
    finally:
        sleepy.stop()


@pytest.mark.parametrize("step", SLEEP_STEPS)
def test_sleep_idle_seconds(step: str, sleep_runs: tuple[Run, Run]) -> None:
    router, modelyard = sleep_runs
    judge(f"{step} (--sleep-idle-seconds)", compare(router.answers[step], modelyard.answers[step]))


def test_sleep_idle_seconds_events(sleep_runs: tuple[Run, Run]) -> None:
    """loading, loaded, sleeping; then the wake: loading (with progress) and loaded again."""
    router, modelyard = sleep_runs
    assert [n for n, _ in event_sequence(router.events, SMOL, False)][-3:] == [
        "status_change sleeping", "status_change loading", "status_change loaded"]
    judge("SSE smol (--sleep-idle-seconds)", compare_events(router.events, modelyard.events, SMOL))


# --- Hugging Face: a filled cache's listing, POST /models downloads and their events, DELETE /models -----------

CACHED_REPO, SPLIT_REPO = "org/cached-GGUF", "org/split-GGUF"
TINY_REPO = "org/tiny-GGUF"
POSTED = f"{TINY_REPO}:q4_k_m"  # named as posted while it downloads, as the cache lists it after
TINY = f"{TINY_REPO}:Q4_K_M"
SLOW, BROKEN = "org/slow-GGUF:Q4_K_M", "org/broken-GGUF:Q4_K_M"
NOT_STARTED = {"no such repo": "org/missing-GGUF", "no such quant": f"{TINY_REPO}:Q8_0",
               "a gated repo, no token": "org/gated-GGUF", "a preset repository": "org/presets"}
# What each router's cache holds at its start (the same files, in a cache of its own): two quants and a
# projector, a split model, and a download in progress that has no snapshot link yet (listed by neither).
FILLED = {CACHED_REPO: ("cached-Q4_K_M.gguf", "cached-Q8_0.gguf", "mmproj-cached-F16.gguf", "README.md"),
          SPLIT_REPO: ("split-Q4_K_M-00001-of-00002.gguf", "split-Q4_K_M-00002-of-00002.gguf")}


def _gguf(size: int, salt: str) -> bytes:
    """A GGUF v3 header with no tensors and no metadata, then `size` bytes in all (`salt` makes each file's
    sha256 its own: the fake CDN finds objects by it)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + salt.encode()
    return head + os.urandom(max(0, size - len(head)))


def _fill_cache(cache: Path) -> None:
    """FILLED laid out as huggingface_hub and llama.cpp write the cache: blobs by sha256, snapshot links to
    them, refs/main; and a partial blob (`.incomplete`) with no link."""
    for repo, paths in FILLED.items():
        folder = cache / ("models--" + repo.replace("/", "--"))
        for path in paths:
            content = _gguf(4096, f"{repo}/{path}") if path.endswith(".gguf") else b"# a model card\n"
            blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(content)
            link = folder / "snapshots" / COMMIT / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
    partial = cache / "models--org--partial-GGUF"
    (partial / "blobs").mkdir(parents=True)
    (partial / "blobs" / f"{'0' * 64}.incomplete").write_bytes(b"GGUF")
    (partial / "refs").mkdir()
    (partial / "refs" / "main").write_text(COMMIT)


def _hub_environment(hub: FakeHub, workdir: Path) -> Callable[[str], dict[str, str]]:
    """Each router's environment: HF_ENDPOINT on the fake hub, its own filled cache, no token."""
    def environment(kind: str) -> dict[str, str]:
        home = workdir / kind.replace(" ", "-")
        _fill_cache(home / "hub")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "LLAMA_CACHE"))
                 and k != "MODEL_ENDPOINT"}
        return {**clean, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(home / "hub"), "HF_HOME": str(home)}
    return environment


def event_of(model: str, event: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("model") == model and m.get("event") == event


def _ended(model: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("model") == model and m.get("event") in ("download_finished", "download_failed")


def hub_downloads(client: httpx.Client) -> Run:
    """The filled cache listed; a download through POST /models (listed while it runs, then as the cache's
    entry); downloads that cannot start, one whose file is gone from the CDN, one cancelled by
    POST /models/unload; DELETE /models of the downloaded model and of a filled one."""
    run = Run()

    def listing(label: str, path: str = "/models") -> None:
        entries = run.ask(client, label, "GET", path).json()["data"]
        run.seen[label] = sorted((e["id"], e["status"]["value"], e["source"], e["can_remove"]) for e in entries)

    feed = EventLog(client, until=event_of(TINY, "model_remove"))
    listing("GET /models: a filled cache")
    listing("GET /v1/models: a filled cache", "/v1/models")
    run.ask(client, "POST /models: good", "POST", "/models", json={"model": POSTED})
    listing("GET /models: downloading")
    run.ask(client, "POST /models: being downloaded", "POST", "/models", json={"model": POSTED})
    feed.wait_for(_ended(POSTED))
    listing("GET /models: downloaded")
    run.ask(client, "POST /models: already downloaded", "POST", "/models", json={"model": TINY})
    for label, model in NOT_STARTED.items():
        if run.ask(client, f"POST /models: {label}", "POST", "/models", json={"model": model}).status_code == 200:
            feed.wait_for(_ended(model))  # router mode's child, finding nothing, says so at once
    run.ask(client, "POST /models: the file is gone from the CDN", "POST", "/models", json={"model": BROKEN})
    feed.wait_for(_ended(BROKEN))
    run.ask(client, "POST /models: to be cancelled", "POST", "/models", json={"model": SLOW})
    feed.wait_for(event_of(SLOW, "download_progress"))
    run.ask(client, "POST /models/unload: a download", "POST", "/models/unload", json={"model": SLOW})
    feed.wait_for(_ended(SLOW))
    listing("GET /models: after the failures")
    run.ask(client, "DELETE /models: a filled cache's model", "DELETE", "/models",
            params={"model": f"{CACHED_REPO}:Q8_0"})
    run.ask(client, "DELETE /models: downloaded", "DELETE", "/models", params={"model": TINY})
    feed.wait_for(event_of(TINY, "model_remove"))
    listing("GET /models: removed")
    run.ask(client, "DELETE /models: removed already", "DELETE", "/models", params={"model": TINY})
    run.event_media = feed.media
    run.events = feed.close()
    return run


HUB_STEPS = (
    "GET /models: a filled cache", "GET /v1/models: a filled cache", "POST /models: good", "GET /models: downloading",
    "POST /models: being downloaded", "GET /models: downloaded", "POST /models: already downloaded",
    *(f"POST /models: {label}" for label in NOT_STARTED), "POST /models: the file is gone from the CDN",
    "POST /models: to be cancelled", "POST /models/unload: a download", "GET /models: after the failures",
    "DELETE /models: a filled cache's model", "DELETE /models: downloaded", "GET /models: removed",
    "DELETE /models: removed already",
)


PRESETS_REPO = "org/presets"  # a preset repository: its preset.ini alone, served with -hf on the command line
REPO_PRESET = f"""[*]
temp = 0.5

[from-a-preset]
hf = {SPLIT_REPO}:Q4_K_M
"""


@pytest.fixture(scope="module")
def hub_runs(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Run, Run]]:
    """Both routers over the fake hub (tests/fake_hub.py; router mode's own downloader speaks plain HTTP to it),
    each with its own filled cache, over an empty models directory and the presets of PRESETS_REPO (`-hf`)."""
    workdir = tmp_path_factory.mktemp("parity-hub")
    (workdir / "models").mkdir()
    fake = FakeHub(pace=0.25)  # 3 MiB: 0.75 s, time to see it listed as downloading
    (workdir / "preset.ini").write_text(REPO_PRESET)
    fake.add(PRESETS_REPO, "preset.ini", workdir / "preset.ini", lfs=False)
    for repo, size in ((TINY_REPO, 3 * 2**20), ("org/slow-GGUF", 3 * 2**20), ("org/broken-GGUF", 4096),
                       ("org/gated-GGUF", 4096)):
        name = repo.split("/")[1].removesuffix("-GGUF")
        source = workdir / f"{name}-Q4_K_M.gguf"
        source.write_bytes(_gguf(size, repo))
        fake.add(repo, source.name, source)
    fake.gone.add(fake.repos["org/broken-GGUF"]["broken-Q4_K_M.gguf"].sha256)
    fake.gated["org/gated-GGUF"] = "hf_" + "a" * 34
    with running(fake):
        pair = _start_pair(llama_server, workdir / "models", workdir, ("-hf", PRESETS_REPO),
                           env=_hub_environment(fake, workdir))
        try:
            router, modelyard = pair.both(hub_downloads)
            assert list(router.answers) == list(modelyard.answers) == list(HUB_STEPS)
            yield router, modelyard
        finally:
            pair.stop()


@pytest.mark.parametrize("step", HUB_STEPS)
def test_hub_download(step: str, hub_runs: tuple[Run, Run]) -> None:
    router, modelyard = hub_runs
    judge(step, compare(router.answers[step], modelyard.answers[step]))


@pytest.mark.parametrize("step", [step for step in HUB_STEPS if step.startswith("GET")])
def test_hub_listing(step: str, hub_runs: tuple[Run, Run]) -> None:
    """The same models, each with the same status, source and can_remove: the filled cache's quants (not its
    projector, nor the partial download), the download in flight under the name posted, then the cache's own
    entry for it, and neither once removed."""
    router, modelyard = hub_runs
    assert router.seen[step] == modelyard.seen[step]


@pytest.mark.parametrize("model", [POSTED, TINY, BROKEN, SLOW, *NOT_STARTED.values(), f"{CACHED_REPO}:Q8_0", "*"])
def test_hub_download_events(model: str, hub_runs: tuple[Run, Run]) -> None:
    """model_status downloading, download_progress, download_finished or download_failed, model_remove."""
    router, modelyard = hub_runs
    assert router.event_media == modelyard.event_media == "text/event-stream"
    judge(f"SSE download {model}", compare_events(router.events, modelyard.events, model))
