"""manager.read_ahead: advice to the kernel, never an error (issue 12 point 2)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from modelyard.manager import read_ahead


def test_a_readable_file_is_advised_and_a_missing_one_is_logged(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    present = tmp_path / "model.gguf"
    present.write_bytes(b"GGUF" + bytes(4096))
    missing = tmp_path / "mmproj.gguf"
    with caplog.at_level(logging.WARNING, logger="modelyard.manager"):
        read_ahead([present, missing])
    assert [r.getMessage() for r in caplog.records] == [
        f"could not read {missing} ahead: [Errno 2] No such file or directory: '{missing}'"]
