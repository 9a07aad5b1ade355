"""llama-server children on Unix sockets (issue 12 point 4): where a child listens, as table tests of the pure
rules (engine.command.Endpoint and launch_plan, children.owner_pid), ChildSockets on the real filesystem, and
end to end with `modelyard serve`, the real llama-server and the real demo models: a child on its socket
answers chats and streams, its socket and directory are modelyard's user's alone, the socket goes with its
child and the directory with modelyard, and two modelyard processes never share one."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from modelyard.children import ChildSockets, owner_pid, socket_fits
from modelyard.config.catalog import Catalog, ModelConfig
from modelyard.config.options import OptionTable, load_option_table
from modelyard.engine.command import SOCKET_SUFFIX, Endpoint, Engine, launch_plan
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from tests.conftest import Router, direct_client, fake_cmd
from tests.fakes import FakeClock, FakeFleet, StaticSource, settle

CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}


# -- the pure rules -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "endpoint"), [
    (["llama-server", "-m", "x.gguf", "--host", "/run/m/1.sock", "--alias", "a"],
     Endpoint(socket=Path("/run/m/1.sock"))),
    (["llama-server", "--host", "127.0.0.1", "--port", "5555", "--alias", "a"], Endpoint(port=5555)),
    (["llama-server", "--port", "5555"], Endpoint(port=5555)),  # router mode's host is its default
    (["llama-server", "--host", "/run/m/1.sock", "--port", "5555"], Endpoint(socket=Path("/run/m/1.sock"))),
    (["llama-server", "--alias", "a"], None),
    (["llama-server", "--port"], None),  # a flag without its value
    (["llama-server", "--port", "x"], None),
])
def test_the_endpoint_of_a_command_line(args: list[str], endpoint: Endpoint | None) -> None:
    assert Endpoint.of_args(args) == endpoint


@pytest.mark.parametrize("endpoint", [Endpoint(port=5555), Endpoint(socket=Path("/tmp/d/3.sock"))])
def test_flags_and_of_args_are_inverse(endpoint: Endpoint) -> None:
    assert Endpoint.of_args(["llama-server", *endpoint.flags()]) == endpoint


def test_how_an_endpoint_is_written_in_logs() -> None:
    assert str(Endpoint(port=5555)) == "127.0.0.1:5555"
    assert str(Endpoint(socket=Path("/tmp/d/3.sock"))) == "unix:///tmp/d/3.sock"


@pytest.mark.parametrize(("endpoint", "tcp_port", "base_url"), [
    (Endpoint(port=5555), 5555, "http://127.0.0.1:5555"),
    (Endpoint(socket=Path("/tmp/d/3.sock")), None, "http://localhost"),  # the host only fills the Host header
    (Endpoint(port=5555, socket=Path("/tmp/d/3.sock")), None, "http://localhost"),  # the socket wins, as in flags
])
def test_where_requests_to_an_endpoint_go(endpoint: Endpoint, tcp_port: int | None, base_url: str) -> None:
    assert (endpoint.tcp_port, endpoint.base_url) == (tcp_port, base_url)


@pytest.fixture(scope="module")
def engine(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(llama_server, load_option_table(llama_server, tmp_path_factory.mktemp("options")))


def test_a_llama_server_child_listens_on_the_socket_it_is_given(engine: Engine) -> None:
    config = ModelConfig("m", {"--model": "/m.gguf"}, "preset", "test")
    plan = launch_plan(config, engine, 5555, socket=Path("/tmp/d/1.sock"))
    assert plan.endpoint == Endpoint(socket=Path("/tmp/d/1.sock"))
    argv = list(plan.argv)
    assert argv[argv.index("--host") + 1] == "/tmp/d/1.sock" and "--port" not in argv
    on_port = launch_plan(config, engine, 5555)  # no socket directory: a loopback port, as before
    assert on_port.endpoint == Endpoint(port=5555)
    assert on_port.argv[on_port.argv.index("--host") + 1:][:3] == ("127.0.0.1", "--port", "5555")
    with pytest.raises(ValueError, match=SOCKET_SUFFIX):
        launch_plan(config, engine, 5555, socket=Path("/tmp/d/1"))  # llama-server would take it for a host


def test_a_custom_engine_keeps_its_port(engine: Engine) -> None:
    config = ModelConfig("m", {}, "preset", "test", command="my-engine --port ${PORT}")
    plan = launch_plan(config, engine, 5555, socket=Path("/tmp/d/1.sock"))
    assert plan.endpoint == Endpoint(port=5555)
    assert plan.argv == ("my-engine", "--port", "5555") and plan.env["PORT"] == "5555"


@pytest.mark.parametrize(("name", "pid"), [
    ("modelyard-123-abc_x", 123), ("modelyard-123-", None), ("modelyard-bench-abc", None), ("modelyard-123", None),
    ("other-123-abc", None), ("xmodelyard-123-abc", None),
])
def test_which_modelyard_made_a_socket_directory(name: str, pid: int | None) -> None:
    assert owner_pid(name) == pid


def test_a_socket_path_must_fit_sun_path() -> None:
    assert socket_fits(Path("/run/user/1000/modelyard-1-x/1.sock"))
    assert not socket_fits(Path("/" + "d" * 120 + "/1.sock"))


# -- ChildSockets, on the filesystem --------------------------------------------------------------------------

def test_child_sockets_make_a_private_directory_with_a_fresh_path_per_child(tmp_path: Path) -> None:
    first, second = ChildSockets(tmp_path), ChildSockets(tmp_path)
    assert first.directory is None and not list(tmp_path.iterdir())  # nothing made until a child asks
    paths = [first.path(), first.path(), second.path()]
    assert all(p is not None and p.name.endswith(SOCKET_SUFFIX) for p in paths)
    assert len(set(paths)) == 3 and first.directory != second.directory  # two modelyards never share one
    assert first.directory is not None and stat.S_IMODE(first.directory.stat().st_mode) == 0o700
    assert owner_pid(first.directory.name) == os.getpid()
    directory = first.directory
    (directory / "1.sock").touch()  # a child's leftover
    first.close()
    assert not directory.exists() and second.directory is not None and second.directory.exists()
    second.close()


def test_the_directory_of_a_modelyard_that_died_is_removed_by_the_next(tmp_path: Path) -> None:
    dead = tmp_path / "modelyard-1-stale"  # its lock file, held by no one
    dead.mkdir()
    (dead / ".lock").touch()
    (dead / "1.sock").touch()
    without_lock = tmp_path / "modelyard-2-new"  # no lock file: not modelyard's, kept
    without_lock.mkdir()
    being_made = tmp_path / ".modelyard-new-3-x"  # another modelyard's, its lock not taken yet: kept
    being_made.mkdir()
    (being_made / ".lock").touch()
    unrelated = tmp_path / "modelyard-bench-x"
    unrelated.mkdir()
    (unrelated / ".lock").touch()
    living = ChildSockets(tmp_path)  # another modelyard, alive (in this process: a lock is per open file)
    assert living.path() is not None and living.directory is not None
    sockets = ChildSockets(tmp_path)
    assert sockets.path() is not None
    assert not dead.exists() and without_lock.exists() and being_made.exists() and unrelated.exists()
    assert living.directory.exists()
    sockets.close()
    living.close()


def test_a_sweep_while_a_directory_is_made_leaves_it_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another modelyard sweeping between this one's mkdir and its flock (its lock not held yet) must not remove
    the directory: it is made and locked under a name the sweep ignores, then renamed. Made under its final
    name, the sweep removed it and every child of this modelyard failed to bind."""
    real_flock = fcntl.flock
    seen_by_the_sweep: list[str] = []
    others: list[ChildSockets] = []

    def flock_after_another_sweeps(fd: int, operation: int) -> None:
        if not others:  # the first lock taken: this modelyard's own, on its directory being made
            seen_by_the_sweep.extend(sorted(entry.name for entry in tmp_path.iterdir()))
            others.append(ChildSockets(tmp_path))
            assert others[0].path() is not None  # it sweeps first
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_another_sweeps)
    sockets = ChildSockets(tmp_path)
    path = sockets.path()
    assert [name.startswith(".modelyard-new-") for name in seen_by_the_sweep] == [True]
    assert path is not None and sockets.directory is not None and path.parent == sockets.directory
    assert sockets.directory.is_dir() and owner_pid(sockets.directory.name) == os.getpid()
    assert stat.S_IMODE(sockets.directory.stat().st_mode) == 0o700
    assert not list(tmp_path.glob(".modelyard-new-*"))  # renamed, nothing left under the temporary name
    third = ChildSockets(tmp_path)  # and its lock holds under the final name: a later sweep keeps it
    assert third.path() is not None and sockets.directory.is_dir()
    for each in (third, others[0], sockets):
        each.close()
    assert not list(tmp_path.iterdir())


