"""What a download's progress looks like to each kind of client (pure).

Router mode (server-models.cpp) puts on /models/sse, for a model being downloaded by POST /models:
`model_status` {"status": "downloading"} when it starts, `download_progress` with the model's progress map
{"progress": {url: {"done": bytes, "total": bytes}}} (every file so far, by its /resolve/ URL; at most ten a
second), then `download_finished`, or `download_failed` (modelyard adds {"error": message}: router mode says
nothing of why). Ollama's /api/pull streams NDJSON lines: "pulling manifest", one
{"status": "pulling <digest12>", "digest": "sha256:...", "total", "completed"} per file as it grows,
"verifying sha256 digest", "writing manifest", then {"status": "success"} (ollama-js fails a stream without
it), or {"error": message}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

STARTED = "model_status"
PROGRESS = "download_progress"
FINISHED = "download_finished"
FAILED = "download_failed"
REMOVED = "model_remove"


@dataclass(frozen=True)
class FileProgress:
    url: str  # the file's /resolve/ address
    digest: str  # its sha256 (or git id), as the hub lists it
    done: int = 0
    total: int = 0


def router_progress(files: Iterable[FileProgress]) -> dict[str, Any]:
    """The data of router mode's `download_progress` event."""
    return {"progress": {f.url: {"done": f.done, "total": f.total} for f in files}}


def router_failure(message: str) -> dict[str, Any]:
    return {"error": message}


def ollama_file_line(file: FileProgress) -> dict[str, Any]:
    return {"status": f"pulling {file.digest[:12]}", "digest": f"sha256:{file.digest}", "total": file.total,
            "completed": file.done}


OLLAMA_START: Mapping[str, Any] = {"status": "pulling manifest"}
OLLAMA_END: tuple[Mapping[str, Any], ...] = ({"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                                              {"status": "success"})


def ollama_error(message: str) -> dict[str, Any]:
    return {"error": message}
