"""Work nobody awaits: what a `late` callback starts (`db_threads`: a database call
that committed after its caller gave up), and the clean-up or bookkeeping a request
cancelled in the middle still owes (`finish`): a release, a revocation, a correction
in the store. The loop keeps only weak references to tasks, so they are kept here
until done; an exception is logged, never left unretrieved. The lifespan waits for
them (`drain`) before it closes the store and the database they use."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("control_plane.background")

_RUNNING: set[asyncio.Task[None]] = set()


def in_background(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Run `work` on the running loop, unawaited."""
    task = asyncio.get_running_loop().create_task(work, name=name)
    _RUNNING.add(task)
    task.add_done_callback(_done)
    return task


async def finish(work: Coroutine[Any, Any, None], name: str) -> None:
    """Await `work`, which must run to its end: should the caller be cancelled
    meanwhile (the server's shutdown cuts its request off), `work` goes on in the
    background and the cancellation goes on up at once, neither swallowed nor
    waited for. `work` should not raise (best effort bookkeeping): a failure the
    caller sees is logged as well."""
    await asyncio.shield(in_background(work, name))


def running() -> int:
    """How many tasks of the running loop are still under way."""
    loop = asyncio.get_running_loop()
    return sum(1 for task in _RUNNING if task.get_loop() is loop)


async def drain(busy: Callable[[], bool], bound: float, poll: float = 0.01) -> bool:
    """Wait, at most `bound` seconds, until the running loop's background tasks are
    done and `busy()` (a database call still running, whose commit may start more)
    is false. True when all was done in time; else what remains is left (logged)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while True:
        tasks = {task for task in _RUNNING if task.get_loop() is loop}
        if not tasks and not busy():
            return True
        left = deadline - loop.time()
        if left <= 0:
            log.warning(
                "shutting down with %d background tasks unfinished%s",
                len(tasks),
                " and database calls running" if busy() else "",
            )
            return False
        if tasks:
            await asyncio.wait(tasks, timeout=left)
        else:  # a thread's call: its outcome comes back through call_soon_threadsafe
            await asyncio.sleep(min(poll, left))


def _done(task: asyncio.Task[None]) -> None:
    _RUNNING.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed: %r", task.get_name(), task.exception())
