"""A JSON file of values about model files, keyed by path, size and modification time: a changed file misses.

Nothing on disk may be lost or corrupted (issue 9, point 9). Before, the file was rewritten in place, so a
crash mid-write left truncated JSON, and two estimator threads (start-up and a reload), or two modelyard
instances on one machine, each wrote their own view and dropped the other's entries. Now:

- a write goes to a temporary file in the same directory, is fsynced, then renamed over the cache
  (os.replace is atomic): a crash at any point leaves either the old file or the new one, never a mix;
- every write is a read-merge-write under an exclusive flock on a sidecar `.lock` file, so writers in other
  processes (or other FileCache objects on the same file) never drop each other's entries;
- a corrupt or unreadable cache file is logged and ignored (treated as empty), and the next write rebuilds it;
- entries whose file has since changed or gone are dropped at each write, so the file does not grow for ever.

A value may be a failure (`{"error": "..."}`, see `failure`): a file that could not be read is not retried
until it changes. The constructor does no I/O; the file is read on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_ERROR = "error"


def failure(message: str) -> dict[str, str]:
    """The cached form of "reading this file failed with `message`"."""
    return {_ERROR: message}


def failure_of(value: Any) -> str | None:
    """The message of a cached failure, or None if `value` is not one."""
    if isinstance(value, dict) and set(value) == {_ERROR}:
        return str(value[_ERROR])
    return None


def file_key(version: str, path: Path) -> str | None:
    """The cache key of the file as it is now (None if it is gone). Nanosecond mtime: a file rewritten within
    the same second with the same size (a re-downloaded model) must miss."""
    try:
        resolved = path.resolve()
        stat = resolved.stat()
    except OSError:
        return None
    return f"v{version}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}"


def _path_of(key: str) -> Path | None:
    """The path inside a key (paths may contain `|`: the version comes first, size and mtime last)."""
    parts = key.split("|", 1)
    if len(parts) != 2:
        return None
    rest = parts[1].rsplit("|", 2)
    return Path(rest[0]) if len(rest) == 3 else None


def is_current(version: str, key: str) -> bool:
    """Whether an entry still describes its file (same version, file still there, unchanged)."""
    path = _path_of(key)
    return path is not None and key.startswith(f"v{version}|") and file_key(version, path) == key


class FileCache:
    def __init__(self, file: Path, version: str = "1") -> None:
        self.file = file
        self._version = version
        self._entries: dict[str, Any] | None = None  # read on first use

    @property
    def _lock_file(self) -> Path:
        return self.file.with_name(self.file.name + ".lock")

    def key(self, path: Path) -> str | None:
        return file_key(self._version, path)

    def get(self, path: Path) -> Any:
        """The cached value, or None (also when the file is gone)."""
        key = self.key(path)
        return None if key is None else self.lookup(key)

    def lookup(self, key: str) -> Any:
        if self._entries is None:
            self._entries = self._read()
        return self._entries.get(key)

    def put(self, key: str, value: Any) -> None:
        """Record `value` under `key` (from `key()`, taken before the file was read), merged into what is on
        disk now. Blocking (a lock, a write and an fsync): callers on the event loop run it in a thread."""
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                entries = {k: v for k, v in self._read().items() if is_current(self._version, k)}
                entries[key] = value
                self._write(entries)
        except OSError as exc:
            log.warning("could not save %s: %s (the value is kept in memory only)", self.file, exc)
            entries = {**(self._entries or {}), key: value}
        self._entries = entries  # one reference swap: readers on other threads see the old or the new dict

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock_file.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            text = self.file.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("ignoring unreadable cache %s: %s (it is rebuilt)", self.file, exc)
            return {}
        try:
            entries = json.loads(text)
        except ValueError as exc:
            log.warning("ignoring corrupt cache %s: %s (it is rebuilt)", self.file, exc)
            return {}
        if not isinstance(entries, dict):
            log.warning("ignoring corrupt cache %s: not a JSON object (it is rebuilt)", self.file)
            return {}
        return entries

    def _write(self, entries: dict[str, Any]) -> None:
        descriptor, temporary = tempfile.mkstemp(dir=self.file.parent, prefix=f".{self.file.name}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w") as out:
                json.dump(entries, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
