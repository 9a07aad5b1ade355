"""Reading a repository's file list and downloading one file into the Hugging Face cache (blocking: the caller
runs it in a worker thread, never on the event loop).

huggingface_hub does the hub's protocol: the endpoint and headers (user agent, token), the file list
(`model_info` with the LFS sha256 of each file), the HEAD on `/resolve/` that gives the commit, the linked
ETag and size and the CDN location, and the hub's errors. The bytes are fetched here rather than by
`hf_hub_download`, which keeps a partial download only within one call and checks no hash: a download writes
to `blobs/<sha256>.incomplete`, resumes it with a Range request after an interruption (in the same pull or a
later one, after a restart too), is hashed whole once complete (a second read of the file), and becomes the
blob, then a snapshot link, only once its size and sha256 match what the hub said. Free space is checked before
the first byte.

huggingface_hub and httpx2 are imported in the functions that use them, not at the top: importing them took
0.16 s and 11 MiB of RSS at every `modelyard serve` (the manager imports this module), for downloads that most
servers never make.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from modelyard import __version__
from modelyard.digests import sha256_of
from modelyard.errors import ErrorKind, ModelError
from modelyard.hub.access import Hub
from modelyard.hub.cache import repo_folder
from modelyard.hub.refs import is_valid_oid

log = logging.getLogger(__name__)
logging.getLogger("httpx2").setLevel(logging.WARNING)  # it logs every request at INFO; modelyard logs each download

CHUNK = 1 << 20
ATTEMPTS = 3  # a connection lost midway is resumed this many times in one pull before it fails
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 30.0, 60.0


class HubError(ModelError):
    """A download or listing that failed (a ModelError: the API answers it as it is); the message says what to
    fix and names the token only by its source."""


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    path: str
    commit: str
    size: int | None = None
    sha256: str | None = None  # the LFS object id; None for a small file kept in git


@dataclass(frozen=True)
class Listing:
    repo: str
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def file(self, path: str) -> RemoteFile:
        return next(f for f in self.files if f.path == path)


def _token(hub: Hub) -> str | bool:
    return hub.token.value if hub.token else False  # False: huggingface_hub must not look for one itself


def list_repo(hub: Hub, repo: str, revision: str = "main") -> Listing:
    """The files of `repo` at `revision`, with sizes and sha256s (one `model_info` call)."""
    if hub.offline:
        raise HubError(ErrorKind.HUB_OFFLINE, f"cannot list {repo}: offline mode is on (HF_HUB_OFFLINE or "
                       f"LLAMA_ARG_OFFLINE) and it is not in the cache at {hub.cache}")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=_token(hub), library_name="modelyard", library_version=__version__)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=30)
    except Exception as exc:
        raise _explain(exc, hub, repo) from None
    commit = info.sha or ""
    if not is_valid_oid(commit):
        raise HubError(ErrorKind.DOWNLOAD_FAILED, f"{hub.endpoint} answered no commit for {repo}: is it a Hugging Face "
                       f"hub? (HF_ENDPOINT)")
    files = tuple(RemoteFile(repo, s.rfilename, commit, (s.lfs.size if s.lfs else s.size),
                             s.lfs.sha256 if s.lfs else None) for s in info.siblings or ())
    return Listing(repo, commit, files)


def resolve_url(hub: Hub, file: RemoteFile) -> str:
    """The file's `/resolve/` address: what router mode's progress events name a file by."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(file.repo, file.path, revision=file.commit, endpoint=hub.endpoint)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def fetch(hub: Hub, file: RemoteFile, progress: Callable[[int, int], None], cancelled: threading.Event,
          free_space: Callable[[Path], int] = free_bytes, retry_delay: float = 1.0) -> Path:
    """The cached file (its snapshot link), downloaded first if it is not whole in the cache.

    `progress(done, total)` is called as bytes arrive (from this thread); setting `cancelled` stops the
    download at the next chunk with a CANCELLED error and keeps the partial file for a later resume.
    """
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils._headers import build_hf_headers

    folder = repo_folder(hub.cache, file.repo)
    pointer = folder / "snapshots" / file.commit / file.path
    if pointer.is_file():
        return pointer
    if hub.offline:
        raise HubError(ErrorKind.HUB_OFFLINE, f"{file.repo}/{file.path} is not in the cache at {hub.cache} and "
                       f"offline mode is on (HF_HUB_OFFLINE or LLAMA_ARG_OFFLINE)")
    url = resolve_url(hub, file)
    try:
        meta = get_hf_file_metadata(url, token=_token(hub), endpoint=hub.endpoint, timeout=30)
    except Exception as exc:
        raise _explain(exc, hub, file.repo, file.path) from None
    expected = (file.sha256 or meta.etag or "").lower()
    size = meta.size if meta.size is not None else file.size
    if not is_valid_oid(expected):
        raise HubError(ErrorKind.DOWNLOAD_FAILED, f"{url} has no sha256 to check the download against (ETag "
                       f"{meta.etag!r}); refusing an unverifiable file")
    blob = folder / "blobs" / expected
    try:
        if not blob.is_file():
            blob.parent.mkdir(parents=True, exist_ok=True)
            location = meta.location or url
            headers = build_hf_headers(token=_token(hub) if _same_origin(url, location) else False,
                                       library_name="modelyard", library_version=__version__)
            _download(location, headers, blob, expected, size, progress, cancelled, free_space, retry_delay)
        _link(blob, pointer)
        _write_ref(folder, file.commit)
    except HfHubHTTPError as exc:  # an OSError too, but the hub's answer, not the disk's
        raise _explain(exc, hub, file.repo, file.path) from None
    except OSError as exc:
        raise _disk_error(exc, blob) from None
    return pointer


