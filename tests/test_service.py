"""`modelyard service` and serve under systemd (issue 10, point 6): the rendered unit line by line (table tests)
and through `systemd-analyze verify`; install, status, logs and uninstall through a fake Host (no real
systemctl, units in a temporary directory); the sd_notify messages and the journald log format as table tests;
and the real `modelyard serve` sending READY=1, RELOADING=1/READY=1 and STOPPING=1 to a datagram socket the
test binds as NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from modelyard.cli import HANDLER_GRACE_S, main
from modelyard.config.catalog import DEFAULT_STOP_TIMEOUT
from modelyard.logformat import (
    PLAIN_FORMAT,
    JournalFormatter,
    formatter,
    is_journal_stream,
    journal_lines,
    stderr_handler,
    syslog_priority,
)
from modelyard.notify import Notifier, message, socket_address, status_line
from modelyard.service import (
    UNIT_NAME,
    Outcome,
    Scope,
    ServiceError,
    UnitSpec,
    absolute_paths,
    flag_value,
    installed_command,
    journalctl_argv,
    permission_problem,
    preset_stop_timeout,
    quote_arg,
    render_unit,
    secret_flag,
    stop_timeout_sec,
    unreachable,
)
from tests.conftest import free_port

EXECUTABLE = installed_command(Path(sys.executable))
NO_BUS = Outcome(1, "System has not been booted with systemd as init system (PID 1). Can't operate.\n"
                    "Failed to connect to bus: Host is down")


def unit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# --- the unit -------------------------------------------------------------------------------------------------

COMMON = ["Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed",
          "KillSignal=SIGTERM", "TimeoutStopSec=57", "Restart=on-failure", "NoNewPrivileges=yes"]
# Would hide the models, the engine cache or the GPU from the engine.
NEVER = ("ProtectHome", "PrivateDevices", "ProtectClock", "DeviceAllow", "DevicePolicy", "ProtectSystem=strict",
         "MemoryDenyWriteExecute", "PrivateUsers", "ProtectKernelLogs", "ProtectKernelModules")


@pytest.mark.parametrize(("spec", "present", "absent"), [
    (UnitSpec(Scope.USER, ("/opt/my/bin/modelyard", "serve", "--port", "9000"), 57),
     [*COMMON, "ExecStart=/opt/my/bin/modelyard serve --port 9000", "WantedBy=default.target"],
     ["User=", "EnvironmentFile=", "PrivateTmp=yes", "After=network-online.target", "ProtectSystem=full"]),
    (UnitSpec(Scope.SYSTEM, ("/opt/my/bin/modelyard", "serve"), 57, Path("/etc/modelyard/env"), "modelyard"),
     [*COMMON, "ExecStart=/opt/my/bin/modelyard serve", "WantedBy=multi-user.target", "User=modelyard",
      "EnvironmentFile=/etc/modelyard/env", "PrivateTmp=yes", "ProtectSystem=full", "ProtectKernelTunables=yes",
      "After=network-online.target", "Wants=network-online.target"],
     ["WantedBy=default.target"]),
    (UnitSpec(Scope.SYSTEM, ("/opt/my/bin/modelyard", "serve"), 57, Path("/etc/my 100%/env")),
     ["EnvironmentFile=/etc/my 100%%/env"], ["User="]),
])
def test_unit_lines(spec: UnitSpec, present: list[str], absent: list[str]) -> None:
    lines = unit_lines(render_unit(spec))
    for wanted in present:
        assert wanted in lines
    for unwanted in absent:
        assert not any(line.startswith(unwanted) for line in lines), unwanted
    assert not [line for line in lines if line.startswith(NEVER)]
    assert [line for line in lines if line.startswith("[")] == ["[Unit]", "[Service]", "[Install]"]
    assert len({line.split("=")[0] for line in lines}) == len(lines)  # no directive twice


@pytest.mark.parametrize(("arg", "quoted"), [
    ("--port", "--port"), ("/a/b.gguf", "/a/b.gguf"), ("80%", "80%%"), ("a b", '"a b"'),
    ("$HOME", '"$$HOME"'), ('say "hi"', '"say \\"hi\\""'), ("back\\slash", '"back\\\\slash"'), ("", '""'),
    ("k=v,w", "k=v,w"), ("'single'", '"\'single\'"'),
])
def test_quote_arg(arg: str, quoted: str) -> None:
    assert quote_arg(arg) == quoted


def test_a_line_break_cannot_reach_the_unit() -> None:
    with pytest.raises(ServiceError, match="line break"):
        render_unit(UnitSpec(Scope.USER, ("/x/modelyard", "serve", "--alias", "a\nExecStartPre=/bin/evil"), 57))


@pytest.mark.parametrize(("grace", "child_stop", "seconds"), [(30, 10, 57), (0, 10, 27), (20, 5.5, 43)])
def test_stop_timeout_covers_the_drain(grace: float, child_stop: float, seconds: int) -> None:
    assert stop_timeout_sec(grace, child_stop) == seconds
    # what serve's shutdown can take: the grace, the handlers' grace, manager.close's wait (stop-timeout + 5 s)
    assert seconds >= grace + HANDLER_GRACE_S + child_stop + 5 + 5


@pytest.mark.parametrize(("text", "longest"), [
    ("", DEFAULT_STOP_TIMEOUT), ("[a]\nstop-timeout = 25\n[b]\nstop-timeout=5 ; short\n", 25.0),
    ("[a]\nstop-timeout = 3\n", DEFAULT_STOP_TIMEOUT), ("; stop-timeout = 99\n", DEFAULT_STOP_TIMEOUT),
    ("[a]\nstop-timeout = soon\n", DEFAULT_STOP_TIMEOUT), ("[a]\n  stop-timeout = 12.5\n", 12.5),
])
def test_preset_stop_timeout(text: str, longest: float) -> None:
    assert preset_stop_timeout(text) == longest


@pytest.mark.parametrize(("args", "secret"), [
    (("--port", "1"), None), (("--api-key", "k"), "--api-key"), (("--api-key=k",), "--api-key"),
    (("-c", "4", "--hf-token", "t"), "--hf-token"), (("--api-key-file", "/k"), None),
])
def test_secret_flags_are_found(args: tuple[str, ...], secret: str | None) -> None:
    assert secret_flag(args) == secret


@pytest.mark.parametrize(("args", "absolute"), [
    (("--models-dir", "m", "-c", "4"), ("--models-dir", "/srv/m", "-c", "4")),
    (("--models-preset=../p.ini",), ("--models-preset=/p.ini",)),
    (("--api-key-file", "/k", "--ssl-key-file", "~/key.pem"), ("--api-key-file", "/k", "--ssl-key-file",
                                                                os.path.expanduser("~/key.pem"))),
    (("--llama-server", "llama-server"), ("--llama-server", "llama-server")),
    (("--llama-server", "bin/llama-server"), ("--llama-server", "/srv/bin/llama-server")),
    (("--alias", "m"), ("--alias", "m")),
])
def test_path_flags_become_absolute(args: tuple[str, ...], absolute: tuple[str, ...]) -> None:
    assert absolute_paths(args, Path("/srv")) == absolute


def test_flag_value_takes_the_last() -> None:
    assert flag_value(["--models-preset", "a", "--models-preset=b"], "--models-preset") == "b"
    assert flag_value(["--models-preset"], "--models-preset") is None


@pytest.mark.parametrize(("mode", "owner", "owner_uid", "problem"), [
    (0o100600, 1000, 1000, None), (0o100400, 0, None, None), (0o100600, 7, None, None),
    (0o100644, 1000, 1000, "chmod 600"), (0o100640, 0, None, "chmod 600"), (0o100600, 0, 1000, "chown alice /k"),
])
def test_secret_file_permissions(mode: int, owner: int, owner_uid: int | None, problem: str | None) -> None:
    found = permission_problem("--api-key-file", Path("/k"), mode, owner, owner_uid, "alice")
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize(("outcome", "down"), [
    (NO_BUS, True), (Outcome(1, "Failed to connect to bus: No medium found"), True),
    (Outcome(127, "systemctl: not found"), True), (Outcome(0, ""), False),
    (Outcome(5, "Failed to restart modelyard.service: Unit modelyard.service not found."), False),
])
def test_unreachable_systemd(outcome: Outcome, down: bool) -> None:
    assert unreachable(outcome) is down


@pytest.mark.parametrize(("scope", "follow", "argv"), [
    (Scope.USER, True, ["journalctl", "--user-unit", UNIT_NAME, "--follow"]),
    (Scope.SYSTEM, False, ["journalctl", "-u", UNIT_NAME]),
])
def test_journalctl_argv(scope: Scope, follow: bool, argv: list[str]) -> None:
    assert journalctl_argv(scope, follow, None, None) == argv


def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")

    def verify(text: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / UNIT_NAME).write_text(text)
        return subprocess.run([analyze, "verify", str(tmp_path / UNIT_NAME)], capture_output=True, text=True,
                              timeout=30, check=False)

    # It must be seen to check units here (a clean run below then means something), or cannot run at all.
    broken = verify(f"[Service]\nType=notify\nExecStart={sys.executable}\nNoSuchKey=1\n")
    if "NoSuchKey" not in broken.stderr:
        pytest.skip(f"systemd-analyze verify does not check units here: {broken.stderr.strip()!r}")
    for spec in (UnitSpec(Scope.USER, (*EXECUTABLE, "serve", "--port", "9000"), 57),
                 UnitSpec(Scope.SYSTEM, (*EXECUTABLE, "serve", "--alias", "a b%$"), 97, tmp_path / "env", "root")):
        checked = verify(render_unit(spec))
        assert (checked.returncode, checked.stdout + checked.stderr) == (0, ""), render_unit(spec)


# --- install, status, logs, uninstall through the seam --------------------------------------------------------

@dataclass
class FakeHost:
    root: Path
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # by systemctl verb; default: success
    down: bool = False  # no systemd answers (a container): every systemctl call says so
    calls: list[tuple[Scope, tuple[str, ...]]] = field(default_factory=list)
    attached: list[list[str]] = field(default_factory=list)

    def unit_dir(self, scope: Scope) -> Path:
        return self.root / scope.value

    def systemctl(self, scope: Scope, args: Any) -> Outcome:
        self.calls.append((scope, tuple(args)))
        return NO_BUS if self.down else self.outcomes.get(args[0], Outcome(0, ""))

    def attach(self, argv: Any) -> int:
        self.attached.append(list(argv))
        return 0


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "units")


def service(host: FakeHost, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["service", *args], obj=host, env=env)


def one_line_error(result: Result, *words: str) -> None:
    """Exit 1 (2: click's usage errors) with one `Error:` line holding `words` (after at most a `wrote ...`
    line), no traceback."""
    assert result.exit_code in (1, 2)
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if not line.startswith("wrote ")] == [lines[-1]] and "Traceback" not in result.stderr
    assert lines[-1].startswith("Error: ")
    for word in words:
        assert word in lines[-1]


def test_install_now_and_uninstall_a_user_unit(host: FakeHost, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.ini").write_text("[chat]\nmodel = /m.gguf\nstop-timeout = 20\n")
    keys = tmp_path / "keys.txt"
    keys.write_text("k1\n")
    keys.chmod(0o600)
    result = service(host, "install", "--user", "--now", "--models-preset", "models.ini", "--api-key-file",
                     str(keys), "--shutdown-grace", "1m", "-c", "4096")
    assert result.exit_code == 0, result.stderr
    path = host.root / "user" / UNIT_NAME
    lines = unit_lines(path.read_text())
    assert f"ExecStart={' '.join(EXECUTABLE)} serve --models-preset {tmp_path}/models.ini --api-key-file " \
           f"{keys} --shutdown-grace 1m -c 4096" in lines
    assert f"TimeoutStopSec={math.ceil(60 + 7 + 20 + 10)}" in lines
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert host.calls == [(Scope.USER, ("daemon-reload",)), (Scope.USER, ("enable", UNIT_NAME)),
                          (Scope.USER, ("restart", UNIT_NAME))]
    assert "loginctl enable-linger" in result.stderr

    host.calls.clear()
    result = service(host, "uninstall", "--user")
    assert result.exit_code == 0, result.stderr
    assert not path.exists()
    assert host.calls[0] == (Scope.USER, ("disable", "--now", UNIT_NAME))
    assert (Scope.USER, ("daemon-reload",)) in host.calls
    one_line_error(service(host, "uninstall", "--user"), "no unit at")


def test_install_without_systemd_still_writes_the_unit(host: FakeHost) -> None:
    host.down = True
    result = service(host, "install", "--environment-file", "/nonexistent/env")
    one_line_error(result, "--environment-file", "/nonexistent/env")
    assert not (host.root / "system" / UNIT_NAME).exists()

    result = service(host, "install", "--port", "9000")
    assert result.exit_code == 0, result.stderr
    assert "ExecStart=" + " ".join(EXECUTABLE) + " serve --port 9000" in unit_lines(
        (host.root / "system" / UNIT_NAME).read_text())
    assert "systemd is not reachable here" in result.stderr and "enable --now modelyard" in result.stderr
    result = service(host, "install", "--now", "--port", "9000")
    one_line_error(result, "systemd is not reachable here", "modelyard serve")  # asked to start: it could not
    assert [call[1] for call in host.calls] == [("daemon-reload",), ("daemon-reload",)]
    one_line_error(service(host, "status"), "systemd is not reachable here")
    result = service(host, "uninstall")
    assert result.exit_code == 0 and not (host.root / "system" / UNIT_NAME).exists()
    assert "systemd is not reachable here" in result.stderr


def test_install_a_system_unit_with_an_environment_file(host: FakeHost, tmp_path: Path) -> None:
    env = tmp_path / "env"
    env.write_text("LLAMA_API_KEY=sekrit\n")
    env.chmod(0o644)
    one_line_error(service(host, "install", "--environment-file", str(env)), "chmod 600")
    env.chmod(0o600)
    if os.getuid() == 0:  # its owner sets a root service's environment: it must be root
        os.chown(env, 65534, -1)
        one_line_error(service(host, "install", "--environment-file", str(env)), f"chown root {env}")
        os.chown(env, 0, -1)
    result = service(host, "install", "--environment-file", str(env), "--run-as", "root")
    assert result.exit_code == 0, result.stderr
    lines = unit_lines((host.root / "system" / UNIT_NAME).read_text())
    assert f"EnvironmentFile={env}" in lines and "User=root" in lines and "PrivateTmp=yes" in lines
    assert "start it with `systemctl enable --now modelyard`" in result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--api-key", "sekrit"], ["--api-key", "--api-key-file"]),
    (["--user", "--run-as", "root"], ["--run-as"]),
    (["--run-as", "no-such-user-here"], ["no such user"]),
    (["--port", "http"], ["--port"]),
    (["--shutdown-grace", "soon"], ["--shutdown-grace"]),
    (["--models-preset", "/nonexistent/models.ini"], ["/nonexistent/models.ini"]),
])
def test_install_refuses_bad_flags_in_one_line(host: FakeHost, args: list[str], words: list[str]) -> None:
    result = service(host, "install", *args)
    one_line_error(result, *words)
    assert "sekrit" not in result.stderr
    assert not (host.root / "system" / UNIT_NAME).exists() and host.calls == []


def test_a_key_in_the_environment_is_not_carried(host: FakeHost) -> None:
    result = service(host, "install", "--user", env={"LLAMA_API_KEY": "sekrit"})
    assert result.exit_code == 0, result.stderr
    assert "LLAMA_API_KEY set here will not reach the service" in result.stderr
    assert "sekrit" not in (host.root / "user" / UNIT_NAME).read_text() + result.stderr


def test_status_and_logs(host: FakeHost) -> None:
    host.outcomes["status"] = Outcome(3, "○ modelyard.service - modelyard\n     Active: inactive (dead)")
    result = service(host, "status", "--user")
    assert (result.exit_code, result.stdout.splitlines()[1].strip()) == (3, "Active: inactive (dead)")
    assert service(host, "logs", "-f", "-p", "warning").exit_code == 0
    assert host.attached == [["journalctl", "-u", UNIT_NAME, "--follow", "--priority", "warning"]]


# --- journald's log format ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("journal_stream", "identity", "journal"), [
    ("8:1234", (8, 1234), True), ("8:1234", (8, 99), False), (None, (8, 1234), False), ("", (8, 1234), False),
    ("8:1234", None, False), ("garbage", (8, 1234), False),
])
def test_is_journal_stream(journal_stream: str | None, identity: tuple[int, int] | None, journal: bool) -> None:
    assert is_journal_stream(journal_stream, identity) is journal


@pytest.mark.parametrize(("level", "priority"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (25, 6), (logging.WARNING, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2), (5, 7),
])
def test_syslog_priority(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


@pytest.mark.parametrize(("journal", "level", "text", "formatted"), [
    (True, logging.WARNING, "disk low", "<4>WARNING modelyard: disk low"),
    (True, logging.INFO, "a\nb", "<6>INFO modelyard: a\n<6>b"),
    (True, logging.DEBUG, "", "<7>DEBUG modelyard: "),
])
def test_journal_format(journal: bool, level: int, text: str, formatted: str) -> None:
    record = logging.LogRecord("modelyard", level, __file__, 1, text, None, None)
    assert formatter(journal).format(record) == formatted


def test_plain_format_keeps_its_timestamp_and_tracebacks_get_a_prefix_per_line() -> None:
    record = logging.LogRecord("modelyard", logging.INFO, __file__, 1, "hello", None, None)
    assert formatter(False).format(record).endswith(" INFO modelyard: hello")
    assert formatter(False)._fmt == PLAIN_FORMAT and formatter(False).format(record)[:2] == "20"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logging.LogRecord("modelyard", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    lines = JournalFormatter().format(failed).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert journal_lines(logging.ERROR, "x") == "<3>x"


def test_stderr_handler_recognises_the_journal_stream(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream:
        info = os.fstat(stream.fileno())
        journal = stderr_handler({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, stream)
        plain = stderr_handler({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"}, stream)
    assert isinstance(journal.formatter, JournalFormatter)
    assert not isinstance(plain.formatter, JournalFormatter)


# --- sd_notify ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "address"), [
    (None, None), ("", None), ("/run/systemd/notify", "/run/systemd/notify"), ("@abc", "\0abc"),
    ("relative/notify", None), ("vsock:2:1234", None),
])
def test_socket_address(value: str | None, address: str | None) -> None:
    assert socket_address(value) == address


def test_message_and_status_line() -> None:
    assert message({"READY": 1, "STATUS": "a\nb"}) == b"READY=1\nSTATUS=a b\n"
    assert status_line([], "http://h:1") == "serving 0 models, none loaded on http://h:1"
    assert status_line(["loaded"], "x") == "serving 1 model, 1 loaded on x"
    assert status_line(["unloaded", "loaded", "loading", "failed", "loaded"], "x") == \
        "serving 5 models, 2 loaded, 1 loading, 1 failed on x"


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, as NOTIFY_SOCKET names it (`@...`)."""
    name = f"modelyard-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(30)
        yield sock, "@" + name