def test_no_directory_is_made_once_closed(tmp_path: Path) -> None:
    """A child's start that comes after close (one queued as modelyard shut down) gets no socket: a directory
    made then would outlive modelyard."""
    never_used = ChildSockets(tmp_path)
    never_used.close()
    assert never_used.path() is None and not list(tmp_path.iterdir())
    used = ChildSockets(tmp_path)
    assert used.path() is not None
    used.close()
    assert used.path() is None and not list(tmp_path.iterdir())


async def test_a_load_queued_as_modelyard_closes_starts_no_child(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A llama-server child's start that runs once close() has begun starts nothing: close has collected the
    children it stops and removed the sockets' directory, so such a child would run on unstopped (on a port)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    config = ModelConfig("m", {"--model": str(tmp_path / "m.gguf")}, "preset", "test")
    source = StaticSource(Catalog(models={"m": config}, by_name={"m": "m"}))
    clock = FakeClock()
    fleet = FakeFleet(clock)
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])), catalog=source.value,
                           clock=clock, gguf_cache=GgufCache(tmp_path / "cache"), child_factory=fleet)
    await manager.close()
    manager._spawn(manager._start_instance("m"))  # the race's shape: a start queued before close, run after it
    await settle()
    assert fleet.children == {} and not list(runtime.iterdir())


