"""sha256 digests of model files (Ollama's /api/tags `digest`), cached on disk by path, size and mtime.

Computing one takes about a second for a 250 MB file and minutes for a 40 GB one, so it is never done on the
request path or the event loop: modelyard.background computes them in its idle-priority worker, and this
cache only records them (a failure too, so an unreadable file is not retried until it changes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from modelyard.file_cache import FileCache


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class FileDigests:
    def __init__(self, directory: Path) -> None:
        self.cache = FileCache(directory / "file-digests.json", version="2")

    def get(self, path: Path) -> str | None:
        """The digest if known (never computes it)."""
        digest = self.cache.get(path)
        return digest if isinstance(digest, str) else None
