"""Background reading of model files (modelyard.background) and the caches it fills (modelyard.file_cache):
idle priority, once per file, failures cached, pause/resume, immediate close, listings that never wait; caches
that survive corruption, crashes and concurrent writers. Issue 9, points 5, 7 and 9."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from modelyard.background import (
    DIGEST,
    FACTS,
    LATER,
    SOON,
    URGENT,
    BackgroundReader,
    Job,
    io_priority_class,
    next_job,
    should_preempt,
    should_stop,
)
from modelyard.digests import FileDigests, sha256_of
from modelyard.file_cache import FileCache, failure
from modelyard.memory import GgufCache, read_gguf, read_gguf_header
from tests.conftest import children_of


def write_gguf(path: Path, context: int = 2048, vocabulary: int = 100) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_token_list([f"t{i}" for i in range(vocabulary)])
    writer.add_tensor("a", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class Recorder:
    """Counts the requests sent to the worker, and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, Path]] = Counter()
        self.sent = asyncio.Event()

    def __call__(self, op: str, path: Path) -> None:
        self.requests[(op, path)] += 1
        self.sent.set()

    async def next_request(self) -> None:
        await self.sent.wait()
        self.sent.clear()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def reader(tmp_path: Path, recorder: Recorder) -> AsyncIterator[BackgroundReader]:
    cache = tmp_path / "cache"
    background = BackgroundReader(GgufCache(cache), FileDigests(cache), on_request=recorder)
    yield background
    await background.close()


def proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat fields from field 3 (state) on: [0] state, [16] nice, [38] policy."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def wait_stopped(pid: int) -> None:
    """Until the process is stopped (waitid WSTOPPED, without reaping it): no polling."""
    await asyncio.to_thread(os.waitid, os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)


# -- decisions --
def _job(priority: int, order: int) -> Job:
    return Job(FACTS, Path(f"/m/{order}"), priority, order)


@pytest.mark.parametrize(("jobs", "paused", "expected"), [
    ([], False, None),
    ([(LATER, 0), (SOON, 1)], False, 1),  # facts before digests
    ([(SOON, 2), (SOON, 1)], False, 1),  # in the order asked
    ([(LATER, 0), (URGENT, 5), (SOON, 1)], False, 5),  # a load waits for it
    ([(LATER, 0), (SOON, 1)], True, None),  # paused: background work waits
    ([(LATER, 0), (URGENT, 3)], True, 3),  # ... but not what a load waits for
])
def test_next_job(jobs: list[tuple[int, int]], paused: bool, expected: int | None) -> None:
    chosen = next_job([_job(p, o) for p, o in jobs], paused)
    assert (chosen.order if chosen else None) == expected


@pytest.mark.parametrize(("pauses", "running", "stop"), [
    (0, LATER, False), (1, LATER, True), (2, SOON, True), (1, URGENT, False), (1, None, False), (0, None, False)])
def test_should_stop(pauses: int, running: int | None, stop: bool) -> None:
    assert should_stop(pauses, None if running is None else _job(running, 0)) is stop


@pytest.mark.parametrize(("running", "incoming", "preempt"), [
    (None, URGENT, False), (LATER, URGENT, True), (SOON, URGENT, True), (URGENT, URGENT, False),
    (LATER, SOON, False), (LATER, LATER, False)])
def test_should_preempt(running: int | None, incoming: int, preempt: bool) -> None:
    assert should_preempt(None if running is None else _job(running, 0), incoming) is preempt


# -- the worker --
async def test_worker_reads_facts_and_digests_as_the_direct_functions(tmp_path: Path, reader: BackgroundReader,
                                                                      recorder: Recorder) -> None:
    model = write_gguf(tmp_path / "m.gguf")
    assert reader.facts(model) is None and reader.digest(model) is None
    assert await reader.want_facts([model], urgent=False) == [read_gguf(model)]
    reader.want_digests([model])
    await reader.wait_idle()
    assert reader.digest(model) == sha256_of(model)
    assert reader.facts(model) == read_gguf(model)
    # Known now: asking again sends nothing to the worker.
    assert await reader.want_facts([model]) == [read_gguf(model)]
    reader.want_digests([model])
    assert recorder.requests == {(FACTS, model): 1, (DIGEST, model): 1}


async def test_demo_models_are_read_in_the_worker_as_directly(reader: BackgroundReader,
                                                              demo_models: dict[str, Path]) -> None:
    paths = list(demo_models.values())
    assert await reader.want_facts(paths) == [read_gguf(p) for p in paths]
    reader.want_digests(paths)
    await reader.wait_idle()
    assert [reader.digest(p) for p in paths] == [sha256_of(p) for p in paths]


