"""Tells systemd how `modelyard serve` is doing (sd_notify, written here: one unix datagram per message, no
dependency). Under a `Type=notify` unit systemd passes a socket address in NOTIFY_SOCKET; modelyard sends
READY=1 once it listens, STOPPING=1 when its drain begins, RELOADING=1/READY=1 around a SIGHUP reload, and
STATUS= lines that `systemctl status` shows. Without NOTIFY_SOCKET every call does nothing; a socket that
cannot be reached is logged once and never stops serve. The message text and the status line are pure
functions; `Notifier` is the thin edge that sends them."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field

log = logging.getLogger("modelyard.notify")
NOTIFY_SOCKET = "NOTIFY_SOCKET"


def socket_address(value: str | None) -> str | None:
    """The address to send to, from NOTIFY_SOCKET: an absolute path, or an abstract name (`@name`, sent with a
    leading NUL). Anything else is not a socket systemd gives out (vsock addresses are not supported here)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    return value if value.startswith("/") else None


def message(fields: Mapping[str, str | int]) -> bytes:
    """One notification: `KEY=value` lines. A value cannot hold a newline (it would start another key), so
    newlines become spaces."""
    return "".join(f"{key}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items()).encode()


def status_line(statuses: Iterable[str], listening: str) -> str:
    """What `systemctl status` shows: how many models are served and how many are up, e.g.
    `serving 3 models, 1 loaded, 1 loading on http://127.0.0.1:8080`."""
    counts: dict[str, int] = {}
    total = 0
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
        total += 1
    parts = [f"serving {total} model{'' if total == 1 else 's'}", f"{counts.get('loaded') or 'none'} loaded"]
    parts += [f"{counts[s]} {s}" for s in ("loading", "stopping", "failed") if counts.get(s)]
    return f"{', '.join(parts)} on {listening}"


@dataclass
class Notifier:
    """Sends notifications to one address (None: to nobody). Only the first failure is logged: a service
    manager that went away must neither flood the log nor stop serve."""

    address: str | None
    _sock: socket.socket | None = field(default=None, init=False, repr=False)
    _failed: bool = field(default=False, init=False, repr=False)

    @classmethod
    def take_from_environ(cls, environ: MutableMapping[str, str]) -> Notifier:
        """Read NOTIFY_SOCKET and remove it, as sd_notify(unset_environment=1) does: children and the
        background worker inherit the environment, and only modelyard itself speaks for the service."""
        return cls(socket_address(environ.pop(NOTIFY_SOCKET, None)))

    @property
    def active(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a full receive queue must never stall the event loop
            self._sock.sendto(message(fields), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify the service manager at NOTIFY_SOCKET (%s); serving on without it", exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, MAINPID=os.getpid(), STATUS=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd 253+ (Type=notify-reload) match this to the reload it asked for.
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
                  STATUS="reloading the model sources")

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
