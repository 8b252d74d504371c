"""Work a `late` callback starts (`db_threads`: a database call that committed after
its caller gave up) and nobody awaits: a release, a revocation, a correction in the
store. The loop keeps only weak references to tasks, so they are kept here until
done; an exception is logged, never left unretrieved."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("control_plane.background")

_RUNNING: set[asyncio.Task[None]] = set()


def in_background(work: Coroutine[Any, Any, None], name: str) -> None:
    """Run `work` on the running loop, unawaited."""
    task = asyncio.get_running_loop().create_task(work, name=name)
    _RUNNING.add(task)
    task.add_done_callback(_done)


def _done(task: asyncio.Task[None]) -> None:
    _RUNNING.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed: %r", task.get_name(), task.exception())
