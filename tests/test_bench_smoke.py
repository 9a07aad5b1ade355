"""The benchmark harness works end to end (not a timed test: figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_bench_smoke_mode_writes_a_report_and_plots(tmp_path: Path, demo_models: object,
                                                    llama_server: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "modelyard.cli", "bench", "--mode", "smoke", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "smoke" / "report.md").read_text()
    for section in ("Hot-path overhead", "Streaming", "Cold load", "Mixed workload", "Router cost", "Scale"):
        assert section in report
    assert "| modelyard |" in report and "| llama-server router |" in report
    for plot in ("latency-cdf.png", "mixed-timeline.png"):
        assert (tmp_path / "smoke" / plot).read_bytes().startswith(b"\x89PNG")