async def test_a_truncated_gguf_fails_once_and_is_read_again_only_after_it_changes(
        tmp_path: Path, reader: BackgroundReader, recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    model = write_gguf(tmp_path / "broken.gguf")
    os.truncate(model, model.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, "modelyard.background"):
        assert await reader.want_facts([model]) == [None]
        assert await reader.want_facts([model]) == [None]
    assert recorder.requests[(FACTS, model)] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(model) in warnings[0] and "ValueError" in warnings[0], warnings

    # A restart (a new reader on the same cache) does not parse it again either.
    again = Recorder()
    second = BackgroundReader(GgufCache(tmp_path / "cache"), FileDigests(tmp_path / "cache"), on_request=again)
    try:
        assert await second.want_facts([model]) == [None]
        assert not again.requests
    finally:
        await second.close()

    write_gguf(model, context=4096)  # fixed: re-parsed
    assert await reader.want_facts([model]) == [read_gguf(model)]
    assert recorder.requests[(FACTS, model)] == 2


async def test_pause_stops_the_worker_and_resume_lets_it_finish(tmp_path: Path, reader: BackgroundReader,
                                                                recorder: Recorder) -> None:
    fifo = tmp_path / "slow.gguf"
    os.mkfifo(fifo)  # a file the test feeds: the digest advances only as the test writes
    created = fifo.stat()
    reader.want_digests([fifo])
    await recorder.next_request()
    writer = await asyncio.to_thread(open, fifo, "wb")  # returns once the worker has opened it
    pid = reader.pid
    assert pid is not None
    reader.pause()
    await wait_stopped(pid)
    assert proc_stat(pid)[0] == "T"
    await asyncio.to_thread(writer.write, b"x" * 1000)
    writer.close()
    # Writing to a FIFO sets its mtime, and a file changed while read is read again: make it look unchanged.
    os.utime(fifo, ns=(created.st_atime_ns, created.st_mtime_ns))
    assert reader.digest(fifo) is None
    reader.resume()
    await reader.wait_idle()
    assert reader.digest(fifo) == sha256_of_bytes(b"x" * 1000)
    assert proc_stat(pid)[0] in "SR"


def sha256_of_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


async def test_a_load_s_facts_do_not_wait_behind_a_digest_or_a_pause(tmp_path: Path, reader: BackgroundReader,
                                                                     recorder: Recorder) -> None:
    fifo, model = tmp_path / "stuck.gguf", write_gguf(tmp_path / "m.gguf")
    os.mkfifo(fifo)  # nobody writes: the digest job blocks for ever
    reader.want_digests([fifo])
    await recorder.next_request()
    reader.pause()
    assert await reader.want_facts([model]) == [read_gguf(model)]  # the stuck worker was replaced
    assert recorder.requests[(DIGEST, fifo)] == 1  # requeued, not run again while paused
    assert reader.digest(fifo) is None


async def test_close_returns_at_once_while_a_long_digest_runs(tmp_path: Path, reader: BackgroundReader,
                                                             recorder: Recorder) -> None:
    big = tmp_path / "huge.gguf"
    with big.open("wb") as file:
        file.truncate(256 * 2**30)  # sparse: minutes of hashing
    reader.want_digests([big])
    await recorder.next_request()
    pid = reader.pid
    assert pid is not None
    started = time.monotonic()
    await reader.close()
    assert time.monotonic() - started < 0.5
    assert not process_exists(pid)  # killed and reaped
    assert reader.digest(big) is None


async def test_close_of_a_paused_worker_is_immediate_too(tmp_path: Path, reader: BackgroundReader,
                                                         recorder: Recorder) -> None:
    big = tmp_path / "huge.gguf"
    with big.open("wb") as file:
        file.truncate(256 * 2**30)
    reader.want_digests([big])
    await recorder.next_request()
    pid = reader.pid
    assert pid is not None
    reader.pause()
    await wait_stopped(pid)
    started = time.monotonic()
    await reader.close()
    assert time.monotonic() - started < 0.5
    assert not process_exists(pid)


async def test_the_worker_runs_at_idle_cpu_and_io_priority(tmp_path: Path, reader: BackgroundReader) -> None:
    await reader.want_facts([write_gguf(tmp_path / "m.gguf")])
    pid = reader.pid
    assert pid is not None
    fields = proc_stat(pid)
    assert int(fields[16]) == 19  # nice (field 19 of /proc/<pid>/stat)
    assert int(fields[38]) == os.SCHED_IDLE  # policy (field 41)
    assert io_priority_class(pid) == 3  # IOPRIO_CLASS_IDLE
    ionice = await asyncio.create_subprocess_exec("ionice", "-p", str(pid), stdout=asyncio.subprocess.PIPE)
    assert (await ionice.communicate())[0].decode().strip() == "idle"


async def test_lookups_never_wait_while_the_worker_is_busy(tmp_path: Path, reader: BackgroundReader,
                                                           recorder: Recorder) -> None:
    fifo, model = tmp_path / "stuck.gguf", write_gguf(tmp_path / "m.gguf")
    os.mkfifo(fifo)
    reader.want_digests([fifo, model])
    await recorder.next_request()
    started = time.monotonic()
    assert reader.facts(model) is None and reader.digest(model) is None and reader.digest(fifo) is None
    assert time.monotonic() - started < 0.05


async def test_a_file_that_vanishes_is_not_read(tmp_path: Path, reader: BackgroundReader,
                                                recorder: Recorder) -> None:
    assert await reader.want_facts([tmp_path / "gone.gguf"]) == [None]
    assert not recorder.requests


async def test_resume_without_pause_is_a_bug(reader: BackgroundReader) -> None:
    with pytest.raises(RuntimeError, match="without pause"):
        reader.resume()


# -- the caches --
@pytest.mark.parametrize("content", ["{not json", '{"v1|/x|1|2": "abc"', "[1, 2]", "\x00\x01"])
def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path: Path, content: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    file, model = tmp_path / "cache.json", tmp_path / "m.gguf"
    model.write_bytes(b"model")
    file.write_text(content)
    cache = FileCache(file)
    with caplog.at_level(logging.WARNING, "modelyard.file_cache"):
        assert cache.get(model) is None
    assert "ignoring corrupt cache" in caplog.text
    key = cache.key(model)
    assert key is not None
    cache.put(key, "digest")
    assert json.loads(file.read_text()) == {key: "digest"}
    assert FileCache(file).get(model) == "digest"


def test_an_unreadable_cache_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = tmp_path / "cache.json"
    file.mkdir()  # reading it fails with IsADirectoryError
    model = tmp_path / "m.gguf"
    model.write_bytes(b"model")
    with caplog.at_level(logging.WARNING, "modelyard.file_cache"):
        assert FileCache(file).get(model) is None
    assert "ignoring unreadable cache" in caplog.text


def test_a_crash_between_write_and_rename_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file, model = tmp_path / "cache.json", tmp_path / "m.gguf"
    model.write_bytes(b"model")
    cache = FileCache(file)
    key = cache.key(model)
    assert key is not None
    cache.put(key, "old")
    before = file.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # as a kill between the write and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, "new")
    assert file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json", "cache.json.lock", "m.gguf"]  # no temp left


def test_entries_of_changed_or_removed_files_are_dropped(tmp_path: Path) -> None:
    file = tmp_path / "cache.json"
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_bytes(b"a")
    second.write_bytes(b"b")
    cache = FileCache(file)
    old_key = cache.key(first)
    assert old_key is not None
    cache.put(old_key, "a")
    first.write_bytes(b"changed")
    key = cache.key(second)
    assert key is not None
    cache.put(key, "b")
    assert json.loads(file.read_text()) == {key: "b"}


def test_failures_are_cached_by_the_sync_reader_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelyard.memory

    model = write_gguf(tmp_path / "broken.gguf")
    os.truncate(model, 100)
    calls = []

    def counting(path: Path) -> object:
        calls.append(path)
        return read_gguf(path)

    monkeypatch.setattr(modelyard.memory, "read_gguf", counting)
    cache = GgufCache(tmp_path / "cache")
    for _ in range(2):
        with pytest.raises(ValueError):
            cache.read(model)
    assert len(calls) == 1
    assert GgufCache(tmp_path / "cache").cache.get(model) == failure(f"ValueError: {_error_of(model)}")


def _error_of(path: Path) -> str:
    try:
        read_gguf(path)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("expected a failure")


_WRITER = """
import sys
from pathlib import Path
from modelyard.file_cache import FileCache
cache = FileCache(Path(sys.argv[1]))
for name in sys.argv[2:]:
    cache.put(cache.key(Path(name)), name)
"""


def test_concurrent_writers_in_two_processes_keep_every_entry(tmp_path: Path) -> None:
    file = tmp_path / "cache.json"
    groups = []
    for group in "ab":
        paths = [tmp_path / f"{group}{i}.gguf" for i in range(40)]
        for path in paths:
            path.write_bytes(path.name.encode())
        groups.append([str(p) for p in paths])
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(file), *paths]) for paths in groups]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    entries = FileCache(file)
    assert {entries.get(Path(p)) for paths in groups for p in paths} == {p for paths in groups for p in paths}


