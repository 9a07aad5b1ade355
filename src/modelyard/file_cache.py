"""A JSON file of values about model files, keyed by path, size and modification time: a changed file misses."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class FileCache:
    def __init__(self, file: Path, version: str = "1") -> None:
        self.file = file
        self._version = version
        try:
            self._entries: dict[str, Any] = json.loads(file.read_text())
        except (OSError, ValueError):
            self._entries = {}

    def _key(self, path: Path) -> str:
        stat = path.stat()
        return f"v{self._version}|{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"

    def get(self, path: Path) -> Any:
        """The cached value, or None (also when the file is gone)."""
        try:
            return self._entries.get(self._key(path))
        except OSError:
            return None

    def put(self, path: Path, value: Any) -> None:
        self._entries[self._key(path)] = value
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self.file.write_text(json.dumps(self._entries))
        except OSError as exc:
            log.debug("could not save %s: %s", self.file, exc)
