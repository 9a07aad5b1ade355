"""`python -m modelyard.bench`: `modelyard bench` with a scenario filter (`--only soak --only fresh-swap`) and
an exit status that tells the soak's bar apart from a broken harness: 0 when every scenario ran (and the soak's
bar held, if it ran), 3 when the report was written but the soak's bar did not hold, 1 for anything else.
`--only cluster` (never part of the default run: it needs the `ray` extra) measures modelyard over a local Ray
cluster (bench/cluster.py) and writes <out>/cluster/report.md."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

import click

from modelyard.bench import CLUSTER, SCENARIOS
from modelyard.engine.locate import EngineNotFound, locate_llama_server

BAR_NOT_MET = 3
TERMINATED = 128 + signal.SIGTERM


def _end_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a CI time-out, `kill`) ends the run through the scenarios' `finally` blocks, which stop both
    routers. Python's default SIGTERM ended the bench at once and left them running (they are in sessions of
    their own), with their children, reparented to init."""
    raise SystemExit(TERMINATED)


@click.command()
@click.option("--mode", type=click.Choice(["smoke", "quick", "full"]), default="quick", show_default=True,
              help="smoke: seconds, checks the harness; quick: a few minutes; full: the figures for the README.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results"), show_default=True,
              help="Where the report (<mode>/report.md) and plots go.")
@click.option("--llama-server", "llama_server", envvar="LLAMA_SERVER", help="The binary both routers use.")
@click.option("--only", multiple=True, type=click.Choice((*SCENARIOS, CLUSTER)),
              help=f"Run only this scenario (repeatable); default: all of them but {CLUSTER} (it needs Ray).")
def main(mode: str, out: Path, llama_server: str | None, only: tuple[str, ...]) -> None:
    """Benchmark modelyard against llama-server router mode, side by side in one run."""
    # Imported here, not at the top: `modelyard.cli` imports this command, and every `modelyard serve` would
    # otherwise load the harness (matplotlib, httpx) it never uses.
    from modelyard.bench.run import SoakBarNotMet, run_benchmark

    signal.signal(signal.SIGTERM, _end_on_sigterm)
    chosen = frozenset(only or SCENARIOS)
    reports = []
    try:
        binary = locate_llama_server(llama_server)
        if CLUSTER in chosen:
            from modelyard.bench.cluster import run_cluster_benchmark

            reports.append(run_cluster_benchmark(mode, out, binary, lambda line: click.echo(line, err=True)))
        if chosen - {CLUSTER}:
            reports.append(run_benchmark(mode, out, binary, lambda line: click.echo(line, err=True),
                                         chosen - {CLUSTER}))
    except SoakBarNotMet as exc:
        click.echo(str(exc), err=True)
        sys.exit(BAR_NOT_MET)
    except (EngineNotFound, RuntimeError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    for report in reports:
        click.echo(report)


if __name__ == "__main__":
    main()
