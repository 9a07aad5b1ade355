"""Start the two routers under test (and find their children, on the endpoint each listens on: router mode's on
loopback ports, modelyard's llama-server children on Unix sockets), and read what each process costs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from modelyard.bench.load import new_session
from modelyard.engine.command import CHILD_KEY_ENV, Endpoint

MODELYARD = "modelyard"
ROUTER_MODE = "llama-server router"
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Target:
    """One server the bench calls: a router, or a router's child "direct" on its own endpoint (over its Unix
    socket for a modelyard child, so that "direct" stays the child's own cost), with the headers it needs."""

    url: str  # the base URL (over a socket its host part only fills the Host header)
    headers: dict[str, str] = field(default_factory=dict)
    socket: Path | None = None

    def session(self, concurrency: int, force_close: bool = False) -> aiohttp.ClientSession:
        return new_session(concurrency, force_close, self.socket)


@dataclass
class RouterProcess:
    """One router (modelyard or llama-server in router mode) running as a subprocess on loopback."""

    kind: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    launched: float
    ready_after: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float, path: str = "/v1/models") -> float:
        deadline = self.launched + timeout
        with httpx.Client(timeout=timeout) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: "
                                       f"{self.log.read_text(errors='replace')[-2000:]}")
                try:
                    if client.get(self.url + path).status_code == 200:
                        self.ready_after = time.monotonic() - self.launched
                        return self.ready_after
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        raise TimeoutError(f"{self.kind} was not ready after {timeout:.0f} s")

    def child_endpoint(self, model: str) -> Endpoint:
        """Where the child serving `model` listens, from /models (status.args, as both routers list it)."""
        listing = httpx.get(self.url + "/models", timeout=30).json()["data"]
        entry = next(m for m in listing if m["id"] == model)
        endpoint = Endpoint.of_args(entry["status"]["args"])
        if endpoint is None:
            raise RuntimeError(f"{self.kind} lists no endpoint for {model}: {entry['status']['args']}")
        return endpoint

    def child_target(self, model: str) -> Target:
        """The child serving `model` (its endpoint from /models status.args), and the headers a direct call
        needs: modelyard's children answer only with their key, which the bench (the same user) reads from
        the child's environment, as only modelyard and root can."""
        endpoint = self.child_endpoint(model)
        pid = child_pid(self.pid, endpoint)
        headers = {}
        if pid is not None:
            with contextlib.suppress(OSError):
                for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    if item.startswith(CHILD_KEY_ENV.encode() + b"="):
                        headers = {"Authorization": f"Bearer {item.split(b'=', 1)[1].decode()}"}
        return Target(endpoint.base_url, headers, endpoint.socket)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the router process itself (children excluded)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def rss_bytes(self, peak: bool = True) -> int:
        return rss_bytes(self.pid, peak)

    def descriptors(self) -> int:
        return open_descriptors(self.pid)

    def children(self) -> list[int]:
        return children_of(self.pid)

    def stop(self) -> None:
        stop_gracefully(self.proc)


def rss_bytes(pid: int, peak: bool = False) -> int:
    """Resident memory of a process now (VmRSS) or at its peak so far (VmHWM), from /proc/<pid>/status."""
    return _status_bytes(pid, "VmHWM:" if peak else "VmRSS:")


def anon_bytes(pid: int) -> int:
    """The anonymous part of its resident memory (RssAnon: heap and stacks), without the file pages it maps
    (a GGUF file read through mmap counts in VmRSS while its pages stay cached, and is not a leak)."""
    return _status_bytes(pid, "RssAnon:")


def _status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def open_descriptors(pid: int) -> int:
    """How many file descriptors a process holds open (sockets, pipes, files), from /proc/<pid>/fd."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def children_of(router_pid: int) -> list[int]:
    """Every live process started by the router with that pid (it marks them with MODELYARD_PARENT_PID)."""
    marker = f"MODELYARD_PARENT_PID={router_pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def child_pid(parent: int, endpoint: Endpoint) -> int | None:
    """The process that `parent` started listening on `endpoint` (either router's child of that model), if
    any."""
    marker = "\0".join(endpoint.flags()[-2:]).encode() + b"\0"  # `--port N` or `--host <socket>`
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if marker in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


def stop_gracefully(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM (a router stops its children), then SIGKILL if it is still there after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_all(procs: list[subprocess.Popen[bytes]], grace: float = 30) -> None:
    """`stop_gracefully` for several at once: one SIGTERM each, then the waits (their drains overlap)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_router(kind: str, binary: Path, source_args: list[str], max_models: int, workdir: Path,
                 engine_args: list[str], modelyard_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, port: int = 0) -> RouterProcess:
    """`port`: 0 = a free one (a caller that must name it beforehand, e.g. in the environment, passes it)."""
    port = port or free_port()
    common = [*source_args, "--models-max", str(max_models), "--port", str(port), *engine_args]
    if kind == MODELYARD:
        command = [sys.executable, "-m", "modelyard.cli", "serve", "--llama-server", str(binary),
                   *modelyard_args, *common]
    else:
        command = [str(binary), *common]
    log = workdir / f"{kind.replace(' ', '-')}-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
    return RouterProcess(kind, proc, f"http://127.0.0.1:{port}", log, time.monotonic())
