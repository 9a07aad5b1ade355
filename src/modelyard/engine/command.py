"""Turn a model's configuration into the command line and environment of its child process, and where it
listens: a llama-server child on a Unix socket in modelyard's private directory when it has one (llama-server
listens there when --host ends in `.sock`), any other engine on the loopback port its command names."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from modelyard.config.catalog import ModelConfig
from modelyard.config.options import FALSEY, OptionTable

CHILD_KEY_ENV = "MODELYARD_CHILD_KEY"  # the child's secret, in its environment (both kinds of engine)

# Router-level settings a child must not inherit through the environment.
_ROUTER_ENV = ("LLAMA_ARG_MODELS_DIR", "LLAMA_ARG_MODELS_PRESET", "LLAMA_ARG_MODELS_MAX",
               "LLAMA_ARG_MODELS_AUTOLOAD", "LLAMA_API_KEY", "LLAMA_ARG_API_KEY", "LLAMA_ARG_API_KEY_FILE",
               "LLAMA_ARG_CORS_ORIGINS", "LLAMA_ARG_CORS_CREDENTIALS", "MODELYARD_API_KEY",
               # modelyard serves under the prefix and asks its children for the path without it (api/app.py)
               "LLAMA_ARG_API_PREFIX",
               # Vertex AI (api/gcp.py): a llama-server child with AIP_MODE=PREDICTION leaves its --port for
               # AIP_HTTP_PORT, the router's own
               "AIP_MODE", "AIP_HTTP_PORT", "AIP_HEALTH_ROUTE", "AIP_PREDICT_ROUTE")
# Settings modelyard decides for every child: its key (from the environment) and its CORS answer. A preset's
# own values would reopen the child to other local users or to web pages.
_ROUTER_OWNED = frozenset({"--api-key", "--api-key-file", "--cors-origins", "--cors-credentials", "--host",
                           "--port"})
# What a child answers as Access-Control-Allow-Origin: an origin on the reserved .invalid domain, which no page
# has, so a browser never lets a page read a child directly (llama-server echoes any Origin by default).
CHILD_CORS_ORIGIN = "http://modelyard-child.invalid"


class Readiness(Enum):
    """How the shell learns that a child can serve."""

    ROUTER_PROTOCOL = "router-protocol"  # llama-server's own child protocol: a `ready` line on stdout
    HTTP_HEALTH = "http-health"  # any other engine: GET /health answers 200


@dataclass(frozen=True)
class Engine:
    """The llama-server binary every model runs on unless its preset names another command (`cmd`)."""

    binary: Path
    options: OptionTable
    router_port: int = 0
    cpu_build: bool = False  # modelyard's own CPU-only build (engine.install.is_cpu_build): it can use no GPU


# llama-server serves each keep-alive connection on one thread and, under a burst of new connections, often
# fails to add threads beyond its fixed pool: the extra connections then wait for an idle one to time out (5 s
# steps, measured here). So modelyard gives each child a fixed pool this large and never opens more
# connections to it than that.
CHILD_HTTP_THREADS = 64


# llama-server b11434 (tools/server/server-http.cpp) listens on a Unix socket, its --port ignored, when --host
# ends in this.
SOCKET_SUFFIX = ".sock"


@dataclass(frozen=True)
class Endpoint:
    """Where a child listens: a Unix socket (`socket`), else the loopback TCP `port`. Over the socket a new
    connection costs 0.14 ms less than over loopback TCP (0.30 against 0.42 ms to /health, aiohttp, measured
    here), which every streamed request pays (llama-server closes the connection after a chunked answer), and
    only modelyard's user can reach it (its directory is 0700)."""

    port: int = 0
    socket: Path | None = None

    def __str__(self) -> str:
        return f"unix://{self.socket}" if self.socket is not None else f"127.0.0.1:{self.port}"

    @property
    def tcp_port(self) -> int | None:
        """The loopback port it listens on; None on a Unix socket (whatever `port` holds then)."""
        return self.port if self.socket is None else None

    @property
    def base_url(self) -> str:
        """The URL its requests' paths are appended to. Over the socket the host part only fills the Host
        header (llama-server reads none); the client connects to the socket itself."""
        return "http://localhost" if self.socket is not None else f"http://127.0.0.1:{self.port}"

    def flags(self) -> tuple[str, ...]:
        """llama-server's flags for it."""
        if self.socket is not None:
            return ("--host", str(self.socket))
        return ("--host", "127.0.0.1", "--port", str(self.port))

    @classmethod
    def of_args(cls, args: Sequence[str]) -> Endpoint | None:
        """The endpoint a llama-server command line (a child's argv, as /models lists it in status.args) listens
        on: the inverse of `flags`; None when it names neither a socket nor a port."""
        host = args[args.index("--host") + 1] if "--host" in args[:-1] else ""
        if host.endswith(SOCKET_SUFFIX):
            return cls(socket=Path(host))
        port = args[args.index("--port") + 1] if "--port" in args[:-1] else ""
        return cls(port=int(port)) if port.isdigit() else None