def test_without_a_usable_directory_children_listen_on_ports(tmp_path: Path) -> None:
    assert ChildSockets(tmp_path / "missing").path() is None
    long = tmp_path / ("d" * 110)
    long.mkdir()
    assert ChildSockets(long).path() is None


# -- end to end -----------------------------------------------------------------------------------------------

@pytest.fixture
def short_runtime() -> Iterator[Path]:
    """A runtime directory with a short path: under pytest-xdist a tmp_path is ~80 characters, and with
    modelyard's directory and the socket's name that passed sun_path's 107 (the child then listened on a port,
    as it should, and the test failed). A user's XDG_RUNTIME_DIR is /run/user/<uid>."""
    runtime = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield runtime
    shutil.rmtree(runtime, ignore_errors=True)


def _socket_dirs(base: Path, router: Router) -> list[Path]:
    return sorted(base.glob(f"modelyard-{router.proc.pid}-*"))


def test_a_child_on_its_socket_serves_chats_and_streams_and_its_socket_goes_with_it(
        short_runtime: Path, models_dir: Path, start_router: Any) -> None:
    runtime = short_runtime
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    router: Router = start_router("--models-dir", str(models_dir), "-c", "2048", env=env)
    other: Router = start_router("--models-dir", str(models_dir), "-c", "2048", env=env)
    api = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    assert api.chat.completions.create(model="smol", **CHAT).choices[0].message.content
    stream = api.chat.completions.create(model="smol", stream=True, **CHAT)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    endpoint = router.endpoint("smol")
    assert endpoint.socket is not None and endpoint.port == 0
    directory = endpoint.socket.parent
    assert _socket_dirs(runtime, router) == [directory]
    assert stat.S_ISSOCK(endpoint.socket.stat().st_mode)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and directory.stat().st_uid == os.getuid()
    assert "ready in" in router.log() and f"unix://{endpoint.socket}" in router.log()
    with direct_client(endpoint, timeout=30) as child:  # reachable (by this user), and still keyed
        assert child.post("/v1/chat/completions", json=CHAT).status_code == 401

    # Another modelyard's children listen in a directory of its own.
    other.client.post("/v1/chat/completions", json={"model": "smol", **CHAT}).raise_for_status()
    other_socket = other.endpoint("smol").socket
    assert other_socket is not None and other_socket.parent != directory
    assert _socket_dirs(runtime, other) == [other_socket.parent]

    # Unloaded, its socket file goes with it; the next child gets a new path.
    assert router.client.post("/models/unload", json={"model": "smol"}).json() == {"success": True}
    router.wait_status("smol", "unloaded")
    assert not endpoint.socket.exists()
    router.client.post("/v1/chat/completions", json={"model": "smol", **CHAT}).raise_for_status()
    again = router.endpoint("smol").socket
    assert again is not None and again != endpoint.socket and again.parent == directory

    # A child killed: the next one starts on a fresh path, and no leftover file blocks it.
    os.kill(router.child_pid("smol"), signal.SIGKILL)
    router.wait_status("smol", "failed")
    router.client.post("/v1/chat/completions", json={"model": "smol", **CHAT}).raise_for_status()
    assert router.endpoint("smol").socket not in (None, again)

    # modelyard stopped: its directory is gone, the other's is not.
    router.stop()
    assert not directory.exists() and _socket_dirs(runtime, router) == []
    assert other_socket.exists()

    # A modelyard killed outright leaves its directory (its children die with it); the next one removes it.
    other.proc.kill()
    other.proc.wait()
    assert other_socket.parent.exists()
    third: Router = start_router("--models-dir", str(models_dir), "-c", "2048", env=env)
    third.client.post("/v1/chat/completions", json={"model": "smol", **CHAT}).raise_for_status()
    assert not other_socket.parent.exists() and len(_socket_dirs(runtime, third)) == 1


def test_a_custom_engine_stays_on_a_loopback_port(tmp_path: Path, start_router: Any) -> None:
    preset = tmp_path / "models.ini"
    preset.write_text(f"[fake]\ncmd = {fake_cmd()}\n")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    router: Router = start_router("--models-preset", str(preset), env={"XDG_RUNTIME_DIR": str(runtime)})
    router.client.post("/v1/chat/completions", json={"model": "fake", **CHAT}).raise_for_status()
    entry = next(m for m in router.client.get("/models").json()["data"] if m["id"] == "fake")
    args = entry["status"]["args"]
    assert int(args[args.index("--port") + 1]) > 0 and not any(a.endswith(SOCKET_SUFFIX) for a in args)
