"""Run one `llm-gateway` command under cProfile, every thread, on the thread CPU clock.

    python -m bench.profiled OUT.pstats control-plane --port 8000

As `docs/edge-profile.md` explains, the profile counts each thread's own CPU time
(`time.thread_time`): waiting for a CPU, for `epoll` or for PostgreSQL is not
charged to whatever ran just before. The control plane runs its transactions on a
thread pool (`control_plane/db.py`), so every thread started after this module
gets a profiler of its own; all of them are merged into OUT when the command
returns (SIGTERM ends a service cleanly).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time
from typing import Any

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _profiled_run(original: Any) -> Any:
    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        with _lock:
            _profiles.append(profile)
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    return run


def main(argv: list[str]) -> int:
    out, command = argv[0], argv[1:]
    threading.Thread.run = _profiled_run(threading.Thread.run)  # type: ignore[method-assign]
    from llm_gateway.cli import main as cli_main

    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    try:
        code = cli_main(command)
    finally:
        profile.disable()
        stats = pstats.Stats(profile)
        with _lock:
            threads = list(_profiles)
        for other in threads:
            # A worker thread still parked in its pool: what it ran so far counts.
            other.disable()
            stats.add(other)
        stats.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
