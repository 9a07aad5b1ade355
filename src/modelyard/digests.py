"""sha256 digests of model files, computed once in the background and cached on disk by path, size and mtime
(a 250 MB file takes about a second; a 40 GB one, minutes: never on the request path)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from modelyard.file_cache import FileCache

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class FileDigests:
    def __init__(self, directory: Path) -> None:
        self._cache = FileCache(directory / "file-digests.json")

    def get(self, path: Path) -> str | None:
        digest = self._cache.get(path)
        return digest if isinstance(digest, str) else None

    async def compute(self, paths: list[Path]) -> None:
        """Digest every file not digested yet, one at a time, off the event loop."""
        for path in dict.fromkeys(paths):
            if self.get(path) is not None:
                continue
            try:
                self._cache.put(path, await asyncio.to_thread(_sha256, path))
            except OSError as exc:
                log.warning("could not digest %s: %s", path, exc)
