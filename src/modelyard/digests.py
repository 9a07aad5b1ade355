"""sha256 digests of model files, computed once in the background and cached on disk by path, size and mtime
(a 250 MB file takes about a second; a 40 GB one, minutes: never on the request path)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class FileDigests:
    def __init__(self, directory: Path) -> None:
        self.file = directory / "file-digests.json"
        try:
            self._entries: dict[str, str] = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self._entries = {}

    @staticmethod
    def _key(path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"

    def get(self, path: Path) -> str | None:
        try:
            return self._entries.get(self._key(path))
        except OSError:
            return None

    async def compute(self, paths: list[Path]) -> None:
        """Digest every file not digested yet, one at a time, off the event loop."""
        for path in dict.fromkeys(paths):
            if self.get(path) is not None:
                continue
            try:
                key = self._key(path)
                self._entries[key] = await asyncio.to_thread(_sha256, path)
            except OSError as exc:
                log.warning("could not digest %s: %s", path, exc)
                continue
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                self.file.write_text(json.dumps(self._entries))
            except OSError as exc:
                log.debug("could not save %s: %s", self.file, exc)
