"""How `modelyard serve` writes its log lines to stderr. On a terminal or into a file: a timestamp, the level,
the logger and the message. When stderr is systemd's journal stream (JOURNAL_STREAM names stderr's device and
inode), journald stamps each line itself, so no timestamp of ours, and each line starts with its syslog priority
(`<3>` error, `<4>` warning, `<6>` info, `<7>` debug, as sd-daemon.h defines them) so `journalctl -p warning`
filters them; a multi-line record (a traceback) gets the prefix on every line, since journald splits on
newlines. Choosing the format and prefixing lines are pure functions; `stderr_handler` reads the environment
and stderr's identity at the edge."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"

# sd-daemon.h's SD_ERR .. SD_DEBUG; Python has no NOTICE level, so 5 is never used.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7


def is_journal_stream(journal_stream: str | None, stderr_identity: tuple[int, int] | None) -> bool:
    """Whether stderr is the journal: systemd sets JOURNAL_STREAM=device:inode of the stream it connected, and
    a child whose stderr was redirected elsewhere inherits the variable but not the stream."""
    if not journal_stream or stderr_identity is None:
        return False
    device, _, inode = journal_stream.partition(":")
    try:
        return (int(device), int(inode)) == stderr_identity
    except ValueError:
        return False


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return DEBUG_PRIORITY


def journal_lines(levelno: int, text: str) -> str:
    """`text` with the record's priority prefix on each of its lines."""
    prefix = f"<{syslog_priority(levelno)}>"
    return "\n".join(prefix + line for line in text.split("\n"))


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return journal_lines(record.levelno, super().format(record))


def formatter(journal: bool) -> logging.Formatter:
    return JournalFormatter() if journal else logging.Formatter(PLAIN_FORMAT)


def stream_identity(stream: TextIO) -> tuple[int, int] | None:
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no descriptor (a test's captured stream) or a closed one: not the journal
        return None
    return info.st_dev, info.st_ino


def stderr_handler(environ: Mapping[str, str], stream: TextIO | None = None) -> logging.Handler:
    """The handler serve logs through: journald's form when stderr is the journal, the plain one otherwise."""
    stream = stream or sys.stderr  # looked up now, not at import: tests and wrappers replace sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(is_journal_stream(environ.get("JOURNAL_STREAM"), stream_identity(stream))))
    return handler
