"""The console's click commands (`ps`, `ls`, `load`, `unload`, `logs`, `chat`, `top`, `pull`), registered on the
main group by cli.py. Each takes --url ($MODELYARD_URL), --api-key-file ($MODELYARD_API_KEY_FILE, or the key
itself in $MODELYARD_API_KEY: never on argv) and --json (machine-readable stdout, no colour), and exits with
client.ExitCode. Tables and progress go through rich; what they show is rendered by render.py."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson

from modelyard.console.errors import (
    DEFAULT_URL,
    EXIT_CODES_HELP,
    KEY_ENV,
    KEY_FILE_ENV,
    URL_ENV,
    ConsoleError,
    ExitCode,
)

# httpx and rich are imported inside the commands, not here: cli.py registers these commands, and every
# `modelyard serve` (each e2e test starts several) would otherwise load them for nothing.
if TYPE_CHECKING:
    from rich.console import Console

    from modelyard.console.client import Client

F = TypeVar("F", bound=Callable[..., Any])


def _server_options(command: F) -> F:
    options = (
        click.option("--url", envvar=URL_ENV, default=DEFAULT_URL, show_default=True,
                     help=f"The modelyard server (env {URL_ENV})."),
        click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
                     help=f"File holding the API key (env {KEY_FILE_ENV}; or the key itself in {KEY_ENV}).",
                     envvar=KEY_FILE_ENV),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout, no colour."),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _client(url: str, api_key_file: Path | None) -> Client:
    from modelyard.console.client import Client, connection

    return Client(connection(url, api_key_file))


_PIPED_WIDTH = 200  # piped into grep or a file, a table is not cut to 80 columns


def _consoles(as_json: bool) -> tuple[Console, Console]:
    from rich.console import Console

    out = Console(no_color=as_json, highlight=False)
    if not out.is_terminal:
        out = Console(no_color=as_json, highlight=False, width=_PIPED_WIDTH)
    return out, Console(stderr=True, highlight=False)


def _emit(value: Any) -> None:
    click.echo(orjson.dumps(value).decode())


def _show(rows: Sequence[Any], table: Callable[[Sequence[Any]], Any], as_json: bool) -> None:
    """A listing: one JSON array for scripts, a table for people."""
    if as_json:
        _emit([row.as_json() for row in rows])
    else:
        _consoles(as_json)[0].print(table(rows))


def _emit_lines(values: Iterable[Mapping[str, Any]]) -> None:
    for value in values:
        _emit(value)


_SETTINGS = {"help_option_names": ["-h", "--help"]}


@click.command("ps", epilog=EXIT_CODES_HELP, context_settings=_SETTINGS)
@_server_options
def ps(url: str, api_key_file: Path | None, as_json: bool) -> None:
    """Loaded models: size, CPU/GPU split, context, requests, when they unload (GET /models, /api/ps)."""
    from modelyard.console.render import ps_rows, ps_table

    with _client(url, api_key_file) as client:
        rows = ps_rows(client.get("/models"), client.get("/api/ps"))
    _show(rows, ps_table, as_json)


@click.command("ls", epilog=EXIT_CODES_HELP, context_settings=_SETTINGS)
@_server_options
def ls(url: str, api_key_file: Path | None, as_json: bool) -> None:
    """Every model the server knows, loaded or not (GET /models, /api/tags)."""
    from modelyard.console.render import ls_rows, ls_table

    with _client(url, api_key_file) as client:
        rows = ls_rows(client.get("/models"), client.get("/api/tags"))
    _show(rows, ls_table, as_json)


@click.command("load", epilog=EXIT_CODES_HELP, context_settings=_SETTINGS)
@_server_options
@click.argument("model")
def load(url: str, api_key_file: Path | None, as_json: bool, model: str) -> None:
    """Load MODEL and wait until it is ready, with a progress bar; exit 1 with the reason if it fails."""
    from modelyard.console.loading import load_with_progress, resolve

    out, err = _consoles(as_json)
    with _client(url, api_key_file) as client:
        name = str(resolve(client, model)["id"])
        try:
            seconds = load_with_progress(client, name, err, show=not as_json)
        except ConsoleError as exc:
            if as_json and exc.exit_code == ExitCode.SERVER:
                _emit({"model": name, "status": "failed", "reason": exc.format_message()})
            raise
    if as_json:
        _emit({"model": name, "status": "loaded", "seconds": round(seconds, 3)})
    else:
        out.print(f"{name} loaded in {seconds:.1f} s")


@click.command("unload", epilog=EXIT_CODES_HELP, context_settings=_SETTINGS)
@_server_options
@click.option("--all", "unload_all", is_flag=True, help="Unload every model.")
@click.argument("model", required=False)
def unload(url: str, api_key_file: Path | None, as_json: bool, unload_all: bool, model: str | None) -> None:
    """Unload MODEL (or --all): it takes no new requests, those in flight finish, then it stops."""
    if bool(model) == unload_all:
        raise click.UsageError("give a MODEL or --all (not both)")
    from modelyard.console.loading import resolve

    with _client(url, api_key_file) as client:
        name = None if model is None else str(resolve(client, model)["id"])
        answer = client.post("/models/unload", {"all": True} if name is None else {"model": name})
    if as_json:
        _emit({"model": name, "all": unload_all, **(answer if isinstance(answer, dict) else {})})
    else:
        names = [name] if name else list(answer.get("unloaded") or []) if isinstance(answer, dict) else []
        shown = ", ".join(names) if names else "nothing: no model is loaded"
        _consoles(as_json)[0].print(f"unloading {shown}" + (" (requests in flight finish first)" if names else ""))


@click.command("logs", epilog=EXIT_CODES_HELP, context_settings=_SETTINGS)
@_server_options
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come (Ctrl-C stops).")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=200, show_default=True,
              help="How many of the last lines to show first.")
@click.argument("model")
def logs(url: str, api_key_file: Path | None, as_json: bool, follow: bool, lines: int, model: str) -> None:
    """The engine's output for MODEL (GET /logs/MODEL; -f follows /logs/sse)."""
    from modelyard.console.loading import resolve

    with _client(url, api_key_file) as client:
        name = str(resolve(client, model)["id"])
        if not follow:
            _print_logs(_log_entries(client, name, lines), as_json)
            return
        with client.events("/logs/sse", {"model": name}) as frames:  # subscribed first: no line falls between
            shown = _log_entries(client, name, lines)
            _print_logs(shown, as_json)
            seen = {(e.get("time"), e.get("line")) for e in shown}
            try:
                for frame in frames:
                    try:
                        entry = orjson.loads(frame.data)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and (entry.get("time"), entry.get("line")) not in seen:
                        seen.clear()  # past the snapshot: nothing later can repeat it
                        _print_logs([entry], as_json)
            except KeyboardInterrupt:
                return
        raise ConsoleError(f"modelyard at {url} ended the log stream (shutting down?)", ExitCode.UNREACHABLE)


