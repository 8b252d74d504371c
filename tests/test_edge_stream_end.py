"""A stream's end in the store, on one embedded stack (real sockets): a completed
stream's ended checkpoint and its usage report are written in one step, the
checkpoint first (`Store.outbox_put_after`), as the relay ends; a stream that did
not complete writes its ended checkpoint on its own, then its report, as before."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.checkpoints import UsageCheckpoint, checkpoint_key
from shared.store import KeyWrite, SlotRelease
from shared.store_memory import MemoryStore
from tests.stack import InProcessStack, base_env


class RecordingStore(MemoryStore):
    """A memory store that notes, in order, each checkpoint write (with its `ended`
    flag), each outbox put, and each combined write (`outbox_put_after`)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str, bool]] = []

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        if key.startswith("ckpt:"):
            self.log.append(("set", key, UsageCheckpoint.loads(value).ended))
        await super().set(key, value, ttl_seconds)

    async def outbox_put(
        self, item_id: str, payload: bytes, due_at: float, release: SlotRelease | None = None
    ) -> None:
        self.log.append(("outbox_put", item_id, False))
        await super().outbox_put(item_id, payload, due_at, release)

    async def outbox_put_after(
        self,
        first: KeyWrite,
        item_id: str,
        payload: bytes,
        due_at: float,
        release: SlotRelease | None = None,
    ) -> None:
        self.log.append(("put_after", first.key, UsageCheckpoint.loads(first.value).ended))
        await super().outbox_put_after(first, item_id, payload, due_at, release)

    def of(self, reservation_id: str) -> list[tuple[str, bool]]:
        """This stream's checkpoint writes and every outbox put, in order."""
        key = checkpoint_key(reservation_id)
        return [(op, ended) for op, k, ended in self.log if k == key or op == "outbox_put"]


@pytest.fixture(scope="module")
def store() -> RecordingStore:
    return RecordingStore()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, store: RecordingStore
) -> Iterator[InProcessStack]:
    tmp = tmp_path_factory.mktemp("stream_end")
    with InProcessStack(base_env(f"sqlite:///{tmp}/gw.db"), store=store) as running:
        yield running


def stream(stack: InProcessStack, query: str) -> tuple[str, str, bytes]:
    c = stack.client
    access = c.new_user(c.new_company("5"))
    grant = c.init_ok(access, {"query": query})
    response = c.http.post(
        grant["completions_url"],
        headers={"Authorization": f"Bearer {grant['stream_token']}"},
        json={"messages": [{"role": "user", "content": query}], "stream": True},
    )
    assert response.status_code == 200, response.text
    return access, grant["reservation_id"], response.content


def test_a_completed_streams_checkpoint_and_report_are_one_write(
    stack: InProcessStack, store: RecordingStore
) -> None:
    access, reservation_id, body = stream(stack, "hello [[mock tokens=5]]")
    assert body.endswith(b"data: [DONE]\n\n")
    record = stack.client.wait_usage(access, reservation_id)
    assert record["status"] == "completed"
    ops = store.of(reservation_id)
    # The ended checkpoint goes with the report (the memory store carries the
    # combined write out as a set and a put, in that order) ...
    at = ops.index(("put_after", True))
    assert ops[at : at + 3] == [("put_after", True), ("set", True), ("outbox_put", False)]
    # ... and never on its own: before it, only running checkpoints (a stream this
    # short may end before its heartbeat's first write).
    assert all(op != "set" or not ended for op, ended in ops[:at])


def test_a_broken_off_stream_writes_its_ended_checkpoint_then_its_report(
    stack: InProcessStack, store: RecordingStore
) -> None:
    access, reservation_id, body = stream(stack, "drop [[mock tokens=20 drop_after=3]]")
    assert b"error" in body
    record = stack.client.wait_usage(access, reservation_id)
    assert record["status"] == "failed"
    ops = store.of(reservation_id)
    assert ("put_after", True) not in ops
    ended = ops.index(("set", True))
    assert ("outbox_put", False) in ops[ended + 1 :]
