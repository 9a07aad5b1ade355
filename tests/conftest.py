"""Fixtures for end-to-end tests: the real llama-server, the real demo models, and `modelyard serve` run as a
separate process on a free port, exactly as a user runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelyard.bench.processes import child_pid, children_of, stop_gracefully
from modelyard.demo import GEMMA3, SMOLLM2, default_models_dir
from modelyard.engine.command import Endpoint
from modelyard.engine.locate import EngineNotFound, locate_llama_server

TESTS = Path(__file__).parent
FAKE_ENGINE = TESTS / "fake_engine.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def llama_server() -> Path:
    try:
        return locate_llama_server()
    except EngineNotFound as exc:
        pytest.fail(f"{exc} (`make test` builds it first)")


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    models = {name: default_models_dir() / f"{name}.gguf" for name in (SMOLLM2, GEMMA3)}
    missing = [str(p) for p in models.values() if not p.is_file()]
    if missing:
        pytest.fail(f"demo models missing: {missing} (`make test` runs `modelyard demo install` first)")
    return models


@pytest.fixture
def models_dir(tmp_path: Path, demo_models: dict[str, Path]) -> Path:
    """The demo models under several names (symlinks), so swaps between distinct models can be tested."""
    return _link_models(tmp_path / "models", demo_models)


@pytest.fixture(scope="module")
def module_models_dir(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path]) -> Path:
    """`models_dir` for a router shared by a module's tests."""
    return _link_models(tmp_path_factory.mktemp("models"), demo_models)


def _link_models(directory: Path, demo_models: dict[str, Path]) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "smol.gguf").symlink_to(demo_models[SMOLLM2])
    (directory / "smol-b.gguf").symlink_to(demo_models[SMOLLM2])
    (directory / "gemma.gguf").symlink_to(demo_models[GEMMA3])
    return directory


class Router:
    """`modelyard serve` in a subprocess."""

    def __init__(self, args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"router-{self.port}.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "modelyard.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def wait_ready(self, timeout: float = 30) -> Router:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"modelyard exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"modelyard did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, model: str) -> str:
        for entry in self.client.get("/models").json()["data"]:
            if entry["id"] == model:
                return str(entry["status"]["value"])
        raise KeyError(model)

    def wait_status(self, model: str, wanted: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status(model) == wanted:
                return
            time.sleep(0.05)
        raise AssertionError(f"{model} never became {wanted} (is {self.status(model)})")

    def endpoint(self, model: str) -> Endpoint:
        """Where the child of `model` listens, as /models lists it (status.args)."""
        entry = next(m for m in self.client.get("/models").json()["data"] if m["id"] == model)
        endpoint = Endpoint.of_args(entry["status"]["args"])
        assert endpoint is not None, entry["status"]["args"]
        return endpoint

    def child_pid(self, model: str) -> int:
        """The process of the child of `model` (found by the endpoint its command line names)."""
        pid = child_pid(self.proc.pid, self.endpoint(model))
        assert pid is not None, f"no child of modelyard listens on {self.endpoint(model)}: {self.children()}"
        return pid

    def children(self) -> list[int]:
        """The router's model children. Not its background reader, which runs while it hashes and parses model
        files new to this machine (on a fresh machine, during the first tests: a clean CI runner)."""
        return [pid for pid in children_of(self.proc.pid) if not _is_background_reader(pid)]

    def stop(self) -> None:
        stop_gracefully(self.proc)
        self.client.close()
        self._log.close()
        leftovers = children_of(self.proc.pid)  # the background reader included
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"children outlived modelyard: {leftovers}"


def direct_client(endpoint: Endpoint, **kwargs: Any) -> httpx.Client:
    """An HTTP client straight to a child, bypassing modelyard: over its Unix socket, or its loopback port."""
    transport = httpx.HTTPTransport(uds=str(endpoint.socket)) if endpoint.socket is not None else None
    return httpx.Client(transport=transport, base_url=endpoint.base_url, **kwargs)


def _is_background_reader(pid: int) -> bool:
    try:
        return b"modelyard.background" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone already


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator[object]:
    yield from _starter(tmp_path)


@pytest.fixture(scope="module")
def start_module_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """`start_router` for routers shared by a module's tests (a start and its first load cost 1 to 3 s): for
    tests that neither need a fresh router nor leave it in a state that another test could notice."""
    yield from _starter(tmp_path_factory.mktemp("routers"))


@pytest.fixture(scope="session")
def smol_router(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path],
                llama_server: Path) -> Iterator[Router]:
    """One router over SmolLM2 alone (as `smol`, -c 2048), shared by the modules that only send it ordinary
    traffic and read what it recorded (activity, metrics): their assertions must hold whatever the other
    modules sent before them (read the newest records, compare counters before and after)."""
    models = tmp_path_factory.mktemp("smol-models")
    (models / "smol.gguf").symlink_to(demo_models[SMOLLM2])
    served = Router(["--models-dir", str(models), "-c", "2048"], tmp_path_factory.mktemp("smol-router")).wait_ready()
    yield served
    served.stop()


def _starter(directory: Path) -> Iterator[object]:
    routers: list[Router] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> Router:
        router = Router(list(args), directory, env)
        routers.append(router)
        return router.wait_ready() if wait else router

    yield start
    for router in routers:
        router.stop()


def fake_cmd(name: str = "fake", load_delay: float = 0.0, fail: bool = False, ignore_term: bool = False) -> str:
    extra = (" --fail-load" if fail else "") + (" --ignore-term" if ignore_term else "")
    return f"{sys.executable} {FAKE_ENGINE} --port ${{PORT}} --name {name} --load-delay {load_delay}{extra}"