def _same_origin(a: str, b: str) -> bool:
    first, second = urlsplit(a), urlsplit(b)
    return (first.scheme, first.hostname, first.port) == (second.scheme, second.hostname, second.port)


def _download(location: str, headers: dict[str, str], blob: Path, expected: str, size: int | None,
              progress: Callable[[int, int], None], cancelled: threading.Event,
              free_space: Callable[[Path], int], retry_delay: float) -> None:
    import httpx2

    partial = blob.with_name(blob.name + ".incomplete")
    for attempt in range(1, ATTEMPTS + 1):
        have = partial.stat().st_size if partial.exists() else 0
        if size is not None and have > size:  # not a prefix of this file: start again
            partial.unlink()
            have = 0
        need, free = (size or 0) - have, free_space(blob.parent)
        if need > free:
            raise HubError(ErrorKind.DISK_FULL, f"{blob.parent} has {_mib(free)} free but the download needs "
                           f"{_mib(need)} more; free some space (or set HF_HUB_CACHE to a larger disk) and pull again")
        try:
            _get(location, headers, partial, have, size, progress, cancelled)
            break
        except (httpx2.TransportError, _ShortRead) as exc:
            cause = str(exc) or type(exc).__name__
            if attempt == ATTEMPTS:
                raise HubError(ErrorKind.HUB_UNREACHABLE, f"the download of {blob.name[:12]} from {location} broke off "
                               f"{ATTEMPTS} times (last: {cause}); pull again to resume it") from None
            log.warning("download from %s interrupted (%s); resuming", location, cause)
            time.sleep(retry_delay)
    actual = sha256_of(partial) if len(expected) == 64 else _git_oid(partial)
    if actual != expected:
        partial.unlink()
        raise HubError(ErrorKind.DOWNLOAD_FAILED, f"the downloaded file's hash is {actual}, the hub lists {expected}: "
                       f"it was corrupted on the way (or the hub changed); it was deleted, pull again")
    os.replace(partial, blob)


class _ShortRead(Exception):
    """The body ended before the size the hub announced (a proxy cut it short)."""


