"""The Hugging Face cache, read and laid out as llama.cpp and huggingface_hub both do (hf-cache.cpp).

    <cache>/models--org--repo/blobs/<sha256>                 the file (`<sha256>.incomplete` while it downloads)
    <cache>/models--org--repo/snapshots/<commit>/<path>      a relative symlink to its blob, made once it is whole
    <cache>/models--org--repo/refs/main                      the commit `main` pointed at

Listing reads only snapshots of the ref'd commit, so a half-written blob is never listed (it has no snapshot
link yet), nor is a link whose blob is gone. The cache folder is found as llama.cpp finds it: LLAMA_CACHE,
HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from modelyard.hub.refs import HubRef, NotInRepo, is_valid_repo_id, plan, split_info

log = logging.getLogger(__name__)

_COMMIT_RE = re.compile(r"[0-9a-fA-F]{40}")
_NOT_MODELS = ("mmproj", "mtp-", "eagle3-", "dflash-", "dspark-")


def cache_dir(environ: Mapping[str, str]) -> Path:
    """Where llama.cpp (and so router mode) keeps Hugging Face downloads."""
    for var, below in (("LLAMA_CACHE", ()), ("HF_HUB_CACHE", ()), ("HUGGINGFACE_HUB_CACHE", ()),
                       ("HF_HOME", ("hub",)), ("XDG_CACHE_HOME", ("huggingface", "hub"))):
        if environ.get(var):
            return Path(environ[var]).expanduser().joinpath(*below)
    return Path(environ.get("HOME") or Path.home()).joinpath(".cache", "huggingface", "hub")


def repo_folder(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def repo_of_folder(name: str) -> str | None:
    if not name.startswith("models--"):
        return None
    repo = name.removeprefix("models--").replace("--", "/")
    return repo if is_valid_repo_id(repo) else None


@dataclass(frozen=True)
class CachedFile:
    repo: str
    path: str  # inside the repository, with `/`
    local: Path  # the snapshot entry (a link to its blob)


def cached_files(cache: Path, repo: str | None = None) -> list[CachedFile]:
    """Every whole file of the ref'd snapshot of each repo (or of `repo`), in a stable order. Unreadable
    folders are skipped with a warning, as --models-dir entries are."""
    try:
        folders = sorted(cache.iterdir()) if cache.is_dir() else []
    except OSError as exc:
        log.warning("Hugging Face cache: cannot read %s: %s", cache, exc.strerror or exc)
        return []
    files: list[CachedFile] = []
    for folder in folders:
        name = repo_of_folder(folder.name)
        if name is None or (repo is not None and name != repo):
            continue
        commit = _ref_commit(folder / "refs")
        snapshot = folder / "snapshots" / commit if commit else None
        if snapshot is None or not snapshot.is_dir():
            continue
        for entry in _walk(snapshot):
            files.append(CachedFile(name, entry.relative_to(snapshot).as_posix(), entry))
    return files


def _ref_commit(refs: Path) -> str | None:
    """The commit of `main`, else of the first other ref (llama.cpp's get_cached_ref)."""
    fallback = None
    try:
        entries = sorted(refs.iterdir()) if refs.is_dir() else []
    except OSError:
        return None
    for entry in entries:
        try:
            commit = entry.read_text().strip() if entry.is_file() else ""
        except OSError:
            continue
        if not _COMMIT_RE.fullmatch(commit):
            continue
        if entry.name == "main":
            return commit
        fallback = fallback or commit
    return fallback


def _walk(snapshot: Path) -> list[Path]:
    found = []
    for root, _dirs, names in os.walk(snapshot, onerror=lambda exc: log.warning("Hugging Face cache: %s", exc)):
        for name in sorted(names):
            entry = Path(root) / name
            if entry.is_file():  # follows the link: a link whose blob is missing is not a file
                found.append(entry)
    return sorted(found)


def cached_models(files: Sequence[CachedFile]) -> list[HubRef]:
    """What router mode lists from the cache: one `repo:TAG` per repository and quant of a model's first shard
    (llama.cpp's common_list_cached_models); files without a tag, projectors and draft heads are not models."""
    seen: dict[str, HubRef] = {}
    for file in files:
        info = split_info(file.path)
        if info is None or info.index != 1 or not info.tag or any(m in info.prefix for m in _NOT_MODELS):
            continue
        ref = HubRef(file.repo, info.tag)
        seen.setdefault(ref.name, ref)
    return list(seen.values())


@dataclass(frozen=True)
class CachedModel:
    """The local files a reference resolves to in the cache."""

    model: Path
    mmproj: Path | None = None


def resolve(files: Sequence[CachedFile], ref: HubRef, want_mmproj: bool = True) -> CachedModel | None:
    """The cached files of `ref` (offline, as common_download_resolve_path), or None if they are not all there."""
    mine = {f.path: f.local for f in files if f.repo == ref.repo}
    try:
        chosen = plan(list(mine), ref, want_mmproj)
    except NotInRepo:
        return None
    info = split_info(chosen.primary)
    if info is not None and len(chosen.model_files) < info.count:  # a shard is missing (still downloading)
        return None
    return CachedModel(mine[chosen.primary], mine[chosen.mmproj] if chosen.mmproj else None)


def remove(cache: Path, ref: HubRef) -> bool:
    """Delete a cached model (common_download_remove): the whole repo without a tag; with one, the snapshot
    entries of that tag and the blobs no other entry still links to. Whether anything was removed."""
    folder = repo_folder(cache, ref.repo)
    if not ref.tag:
        if not folder.is_dir():
            return False
        shutil.rmtree(folder)
        return True
    entries = [f.local for f in cached_files(cache, ref.repo)
               if (info := split_info(f.path)) is not None and info.tag == ref.tag]
    if not entries:
        return False
    blobs = {_blob_of(entry) for entry in entries} - {None}
    for entry in entries:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
    still_used = {_blob_of(f.local) for f in cached_files(cache, ref.repo)}
    for blob in blobs - still_used:
        if blob is not None:
            with contextlib.suppress(FileNotFoundError):
                blob.unlink()
    return True


def _blob_of(entry: Path) -> Path | None:
    if not entry.is_symlink():
        return None
    return Path(os.path.normpath(entry.parent / os.readlink(entry)))
