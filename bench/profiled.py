"""Run one `llm-gateway` command with cProfile on call, on the thread CPU clock.

    python -m bench.profiled OUT control-plane --port 8000

`SIGUSR1` starts profiling; `SIGUSR2` stops it and writes what was collected to
`OUT.1`, then `OUT.2`, … (so a driver can profile one kind of request at a time,
with the set-up outside the window). As `docs/edge-profile.md` explains, the clock
is each thread's own CPU time (`time.thread_time`): waiting for a CPU, for `epoll`
or for PostgreSQL is not charged to whatever ran just before.

The control plane runs its database calls on threads of its own
(`control_plane/db_threads.py`; `concurrent.futures` pools elsewhere): each job such
a thread runs while profiling is on gets that thread's own profiler, merged into the
same file as the event loop's.
"""

from __future__ import annotations

import cProfile
import pstats
import signal
import sys
import threading
import time
from concurrent.futures import thread as pool_thread
from types import FrameType
from typing import Any

from control_plane import db_threads


class Window:
    def __init__(self, out: str) -> None:
        self.out = out
        self.on = False
        self.main: cProfile.Profile | None = None
        self.workers: list[cProfile.Profile] = []
        self.local = threading.local()
        self.lock = threading.Lock()
        self.written = 0

    def start(self, signum: int, frame: FrameType | None) -> None:
        if self.on:
            return
        with self.lock:
            self.workers = []
            self.local = threading.local()
        self.main = cProfile.Profile(time.thread_time)
        self.on = True
        self.main.enable()

    def stop(self, signum: int, frame: FrameType | None) -> None:
        if not self.on or self.main is None:
            return
        self.main.disable()
        self.on = False
        stats = pstats.Stats(self.main)
        with self.lock:
            for profile in self.workers:
                stats.add(profile)
        self.written += 1
        stats.dump_stats(f"{self.out}.{self.written}")

    def worker_profile(self) -> cProfile.Profile:
        profile: cProfile.Profile | None = getattr(self.local, "profile", None)
        if profile is None:
            profile = cProfile.Profile(time.thread_time)
            self.local.profile = profile
            with self.lock:
                self.workers.append(profile)
        return profile


def _profiled(window: Window, original: Any) -> Any:
    """`original`, profiled on its thread while the window is open."""

    def run(*args: Any) -> None:
        if not window.on:
            original(*args)
            return
        profile = window.worker_profile()
        profile.enable()
        try:
            original(*args)
        finally:
            profile.disable()

    return run


def main(argv: list[str]) -> int:
    out, command = argv[0], argv[1:]
    window = Window(out)
    work_item: Any = pool_thread._WorkItem
    work_item.run = _profiled(window, work_item.run)
    # `DbThreads._work` looks `_run_job` up in its module on every job.
    db_threads._run_job = _profiled(window, db_threads._run_job)
    signal.signal(signal.SIGUSR1, window.start)
    signal.signal(signal.SIGUSR2, window.stop)
    from llm_gateway.cli import main as cli_main

    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
