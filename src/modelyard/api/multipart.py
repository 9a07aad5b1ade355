"""Find the `model` field of a multipart/form-data body while it streams in, so that the body can go on to the
model's server as it arrives instead of being held whole (router mode's cpp-httplib parses the whole form in
memory before it looks at the model; an audio file can be hundreds of MiB).

`FieldScanner` is the pure part: fed the body in chunks of any size, it keeps only what it still has to decide
on (a part's headers, the field's value, the tail of a part that could hold the start of a boundary) and
reports the field's value, the end of the form without it, or what is malformed. `read_field` is the shell:
it reads the request until the scanner has decided, keeping what it read in a spool (memory up to
`MEMORY_LIMIT`, a temporary file beyond), and `replay` sends the spool and then the rest of the body as it
arrives.

Why a spool rather than a 400 when a file precedes `model`: the clients in use (the openai SDK through httpx,
curl -F in the order written, the llama.cpp web UI) send their text fields before their files, so the spool
holds a few hundred bytes; one that sends the file first works with router mode, and must work here too, at
the price of a temporary file the size of what came before `model`.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import Message
from typing import IO

from aiohttp import web
from aiohttp.multipart import BadContentDispositionHeader, parse_content_disposition

from modelyard.errors import ErrorKind, ModelError

MEMORY_LIMIT = 1 << 20  # what came before the field, kept in memory; beyond it the spool is a temporary file
HEADERS_LIMIT = 16 << 10  # one part's headers
VALUE_LIMIT = 4 << 10  # the field's value (a model name)
_CHUNK = 64 << 10
_HEADER_LINE = re.compile(rb"([^:\r\n]+):[ \t]*(.*)")


def boundary_of(content_type: str) -> str | None:
    """The `boundary` parameter of a multipart Content-Type, or None."""
    message = Message()
    message["Content-Type"] = content_type
    boundary = message.get_param("boundary")
    return boundary if isinstance(boundary, str) and boundary else None


class FieldScanner:
    """Finds the value of one text field (a part without `filename`) in a multipart body fed in chunks.

    After each `feed`, `done` says whether it has decided: `value` is the field's value, or None with
    `problem` None when the form ended without it, or `problem` saying what is malformed."""

    def __init__(self, boundary: str, name: str) -> None:
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._name = name
        self._pending = b"\r\n"  # a body may start with its first delimiter, which then has no CRLF before it
        self._state = self._preamble
        self.done = False
        self.value: str | None = None
        self.problem: str | None = None

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        self._pending += chunk
        while not self.done and self._state():
            pass

    def end(self) -> None:
        """The body ended: undecided now means truncated."""
        if not self.done:
            self._fail("the multipart body ends before its closing boundary")

    def _fail(self, problem: str) -> bool:
        self.problem, self.done = problem, True
        return False

    def _find_delimiter(self) -> int:
        """The delimiter's position in what is pending, or -1 after dropping what cannot hold its start."""
        at = self._pending.find(self._delimiter)
        if at < 0:
            keep = len(self._delimiter) - 1
            if len(self._pending) > keep:
                self._pending = self._pending[-keep:]
        return at

    # Each state consumes what it can; True: it moved on and the next state should look at what is left.
    def _preamble(self) -> bool:
        return self._skip()

    def _skip(self) -> bool:
        at = self._find_delimiter()
        if at < 0:
            return False
        self._pending = self._pending[at + len(self._delimiter):]
        self._state = self._after_delimiter
        return True

    def _after_delimiter(self) -> bool:
        if len(self._pending) < 2:
            return False
        if self._pending.startswith(b"--"):
            self.done = True  # the closing delimiter: the form has no such field
            return False
        end = self._pending.find(b"\r\n")
        if end < 0:
            if len(self._pending) > 256:
                return self._fail("a multipart boundary is followed by text instead of a line end")
            return False
        if self._pending[:end].strip(b" \t"):
            return self._fail("a multipart boundary is followed by text instead of a line end")
        self._pending = self._pending[end + 2:]
        self._state = self._headers
        return True

    def _headers(self) -> bool:
        end = self._pending.find(b"\r\n\r\n")
        if self._pending.startswith(b"\r\n"):
            end, block = 0, b""
        elif end < 0:
            if len(self._pending) > HEADERS_LIMIT:
                return self._fail(f"a multipart part's headers are longer than {HEADERS_LIMIT} bytes")
            return False
        else:
            block = self._pending[:end]
            end += 2
        self._pending = self._pending[end + 2:]
        disposition = None
        for line in block.split(b"\r\n"):
            match = _HEADER_LINE.fullmatch(line)
            if match and match.group(1).strip().lower() == b"content-disposition":
                disposition = match.group(2).decode("latin-1")
        self._state = self._value if disposition is not None and self._is_field(disposition) else self._skip
        return True

    def _is_field(self, disposition: str) -> bool:
        try:
            kind, params = parse_content_disposition(disposition)
        except BadContentDispositionHeader:
            return False
        return kind == "form-data" and params.get("name") == self._name and "filename" not in params

    def _value(self) -> bool:
        at = self._pending.find(self._delimiter)
        if at > VALUE_LIMIT or (at < 0 and len(self._pending) > VALUE_LIMIT + len(self._delimiter)):
            return self._fail(f"the form field '{self._name}' is longer than {VALUE_LIMIT} bytes")
        if at < 0:
            return False
        try:
            self.value = self._pending[:at].decode("utf-8")
        except UnicodeDecodeError:
            return self._fail(f"the form field '{self._name}' is not UTF-8")
        self.done = True
        return False


