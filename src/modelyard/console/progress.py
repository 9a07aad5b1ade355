"""The progress bar of `modelyard engine install`: its stages (download, configure, build with cmake's
percentage, then the web UI's npm steps) drawn with rich on stderr; on a stderr that is not a terminal, the
plain lines as before."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

_STAGES = {"download": "downloading the llama.cpp source", "configure": "configuring (cmake)",
           "build": "building llama-server", "done": "installed",
           "ui-download": "fetching the web UI's source", "ui-install": "installing the web UI's npm packages",
           "ui-build": "building the web UI (npm run build)", "ui-done": "web UI installed"}

Echo = Callable[[str], None]
Report = Callable[[str, float | None], None]


@contextmanager
def engine_progress() -> Iterator[tuple[Echo, Report | None]]:
    """(echo, progress) for engine.install.install_engine: lines print above the bar."""
    err = Console(stderr=True, highlight=False)
    if not err.is_terminal:
        yield (lambda line: err.print(line, markup=False, soft_wrap=True)), None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(_STAGES["download"], total=None)

        def report(stage: str, fraction: float | None) -> None:
            described = _STAGES.get(stage, stage)
            if fraction is None:
                bar.update(task, description=described, total=None)
            else:
                bar.update(task, description=described, total=1.0, completed=fraction)

        yield (lambda line: bar.console.print(line, markup=False, soft_wrap=True)), report
