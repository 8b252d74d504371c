"""The database's worker threads: what `loop.run_in_executor` on a `ThreadPoolExecutor`
does for `Database`, with less machinery per call (issue 14.3).

Every database call of a request is a hop to one of these threads and back (an
init makes two). `run_in_executor` builds a `concurrent.futures.Future` (its
`Condition`, its callbacks), takes the executor's idle semaphore (a lock in Python)
on each submit and gives it back on each completion, and chains that future to an
asyncio one. Here a job is the function, the asyncio future and its loop on a
`SimpleQueue`; the thread hands the outcome back with one `call_soon_threadsafe`.
Measured (uvloop, 10,000 hops of a no-op, the two alternated, six rounds, load
average 2): 43 to 48 µs of CPU a hop through the executor, 31 to 35 µs through this.

The executor's behaviour is kept: at most `workers` calls run at once (one per
pooled connection), the rest wait in order; a call whose caller was cancelled
before a thread took it never runs (its timer stops when the thread skips it), one
already running finishes (its result is dropped, as `run_in_executor`'s is, or
handed to its `late`, as a call's past its bound is);
`close` lets running calls finish, cancels those still waiting and joins the
threads. Threads start on demand, as the executor's do, up to `workers`.

A call may be bounded (`run(fn, timeout=…)`): a PostgreSQL that goes silent (a
stopped server, a lock, a partition the sockets have not noticed) would otherwise
hold every thread and queue every later call for as long as it lasts, each client
waiting with it, and the queued calls would all run once it is back, taking holds
for clients long gone (measured: 16 requests all still waiting after 40 s, 10
threads held, 13 holds taken after `SIGCONT`). Past its bound a call's caller gets
`DatabaseTimeout` (503 ``database_unavailable``): a call no thread took by then
never runs; one already running cannot be stopped from here (its thread waits on
the socket), so its outcome is dropped, and a success is handed to its `late`
callback, which undoes what nobody will use (init releases its hold). A caller
cancelled while its call runs (the server's shutdown cuts its request off, the
sweeper is stopped) takes the same path: its commit goes to `late`. The bound
costs one timer per call (`loop.call_later`), no round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class DatabaseTimeout(TimeoutError):
    """A database call was not done within its bound (`DbThreads.run`)."""


class _Job:
    """One call: `fn` (None once it expired, so a long queue of expired calls keeps
    none of their requests' data), its caller's future and loop, its timer, what to
    do with a success that came too late, and what to call once no thread holds it."""

    __slots__ = ("done", "fn", "future", "late", "loop", "timer")

    def __init__(
        self,
        fn: Callable[[], Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        late: Callable[[Any], None] | None,
        done: Callable[[], None] | None,
    ) -> None:
        self.fn: Callable[[], Any] | None = fn
        self.future = future
        self.loop = loop
        self.late = late
        self.done = done
        self.timer: asyncio.TimerHandle | None = None


class DbThreads:
    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        # Calls a thread took whose outcome the loop has not handled yet (`busy`).
        self._running = 0

    def run(
        self,
        fn: Callable[[], T],
        *,
        timeout: float | None = None,
        late: Callable[[T], None] | None = None,
        done: Callable[[], None] | None = None,
    ) -> asyncio.Future[T]:
        """``fn()`` on a worker thread; await the returned future for its outcome.
        Call it on the running event loop. With a `timeout` (seconds, from now: the
        wait for a thread included), the future fails with `DatabaseTimeout` past
        it; ``fn`` then never starts if no thread took it, and if it was running its
        result is handed to ``late`` (on the loop) when it comes. The same for a
        caller cancelled while ``fn`` runs: a commit nobody awaits goes to ``late``.
        ``done`` is called on the loop once no thread holds the call any more (it
        ran, or a thread skipped it), however its caller was answered: a call past
        its bound may hold its thread long after (`db_shares` counts it till then)."""
        try:
            if self._closed:
                raise RuntimeError("cannot run database calls after close")
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            if len(self._threads) < self._workers:
                self._start_one()
        except BaseException:
            if done is not None:  # no thread will ever hold it
                done()
            raise
        job = _Job(fn, future, loop, late, done)
        if timeout is not None:
            job.timer = loop.call_later(timeout, _expire, job, timeout)
        self._jobs.put(job)
        return future

    async def call(
        self,
        fn: Callable[[], T],
        *,
        timeout: float | None = None,
        late: Callable[[T], None] | None = None,
        done: Callable[[], None] | None = None,
    ) -> T:
        """`run` awaited. A cancellation that lands after ``fn``'s result is set but
        before the caller resumes (delivered in the same turn of the loop) loses
        the result at the ``await``, and `_succeed` found the future not yet done:
        that result too is nobody's, and goes to ``late`` here, once."""
        future = self.run(fn, timeout=timeout, late=late, done=done)
        try:
            return await future
        except asyncio.CancelledError:
            if late is not None and future.done() and not future.cancelled():
                if future.exception() is None:
                    late(future.result())
            raise

    def _start_one(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run database calls after close")
            if len(self._threads) >= self._workers:
                return
            thread = threading.Thread(
                target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._running += 1
            try:
                _run_job(job)
            finally:
                # After the outcome on the loop (callbacks run in order): by then
                # a commit nobody awaited has been handed to its `late`.
                try:
                    job.loop.call_soon_threadsafe(self._one_done, job)
                except RuntimeError:  # the loop is closed: nobody waits on `done`
                    self._one_done(None)

    def _one_done(self, job: _Job | None) -> None:
        with self._lock:
            self._running -= 1
        if job is not None and job.done is not None:
            job.done()

    def busy(self) -> bool:
        """Whether a call is queued, running, or its outcome not yet handled on
        the loop (the lifespan waits for them before it closes the database)."""
        return self._running > 0 or not self._jobs.empty()

    def close(self) -> None:
        """Let running calls finish, cancel the waiting ones, join the threads."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _deliver(job, _cancel, None)
                if job.done is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is closed
                        job.loop.call_soon_threadsafe(job.done)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()


def _run_job(job: _Job) -> None:
    fn = job.fn
    if fn is None:  # past its bound before a thread took it: its timer has fired
        return
    if job.future.done():
        # Its caller was cancelled before a thread took it. Its timer would keep
        # the job, and the request's data in `fn`, for the rest of the bound: it is
        # stopped here, on this rare path, rather than by a done-callback on every
        # call's future (~2.4 µs a call, measured).
        job.fn = None
        if job.timer is not None:
            _deliver(job, _cancel, None)  # the future is cancelled already
        return
    try:
        result = fn()
    except BaseException as exc:  # handed to the caller, as the executor does
        _deliver(job, _fail, exc)
    else:
        _deliver(job, _succeed, result)


def _deliver(job: _Job, outcome: Callable[[_Job, Any], None], value: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        job.loop.call_soon_threadsafe(outcome, job, value)


def _expire(job: _Job, timeout: float) -> None:
    if job.future.done():
        return
    job.fn = None  # if still queued: it never runs, and its data can go now
    job.future.set_exception(DatabaseTimeout(f"the database did not answer within {timeout:g} s"))


def _stop_timer(job: _Job) -> None:
    if job.timer is not None:
        job.timer.cancel()


def _succeed(job: _Job, result: Any) -> None:
    _stop_timer(job)
    future = job.future
    if not future.done():
        future.set_result(result)
    elif job.late is not None:
        # Done after its caller stopped waiting: told 503 past its bound, or
        # cancelled while it ran (its request cut off by the server's shutdown, the
        # sweeper stopped). Either way the commit is nobody's: `late` takes it.
        job.late(result)


def _fail(job: _Job, exc: BaseException) -> None:
    _stop_timer(job)
    future = job.future
    if future.done():
        return
    if isinstance(exc, StopIteration):  # a future refuses it: as the executor converts it
        exc = RuntimeError("the database call raised StopIteration")
    future.set_exception(exc)


def _cancel(job: _Job, _value: Any) -> None:
    _stop_timer(job)
    job.future.cancel()