# -- the header reader the worker runs --
def _reference(path: Path) -> tuple[dict[str, object], list[tuple[int, int]]]:
    """What llama.cpp's own gguf.GGUFReader reads (slow: a numpy view per array item)."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, [(int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]


def _same_as_reference(path: Path) -> None:
    fields, tensors = read_gguf_header(path)
    expected_fields, expected_tensors = _reference(path)
    assert tensors == expected_tensors
    assert fields.keys() == expected_fields.keys()
    for key, value in fields.items():
        skipped = key.startswith("tokenizer.") and isinstance(expected_fields[key], list)
        assert value == ([] if skipped or _is_string_list(expected_fields[key]) else expected_fields[key]), key


def _is_string_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], str)


def test_the_header_reader_reads_what_gguf_s_reader_reads(tmp_path: Path) -> None:
    path = tmp_path / "varied.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(4096)
    writer.add_block_count(4)
    writer.add_head_count_kv([1, 2, 4, 2])  # per-layer, as some architectures store it
    writer.add_sliding_window(512)
    writer.add_array("gemma3.attention.sliding_window_pattern", [True, True, False, True])
    writer.add_array("general.tags", ["a", "b"])
    writer.add_float32("gemma3.rope.scale", 0.5)
    writer.add_bool("gemma3.flag", True)
    writer.add_token_list(["x", "y"])
    writer.add_token_scores([0.5, 1.0])
    writer.add_tensor("q", np.ones((32, 8), dtype=np.float16))
    writer.add_tensor("k", np.ones((3,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _same_as_reference(path)
    assert read_gguf(path).head_count_kv == 4 and read_gguf(path).sliding_layers == 3


def test_the_header_reader_on_a_real_model(demo_models: dict[str, Path]) -> None:
    started = time.process_time()
    read_gguf_header(demo_models["smollm2-135m-instruct"])
    assert time.process_time() - started < 1.0  # GGUFReader: 5.4 CPU-seconds here
    _same_as_reference(demo_models["smollm2-135m-instruct"])


@pytest.mark.parametrize(("cut", "message"), [
    (lambda size: size - 10, "truncated GGUF: tensor a ends at byte"),  # tensor data cut short
    (lambda size: 40, "truncated (or corrupt )?GGUF header"),  # inside the metadata
    (lambda size: 0, "cannot mmap an empty file"),
])
def test_the_header_reader_refuses_a_truncated_file(tmp_path: Path, cut: object, message: str) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    assert callable(cut)
    os.truncate(path, cut(path.stat().st_size))
    with pytest.raises(ValueError, match=message):
        read_gguf(path)


def test_the_header_reader_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(path)


# -- end to end: `modelyard serve` with the real engine --
def _worker_of(router_pid: int) -> int | None:
    for pid in children_of(router_pid):
        try:
            if b"modelyard.background" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def _reading(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in (Path(f"/proc/{pid}/fd")).iterdir())
    except OSError:
        return False


def test_serve_reads_files_in_the_background_and_exits_at_once(tmp_path: Path, models_dir: Path,
                                                               llama_server: Path, start_router: Any) -> None:
    """A fresh cache (files never seen) and a 256 GiB model whose digest would take minutes: the worker
    digests it at idle priority while a model loads and answers, listings do not wait for it, and SIGTERM
    is not held up by it (a parse still running held exit for 38.7 s before)."""
    huge = models_dir / "aaa-huge.gguf"  # first in the catalog, so its digest is the one running
    with huge.open("wb") as file:
        file.truncate(256 * 2**30)
    router = start_router("--models-dir", str(models_dir), "--llama-server", str(llama_server),
                          env={"MODELYARD_ENGINE_CACHE": str(tmp_path / "cache")})
    deadline = time.monotonic() + 30
    worker = None
    while time.monotonic() < deadline and (worker is None or not _reading(worker, huge)):
        worker = _worker_of(router.proc.pid)
        time.sleep(0.02)
    assert worker is not None and _reading(worker, huge), router.log()
    assert int(proc_stat(worker)[16]) == 19 and int(proc_stat(worker)[38]) == os.SCHED_IDLE

    reply = router.client.post("/v1/completions", json={"model": "smol", "prompt": "Hi", "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    started = time.monotonic()
    tags = router.client.get("/api/tags")
    assert time.monotonic() - started < 1.0
    entries = {m["name"]: m for m in tags.json()["models"]}
    assert entries["aaa-huge:latest"]["digest"] == ""  # not known yet, and the listing did not wait
    assert "could not read the GGUF metadata of" in router.log() and str(huge) in router.log()

    started = time.monotonic()
    router.proc.send_signal(signal.SIGTERM)
    router.proc.wait(timeout=30)
    assert time.monotonic() - started < 5.0, router.log()
    assert not process_exists(worker)
