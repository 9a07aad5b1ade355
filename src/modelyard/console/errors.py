"""The console's exit codes, its one-line error and where it finds the server and the key: kept apart from
client.py (httpx) and render.py (rich) so that cli.py can register the commands, and every `modelyard serve`
start, without importing either."""

from __future__ import annotations

from enum import IntEnum

import click

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "MODELYARD_URL"
KEY_ENV = "MODELYARD_API_KEY"
KEY_FILE_ENV = "MODELYARD_API_KEY_FILE"


class ExitCode(IntEnum):
    """What every console command exits with (listed in each command's --help)."""

    OK = 0
    SERVER = 1  # the server answered an error (or a load failed)
    USAGE = 2  # a bad option or argument (click's own code)
    UNREACHABLE = 3  # no server at --url
    UNKNOWN_MODEL = 4
    REFUSED = 5  # 401/403: a missing or wrong key, or a key without the scope


EXIT_CODES_HELP = ("Exit codes: 0 ok, 1 error from the server (or the load failed), 2 usage, "
                   "3 cannot reach the server, 4 unknown model, 5 key missing, wrong or lacking the scope.")


class ConsoleError(click.ClickException):
    """A failure shown as one line (cli.py's `_OneLineErrors` prints it) with its exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = int(code)  # type: ignore[misc]  # click declares it on the class; per error here


class RouteMissing(ConsoleError):
    """The server does not serve this route (404 `not_found`): an older modelyard."""
