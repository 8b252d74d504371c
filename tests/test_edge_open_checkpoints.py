"""The usage checkpoints of a stream that fails while its edge opens the backend
(`StreamJob.open`, `stream_edge.checkpoints.Checkpointer`), counted at the store.

Each write there is load-bearing: the heartbeat's first checkpoint, written as the
opening starts, is what the sweeper sees fall silent when the edge dies while it
opens (`test_e2e_edge_crash.py`, "an edge killed while its backend has not
answered"); the ended one, last, keeps the sweeper from settling the stream as silent (and
revoking it) while its report waits in the outbox. An opening that fails before the
heartbeat ran writes the ended one alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from shared.checkpoints import UsageCheckpoint, checkpoint_key
from tests.inproc import MOCK, Gateway, gateway_env, opened

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("edge-open-checkpoints")
    env = gateway_env(
        str(tmp),
        LLMGW_WEBHOOK_RETRY_BASE_SECONDS="0.05",
        LLMGW_UPSTREAM_RETRIES="0",
        LLMGW_BREAKER_FAILURES="1000",
    )
    async with Gateway(env) as gateway:
        yield gateway


@pytest.mark.parametrize(
    ("query", "refused", "written"),
    [
        # The in-memory transport refuses before its first await: the heartbeat
        # task never ran.
        ("refused [[mock tokens=2]]", True, [(1, True)]),
        # The backend's 500 comes after an await, as a real refused connect does:
        # the heartbeat's first write, then the ended one.
        ("fails [[mock fail=500]]", False, [(1, False), (2, True)]),
    ],
    ids=["refused-before-any-await", "backend-500"],
)
async def test_a_stream_failing_while_opening_writes_its_heartbeat_then_its_end(
    gw: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    query: str,
    refused: bool,
    written: list[tuple[int, bool]],
) -> None:
    writes: list[tuple[str, bytes]] = []
    store: Any = gw.store
    real_set = store.set

    async def counted_set(key: str, value: bytes, *args: Any, **kwargs: Any) -> Any:
        writes.append((key, value))
        return await real_set(key, value, *args, **kwargs)

    monkeypatch.setattr(store, "set", counted_set)
    token = await gw.new_user()
    grant = await gw.init_ok(token, {"query": query})
    if refused:
        gw.backends.faults_for(MOCK).refuse = 1
    async with opened(await gw.get(grant["stream_url"])) as response:
        await response.aread()
    assert response.status_code == 502
    record = await gw.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["cost"]) == ("failed", "0.000000")
    key = checkpoint_key(grant["reservation_id"])
    checkpoints = [UsageCheckpoint.loads(value) for k, value in writes if k == key]
    assert [(point.beat, point.ended) for point in checkpoints] == written
