"""manager.read_ahead: advice to the kernel, never an error (issue 12 point 2): each of the model's files is
advised (POSIX_FADV_WILLNEED), except one that would not fit in the memory available; a file the kernel
refuses is logged; an OS without posix_fadvise (macOS) is left alone."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from modelyard import manager
from modelyard.manager import read_ahead


@pytest.fixture
def advised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int]]:
    """What posix_fadvise was asked: (file size, offset, length, advice), one per call."""
    calls: list[tuple[int, int, int, int]] = []

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((os.fstat(fd).st_size, offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", record, raising=False)
    return calls


def model(tmp_path: Path, **sizes: int) -> dict[str, str]:
    """Settings naming files of these sizes (by canonical flag without its dashes: model, mmproj)."""
    settings = {}
    for flag, size in sizes.items():
        path = tmp_path / f"{flag}.gguf"
        path.write_bytes(b"GGUF" + bytes(size - 4))
        settings[f"--{flag}"] = str(path)
    return settings


def test_every_file_of_the_model_is_advised(tmp_path: Path, advised: list[tuple[int, int, int, int]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager, "available_memory", lambda: 1 << 30)
    read_ahead(model(tmp_path, model=8192, mmproj=4096))
    assert advised == [(8192, 0, 0, os.POSIX_FADV_WILLNEED), (4096, 0, 0, os.POSIX_FADV_WILLNEED)]


def test_a_file_larger_than_the_memory_available_is_skipped(tmp_path: Path, advised: list[tuple[int, int, int, int]],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(manager, "available_memory", lambda: 10_000)
    with caplog.at_level(logging.DEBUG, logger="modelyard.manager"):
        read_ahead(model(tmp_path, model=16_384, mmproj=4096))
    assert advised == [(4096, 0, 0, os.POSIX_FADV_WILLNEED)]  # the model's would evict the running models' pages
    assert any("not reading" in r.getMessage() and "model.gguf" in r.getMessage() for r in caplog.records)
    advised.clear()
    monkeypatch.setattr(manager, "available_memory", lambda: 6000)
    read_ahead(model(tmp_path, model=4096, mmproj=4096))  # each fits, not both
    assert [size for size, *_ in advised] == [4096]


def test_without_knowing_the_memory_available_every_file_is_advised(
        tmp_path: Path, advised: list[tuple[int, int, int, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager, "available_memory", lambda: 0)
    read_ahead(model(tmp_path, model=16_384))
    assert [size for size, *_ in advised] == [16_384]


def test_a_file_the_kernel_refuses_is_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    def refuse(fd: int, offset: int, length: int, advice: int) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse, raising=False)
    settings = model(tmp_path, model=4096)
    with caplog.at_level(logging.WARNING, logger="modelyard.manager"):
        read_ahead(settings)
    assert [r.getMessage() for r in caplog.records] == [
        f"could not read {settings['--model']} ahead: [Errno 22] Invalid argument"]


def test_an_os_without_posix_fadvise_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delattr(os, "posix_fadvise", raising=False)  # macOS: AttributeError escaped `except OSError`
    with caplog.at_level(logging.DEBUG, logger="modelyard.manager"):
        read_ahead(model(tmp_path, model=4096))
    assert caplog.records == []


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this OS")
def test_the_kernel_takes_the_advice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="modelyard.manager"):
        read_ahead(model(tmp_path, model=8192))  # the real call, on a real file: nothing to log
    assert caplog.records == []
