"""A small synchronous HTTP client for the console commands: JSON requests, server-sent events, and the one
place that turns a failed call into a one-line error with its exit code (cannot connect, a refused key, an
unknown model, any other error the server answers). The key travels in `Authorization: Bearer`; it comes from
a file or the environment, never from argv, which every local user can read in `ps`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from modelyard.console.errors import KEY_ENV, KEY_FILE_ENV, ConsoleError, ExitCode, RouteMissing

_CONNECT_TIMEOUT_S = 5.0
_REQUEST_TIMEOUT_S = 60.0
_STREAM_READ_TIMEOUT_S = 60.0  # every event stream sends a keepalive at least every 15 s


@dataclass(frozen=True)
class Connection:
    url: str
    key: str | None = None
    key_source: str = ""  # where the key came from, for error messages; never the key itself


def read_key_file(path: Path) -> str:
    """The first line that is not blank or a `#` comment."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConsoleError(f"cannot read the API key file {path}: {exc.strerror or exc}", ExitCode.USAGE) from None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if line.startswith("[") or "=" in line:
                raise ConsoleError(f"{path} looks like a server keys file (TOML); the console wants a file "
                                   f"holding just the key", ExitCode.USAGE)
            return line
    raise ConsoleError(f"the API key file {path} holds no key", ExitCode.USAGE)


def connection(url: str, key_file: Path | None, environ: Mapping[str, str] | None = None) -> Connection:
    """--url and the key: --api-key-file, else $MODELYARD_API_KEY_FILE, else $MODELYARD_API_KEY."""
    env = os.environ if environ is None else environ
    if not url.startswith(("http://", "https://")):
        raise ConsoleError(f"--url {url!r} must start with http:// or https://", ExitCode.USAGE)
    if key_file is None and env.get(KEY_FILE_ENV):
        key_file = Path(env[KEY_FILE_ENV])
    if key_file is not None:
        return Connection(url.rstrip("/"), read_key_file(key_file), f"--api-key-file {key_file}")
    key = env.get(KEY_ENV, "").strip()
    return Connection(url.rstrip("/"), key or None, f"${KEY_ENV}" if key else "")


@dataclass(frozen=True)
class SseEvent:
    event: str  # "message" unless the frame names one
    data: str


class SseParser:
    """Server-sent events, one line at a time: a frame ends at a blank line; comments (`: keepalive`) vanish."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            frame = SseEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return frame
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def error_message(body: bytes) -> tuple[str, str]:
    """(message, code) from an OpenAI envelope `{"error": {"message", "code"}}` or Ollama's `{"error": "..."}`."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace").strip()[:200], ""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", "")), str(error.get("code", ""))
    if isinstance(error, str):
        return error, ""
    return body.decode(errors="replace").strip()[:200], ""


def failure(conn: Connection, method: str, path: str, status: int, body: bytes) -> ConsoleError:
    """The one line (and exit code) for an error answer."""
    message, code = error_message(body)
    if status == 401:
        if conn.key is None:
            return ConsoleError(f"modelyard at {conn.url} needs an API key: pass --api-key-file FILE or set "
                                f"${KEY_ENV}", ExitCode.REFUSED)
        return ConsoleError(f"modelyard at {conn.url} refused the API key from {conn.key_source}: it is not "
                            f"one of the server's keys", ExitCode.REFUSED)
    if status == 403:
        return ConsoleError(f"refused: {message or 'forbidden'}", ExitCode.REFUSED)
    if code == "model_not_found":
        return ConsoleError(message, ExitCode.UNKNOWN_MODEL)
    if code == "not_found" and status == 404:
        return RouteMissing(f"modelyard at {conn.url} does not serve {method} {path} (an older version?)",
                            ExitCode.SERVER)
    return ConsoleError(f"{message or 'error'} (HTTP {status})", ExitCode.SERVER)


def unreachable(conn: Connection, exc: Exception) -> ConsoleError:
    reason = str(exc) or type(exc).__name__
    return ConsoleError(f"cannot reach modelyard at {conn.url}: {reason} (is `modelyard serve` running?)",
                        ExitCode.UNREACHABLE)


class Client:
    """One server. Every method raises ConsoleError, never an httpx exception."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        headers = {"Authorization": f"Bearer {conn.key}"} if conn.key else {}
        self._http = httpx.Client(base_url=conn.url, headers=headers,
                                  timeout=httpx.Timeout(_REQUEST_TIMEOUT_S, connect=_CONNECT_TIMEOUT_S))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, params: Mapping[str, str | int] | None = None) -> Any:
        return self._json("GET", path, params=params)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._json("POST", path, content=orjson.dumps(body))

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, headers=self._content_type(kwargs), **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.conn, exc) from None
        if response.status_code >= 400:
            raise failure(self.conn, method, path, response.status_code, response.content)
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ConsoleError(f"{method} {path} answered something that is not JSON", ExitCode.SERVER) from None

    @staticmethod
    def _content_type(kwargs: Mapping[str, Any]) -> dict[str, str]:
        return {"Content-Type": "application/json"} if "content" in kwargs else {}

    @contextmanager
    def events(self, path: str, params: Mapping[str, str] | None = None,
               body: Mapping[str, Any] | None = None) -> Iterator[Iterator[SseEvent]]:
        """Server-sent events from GET `path` (or POST `body`). Entering sends the request and checks the
        answer, so a caller can subscribe before it asks for what it wants to watch; the frames come until the
        server ends the stream. Leaving closes the connection, which cancels a generation at once."""
        method = "GET" if body is None else "POST"
        kwargs: dict[str, Any] = {} if body is None else {"content": orjson.dumps(body)}
        timeout = httpx.Timeout(_STREAM_READ_TIMEOUT_S, connect=_CONNECT_TIMEOUT_S)
        try:
            with self._http.stream(method, path, params=params, timeout=timeout,
                                   headers={"Accept": "text/event-stream", **self._content_type(kwargs)},
                                   **kwargs) as response:
                if response.status_code >= 400:
                    raise failure(self.conn, method, path, response.status_code, response.read())
                yield _frames(response)
        except httpx.TransportError as exc:
            raise unreachable(self.conn, exc) from None


def _frames(response: httpx.Response) -> Iterator[SseEvent]:
    parser = SseParser()
    for line in response.iter_lines():
        frame = parser.feed(line)
        if frame is not None:
            yield frame
