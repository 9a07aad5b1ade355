"""Hugging Face models: the reference and quant rules (tables), the cache as router mode lists it, and the
downloads against the fake hub (tests/fake_hub.py) on loopback: progress, resume, hash check, the hub's
errors, a full disk, no network, joined and cancelled downloads. Synthetic 3 MiB files, no engine."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.console.pull import PullStep, pull_step
from modelyard.errors import ErrorKind
from modelyard.hub import events
from modelyard.hub.access import Hub, Token, hub_from_environ
from modelyard.hub.cache import CachedFile, cache_dir, cached_files, cached_models, remove, resolve
from modelyard.hub.downloads import Downloads
from modelyard.hub.fetch import HubError, fetch, list_repo
from modelyard.hub.refs import HubRef, NotInRepo, RefError, best_model, best_sibling, parse_ref, plan
from tests.fake_hub import COMMIT, FakeHub, running

REPO = "org/tiny-GGUF"
SIZE = 3 * 2**20 + 12345  # a few chunks of fetch.CHUNK, and a ragged end


# --- references and quant choice (pure) ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "file", "expected"), [
    ("org/repo", "", HubRef("org/repo")),
    ("org/repo:q4_k_m", "", HubRef("org/repo", "Q4_K_M")),
    ("  ggml-org/SmolLM2-135M-Instruct-GGUF:Q8_0 ", "", HubRef("ggml-org/SmolLM2-135M-Instruct-GGUF", "Q8_0")),
    ("org/repo:Q4_0", "sub/x-F16.gguf", HubRef("org/repo", "Q4_0", "sub/x-F16.gguf")),
])
def test_parse_ref(text: str, file: str, expected: HubRef) -> None:
    assert parse_ref(text, file) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("repo", "org/repo or org/repo:QUANT"), ("a/b/c", "org/repo"), ("org/repo:Q4:x", "more than one ':'"),
    ("org/-repo", "org/repo"), ("org/repo:Q 4", "not a quant tag"), ("", "org/repo"),
])
def test_bad_refs_say_what_to_write(text: str, says: str) -> None:
    with pytest.raises(RefError, match=says):
        parse_ref(text)


FILES = ["README.md", "m-F16.gguf", "m-Q8_0.gguf", "m-Q4_K_M.gguf", "mmproj-m-f16.gguf", "m-imatrix-Q4_0.gguf",
         "big/m-Q2_K-00001-of-00002.gguf", "big/m-Q2_K-00002-of-00002.gguf", "big/mmproj-Q8_0.gguf"]


@pytest.mark.parametrize(("files", "tag", "expected"), [
    (FILES, "", "m-Q4_K_M.gguf"),  # the default quant
    ([f for f in FILES if "Q4_K_M" not in f], "", "m-Q8_0.gguf"),  # then Q8_0
    (["a-F16.gguf", "b-BF16.gguf"], "", "a-F16.gguf"),  # then the first model file
    (FILES, "q8_0", "m-Q8_0.gguf"),  # a tag is matched case-insensitively
    (FILES, "Q2_K", "big/m-Q2_K-00001-of-00002.gguf"),  # a split model loads from its first shard
    (FILES, "Q4_0", None),  # imatrix files are not models; a tag that matches nothing is no fallback
    (["mmproj-Q4_K_M.gguf"], "", None),
])
def test_best_model(files: list[str], tag: str, expected: str | None) -> None:
    assert best_model(files, tag) == expected


def test_plan_takes_every_shard_and_the_nearest_projector() -> None:
    chosen = plan(FILES, HubRef("org/m", "Q2_K"))
    assert chosen.model_files == ("big/m-Q2_K-00001-of-00002.gguf", "big/m-Q2_K-00002-of-00002.gguf")
    assert chosen.mmproj == "big/mmproj-Q8_0.gguf"  # the deepest shared folder wins over the root's
    assert plan(FILES, HubRef("org/m", "Q4_K_M")).mmproj == "mmproj-m-f16.gguf"
    assert plan(FILES, HubRef("org/m", "Q4_K_M"), want_mmproj=False).mmproj is None
    assert plan(FILES, HubRef("org/m", "", "m-F16.gguf")).primary == "m-F16.gguf"  # hf-file overrides the tag
    assert best_sibling(["p/mmproj-F16.gguf", "p/mmproj-Q8_0.gguf"], "p/m-Q8_0.gguf", "mmproj") == "p/mmproj-Q8_0.gguf"


@pytest.mark.parametrize(("ref", "says"), [
    (HubRef("org/m", "Q3_K_S"), "no GGUF file with quant Q3_K_S; it has: F16, Q2_K, Q4_K_M, Q8_0"),
    (HubRef("org/m", "", "nope.gguf"), "file 'nope.gguf' is not in org/m"),
])
def test_plan_says_what_the_repo_has(ref: HubRef, says: str) -> None:
    with pytest.raises(NotInRepo, match=says):
        plan(FILES, ref)


# --- the cache --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("environ", "expected"), [
    ({"LLAMA_CACHE": "/l", "HF_HUB_CACHE": "/h"}, "/l"),
    ({"HF_HUB_CACHE": "/h", "HF_HOME": "/home"}, "/h"),
    ({"HUGGINGFACE_HUB_CACHE": "/old"}, "/old"),
    ({"HF_HOME": "/home", "XDG_CACHE_HOME": "/x"}, "/home/hub"),
    ({"XDG_CACHE_HOME": "/x", "HOME": "/u"}, "/x/huggingface/hub"),
    ({"HOME": "/u"}, "/u/.cache/huggingface/hub"),
])
def test_cache_dir_as_llama_cpp_finds_it(environ: dict[str, str], expected: str) -> None:
    assert cache_dir(environ) == Path(expected)


def _cached(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> None:
    folder = cache / ("models--" + repo.replace("/", "--"))
    for path, content in files.items():
        blob = folder / "blobs" / f"{abs(hash((repo, path))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = folder / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def test_cache_listing_as_router_mode(tmp_path: Path) -> None:
    _cached(tmp_path, "org/a-GGUF", {"a-Q4_K_M.gguf": b"x", "a-q8_0.gguf": b"x", "mmproj-a-F16.gguf": b"x",
                                     "s/a-Q2_K-00001-of-00002.gguf": b"x", "s/a-Q2_K-00002-of-00002.gguf": b"x",
                                     "notag.gguf": b"x", "README.md": b"x"})
    _cached(tmp_path, "org/b", {"b-Q4_0.gguf": b"x"})
    folder = tmp_path / "models--org--b"
    (folder / "blobs" / "deadbeef.incomplete").write_bytes(b"half")  # a download in flight: never listed
    (folder / "snapshots" / COMMIT / "gone-Q5_0.gguf").symlink_to("../../blobs/missing")  # its blob is gone
    _cached(tmp_path, "org/c", {"c-Q4_0.gguf": b"x"}, commit="f" * 40)
    (tmp_path / "models--org--c" / "refs" / "main").write_text("not a commit")  # no usable ref: not listed
    (tmp_path / "datasets--org--d").mkdir()
    names = [ref.name for ref in cached_models(cached_files(tmp_path))]
    assert names == ["org/a-GGUF:Q4_K_M", "org/a-GGUF:Q8_0", "org/a-GGUF:Q2_K", "org/b:Q4_0"]
    files = cached_files(tmp_path)
    found = resolve(files, HubRef("org/a-GGUF", "Q4_K_M"))
    assert found is not None and found.model.name == "a-Q4_K_M.gguf" and found.mmproj is not None
    assert resolve(files, HubRef("org/a-GGUF", "Q3_K_M")) is None
    assert resolve([CachedFile("org/a-GGUF", "s/a-Q2_K-00001-of-00002.gguf", Path("/x"))],
                   HubRef("org/a-GGUF", "Q2_K")) is None  # a split model with a shard missing is not usable


def test_remove_a_tag_keeps_shared_blobs_and_a_repo_goes_whole(tmp_path: Path) -> None:
    _cached(tmp_path, "org/a", {"a-Q4_K_M.gguf": b"x", "a-Q8_0.gguf": b"y"})
    assert remove(tmp_path, HubRef("org/a", "Q4_K_M"))
    assert [r.name for r in cached_models(cached_files(tmp_path))] == ["org/a:Q8_0"]
    assert len(list((tmp_path / "models--org--a" / "blobs").iterdir())) == 1  # its blob went with it
    assert not remove(tmp_path, HubRef("org/a", "Q4_K_M"))
    assert remove(tmp_path, HubRef("org/a"))
    assert not (tmp_path / "models--org--a").exists()


# --- downloads against the fake hub ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-Q4_K_M.gguf"
    path.write_bytes(b"GGUF" + os.urandom(SIZE - 4))
    return path


@pytest.fixture(scope="module")
def served(tiny: Path) -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.add(REPO, "tiny-Q4_K_M.gguf", tiny)
    hub.add("org/gated-GGUF", "g-Q4_K_M.gguf", tiny)
    hub.gated["org/gated-GGUF"] = "hf_right"
    with running(hub):
        yield hub


@pytest.fixture
def fake(served: FakeHub) -> Iterator[FakeHub]:
    served.requests.clear()
    yield served
    served.cut_after, served.cuts_left, served.corrupt, served.pace = None, 0, False, 0.0


def _hub(fake: FakeHub, tmp_path: Path, token: Token | None = None) -> Hub:
    return Hub(fake.url, tmp_path / "hub", token=token)


def test_pull_with_progress_lands_in_the_cache_verified(fake: FakeHub, tmp_path: Path, tiny: Path) -> None:
    hub = _hub(fake, tmp_path, Token("hf_secret", "HF_TOKEN"))
    listing = list_repo(hub, REPO)
    assert listing.commit == COMMIT and listing.paths == ["tiny-Q4_K_M.gguf"]
    seen: list[tuple[int, int]] = []
    path = fetch(hub, listing.file("tiny-Q4_K_M.gguf"), lambda done, total: seen.append((done, total)),
                 threading.Event())
    assert path.read_bytes() == tiny.read_bytes() and path.is_symlink()
    assert seen[0] == (0, SIZE) and seen[-1] == (SIZE, SIZE) and seen == sorted(seen)
    assert [r.name for r in cached_models(cached_files(hub.cache))] == [f"{REPO}:Q4_K_M"]
    resolve_request = next(r for r in fake.requests if "/resolve/" in r.path)
    assert resolve_request.headers["Authorization"] == "Bearer hf_secret"
    assert "Authorization" not in fake.downloads()[0].headers  # the token never goes to the CDN
    assert fetch(hub, listing.file("tiny-Q4_K_M.gguf"), lambda d, t: None, threading.Event()) == path
    assert len(fake.downloads()) == 1  # cached: not fetched again


def test_a_connection_cut_midway_is_resumed_with_a_range(fake: FakeHub, tmp_path: Path, tiny: Path) -> None:
    hub = _hub(fake, tmp_path)
    fake.cut_after, fake.cuts_left = 2**20 + 100, 1
    path = fetch(hub, list_repo(hub, REPO).file("tiny-Q4_K_M.gguf"), lambda d, t: None, threading.Event(),
                 retry_delay=0)
    assert path.read_bytes() == tiny.read_bytes()
    first, second = fake.downloads()
    assert "Range" not in first.headers
    resumed_at = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 2**20 + 100  # from what reached the disk


def test_a_cancelled_pull_resumes_in_the_next_one(fake: FakeHub, tmp_path: Path, tiny: Path) -> None:
    hub = _hub(fake, tmp_path)
    file = list_repo(hub, REPO).file("tiny-Q4_K_M.gguf")
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= 2**20:
            cancel.set()

    with pytest.raises(HubError) as cancelled:
        fetch(hub, file, progress, cancel)
    assert cancelled.value.kind == ErrorKind.CANCELLED
    assert cached_files(hub.cache) == []  # the partial file is not listed
    partial = hub.cache / "models--org--tiny-GGUF" / "blobs" / f"{file.sha256}.incomplete"
    kept = partial.stat().st_size
    assert kept >= 2**20
    assert fetch(hub, file, lambda d, t: None, threading.Event()).read_bytes() == tiny.read_bytes()
    assert fake.downloads()[-1].headers["Range"] == f"bytes={kept}-"


def test_a_wrong_hash_is_refused_deleted_and_not_listed(fake: FakeHub, tmp_path: Path) -> None:
    hub = _hub(fake, tmp_path)
    fake.corrupt = True
    with pytest.raises(HubError, match=r"hash is [0-9a-f]{64}, the hub lists [0-9a-f]{64}") as refused:
        fetch(hub, list_repo(hub, REPO).file("tiny-Q4_K_M.gguf"), lambda d, t: None, threading.Event())
    assert refused.value.kind == ErrorKind.DOWNLOAD_FAILED
    assert cached_files(hub.cache) == []
    assert not list((hub.cache / "models--org--tiny-GGUF" / "blobs").iterdir())


@pytest.mark.parametrize(("token", "says"), [
    (None, "org/gated-GGUF is a gated repository and the hub refused no token"),
    (Token("hf_wrong_value", "hf-token in [g] (models.ini:3)"), "refused the token from hf-token in \\[g\\]"),
])
def test_a_gated_repo_says_which_token_was_sent(fake: FakeHub, tmp_path: Path, token: Token | None,
                                                says: str) -> None:
    with pytest.raises(HubError, match=says) as refused:
        list_repo(_hub(fake, tmp_path, token), "org/gated-GGUF")
    assert refused.value.kind == ErrorKind.HUB_AUTH and "hf_wrong_value" not in refused.value.message
    assert list_repo(_hub(fake, tmp_path, Token("hf_right", "HF_TOKEN")), "org/gated-GGUF").paths


def test_not_found_says_what(fake: FakeHub, tmp_path: Path) -> None:
    hub = _hub(fake, tmp_path)
    with pytest.raises(HubError, match=f"repository org/nothing was not found on {fake.url}") as missing:
        list_repo(hub, "org/nothing")
    assert missing.value.kind == ErrorKind.HUB_NOT_FOUND
    listing = list_repo(hub, REPO)
    ghost = type(listing.files[0])(REPO, "ghost-Q4_K_M.gguf", COMMIT)
    with pytest.raises(HubError, match=f"file ghost-Q4_K_M.gguf was not found in {REPO}"):
        fetch(hub, ghost, lambda d, t: None, threading.Event())


def test_no_network_and_offline(tmp_path: Path, unused_tcp_port: int) -> None:
    with pytest.raises(HubError, match=f"cannot reach the hub at http://127.0.0.1:{unused_tcp_port}") as down:
        list_repo(Hub(f"http://127.0.0.1:{unused_tcp_port}", tmp_path), REPO)
    assert down.value.kind == ErrorKind.HUB_UNREACHABLE
    offline = hub_from_environ({"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    with pytest.raises(HubError, match="offline mode is on") as refused:
        list_repo(offline, REPO)
    assert refused.value.kind == ErrorKind.HUB_OFFLINE


@pytest.fixture
def unused_tcp_port() -> int:
    from tests.conftest import free_port

    return free_port()


def test_token_sources(tmp_path: Path) -> None:
    assert hub_from_environ({"HF_TOKEN": "hf_x", "HOME": str(tmp_path)}).describe_token() == "the token from HF_TOKEN"
    (tmp_path / "token").write_text("hf_y\n")
    hub = hub_from_environ({"HF_HOME": str(tmp_path), "MODEL_ENDPOINT": "http://m/", "HF_ENDPOINT": "http://h"})
    assert hub.token == Token("hf_y", f"the token file {tmp_path / 'token'}") and hub.endpoint == "http://m"
    assert "hf_y" not in repr(hub)
    assert hub_from_environ({"HOME": str(tmp_path / "none")}).describe_token().startswith("no token")


# --- the downloads in flight (async) -----------------------------------------------------------------------

class Notices:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []

    def __call__(self, event: str, model: str, data: Any) -> None:
        self.seen.append((event, model, data))

    def names(self) -> list[str]:
        return [event for event, _, _ in self.seen]


def _downloads(fake: FakeHub, tmp_path: Path, notices: Notices, **kwargs: Any) -> Downloads:
    return Downloads(notices, environ={"HF_ENDPOINT": fake.url, "HF_HUB_CACHE": str(tmp_path / "hub"),
                                       "HOME": str(tmp_path)}, retry_delay=0, **kwargs)


async def test_a_second_pull_joins_the_first_and_events_are_router_modes(fake: FakeHub, tmp_path: Path) -> None:
    notices = Notices()
    finished: list[str] = []
    downloads = Downloads(notices, lambda d: finished.append(d.name),
                          environ={"HF_ENDPOINT": fake.url, "HF_HUB_CACHE": str(tmp_path / "hub"),
                                   "HOME": str(tmp_path)})
    first = await downloads.start(parse_ref(f"{REPO}:Q4_K_M"))
    assert await downloads.start(parse_ref(f"{REPO}:q4_k_m")) is first
    other_name = await downloads.start(parse_ref(REPO))  # another name, the same file: shares its fetch
    seen = [snapshot async for snapshot in first.updates()]
    assert (await first.result()).model.name == "tiny-Q4_K_M.gguf"
    await other_name.result()
    assert len(fake.downloads()) == 1
    assert seen[-1][0].done == SIZE and seen[-1][0].digest == fake.repos[REPO]["tiny-Q4_K_M.gguf"].sha256
    mine = [(e, d) for e, m, d in notices.seen if m == f"{REPO}:Q4_K_M"]
    assert mine[0] == (events.STARTED, {"status": "downloading"})
    assert mine[-1] == (events.FINISHED, None)
    url = f"{fake.url}/{REPO}/resolve/{COMMIT}/tiny-Q4_K_M.gguf"
    assert mine[-2] == (events.PROGRESS, {"progress": {url: {"done": SIZE, "total": SIZE}}})
    assert finished == [f"{REPO}:Q4_K_M", REPO] and downloads.active() == []


async def test_cancel_stops_the_download_and_keeps_what_it_wrote(fake: FakeHub, tmp_path: Path) -> None:
    notices = Notices()
    downloads = _downloads(fake, tmp_path, notices)
    fake.pace = 0.05  # the cancel must come before the last byte
    download = await downloads.start(parse_ref(f"{REPO}:Q4_K_M"))
    async for snapshot in download.updates():
        if snapshot and snapshot[0].done > 0:
            downloads.cancel(download.name)
    with pytest.raises(HubError) as cancelled:
        await download.result()
    assert cancelled.value.kind == ErrorKind.CANCELLED
    assert notices.seen[-1] == (events.FAILED, download.name, {"error": cancelled.value.message})
    await download.stopped()  # its thread notices at its next chunk
    (partial,) = download.partials()
    assert 0 < partial.stat().st_size < SIZE  # kept for a later resume
    assert cached_files(tmp_path / "hub") == []


async def test_a_pull_right_after_a_cancel_waits_for_it_then_resumes(fake: FakeHub, tmp_path: Path,
                                                                       tiny: Path) -> None:
    downloads = _downloads(fake, tmp_path, Notices())
    fake.pace = 0.05
    first = await downloads.start(parse_ref(f"{REPO}:Q4_K_M"))
    async for snapshot in first.updates():
        if snapshot and snapshot[0].done > 0:
            downloads.cancel(first.name)
    second = await downloads.start(parse_ref(f"{REPO}:Q4_K_M"))  # the cancelled thread may still be writing
    fake.pace = 0.0
    fetched = (await second.result()).model
    assert await asyncio.to_thread(fetched.read_bytes) == await asyncio.to_thread(tiny.read_bytes)
    assert "Range" in fake.downloads()[-1].headers  # never two writers: it resumed what the first kept


async def test_a_full_disk_is_refused_before_the_first_byte(fake: FakeHub, tmp_path: Path) -> None:
    downloads = _downloads(fake, tmp_path, Notices(), free_space=lambda path: 2**20)
    with pytest.raises(HubError, match=r"has 1\.0 MiB free but the download needs 3\.0 MiB") as full:
        await downloads.start(parse_ref(f"{REPO}:Q4_K_M"))
    assert full.value.kind == ErrorKind.DISK_FULL and fake.downloads() == []


async def test_an_unknown_quant_lists_the_repos(fake: FakeHub, tmp_path: Path) -> None:
    downloads = _downloads(fake, tmp_path, Notices())
    with pytest.raises(HubError, match=f"{REPO} has no GGUF file with quant Q3_K_S; it has: Q4_K_M") as missing:
        await downloads.start(parse_ref(f"{REPO}:Q3_K_S"))
    assert missing.value.kind == ErrorKind.HUB_NOT_FOUND


# --- what `modelyard pull` reads of /models/sse (pure) ------------------------------------------------------

@pytest.mark.parametrize(("message", "expected"), [
    ({"model": "o/r:Q4_0", "event": "download_progress",
      "data": {"progress": {"u1": {"done": 5, "total": 10}, "u2": {"done": 1, "total": 4}}}},
     PullStep("downloading", 6, 14)),
    ({"model": "o/r:Q4_0", "event": "download_finished"}, PullStep("done")),
    ({"model": "o/r:Q4_0", "event": "download_failed", "data": {"error": "disk full"}},
     PullStep("failed", reason="disk full")),
    ({"model": "o/r:Q4_0", "event": "download_failed"}, PullStep("failed", reason="the server gave no reason")),
    ({"model": "other", "event": "download_finished"}, None),
    ({"model": "o/r:Q4_0", "event": "status_change", "data": {"status": "loading"}}, None),
])
def test_pull_steps(message: dict[str, Any], expected: PullStep | None) -> None:
    assert pull_step(message, "o/r:Q4_0") == expected


def test_serving_imports_no_hub_client_until_a_download() -> None:
    """huggingface_hub and httpx2 (0.16 s, 11 MiB) and the bench's matplotlib load only when used."""
    import subprocess
    import sys

    code = ("import sys, modelyard.cli, modelyard.api.app; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'huggingface_hub', 'httpx2', 'matplotlib'}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