def receive_until(sock: socket.socket, key: str) -> dict[str, str]:
    """The next message holding `key` (STATUS= updates may come before it)."""
    while True:
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
        if key in fields:
            return fields


def test_notifier_sends_and_survives_a_missing_socket(notify_socket: tuple[socket.socket, str],
                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sock, name = notify_socket
    environ = {"NOTIFY_SOCKET": name, "PATH": "/bin"}
    notifier = Notifier.take_from_environ(environ)
    assert environ == {"PATH": "/bin"}  # children must not inherit it
    notifier.ready("serving")
    assert receive_until(sock, "READY") == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "serving"}
    notifier.close()
    gone = Notifier(str(tmp_path / "no-such-socket"))
    with caplog.at_level(logging.WARNING, "modelyard.notify"):
        gone.ready("x")
        gone.stopping("y")
    assert len(caplog.records) == 1 and "NOTIFY_SOCKET" in caplog.records[0].getMessage()
    Notifier(None).ready("nobody listens")  # no socket: nothing to do


def test_serve_notifies_ready_reloading_and_stopping(notify_socket: tuple[socket.socket, str], models_dir: Path,
                                                     llama_server: Path, start_router: Any) -> None:
    sock, name = notify_socket
    router = start_router("--models-dir", str(models_dir), "--llama-server", str(llama_server),
                          env={"NOTIFY_SOCKET": name}, wait=False)
    ready = receive_until(sock, "READY")
    assert router.client.get("/health").status_code == 200  # READY=1 came once it listens
    assert ready["MAINPID"] == str(router.proc.pid)
    assert ready["STATUS"] == f"serving 3 models, none loaded on http://127.0.0.1:{router.port}"
    router.proc.send_signal(signal.SIGHUP)
    assert "MONOTONIC_USEC" in receive_until(sock, "RELOADING")
    assert receive_until(sock, "READY")["STATUS"].startswith("serving 3 models")
    router.proc.send_signal(signal.SIGTERM)
    assert receive_until(sock, "STOPPING")["STATUS"].startswith("draining: 0 request(s) in flight")
    assert router.proc.wait(30) == 0


def test_serve_logs_in_journald_form_to_the_journal_stream(notify_socket: tuple[socket.socket, str],
                                                          tmp_path: Path, models_dir: Path,
                                                          llama_server: Path) -> None:
    sock, name = notify_socket
    log_path = tmp_path / "journal-stream"
    with log_path.open("wb") as stream:
        info = os.fstat(stream.fileno())
        # --api-key on the command line: serve warns about it, so one line of each priority is expected
        proc = subprocess.Popen([sys.executable, "-m", "modelyard.cli", "serve", "--port", str(free_port()),
                                 "--models-dir", str(models_dir), "--llama-server", str(llama_server),
                                 "--api-key", "k"], stdout=stream, stderr=stream,
                                env={**os.environ, "NOTIFY_SOCKET": name,
                                     "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
        try:
            receive_until(sock, "READY")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = log_path.read_text().splitlines()
    logged = [line for line in lines if re.match(r"<\d>", line)]
    assert any(line.startswith("<4>WARNING modelyard: --api-key on the command line") for line in logged), lines
    assert any(line.startswith("<6>INFO modelyard: draining") for line in logged), lines
    assert not [line for line in lines if re.match(r"\d{4}-\d\d-\d\d ", line)]  # journald stamps them itself
