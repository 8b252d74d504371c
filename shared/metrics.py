"""Prometheus exposition for one app, whether it runs in one process or as several
uvicorn workers (`llm-gateway control-plane|stream-edge --workers N`).

One process: the app's own registry is rendered (a per-app registry lets several apps
share a process, as `llm-gateway dev` and the tests do).

Several workers: prometheus-client's multiprocess mode. It is chosen when
``PROMETHEUS_MULTIPROC_DIR`` is set before the library is first imported (the CLI sets
it before starting the workers); each worker then writes its samples to files in that
directory, and a scrape — answered by whichever worker the kernel picks — merges all
of them, so counters and histograms are the sums over the workers. Gauges say how to
merge in their ``multiprocess_mode``: ``livesum`` for streams in flight, ``livemax`` or
``mostrecent`` for values every worker reads from shared state. See
https://prometheus.github.io/client_python/multiprocess/
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_DB_FILE = re.compile(r"_(\d+)\.db$")


def multiproc_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def exposition(registry: CollectorRegistry) -> bytes:
    """The text to answer `GET /metrics` with: all workers' samples merged when in
    multiprocess mode, else this app's registry."""
    path = multiproc_dir()
    if path is None:
        return generate_latest(registry)
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path)  # type: ignore[no-untyped-call]
    return generate_latest(merged)


def reset_multiproc_dir(path: str) -> None:
    """Create `path` and remove samples a previous run left there (the library's
    rule: the directory must be empty when the workers start)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def forget_dead_workers(path: str) -> list[int]:
    """Drop the live gauges of workers that died (uvicorn restarts a crashed worker
    but has no hook to tell the library), so ``streams_active`` does not count the
    streams of a process that is gone. Counters are kept: they stay summed."""
    dead = set()
    for file in Path(path).glob("gauge_live*.db"):
        match = _DB_FILE.search(file.name)
        if match and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        with contextlib.suppress(FileNotFoundError):
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    return sorted(dead)
