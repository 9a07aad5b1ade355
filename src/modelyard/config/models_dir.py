"""`--models-dir` scanning, the same way router mode does it (`common/preset.cpp`, load_from_models_dir).

An entry that cannot be read (a chmod 000 subfolder or file, a stat that fails) is skipped with one warning
naming the path and the error, at start and on every reload: a fault campaign saw one such folder make
`GET /models?reload=1` answer 500 and start-up print a traceback. Only the directory itself being unreadable
stops the scan, with a ConfigError.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modelyard.config.presets import ConfigError

log = logging.getLogger(__name__)

_DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    mmproj: Path | None = None
    draft: Path | None = None


def _is_mmproj(name: str) -> bool:
    return "mmproj" in name


def _is_draft(name: str) -> bool:
    return name.startswith(_DRAFT_PREFIXES)


def scan_models_dir(directory: Path) -> list[LocalModel]:
    """Top-level `X.gguf` is model `X`; a subfolder is one model (first shard or single file, mmproj, draft)."""
    try:
        if not directory.is_dir():
            raise ConfigError(f"models directory '{directory}' does not exist or is not a directory")
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise ConfigError(f"cannot read the models directory '{directory}': {exc.strerror or exc}; "
                          f"check its permissions") from None
    models: list[LocalModel] = []
    for entry, is_dir in _kinds(entries):
        if is_dir:
            found = _scan_subdir(entry)
            if found:
                models.append(found)
        elif entry.name.endswith(".gguf"):
            if _is_mmproj(entry.name) or _is_draft(entry.name) or not _readable(entry):
                continue
            models.append(LocalModel(entry.name.removesuffix(".gguf"), entry.resolve()))
    return models


def _skip(path: Path, exc: OSError) -> None:
    log.warning("models dir: skipping %s: %s", path, exc.strerror or exc)


def _kinds(entries: list[Path]) -> Iterator[tuple[Path, bool]]:
    """(entry, is a directory) for each directory or regular file; entries whose stat fails are skipped."""
    for entry in entries:
        try:
            if entry.is_dir():
                yield entry, True
            elif entry.is_file():
                yield entry, False
        except OSError as exc:  # is_dir/is_file only hide "does not exist"-like errors, not EACCES
            _skip(entry, exc)


def _readable(path: Path) -> bool:
    """Whether the file can be opened; a model file no one can read would only fail later, at load."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        _skip(path, exc)
        return False
    return True


def _scan_subdir(subdir: Path) -> LocalModel | None:
    model: Path | None = None
    first_shard: Path | None = None
    mmproj: Path | None = None
    draft: Path | None = None
    try:
        entries = sorted(subdir.iterdir())
    except OSError as exc:
        _skip(subdir, exc)
        return None
    for entry, is_dir in _kinds(entries):
        if is_dir or not entry.name.endswith(".gguf"):
            continue
        if _is_mmproj(entry.name):
            mmproj = entry
        elif _is_draft(entry.name):
            draft = draft or entry
        elif "-00001-of-" in entry.name:
            first_shard = entry
        else:
            model = entry
    path = first_shard or model
    if path is None or not _readable(path):
        return None
    return LocalModel(subdir.name, path.resolve(), mmproj.resolve() if mmproj else None,
                      draft.resolve() if draft else None)
