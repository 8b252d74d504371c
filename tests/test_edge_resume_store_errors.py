"""The store fails while a resumable stream waits for its client to come back: the
stream still ends within the resume grace, cancelled and billed for what was
generated. Before the fix the store's error killed the wait, nothing cancelled the
backend, and the answer ran to its end for nobody: the user was billed for all of
it and the backend kept generating (review 5)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from shared.store_memory import MemoryStore
from stream_edge.resume import attached_key
from tests.inproc import Gateway, events, eventually, gateway_env, opened

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKENS = 400  # at 50 ms each: a 20 s answer, far longer than the grace


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    env = gateway_env(
        str(tmp_path_factory.mktemp("resume-store")),
        LLMGW_RESUME_GRACE_SECONDS="1",
        LLMGW_WEBHOOK_RETRY_BASE_SECONDS="0.05",
        LLMGW_WEBHOOK_RETRY_CAP_SECONDS="0.5",
    )
    async with Gateway(env) as gateway:
        yield gateway


async def test_a_store_failing_during_the_resume_grace_still_cancels_the_stream(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": f"long answer [[mock tokens={TOKENS} delay_ms=50]]"})
    failing_reads: list[str] = []
    get = MemoryStore.get

    async def failing_get(self: MemoryStore, key: str) -> bytes | None:
        if key.startswith(attached_key("")):
            failing_reads.append(key)
            raise ConnectionError("the store is unreachable")
        return await get(self, key)

    async with opened(await gw.get(grant["stream_url"])) as response:
        assert response.status_code == 200
        got = await events(response, stop_after=3)
        assert [e.event for e in got[-2:]] == ["chunk", "chunk"]
        monkeypatch.setattr(MemoryStore, "get", failing_get)
    # The client left; the edge looks for a reconnect in a store that now fails.
    await eventually(lambda: failing_reads, "the edge never looked for a reconnect")
    record = await gw.wait_usage(access, grant["reservation_id"], within=15)
    assert record["status"] == "cancelled", record
    assert record["output_tokens"] < TOKENS
    await eventually(lambda: gw.stats.cancelled >= 1, "the backend was never cancelled")
