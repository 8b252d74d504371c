"""`RecentAnswer`: however many ask at once or within its age, one computation (the
anonymous routes that read the database: a flood costs one transaction a second)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.recent_answer import RecentAnswer
from tests.test_control_plane import start_cp


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_crowd_shares_one_computation_until_the_answer_ages() -> None:
    clock, calls, gate = Clock(), [], asyncio.Event()

    async def compute() -> int:
        calls.append(clock.now)
        await gate.wait()
        return len(calls)

    answer = RecentAnswer(compute, max_age=1.0, clock=clock)
    crowd = [asyncio.ensure_future(answer.get()) for _ in range(500)]
    await asyncio.sleep(0)
    gate.set()
    assert set(await asyncio.gather(*crowd)) == {1} and len(calls) == 1
    clock.now = 0.9
    assert await answer.get() == 1 and len(calls) == 1
    clock.now = 1.0
    assert await answer.get() == 2 and len(calls) == 2


async def test_a_failure_is_not_kept_and_forget_drops_an_answer_begun_before() -> None:
    clock, results = Clock(), [ValueError("down"), 1, 2, 3]
    gate = asyncio.Event()
    gate.set()

    async def compute() -> int:
        await gate.wait()
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    answer = RecentAnswer(compute, clock=clock)
    with pytest.raises(ValueError):
        await answer.get()
    assert await answer.get() == 1
    gate.clear()
    answer.forget()
    begun = asyncio.ensure_future(answer.get())  # computing 2, from before the change
    await asyncio.sleep(0)
    answer.forget()  # what it reads changed meanwhile
    gate.set()
    assert await begun == 2
    assert await answer.get() == 3  # 2 was not kept


@pytest.mark.parametrize("path", ["/.well-known/jwks.json", "/readyz", "/metrics"])
def test_a_flood_of_anonymous_reads_costs_the_database_one_transaction(
    path: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Each of these anonymous routes took a database transaction per request, on the
    threads logins, inits and settlements wait for: a flood of them queued everyone
    else's behind it."""
    with start_cp(request, tmp_path, "sqlite") as cp:
        db = cp.app.state.deps.db
        transaction, seen = db.transaction, []

        def counted(work: Any, **options: Any) -> Any:
            seen.append(work)
            return transaction(work, **options)

        db.transaction = counted

        async def flood() -> list[int]:
            async with httpx.AsyncClient(base_url=cp.url, timeout=30) as client:
                answers = await asyncio.gather(*(client.get(path) for _ in range(200)))
            return [r.status_code for r in answers]

        try:
            statuses = asyncio.run(flood())
        finally:
            db.transaction = transaction
        assert statuses == [200] * 200
        # One a second (the answer's age) however long the flood takes on a slow
        # machine, plus whatever the sweeper's own passes read meanwhile: far from 200.
        assert 1 <= len(seen) <= 20, len(seen)
