"""`make bench` still runs: the edge benchmark's `--quick` mode end to end.

Real processes on PostgreSQL and Redis, tiny counts; the report goes to a temporary
file (never `docs/performance.md`). It must finish within a minute; on timeout it is
asked to stop (SIGTERM), so it still stops its services and drops its database.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_DSN, REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
ROWS = [(1, 0), (1, 20), (50, 0), (50, 20), (200, 0), (200, 20)]


@pytest.mark.postgres
def test_quick_bench_writes_every_row(pg_server: str, redis_prefix: str, tmp_path: Path) -> None:
    # `pg_server` and `redis_prefix` only check that both services are up (skip or fail
    # as the rest of the suite does); the benchmark makes its own database and prefix.
    output = tmp_path / "performance.md"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.edge_bench",
            "--quick",
            "--output",
            str(output),
            "--pg-dsn",
            PG_ADMIN_DSN,
            "--redis-url",
            REDIS_URL,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail("the quick benchmark took over 60 s:\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    report = output.read_text()
    for concurrency, delay in ROWS:
        row = f"| {concurrency} | {delay} ms |"
        # once in each of the latency, throughput and sizes tables, twice in the CPU one
        assert report.count(row) >= 3, f"missing row {row}"
    assert "## Memory" in report and "## Targets" in report
    assert re.search(r"Speed gauge .*: \d+\.\d ms before the run, \d+\.\d ms after", report)
    # The whole turn (issue 14): the init phase at three concurrencies, whole turns,
    # TTFT with the control plane idle and busy, and the target table.
    for concurrency in (1, 32, 128):
        assert f"\n| {concurrency} | " in report.split("### Inits")[1].split("###")[0]
    assert "### Whole turns" in report and "idle and busy" in report
    targets = report.split("## Issue 14's targets")[1]
    # Each of the nine rows has a verdict. A quick run may leave one "not measured":
    # /proc counts CPU in 10 ms ticks, and the mock's few streams can use less than
    # one, leaving no backend CPU to divide by (the ratio row).
    verdicts = ("**met**", "**not met**", "**not measured**")
    assert sum(targets.count(verdict) for verdict in verdicts) == 9
    assert "(0 errors" not in targets
    assert str(ROOT) not in report  # no machine-specific paths in the document