@dataclass(frozen=True)
class LaunchPlan:
    argv: tuple[str, ...]
    env: Mapping[str, str]
    readiness: Readiness
    endpoint: Endpoint
    max_connections: int = 0  # 0 = no limit
    cpus: frozenset[int] = frozenset()  # the CPUs the child is confined to from its start (placement.py); empty: any


def launch_plan(config: ModelConfig, engine: Engine, port: int, key: str = "",
                cpus: frozenset[int] = frozenset(), socket: Path | None = None) -> LaunchPlan:
    """`key`: the child's secret; modelyard sends it with every request (env only: argv is public). `cpus`:
    the CPUs a llama-server child is confined to (its placement; another engine's are its own business).
    `socket`: the Unix socket (a path ending in SOCKET_SUFFIX) a llama-server child listens on instead of
    `port`; another engine's command names its own listening flags around ${PORT}, so it gets `port`."""
    env = {k: v for k, v in os.environ.items() if k not in _ROUTER_ENV}
    env["MODELYARD_PARENT_PID"] = str(os.getpid())  # lets tools (and tests) find a router's children
    if key:
        env[CHILD_KEY_ENV] = key
    if config.command:
        command = (config.command.replace("${PORT}", str(port)).replace("${MODEL}", config.name)
                   .replace("${MODEL_PATH}", config.model_path or ""))
        return LaunchPlan(tuple(shlex.split(command)), {**env, "PORT": str(port)}, Readiness.HTTP_HEALTH,
                          Endpoint(port=port))
    if socket is not None and not str(socket).endswith(SOCKET_SUFFIX):
        raise ValueError(f"a child's socket must end in {SOCKET_SUFFIX} (llama-server would take it for a "
                         f"host name): {socket}")
    endpoint = Endpoint(port=port) if socket is None else Endpoint(socket=socket)
    if key:
        env["LLAMA_API_KEY"] = key
    env["LLAMA_ARG_CORS_ORIGINS"] = CHILD_CORS_ORIGIN
    settings = {k: v for k, v in config.settings.items() if k not in _ROUTER_OWNED}
    threads = _positive_int(settings.get("--threads-http")) or CHILD_HTTP_THREADS
    settings["--threads-http"] = str(threads)
    argv = (str(engine.binary), *render_settings(settings, engine.options),
            *endpoint.flags(), "--alias", config.name)
    # LLAMA_SERVER_ROUTER_PORT turns on llama-server's child protocol: it reports `ready` on stdout and
    # exits when its stdin closes, i.e. when modelyard dies.
    env["LLAMA_SERVER_ROUTER_PORT"] = str(engine.router_port)
    return LaunchPlan(argv, env, Readiness.ROUTER_PROTOCOL, endpoint, max_connections=threads, cpus=cpus)


def _positive_int(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


def render_settings(settings: Mapping[str, str], options: OptionTable) -> list[str]:
    """Render settings as router mode does: long flags, `--no-x` for a false boolean, values after flags."""
    args: list[str] = []
    for flag, value in settings.items():
        option = options.lookup(flag)
        if option is None or option.preset_only:
            continue
        if option.takes_value:
            args += [option.canonical, value]
        elif value.lower() in FALSEY:
            if option.negations:
                args.append(option.negations[-1])
        else:
            args.append(option.canonical)
    return args
