"""A swap right after start-up over files the router has never seen (issue 9, point 7's bar). Each router
starts over fresh copies of the two demo models (real copies: new inodes, new mtimes) with an empty cache
directory and HOME, so modelyard's GGUF and digest caches are empty and its background work (sha256 digests,
GGUF parsing) runs exactly when the first requests do. One second after /health answers, a request for model
A (a cold load), then one for B (a swap, `--models-max 1`): B's time to first token and the total. The copies
are out of the page cache when the router starts (written back, then dropped: POSIX_FADV_DONTNEED). Router mode
runs on its own fresh copies of the same files; the bar is that modelyard is no slower."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from modelyard.bench.load import new_session, streamed_chat
from modelyard.bench.processes import RouterProcess, start_router

A, B = "fresh-a", "fresh-b"
# More never-seen files than the two requested, as in a real models dir: with only A and B (350 MB) the
# background digests were done about when B was asked for, and the scenario could not tell the difference.
EXTRA_COPIES = 4
AFTER_HEALTH_S = 1.0  # the scenario itself: the requests come one second after the router says it is up
_TOKENS = 4

# Variables that would point modelyard at an existing cache instead of the fresh one.
_CACHE_ENV = ("MODELYARD_ENGINE_CACHE", "XDG_CACHE_HOME", "HOME")


@dataclass(frozen=True)
class FreshSwap:
    health_after: float  # launch to /health answering
    a_first_token: float  # A's request to its first token (a cold load)
    b_first_token: float  # B's request to its first token (a swap)
    total: float  # A's request to B's last token


def fresh_env(home: Path, base: dict[str, str]) -> dict[str, str]:
    """The environment of a router that has never run on this machine: its own HOME and cache directory
    (install.cache_root reads MODELYARD_ENGINE_CACHE, then XDG_CACHE_HOME, then HOME); the engine binary is
    given by path, so it is still shared."""
    env = {k: v for k, v in base.items() if k not in _CACHE_ENV}
    env["HOME"] = str(home)
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    return env


def fresh_copies(directory: Path, a_source: Path, b_source: Path, extra_copies: int = EXTRA_COPIES) -> Path:
    """A models dir holding real copies (not links) of the two files, as models A and B, and `extra_copies`
    more of B's file that are never requested."""
    models = directory / "models"
    models.mkdir(parents=True)
    extras = [(b_source, f"fresh-extra-{i}") for i in range(extra_copies)]
    for source, name in ((a_source, A), (b_source, B), *extras):
        copy = models / f"{name}.gguf"
        shutil.copyfile(source.resolve(), copy)
        # Written back now, not during the measurement: 350 MB of dirty pages flushed while the children load
        # slowed both routers' loads (router mode's swap took 2.6 s instead of its usual 1.1 s).
        with copy.open("rb") as written:
            os.fsync(written.fileno())
            # And out of the page cache: a file never seen has never been read either. Just written, the copy
            # was all in memory, so neither router's load read the disk, and read-ahead could not show.
            os.posix_fadvise(written.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return models


async def _a_then_b(router: RouterProcess) -> tuple[float, float, float]:
    async with new_session(2) as session:
        started = time.perf_counter()
        first = await streamed_chat(session, router.url, A, _TOKENS)
        asked_b = time.perf_counter()
        second = await streamed_chat(session, router.url, B, _TOKENS)
        return first.first_token, second.first_token, asked_b - started + second.total


def fresh_swap(kind: str, binary: Path, workdir: Path, a_source: Path, b_source: Path,
               engine_args: list[str], extra_copies: int = EXTRA_COPIES,
               after_health_s: float = AFTER_HEALTH_S) -> FreshSwap:
    """One measurement: copies, a router over them, the two requests; the router and copies are removed."""
    home = workdir / f"home-{kind.replace(' ', '-')}-{time.monotonic_ns()}"
    models = fresh_copies(home, a_source, b_source, extra_copies)
    router = start_router(kind, binary, ["--models-dir", str(models)], 1, workdir, engine_args,
                          env=fresh_env(home, dict(os.environ)))
    try:
        health = router.wait_ready(120, "/health")
        time.sleep(after_health_s)
        a_first, b_first, total = asyncio.run(_a_then_b(router))
        return FreshSwap(health, a_first, b_first, total)
    finally:
        router.stop()
        shutil.rmtree(home)  # the copies take disk space; the next round makes its own
