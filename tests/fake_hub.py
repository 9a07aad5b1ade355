"""A small Hugging Face hub on loopback, for tests that must never touch the internet: point HF_ENDPOINT at
`FakeHub.url`. It answers what huggingface_hub and llama.cpp ask, with the hub's own shapes and headers:

- `GET /api/models/{repo}[/revision/{rev}]` (model_info; `?blobs=true` adds sizes and LFS sha256s),
  `GET /api/models/{repo}/tree/{rev}` and `GET /api/models/{repo}/refs` (what llama.cpp reads);
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: for an LFS file (a model), 302 to the CDN (another port, so another
  origin: the auth header must not follow) with X-Repo-Commit, X-Linked-Etag (the sha256), X-Linked-Size and
  ETag; a small file kept in git (`add(..., lfs=False)`: a preset.ini, a README) is answered there and then,
  its ETag the git blob id, as the hub answers it;
- `GET /cdn/{sha256}` on the CDN port: the bytes, 206 for a Range request.

Errors as the hub sends them (X-Error-Code): RepoNotFound (401 without a token, 404 with one), EntryNotFound,
GatedRepo. It can be told to require a token (`gated`), to cut the connection after N bytes for the next
downloads (`cut_after`), to serve a wrong byte (`corrupt`), to have lost a file's object from the CDN though
the hub still lists it (`gone`: the CDN's 404 NoSuchKey, to HEAD and GET) or to be slow (`pace`); `requests`
records what was asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from modelyard.digests import sha256_of

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    path: str
    source: Path  # served from disk (a synthetic file, or the real demo GGUF)
    size: int
    sha256: str
    git_oid: str  # the LFS pointer's git id, or the file's own for a file kept in git
    lfs: bool = True


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    gated: dict[str, str] = field(default_factory=dict)  # repo -> the one token that may read it
    cut_after: int | None = None  # close each download after this many bytes ...
    cuts_left: int = 0  # ... this many times
    corrupt: bool = False  # flip a byte of every download
    pace: float = 0.0  # seconds between two MiB of a download (a slow link, to act during one)
    gone: set[str] = field(default_factory=set)  # sha256s whose CDN object is missing
    requests: list[Seen] = field(default_factory=list)
    url: str = ""
    cdn_url: str = ""

    def add(self, repo: str, path: str, source: Path, lfs: bool = True) -> HubFile:
        digest = sha256_of(source)
        size = source.stat().st_size
        stored = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {size}\n".encode() if lfs
                  else source.read_bytes())  # what git keeps: the LFS pointer, or the file itself
        oid = hashlib.sha1(f"blob {len(stored)}\0".encode() + stored).hexdigest()
        file = HubFile(path, source, size, digest, oid, lfs)
        self.repos.setdefault(repo, {})[path] = file
        return file

    def downloads(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.method == "GET" and seen.path.startswith("/cdn/")]

    # -- the hub's API --
    def _repo(self, request: web.Request) -> tuple[str, dict[str, HubFile]] | web.Response:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in self.repos:
            status = 404 if request.headers.get("Authorization") else 401
            return web.json_response({"error": "Repository not found"}, status=status,
                                     headers={"X-Error-Code": "RepoNotFound",
                                              "X-Error-Message": "Repository not found"})
        token = self.gated.get(repo)
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            message = f"Access to model {repo} is restricted. You must have access to it and be authenticated."
            return web.json_response({"error": message}, status=401,
                                     headers={"X-Error-Code": "GatedRepo", "X-Error-Message": message})
        return repo, self.repos[repo]

    async def model_info(self, request: web.Request) -> web.Response:
        found = self._repo(request)
        if isinstance(found, web.Response):
            return found
        repo, files = found
        blobs = request.query.get("blobs", "").lower() == "true"
        siblings: list[dict[str, Any]] = []
        for file in files.values():
            sibling: dict[str, Any] = {"rfilename": file.path}
            if blobs:
                sibling.update(size=file.size, blobId=file.git_oid)
                if file.lfs:
                    sibling["lfs"] = {"size": file.size, "sha256": file.sha256, "pointerSize": 134}
            siblings.append(sibling)
        return web.json_response({"_id": "6650" + COMMIT[:20], "id": repo, "modelId": repo,
                                  "author": repo.split("/")[0],
                                  "sha": COMMIT, "lastModified": "2026-01-02T03:04:05.000Z", "private": False,
                                  "gated": repo in self.gated, "disabled": False, "downloads": 0, "likes": 0,
                                  "tags": ["gguf"], "library_name": "gguf", "siblings": siblings,
                                  "createdAt": "2026-01-01T00:00:00.000Z", "usedStorage": sum(
                                      f.size for f in files.values())})

    async def tree(self, request: web.Request) -> web.Response:
        found = self._repo(request)
        if isinstance(found, web.Response):
            return found
        return web.json_response([{"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path,
                                   **({"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}} if f.lfs else {})}
                                  for f in found[1].values()])

    async def refs(self, request: web.Request) -> web.Response:
        found = self._repo(request)
        if isinstance(found, web.Response):
            return found
        return web.json_response({"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": COMMIT}],
                                  "tags": [], "converts": []})

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        found = self._repo(request)
        if isinstance(found, web.Response):
            return found
        file = found[1].get(request.match_info["path"])
        if file is None:
            return web.json_response({"error": "Entry not found"}, status=404,
                                     headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        if not file.lfs:
            return web.Response(body=file.source.read_bytes(), headers={
                "X-Repo-Commit": COMMIT, "ETag": f'"{file.git_oid}"', "Content-Type": "text/plain; charset=utf-8"})
        return web.Response(status=302, headers={
            "Location": f"{self.cdn_url}/cdn/{file.sha256}", "X-Repo-Commit": COMMIT,
            "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size), "ETag": f'"{file.git_oid}"',
            "Accept-Ranges": "bytes", "Content-Type": "text/plain; charset=utf-8"})

    # -- the CDN --
    async def cdn(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["sha"]
        file = next((f for files in self.repos.values() for f in files.values() if f.sha256 == digest), None)
        if file is None or digest in self.gone:
            return web.Response(status=404, text="NoSuchKey")
        start = 0
        if request.headers.get("Range", "").startswith("bytes="):
            start = int(request.headers["Range"].removeprefix("bytes=").split("-")[0])
        headers = {"ETag": f'"{file.sha256}"', "Accept-Ranges": "bytes", "Content-Type": "binary/octet-stream",
                   "Content-Length": str(file.size - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{file.size - 1}/{file.size}"
        response = web.StreamResponse(status=206 if start else 200, headers=headers)
        if request.method == "HEAD":
            await response.prepare(request)
            return response
        await response.prepare(request)
        cut = None
        if self.cut_after is not None and self.cuts_left > 0:
            self.cuts_left -= 1
            cut = self.cut_after
        sent = 0
        with file.source.open("rb") as source:
            source.seek(start)
            while block := source.read(1 << 20):
                if self.corrupt and sent == 0:
                    block = bytes([block[0] ^ 0xFF]) + block[1:]
                if cut is not None and sent + len(block) >= cut:
                    await response.write(block[:cut - sent])
                    assert request.transport is not None
                    request.transport.close()  # midway: the client sees a body shorter than Content-Length
                    return response
                await response.write(block)
                sent += len(block)
                if self.pace:
                    await asyncio.sleep(self.pace)
        await response.write_eof()
        return response

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(Seen(request.method, request.path, dict(request.headers)))
        response: web.StreamResponse = await handler(request)
        return response

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/models/{org}/{name}", self.model_info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.model_info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self.tree)
        app.router.add_get("/api/models/{org}/{name}/refs", self.refs)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        app.router.add_get("/cdn/{sha}", self.cdn)
        return app




@contextmanager
def running(hub: FakeHub) -> Iterator[FakeHub]:
    """The hub served on two free loopback ports (hub and CDN) from a thread of its own, so that blocking
    clients (huggingface_hub in a worker thread, a router subprocess) and async tests can all use it."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(hub.app(), access_log=None)

    async def start() -> None:
        await runner.setup()
        sites = [web.TCPSite(runner, "127.0.0.1", 0) for _ in range(2)]
        for site in sites:
            await site.start()
        ports = [site._server.sockets[0].getsockname()[1] for site in sites]  # type: ignore[union-attr]
        hub.url, hub.cdn_url = (f"http://127.0.0.1:{port}" for port in ports)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield hub
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
