"""Find the llama-server binary: --llama-server, $LLAMA_SERVER, the PATH, then modelyard's own build."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from modelyard.engine.install import installed_binary


class EngineNotFound(RuntimeError):
    pass


def locate_llama_server(explicit: str | None = None) -> Path:
    candidates: list[tuple[str, str | None]] = [
        ("--llama-server", explicit),
        ("$LLAMA_SERVER", os.environ.get("LLAMA_SERVER")),
    ]
    for origin, value in candidates:
        if value:
            path = Path(value).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise EngineNotFound(f"{origin} points at '{value}', which is not an executable file")
            return path.resolve()
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path).resolve()
    built = installed_binary()
    if built.is_file():
        return built
    raise EngineNotFound("no llama-server found: pass --llama-server PATH, set $LLAMA_SERVER, put it on the PATH, "
                         "or build one with `modelyard engine install` (about 10 minutes on 2 cores)")