class BodyTooLarge(Exception):
    pass


@dataclass
class Spooled:
    """What `read_field` read: the field's value (None: the form has none) and the bytes read so far."""

    value: str | None
    spool: IO[bytes]
    size: int  # bytes of the body read so far (the spool's size)
    limit: int  # the most bytes the body may have
    # What reading the rest of the client's body raised. The HTTP client sending it to the child reports any
    # failure of the body as a connection error (a 502 from the proxy); the handler answers this instead.
    error: Exception | None = None

    def close(self) -> None:
        self.spool.close()


async def read_field(request: web.Request, name: str, limit: int) -> Spooled:
    """Read the request until the multipart field `name` is known (or the form is over). ModelError: not
    multipart, malformed, or (413) larger than `limit`."""
    boundary = boundary_of(request.headers.get("Content-Type", ""))
    if boundary is None:
        raise ModelError(ErrorKind.BAD_REQUEST, "the multipart/form-data Content-Type has no boundary parameter")
    if request.content_length is not None and request.content_length > limit:
        raise ModelError(ErrorKind.TOO_LARGE, f"request body larger than {limit // 2**20} MiB")
    scanner = FieldScanner(boundary, name)
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=MEMORY_LIMIT)  # noqa: SIM115 (replay closes it)
    size = 0
    try:
        while not scanner.done:
            chunk = await request.content.readany()
            if not chunk:
                scanner.end()
                break
            size += len(chunk)
            if size > limit:
                raise ModelError(ErrorKind.TOO_LARGE, f"request body larger than {limit // 2**20} MiB")
            spool.write(chunk)
            scanner.feed(chunk)
    except BaseException:
        spool.close()
        raise
    if scanner.problem is not None:
        spool.close()
        raise ModelError(ErrorKind.BAD_REQUEST, f"{scanner.problem}; send a multipart/form-data body with a "
                                                f"'{name}' field")
    return Spooled(scanner.value, spool, size, limit)


async def replay(request: web.Request, read: Spooled) -> AsyncIterator[bytes]:
    """The whole body: what was spooled, then the rest as the client sends it. Closes the spool. Raises
    BodyTooLarge past the limit (a chunked body declares no length to refuse it by); what it raises is also
    kept in `read.error`."""
    try:
        read.spool.seek(0)
        while block := read.spool.read(_CHUNK):
            yield block
    finally:
        read.close()
    size = read.size
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > read.limit:
                raise BodyTooLarge(f"request body larger than {read.limit // 2**20} MiB")
            yield chunk
    except Exception as exc:
        read.error = exc
        raise
