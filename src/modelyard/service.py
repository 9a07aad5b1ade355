"""`modelyard service`: run `modelyard serve` under systemd. `install` writes a unit (a user unit in
~/.config/systemd/user, or a system one in /etc/systemd/system) whose ExecStart is the installed executable with
the given serve flags, `Type=notify` (serve reports readiness through NOTIFY_SOCKET, see notify.py),
`KillMode=mixed` (systemd's SIGTERM reaches modelyard only, whose drain stops the children; a SIGTERM to every
process would cut the children's in-flight requests), a `TimeoutStopSec` that covers the drain, and hardening
that leaves the models, the engine cache and the GPU reachable. It reloads systemd and, with `--now`, enables
and starts the unit; `status`, `logs` and `uninstall` go through systemctl and journalctl. Secrets never go on
ExecStart (every local user can read it through `systemctl show`): keys go through `--api-key-file` or an
`--environment-file`, both readable only by their owner.

Rendering the unit and checking the flags are pure functions; the filesystem, systemctl and journalctl are
reached through `Host`, which tests replace. Where systemctl cannot reach a systemd (a container), the unit is
still written and one line says what to do."""

from __future__ import annotations

import math
import os
import pwd
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

import click
from click.core import ParameterSource

from modelyard import __version__
from modelyard.config.catalog import DEFAULT_STOP_TIMEOUT
from modelyard.config.durations import parse_duration

UNIT_NAME = "modelyard.service"
# What serve's shutdown takes beyond --shutdown-grace: the HTTP handlers' grace (cli.HANDLER_GRACE_S, 2 s) and
# ModelManager.close's wait for the children (their stop-timeout + 5 s); the margin keeps systemd's SIGKILL for
# a modelyard that really hangs.
SHUTDOWN_OVERHEAD_S = 2.0 + 5.0
STOP_MARGIN_S = 10.0
DEFAULT_SHUTDOWN_GRACE = "30s"
# Serve flags whose value is a secret: on ExecStart it is readable by every local user.
SECRET_FLAGS = ("--api-key", "--hf-token", "-hft")
# Serve flags whose value is a path: the service does not start in the installer's directory.
PATH_FLAGS = ("--models-dir", "--models-preset", "--api-key-file", "--ssl-key-file", "--ssl-cert-file",
              "--llama-server")
_SAFE_ARG = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_STOP_TIMEOUT_LINE = re.compile(r"^\s*stop-timeout\s*=\s*([0-9]+(?:\.[0-9]*)?)\s*(?:[;#].*)?$", re.MULTILINE)
_UNREACHABLE = ("System has not been booted with systemd", "Failed to connect to bus",
                "Failed to connect to user scope bus", "systemctl: not found")


class ServiceError(click.ClickException):
    """A service command that cannot do what was asked: one line, exit 1."""


class Scope(StrEnum):
    USER = "user"
    SYSTEM = "system"


# --- the functional core ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitSpec:
    scope: Scope
    command: tuple[str, ...]  # absolute executable, "serve", the serve flags
    stop_timeout_s: int
    environment_file: Path | None = None
    run_as: str | None = None  # User= of a system unit; None: root
    kill: str = "/bin/kill"


