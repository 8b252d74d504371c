"""`control_plane.db_threads.DbThreads`: `Database`'s worker threads behave as the
`ThreadPoolExecutor` they replace (results, errors, the cap on calls at once,
cancellation before and while running, close)."""

from __future__ import annotations

import asyncio
import functools
import gc
import pathlib
import threading
import time
import weakref

import pytest

from control_plane.db_threads import DatabaseTimeout, DbThreads


def test_results_and_errors_come_back_on_the_loop() -> None:
    threads = DbThreads(2, "t")

    def boom() -> None:
        raise ValueError("no")

    async def main() -> tuple[int, str]:
        ran_on = await threads.run(lambda: threading.current_thread().name)
        with pytest.raises(ValueError, match="no"):
            await threads.run(boom)
        return await threads.run(lambda: 41 + 1), ran_on

    try:
        value, ran_on = asyncio.run(main())
    finally:
        threads.close()
    assert value == 42
    assert ran_on.startswith("t_")


def test_at_most_workers_calls_run_at_once_and_the_rest_wait() -> None:
    threads = DbThreads(3, "t")
    lock = threading.Lock()
    # The first three calls meet here, so three run at once whatever the machine's
    # load; with a smaller cap the barrier breaks, with a larger one the peak shows it.
    first_three = threading.Barrier(3)
    running = 0
    peak = 0

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        if i < 3:
            first_three.wait(5)
        time.sleep(0.01)
        with lock:
            running -= 1
        return i

    async def main() -> list[int]:
        return list(
            await asyncio.gather(*(threads.run(functools.partial(work, i)) for i in range(12)))
        )

    try:
        assert asyncio.run(main()) == list(range(12))
    finally:
        threads.close()
    assert peak == 3


def test_a_call_cancelled_before_it_starts_never_runs_and_a_running_one_finishes() -> None:
    threads = DbThreads(1, "t")
    release = threading.Event()
    started = threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        started.set()
        release.wait(5)
        ran.append("blocker")

    async def main() -> None:
        first = asyncio.ensure_future(threads.run(blocker))
        second = asyncio.ensure_future(threads.run(lambda: ran.append("queued")))
        await asyncio.to_thread(started.wait, 5)
        first.cancel()  # already running: it finishes, its result is dropped
        second.cancel()  # still waiting: it never runs
        release.set()
        await asyncio.sleep(0)
        assert await threads.run(lambda: "after") == "after"

    try:
        asyncio.run(main())
    finally:
        threads.close()
    assert ran == ["blocker"]


def test_close_cancels_the_waiting_and_refuses_new_calls() -> None:
    threads = DbThreads(1, "t")
    release = threading.Event()
    started = threading.Event()

    async def main() -> None:
        def blocker() -> str:
            started.set()
            release.wait(5)
            return "done"

        running = threads.run(blocker)
        waiting = threads.run(lambda: "never")
        await asyncio.to_thread(started.wait, 5)
        closing = asyncio.ensure_future(asyncio.to_thread(threads.close))
        await asyncio.wait({waiting}, timeout=5)  # close has cancelled the waiting call
        assert waiting.cancelled()
        release.set()
        await closing
        assert await running == "done"
        with pytest.raises(asyncio.CancelledError):
            await waiting
        with pytest.raises(RuntimeError):
            threads.run(lambda: None)

    asyncio.run(main())


def test_a_bounded_call_past_its_bound_fails_and_one_no_thread_took_never_runs() -> None:
    # A database gone silent: the one thread is stuck in its call (released only by
    # the test). The stuck call's caller and the one queued behind it both get
    # `DatabaseTimeout`; once the thread is free the queued call never runs, and the
    # stuck one's late result goes to `late`, on the loop.
    threads = DbThreads(1, "t")
    stuck = threading.Event()
    free = threading.Event()
    ran: list[str] = []
    late: list[str] = []

    def silent() -> str:
        stuck.set()
        free.wait(30)
        ran.append("silent")
        return "committed late"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        came = asyncio.Event()

        def on_late(result: str) -> None:
            late.append(result)
            came.set()

        first = threads.run(silent, timeout=0.05, late=on_late)
        await loop.run_in_executor(None, stuck.wait, 30)
        queued = threads.run(lambda: ran.append("queued"), timeout=0.05)
        for call in (first, queued):
            with pytest.raises(DatabaseTimeout):
                await call
        free.set()
        # A bounded call after them: the thread has taken and skipped `queued`.
        assert await threads.run(lambda: "next", timeout=30) == "next"
        await asyncio.wait_for(came.wait(), 30)  # delivered on the loop, after `free`

    try:
        asyncio.run(main())
    finally:
        free.set()
        threads.close()
    assert ran == ["silent"]
    assert late == ["committed late"]