def _log_entries(client: Client, name: str, lines: int) -> list[dict[str, Any]]:
    answer = client.get(f"/logs/{name}", {"lines": lines})
    entries = answer.get("lines") if isinstance(answer, dict) else None
    return [e for e in entries or [] if isinstance(e, dict)]


def _print_logs(entries: Iterable[Mapping[str, Any]], as_json: bool) -> None:
    from modelyard.console.render import log_line

    for entry in entries:
        _emit(entry) if as_json else click.echo(log_line(entry, with_model=False))


@click.command("chat", epilog=EXIT_CODES_HELP, context_settings=_SETTINGS)
@_server_options
@click.option("--max-tokens", type=click.IntRange(min=1), help="The most tokens a reply may have.")
@click.argument("model")
def chat(url: str, api_key_file: Path | None, as_json: bool, max_tokens: int | None, model: str) -> None:
    """Chat with MODEL, streaming, keeping the conversation. \"\"\" starts and ends a multi-line message; /bye
    or Ctrl-D quits; Ctrl-C stops a reply. With --json each reply is one JSON line; with stdin not a
    terminal, stdin is one message, answered once."""
    from modelyard.console.chat import ChatSettings, run_chat

    out, err = _consoles(as_json)
    with _client(url, api_key_file) as client:
        code = run_chat(client, model, out, err, ChatSettings(as_json, max_tokens))
    if code:
        raise SystemExit(code)


@click.command("top", epilog=EXIT_CODES_HELP, context_settings=_SETTINGS)
@_server_options
def top(url: str, api_key_file: Path | None, as_json: bool) -> None:
    """Live view of the models and the requests in flight (q or Ctrl-C quits); --json prints one snapshot."""
    from modelyard.console.top import print_snapshot, run_top

    out, _ = _consoles(as_json)
    with _client(url, api_key_file) as client:
        if as_json:
            print_snapshot(client, out)
        else:
            run_top(client, out)


@click.command("pull", epilog=EXIT_CODES_HELP, context_settings=_SETTINGS)
@_server_options
@click.argument("model")
def pull(url: str, api_key_file: Path | None, as_json: bool, model: str) -> None:
    """Download MODEL, a Hugging Face repo of GGUF files (org/repo or org/repo:QUANT, as llama-server's -hf),
    into the server's Hugging Face cache, with a progress bar (POST /models); it is then listed as
    org/repo:QUANT. Exit 1 with the reason (a gated repo, no such quant, a full disk) if it fails."""
    from modelyard.console.pull import pull_with_progress

    out, err = _consoles(as_json)
    with _client(url, api_key_file) as client:
        pulled = pull_with_progress(client, model, err, show=not as_json)
    if as_json:
        _emit({"model": pulled.model, "status": "present" if pulled.already else "downloaded",
               "bytes": pulled.bytes, "seconds": round(pulled.seconds, 3)})
    elif pulled.already:
        out.print(f"{pulled.model} is already downloaded")
    else:
        out.print(f"{pulled.model} downloaded ({pulled.bytes / 2**20:,.1f} MiB in {pulled.seconds:.1f} s)")


COMMANDS = (ps, ls, load, unload, logs, chat, top, pull)