def _get(location: str, headers: dict[str, str], partial: Path, have: int, size: int | None,
         progress: Callable[[int, int], None], cancelled: threading.Event) -> None:
    import httpx2
    from huggingface_hub import get_session, hf_raise_for_status

    request_headers = {**headers, **({"Range": f"bytes={have}-"} if have else {})}
    timeout = httpx2.Timeout(CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S)
    with get_session().stream("GET", location, headers=request_headers, timeout=timeout,
                              follow_redirects=True) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        resumed = have > 0 and response.status_code == 206
        start = have if resumed else 0
        total = size if size is not None else start + int(response.headers.get("Content-Length", 0))
        with partial.open("ab" if resumed else "wb") as out:
            done = start
            progress(done, total)
            for chunk in response.iter_bytes(CHUNK):
                if cancelled.is_set():
                    raise HubError(ErrorKind.CANCELLED, "the download was cancelled")
                out.write(chunk)
                done += len(chunk)
                progress(done, total)
    if size is not None and done < size:
        raise _ShortRead(f"got {done} of {size} bytes")


def _git_oid(path: Path) -> str:
    """A small git-stored file's id: sha1 of `blob <size>\\0` and the content."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    digest.update(path.read_bytes())
    return digest.hexdigest()


def _link(blob: Path, pointer: Path) -> None:
    """The snapshot entry: a relative link to the blob, as huggingface_hub makes it (a copy where links fail)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    temporary = pointer.with_name(pointer.name + ".link")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    try:
        temporary.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        shutil.copyfile(blob, temporary)
    os.replace(temporary, pointer)


def _write_ref(folder: Path, commit: str) -> None:
    ref = folder / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name("main.tmp")
    temporary.write_text(commit)
    os.replace(temporary, ref)


def _mib(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _disk_error(exc: OSError, blob: Path) -> HubError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HubError(ErrorKind.DISK_FULL, f"the disk of {blob.parent} is full; free some space (or set "
                        f"HF_HUB_CACHE to a larger disk) and pull again to resume")
    return HubError(ErrorKind.DOWNLOAD_FAILED, f"cannot write the Hugging Face cache at {blob.parent}: "
                    f"{exc.strerror or exc}; check its permissions")


def _explain(exc: Exception, hub: Hub, repo: str, path: str = "") -> HubError:
    """The hub's errors in words a user can act on."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo}/{path}" if path else repo
    token = hub.describe_token()
    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, GatedRepoError):
        return HubError(ErrorKind.HUB_AUTH, f"{repo} is a gated repository and the hub refused {token}: accept its "
                        f"terms at {hub.endpoint}/{repo} with your account and use a token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(ErrorKind.HUB_NOT_FOUND, f"repository {repo} was not found on {hub.endpoint} (sent "
                        f"{token}; a private repository looks the same to a token that may not read it)")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(ErrorKind.HUB_NOT_FOUND, f"{repo} has no revision 'main' on {hub.endpoint}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError(ErrorKind.HUB_NOT_FOUND, f"file {path} was not found in {repo} on {hub.endpoint}")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        status = exc.response.status_code
        return HubError(ErrorKind.HUB_AUTH, f"the hub refused {what} ({status}) with {token}; check that the token "
                        f"is valid and may read {repo}")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 404:
        return HubError(ErrorKind.HUB_NOT_FOUND, f"{what} was not found on {hub.endpoint}")
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(ErrorKind.HUB_OFFLINE, f"cannot reach the hub for {what}: HF_HUB_OFFLINE is set")
    if isinstance(exc, (httpx2.TransportError, OSError)) and not isinstance(exc, HfHubHTTPError):
        return HubError(ErrorKind.HUB_UNREACHABLE, f"cannot reach the hub at {hub.endpoint} for {what}: "
                        f"{exc or type(exc).__name__}; check the network (or set HF_HUB_OFFLINE=1 to use only "
                        f"cached models)")
    return HubError(ErrorKind.DOWNLOAD_FAILED, f"the hub answered an error for {what}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