def test_a_call_cancelled_while_it_runs_hands_its_success_to_late() -> None:
    # A request cut off (the server's shutdown cancels it) while its transaction
    # runs: the transaction commits anyway. Before, its result was dropped, and what
    # `late` does for a commit past the bound (init releases its hold, a settlement
    # is counted and corrects the TPM window, a silent stream's token is revoked)
    # never happened. Now a cancelled caller's commit goes to `late`, as a timed-out
    # one's does; a call cancelled before a thread took it never runs, nor is late.
    threads = DbThreads(1, "t")
    started = threading.Event()
    release = threading.Event()
    late: list[str] = []

    def committing() -> str:
        started.set()
        release.wait(30)
        return "committed"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        came = asyncio.Event()

        def on_late(result: str) -> None:
            late.append(result)
            came.set()

        running = asyncio.ensure_future(threads.run(committing, timeout=60, late=on_late))
        queued = asyncio.ensure_future(threads.run(lambda: "never", timeout=60, late=on_late))
        await loop.run_in_executor(None, started.wait, 30)
        running.cancel()
        queued.cancel()
        release.set()
        await asyncio.wait_for(came.wait(), 30)
        # One thread, calls in order: past this, the queued call has been skipped.
        assert await threads.run(lambda: "after", timeout=60) == "after"

    try:
        asyncio.run(main())
    finally:
        release.set()
        threads.close()
    assert late == ["committed"]


def test_a_bounded_call_that_answers_in_time_is_not_late() -> None:
    threads = DbThreads(1, "t")
    late: list[int] = []

    async def main() -> int:
        return await threads.run(lambda: 7, timeout=30, late=late.append)

    try:
        assert asyncio.run(main()) == 7
    finally:
        threads.close()
    assert late == []


def test_a_cancelled_call_lets_go_of_its_data_once_its_thread_is_past_it() -> None:
    # A client gone while its call waited for a thread: once the thread has skipped
    # the call, nothing may keep the call's data (the request's body, its messages)
    # until the call's bound would have fired; the one that was running lets go as
    # soon as it finishes. Its timer held both for the whole bound before.
    threads = DbThreads(1, "t")
    release = threading.Event()
    started = threading.Event()

    class Data:
        pass

    def blocker(_: Data) -> None:
        started.set()
        release.wait(5)

    async def cancelled_calls() -> tuple[weakref.ref[Data], weakref.ref[Data]]:
        running_data, queued_data = Data(), Data()
        calls = (
            threads.run(functools.partial(blocker, running_data), timeout=60),
            threads.run(functools.partial(lambda _: None, queued_data), timeout=60),
        )
        await asyncio.to_thread(started.wait, 5)
        for call in calls:
            call.cancel()  # as its awaiting task's cancel does
        return weakref.ref(running_data), weakref.ref(queued_data)

    async def main() -> None:
        running, queued = await cancelled_calls()
        release.set()
        # One thread, calls taken in order: past this, it has finished the first and
        # skipped the second, and what it handed back has run on the loop.
        assert await threads.run(lambda: "after", timeout=60) == "after"
        gc.collect()
        assert running() is None
        assert queued() is None

    try:
        asyncio.run(main())
    finally:
        threads.close()


def test_a_call_cancelled_as_its_result_comes_hands_it_to_late(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cancellation lands after the commit's result is set on the future but
    # before the awaiting task resumes (a cancel delivered in the same turn of the
    # loop, as anyio's cancel scopes deliver theirs): the task gets CancelledError
    # at its await, the result is lost, and `_succeed` saw a future not yet done,
    # so it did not hand it to `late` either. Before: an init's hold (its
    # `_give_back` never learned of it) stayed held until the sweeper's deadline, a
    # webhook's settlement was never counted. Now the caller's await hands it on.
    from control_plane import db_threads
    from control_plane.db import Database

    db = Database(f"sqlite:///{tmp_path}/race.db", pool_size=1)
    late: list[int] = []
    caller: list[asyncio.Task[int]] = []
    real = db_threads._succeed

    def succeed_then_cancel(job: object, result: object) -> None:
        real(job, result)  # type: ignore[arg-type]
        caller[0].cancel()  # before the task's wake-up, queued by set_result

    monkeypatch.setattr(db_threads, "_succeed", succeed_then_cancel)

    async def main() -> None:
        task = asyncio.ensure_future(db.transaction(lambda s: 7, late=late.append))
        caller.append(task)
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    finally:
        db.close()
    assert late == [7]


def test_done_is_called_once_no_thread_holds_the_call_past_its_bound_too() -> None:
    """`done` (what gives a company's slot back, `db_shares`) comes once per call,
    when its thread is finished with it: for a call past its bound, not at the 503
    but when the thread lets go; for one that never ran, when a thread skipped it."""
    threads = DbThreads(1, "t")
    release = threading.Event()
    done: list[str] = []

    def boom() -> None:
        raise ValueError("no")

    async def main() -> None:
        await threads.run(lambda: 1, done=lambda: done.append("ok"))
        with pytest.raises(ValueError):
            await threads.run(boom, done=lambda: done.append("failed"))
        stuck = threads.run(
            lambda: release.wait(10), timeout=0.05, done=lambda: done.append("stuck")
        )
        queued = threads.run(lambda: 2, timeout=0.05, done=lambda: done.append("skipped"))
        for future in (stuck, queued):
            with pytest.raises(DatabaseTimeout):
                await future
        assert done == ["ok", "failed"]  # the thread still holds the stuck call
        release.set()
        while len(done) < 4:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        release.set()
        threads.close()
    assert done == ["ok", "failed", "stuck", "skipped"]
