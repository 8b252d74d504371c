"""The edge's local spool of usage reports (stream_edge/spool.py): durable appends,
one drainer per file, nothing lost to an append racing a drain, a torn last line
skipped, and the outbox moving spooled reports (with their slots) into the store."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from shared.store import Admission, SlotRelease
from shared.store_memory import MemoryStore
from shared.webhooks import UsageEvent
from stream_edge import spool as spool_module
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import Outbox
from stream_edge.spool import PENDING, Spool, _same_file


def test_appends_are_claimed_once_and_read_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    assert not spool.has_pending() and spool.claim() == []
    spool.append(b'{"n": 1}')
    spool.append(b'{"n": 2}\n')
    assert spool.has_pending()
    [claimed] = spool.claim()
    assert Spool(tmp_path / "s").claim() == []  # another process finds nothing to take
    spool.append(b'{"n": 3}')  # after the claim: a new file, not the claimed one
    assert spool.read(claimed) == [b'{"n": 1}', b'{"n": 2}']
    spool.remove(claimed)
    [second] = spool.claim()
    assert spool.read(second) == [b'{"n": 3}']


def test_an_append_that_opened_the_file_before_a_drain_renamed_it_is_not_lost(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    spool.append(b"first")
    early = os.open(tmp_path / PENDING, os.O_WRONLY | os.O_APPEND)  # opened before...
    try:
        assert _same_file(early, tmp_path / PENDING)
        [claimed] = spool.claim()  # ...the drainer renamed the file:
        assert not _same_file(early, tmp_path / PENDING)  # `append` writes again
    finally:
        os.close(early)
    spool.append(b"second")
    assert spool.read(claimed) == [b"first"]
    [fresh] = [p for p in spool.claim() if p != claimed]
    assert spool.read(fresh) == [b"second"]


def test_a_drain_left_behind_is_taken_over_only_when_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead, alive = Spool(tmp_path), Spool(tmp_path)
    dead.append(b"x")
    [left] = dead.claim()  # this drainer dies here
    assert alive.claim() == []  # too fresh: maybe still being drained
    monkeypatch.setattr(spool_module, "STALE_DRAIN_SECONDS", -1.0)
    [taken] = alive.claim()
    assert taken != left and alive.read(taken) == [b"x"]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(b'{"ok": 1}')
    with (tmp_path / PENDING).open("ab") as file:
        file.write(b'{"torn')  # a crash mid-append
    [claimed] = spool.claim()
    assert spool.read(claimed) == [b'{"ok": 1}', b'{"torn']


def test_a_record_after_a_torn_one_stays_whole(tmp_path: Path) -> None:
    """A crash mid-append leaves a record without its newline; the next append must
    not be glued to it (both would fail to parse, and the drain drops the file)."""
    spool = Spool(tmp_path)
    spool.append(b'{"ok": 1}')
    with (tmp_path / PENDING).open("ab") as file:
        file.write(b'{"torn')
    spool.append(b'{"ok": 2}')
    [claimed] = spool.claim()
    assert spool.read(claimed) == [b'{"ok": 1}', b'{"torn', b'{"ok": 2}']


def test_a_failed_write_takes_its_partial_record_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    spool.append(b'{"ok": 1}')
    real_write = os.write

    def half_then_full_disk(fd: int, data: bytes) -> int:
        monkeypatch.setattr(os, "write", failing)
        return real_write(fd, bytes(data[: len(data) // 2]))

    def failing(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full_disk)
    with pytest.raises(OSError):
        spool.append(b'{"lost": "the caller knows"}')
    monkeypatch.setattr(os, "write", real_write)
    spool.append(b'{"ok": 3}')
    [claimed] = spool.claim()
    assert spool.read(claimed) == [b'{"ok": 1}', b'{"ok": 3}']


def event(jti: str) -> UsageEvent:
    return UsageEvent(
        jti=jti, reservation_id="r", company_id="c", user_id="u", session_id="s",
        request_id="q", model="m", provider="p", status="completed", finish_reason="stop",
        input_tokens=1, output_tokens=2, usage_source="upstream",
        started_at="2026-01-01T00:00:00Z", first_token_at=None,
        ended_at="2026-01-01T00:00:01Z", content=None,
    )  # fmt: skip


async def test_the_outbox_drains_spooled_reports_with_their_slots(tmp_path: Path) -> None:
    store = MemoryStore()
    admitted = await store.admit(
        Admission([], "used:j1", "stream", 60, ["streams:user:u"], [5], "j1", 0.0, 1e12)
    )
    assert admitted.verdict == "ok"
    spool = Spool(tmp_path)
    outbox = Outbox(store, None, "http://127.0.0.1:9/x", "whsec_" + "QUFB" * 11,  # type: ignore[arg-type]
                    EdgeMetrics(), spool=spool)  # fmt: skip
    spool.append(
        orjson.dumps(
            {
                "item": {"id": "usage_j1", "body": event("j1").body().decode(), "attempt": 0},
                "release": {"slot_keys": ["streams:user:u"], "member": "j1"},
            }
        )
    )
    spool.append(b"not json")  # skipped, does not block the rest
    assert await outbox.drain_spool() == 1
    assert await store.outbox_size() == 1
    assert orjson.loads(await store.outbox_get("usage_j1") or b"{}")["id"] == "usage_j1"
    assert not spool.has_pending() and list(tmp_path.iterdir()) == []
    # The slot went back with it: a stream at the limit of 1 is admitted again.
    again = await store.admit(
        Admission([], "used:j2", "stream", 60, ["streams:user:u"], [1], "j2", 1.0, 1e12)
    )
    assert again.verdict == "ok"
    assert await outbox.drain_spool() == 0


async def test_slots_can_be_released_on_their_own_in_redis(redis_prefix: str) -> None:
    from shared.store_redis import RedisStore
    from tests.conftest import REDIS_URL

    store = RedisStore.from_url(REDIS_URL, prefix=redis_prefix)
    try:
        keys = ["streams:user:u", "streams:company:c"]
        first = await store.admit(Admission([], "used:a", "stream", 60, keys, [1, 9], "a", 0, 1e12))
        assert first.verdict == "ok"
        full = await store.admit(Admission([], "used:b", "stream", 60, keys, [1, 9], "b", 0, 1e12))
        assert full.verdict == "full"
        await store.release_slots(SlotRelease(keys, "a"))
        freed = await store.admit(Admission([], "used:b", "stream", 60, keys, [1, 9], "b", 0, 1e12))
        assert freed.verdict == "ok"
    finally:
        await store.close()
