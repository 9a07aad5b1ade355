"""`--models-dir` scanning, the same way router mode does it (`common/preset.cpp`, load_from_models_dir)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelyard.config.presets import ConfigError

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
    if not directory.is_dir():
        raise ConfigError(f"models directory '{directory}' does not exist or is not a directory")
    models: list[LocalModel] = []
    for entry in sorted(directory.iterdir()):
        if entry.is_dir():
            found = _scan_subdir(entry)
            if found:
                models.append(found)
        elif entry.is_file() and entry.name.endswith(".gguf"):
            if _is_mmproj(entry.name) or _is_draft(entry.name):
                continue
            models.append(LocalModel(entry.name.removesuffix(".gguf"), entry.resolve()))
    return models


def _scan_subdir(subdir: Path) -> LocalModel | None:
    model: Path | None = None
    first_shard: Path | None = None
    mmproj: Path | None = None
    draft: Path | None = None
    for entry in sorted(subdir.iterdir()):
        if not entry.is_file() or not entry.name.endswith(".gguf"):
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
    if path is None:
        return None
    return LocalModel(subdir.name, path.resolve(), mmproj.resolve() if mmproj else None,
                      draft.resolve() if draft else None)
