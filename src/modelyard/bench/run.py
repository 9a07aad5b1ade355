"""Put a benchmark run together: models directory, routers, measurements, report and plots."""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from modelyard.bench import SCENARIOS
from modelyard.bench.report import plot, render
from modelyard.bench.scenarios import PLANS, Setup, run_all
from modelyard.bench.soak import verdict
from modelyard.demo import SMOLLM2, default_models_dir
from modelyard.engine.install import LLAMA_CPP_BUILD

# Given to both routers, so every child runs with the same flags (modelyard would add --threads-http 64 itself).
# One compute thread per child: with the default (one per core), three resident models computing at once on
# 2 cores spin against each other; the mixed workload then took 27-72 s instead of 3.9 s, for both routers.
ENGINE_ARGS = ["-c", "2048", "--threads-http", "64", "--threads", "1"]
# The all-resident workload once more with llama-server's default threads (issue 12 point 1): router mode's
# children then each take every core; modelyard gives each child cores of its own (placement.py).
DEFAULT_THREADS_ARGS = ["-c", "2048", "--threads-http", "64"]


class SoakBarNotMet(RuntimeError):
    """The soak's bar did not hold (a hang, a reset, a truncated answer, memory or descriptors not back)."""


def run_benchmark(mode: str, out: Path, binary: Path, log: Callable[[str], None],
                  only: frozenset[str] = frozenset(SCENARIOS)) -> Path:
    """Run the scenarios in `only` and write the report; its path. Raises SoakBarNotMet, once the report is
    written, when the soak ran and its bar did not hold, so that the exit status says so."""
    unknown = sorted(only - set(SCENARIOS))
    if unknown:
        raise RuntimeError(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    plan = PLANS[mode]
    model = default_models_dir() / f"{plan.model}.gguf"  # models a, b and c, and more (see Plan.model)
    smollm2 = default_models_dir() / f"{SMOLLM2}.gguf"
    for path in (model, smollm2):
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: run `modelyard demo install`")
    directory = out / mode
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="modelyard-bench-") as tmp:
        models_dir = Path(tmp) / "models"
        models_dir.mkdir()
        for name in ("a", "b", "c"):
            (models_dir / f"{name}.gguf").symlink_to(model)
        setup = Setup(binary, models_dir, Path(tmp), ENGINE_ARGS, smollm2, model,
                      default_threads_args=DEFAULT_THREADS_ARGS)
        started = time.monotonic()
        results = run_all(setup, plan, log, only)
        log(f"measured in {time.monotonic() - started:.0f} s")
    command = shlex.join(["modelyard", "bench", "--mode", mode, *sys.argv[sys.argv.index(mode) + 1:]]
                         if mode in sys.argv else ["modelyard", "bench", "--mode", mode])
    report = directory / "report.md"
    report.write_text(render(results, plan, f"{plan.model} ({model.stat().st_size / 1e6:.0f} MB)",
                             f"{LLAMA_CPP_BUILD} ({binary})", command))
    for path in plot(results, directory):
        log(f"plot: {path}")
    failures = verdict(results.soak) if results.soak is not None else []
    if failures:
        raise SoakBarNotMet(f"the soak's bar did not hold: {'; '.join(failures)} (report: {report})")
    return report