def quote_arg(arg: str) -> str:
    """One argument as systemd's command-line syntax reads it: `%` starts a specifier and `$` a variable, so
    both are doubled; anything beyond plain characters is double-quoted with C escapes."""
    escaped = _one_line(arg).replace("%", "%%").replace("$", "$$")
    if escaped and _SAFE_ARG.fullmatch(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _one_line(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ServiceError(f"{value!r} holds a line break, which a unit file cannot carry")
    return value


def stop_timeout_sec(shutdown_grace: float, child_stop_timeout: float) -> int:
    """TimeoutStopSec: the drain's grace, the shutdown's own steps, then a margin."""
    return math.ceil(shutdown_grace + SHUTDOWN_OVERHEAD_S + child_stop_timeout + STOP_MARGIN_S)


def preset_stop_timeout(preset_text: str) -> float:
    """The longest `stop-timeout` a preset file gives a model, at least the default one (models-dir entries and
    sections without the key use it). Invalid values are serve's to report; here they are not counted."""
    return max([DEFAULT_STOP_TIMEOUT, *(float(m) for m in _STOP_TIMEOUT_LINE.findall(preset_text))])


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The last value given to `flag` (`--flag V` or `--flag=V`), as click reads it."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg[len(flag) + 1:]
    return found


def secret_flag(args: Sequence[str]) -> str | None:
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in SECRET_FLAGS:
            return name
    return None


def absolute_paths(args: Sequence[str], cwd: Path) -> tuple[str, ...]:
    """`args` with the values of path flags made absolute. A bare `--llama-server` name (no `/`) is left for
    the PATH lookup."""
    out = list(args)
    for i, arg in enumerate(out):
        for flag in PATH_FLAGS:
            if arg == flag and i + 1 < len(out):
                out[i + 1] = _absolute(flag, out[i + 1], cwd)
            elif arg.startswith(flag + "="):
                out[i] = f"{flag}={_absolute(flag, arg[len(flag) + 1:], cwd)}"
    return tuple(out)


def _absolute(flag: str, value: str, cwd: Path) -> str:
    if flag == "--llama-server" and "/" not in value:
        return value
    return os.path.normpath(cwd / Path(value).expanduser())


def permission_problem(what: str, path: Path, mode: int, owner: int, owner_uid: int | None,
                       owner_name: str) -> str | None:
    """Why a secrets file is not fit for the service: other users can read it, or it does not belong to whom it
    must (`owner_uid`; None: anyone)."""
    if mode & 0o077:
        return f"{what} {path} can be read by other users (mode {mode & 0o777:o}): chmod 600 {path}"
    if owner_uid is not None and owner != owner_uid:
        return f"{what} {path} must belong to {owner_name} (it belongs to uid {owner}): chown {owner_name} {path}"
    return None


def unreachable(outcome: Outcome) -> bool:
    """Whether systemctl failed because no systemd answers (a container, no user session), not because of
    the unit."""
    return outcome.returncode == 127 or any(marker in outcome.output for marker in _UNREACHABLE)


def systemctl_words(scope: Scope) -> str:
    return "systemctl --user" if scope == Scope.USER else "systemctl"


def journalctl_argv(scope: Scope, follow: bool, lines: int | None, priority: str | None) -> list[str]:
    argv = ["journalctl", "--user-unit" if scope == Scope.USER else "-u", UNIT_NAME]
    if follow:
        argv.append("--follow")
    if lines is not None:
        argv += ["--lines", str(lines)]
    if priority:
        argv += ["--priority", priority]
    return argv


def render_unit(spec: UnitSpec) -> str:
    system = spec.scope == Scope.SYSTEM
    unit = ["[Unit]", "Description=modelyard: one OpenAI-compatible endpoint for local LLMs"]
    if system:  # a --host other than loopback needs its address; user managers have no network targets
        unit += ["Wants=network-online.target", "After=network-online.target"]
    service = [
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",  # only modelyard speaks for the service, never a child
        "ExecStart=" + " ".join(quote_arg(a) for a in spec.command),
        f"ExecReload={spec.kill} -HUP $MAINPID",  # re-reads the model sources; serve sends RELOADING=1/READY=1
        # SIGTERM to modelyard alone: its drain lets requests finish, then stops the children itself (with
        # the default control-group mode every child would get SIGTERM at once and cut its requests). The
        # final SIGKILL still reaches every process left in the unit's cgroup.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={spec.stop_timeout_s}",
        "Restart=on-failure",
        "RestartSec=2",
    ]
    if spec.run_as:
        service.append(f"User={_one_line(spec.run_as)}")
    if spec.environment_file:
        # A path, taken whole (no quotes); only specifiers are expanded.
        service.append(f"EnvironmentFile={_one_line(str(spec.environment_file)).replace('%', '%%')}")
    # Hardening that the engine survives: no device or home restrictions (models, ~/.cache/modelyard and
    # /dev/nvidia* stay reachable; ProtectClock= and PrivateDevices= would close the device list), and no
    # ProtectKernelModules= (CUDA may load nvidia-uvm on its first use).
    service += ["NoNewPrivileges=yes", "LockPersonality=yes", "RestrictRealtime=yes", "RestrictSUIDSGID=yes"]
    if system:  # mount namespaces: a user manager cannot set them up without user namespaces
        service += ["PrivateTmp=yes", "ProtectSystem=full", "ProtectKernelTunables=yes", "ProtectControlGroups=yes",
                    "RestrictNamespaces=yes"]
    install = ["[Install]", f"WantedBy={'multi-user.target' if system else 'default.target'}"]
    header = [f"# Written by `modelyard service install` (modelyard {__version__}); "
              f"`modelyard service uninstall{' --user' if not system else ''}` removes it."]
    return "\n".join([*header, *unit, "", *service, "", *install]) + "\n"


# --- the edge: files, systemctl, journalctl -------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    returncode: int
    output: str


@runtime_checkable
class Host(Protocol):
    """What the service commands touch outside the process."""

    def unit_dir(self, scope: Scope) -> Path: ...

    def systemctl(self, scope: Scope, args: Sequence[str]) -> Outcome: ...

    def attach(self, argv: Sequence[str]) -> int: ...


class SystemdHost:
    """The real machine."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def unit_dir(self, scope: Scope) -> Path:
        if scope == Scope.SYSTEM:
            return Path("/etc/systemd/system")
        config = self._environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(config) / "systemd" / "user"

    def systemctl(self, scope: Scope, args: Sequence[str]) -> Outcome:
        argv = ["systemctl", *(["--user"] if scope == Scope.USER else []), *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            return Outcome(127, "systemctl: not found")
        return Outcome(done.returncode, (done.stdout + done.stderr).strip())

    def attach(self, argv: Sequence[str]) -> int:
        try:
            return subprocess.call(list(argv))
        except FileNotFoundError:
            raise ServiceError(f"{argv[0]} is not installed here; it comes with systemd") from None


def installed_command(python: Path) -> tuple[str, ...]:
    """How the unit starts modelyard: the `modelyard` script beside this interpreter (a venv's bin/), else the
    interpreter itself. Not resolved through symlinks: a venv's python must be started by its venv path."""
    python = Path(os.path.abspath(python))
    script = python.parent / "modelyard"
    if script.is_file() and os.access(script, os.X_OK):
        return (str(script),)
    return (str(python), "-m", "modelyard.cli")


def write_unit(path: Path, text: str) -> None:
    """Atomically, so a half-written unit is never loaded; 0644, as it holds no secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _check_secret_file(what: str, path: Path, owner_uid: int | None) -> None:
    try:
        info = path.stat()
    except OSError as exc:
        raise ServiceError(f"cannot read {what} {path}: {exc.strerror}") from None
    name = _user_name(owner_uid) if owner_uid is not None else ""
    problem = permission_problem(what, path, info.st_mode, info.st_uid, owner_uid, name)
    if problem:
        raise ServiceError(problem)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a container's uid without a passwd entry: the number names it
        return str(uid)


def _serve_flags(ctx: click.Context, args: tuple[str, ...]) -> tuple[float, list[str]]:
    """Check the flags as serve will (types, files, ranges) and return the --shutdown-grace they give, and the
    environment variables serve read here that the service will not see."""
    root = ctx.find_root()
    serve = root.command.get_command(root, "serve") if isinstance(root.command, click.Group) else None
    if serve is None:
        raise ServiceError("no serve command to install")
    with serve.make_context("serve", list(args), parent=root) as parsed:
        grace_text = DEFAULT_SHUTDOWN_GRACE
        if parsed.get_parameter_source("shutdown_grace") == ParameterSource.COMMANDLINE:
            grace_text = str(parsed.params["shutdown_grace"])
        from_env = [str(p.envvar) for p in serve.params if isinstance(p, click.Option) and p.name
                    and parsed.get_parameter_source(p.name) == ParameterSource.ENVIRONMENT]
    try:
        grace = max(0.0, parse_duration(grace_text, "--shutdown-grace"))
    except ValueError as exc:
        raise ServiceError(str(exc)) from None
    return grace, from_env


def _child_stop_timeout(args: Sequence[str]) -> float:
    preset = flag_value(args, "--models-preset")
    if preset is None:
        return DEFAULT_STOP_TIMEOUT
    try:
        return preset_stop_timeout(Path(preset).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceError(f"cannot read --models-preset {preset}: {exc}") from None


def _host(ctx: click.Context) -> Host:
    obj = ctx.find_object(object)
    return obj if isinstance(obj, Host) else SystemdHost()


def _scope(user: bool) -> Scope:
    return Scope.USER if user else Scope.SYSTEM


def _unreachable_line(outcome: Outcome, after: str) -> str:
    first = outcome.output.splitlines()[0] if outcome.output else f"exit {outcome.returncode}"
    return f"systemd is not reachable here ({first}); {after}"


# --- the commands ---------------------------------------------------------------------------------------------

user_option = click.option("--user", is_flag=True,
                           help="The user's own unit (~/.config/systemd/user), not the system's.")


@click.group()
def service() -> None:
    """Run `modelyard serve` as a systemd service."""


@service.command("install", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                 short_help="Write and load a unit that runs `modelyard serve` with these flags.")
@user_option
@click.option("--now", is_flag=True, help="Also enable the unit and (re)start it.")
@click.option("--environment-file", type=click.Path(dir_okay=False, path_type=Path),
              help="EnvironmentFile= of the unit (mode 0600), e.g. LLAMA_API_KEY=... .")
@click.option("--run-as", help="User= of a system unit (default: root).")
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def install(ctx: click.Context, user: bool, now: bool, environment_file: Path | None, run_as: str | None,
            serve_args: tuple[str, ...]) -> None:
    """Write a systemd unit running `modelyard serve SERVE_ARGS...`, reload systemd, and with --now enable and
    start it. Keys go through --api-key-file or --environment-file, never on the command line."""
    scope, host = _scope(user), _host(ctx)
    secret = secret_flag(serve_args)
    if secret:
        raise ServiceError(f"{secret} would put a secret on the unit's ExecStart, which every local user can "
                           f"read: use --api-key-file PATH, or --environment-file PATH holding LLAMA_API_KEY=...")
    if run_as and scope == Scope.USER:
        raise ServiceError("--run-as is for system units; a --user unit runs as its user")
    if run_as:
        try:
            pwd.getpwnam(run_as)
        except KeyError:
            raise ServiceError(f"--run-as {run_as}: no such user") from None
    args = absolute_paths(serve_args, Path.cwd())
    grace, from_env = _serve_flags(ctx, args)
    key_file = flag_value(args, "--api-key-file")
    if key_file:
        # Read by serve, as the service's user (root reads any file).
        reader = os.getuid() if scope == Scope.USER else pwd.getpwnam(run_as).pw_uid if run_as else None
        _check_secret_file("--api-key-file", Path(key_file), reader)
    if environment_file:
        # Read by the service manager, and whoever owns it sets the service's environment (LD_PRELOAD=...).
        environment_file = Path(os.path.abspath(environment_file))
        _check_secret_file("--environment-file", environment_file, os.getuid() if scope == Scope.USER else 0)
    spec = UnitSpec(scope=scope, command=(*installed_command(Path(sys.executable)), "serve", *args),
                    stop_timeout_s=stop_timeout_sec(grace, _child_stop_timeout(args)),
                    environment_file=environment_file, run_as=run_as)
    path = host.unit_dir(scope) / UNIT_NAME
    try:
        write_unit(path, render_unit(spec))
    except OSError as exc:
        hint = " (a system unit needs root; or pass --user)" if scope == Scope.SYSTEM else ""
        raise ServiceError(f"cannot write {path}: {exc.strerror}{hint}") from None
    click.echo(f"wrote {path}", err=True)
    if from_env:
        click.echo(f"note: {', '.join(from_env)} set here will not reach the service: put them in "
                   f"--environment-file or pass the flags", err=True)
    _activate(host, scope, now)


def _activate(host: Host, scope: Scope, now: bool) -> None:
    words, flag = systemctl_words(scope), " --user" if scope == Scope.USER else ""
    reload = host.systemctl(scope, ["daemon-reload"])
    if unreachable(reload):
        line = _unreachable_line(reload, f"the unit is written but not loaded: where systemd runs, "
                                         f"`{words} daemon-reload && {words} enable --now modelyard`; "
                                         f"here, run `modelyard serve` directly")
        if now:
            raise ServiceError(line)
        click.echo(line, err=True)
        return
    if reload.returncode != 0:
        raise ServiceError(f"{words} daemon-reload failed: {reload.output}")
    if not now:
        click.echo(f"start it with `{words} enable --now modelyard`", err=True)
        return
    for step in (["enable", UNIT_NAME], ["restart", UNIT_NAME]):  # restart: a running one takes the new unit
        done = host.systemctl(scope, step)
        if done.returncode != 0:
            last = done.output.splitlines()[-1] if done.output else f"exit {done.returncode}"
            raise ServiceError(f"{words} {' '.join(step)} failed: {last} (see `modelyard service logs{flag}`)")
    linger = "; to keep it running without a login session: `loginctl enable-linger`" if flag else ""
    click.echo(f"enabled and started; `modelyard service status{flag}`{linger}", err=True)


@service.command("uninstall")
@user_option
@click.pass_context
def uninstall(ctx: click.Context, user: bool) -> None:
    """Stop and disable the unit, remove it, reload systemd."""
    scope, host = _scope(user), _host(ctx)
    path = host.unit_dir(scope) / UNIT_NAME
    if not path.exists():
        other = "without --user" if user else "with --user"
        raise ServiceError(f"no unit at {path} (was it installed {other}?)")
    words = systemctl_words(scope)
    stopped = host.systemctl(scope, ["disable", "--now", UNIT_NAME])
    reachable = not unreachable(stopped)
    if reachable and stopped.returncode != 0:
        raise ServiceError(f"{words} disable --now {UNIT_NAME} failed: {stopped.output}")
    try:
        path.unlink()
    except OSError as exc:
        raise ServiceError(f"cannot remove {path}: {exc.strerror}") from None
    click.echo(f"removed {path}", err=True)
    if reachable:
        host.systemctl(scope, ["daemon-reload"])
        host.systemctl(scope, ["reset-failed", UNIT_NAME])  # forget a failed state; nothing to check after it
    else:
        click.echo(_unreachable_line(stopped, "nothing was running under it here"), err=True)


@service.command("status")
@user_option
@click.pass_context
def status(ctx: click.Context, user: bool) -> None:
    """The unit's state and serve's STATUS= line (systemctl status)."""
    scope, host = _scope(user), _host(ctx)
    shown = host.systemctl(scope, ["status", "--no-pager", UNIT_NAME])
    if unreachable(shown):
        raise ServiceError(_unreachable_line(shown, "run `modelyard serve` directly, or check the service "
                                                    "where systemd runs"))
    click.echo(shown.output)
    ctx.exit(shown.returncode)  # systemctl's own: 3 when inactive, 4 when there is no such unit


@service.command("logs")
@user_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", type=click.IntRange(min=0), help="Only the last N lines.")
@click.option("-p", "--priority", help="Only lines this important or more (err, warning, info, debug).")
@click.pass_context
def logs(ctx: click.Context, user: bool, follow: bool, lines: int | None, priority: str | None) -> None:
    """The service's log, from the journal (journalctl -u, or --user-unit)."""
    ctx.exit(_host(ctx).attach(journalctl_argv(_scope(user), follow, lines, priority)))

