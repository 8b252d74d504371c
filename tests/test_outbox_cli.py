"""`llm-gateway outbox` over a store holding more dead letters than one read of them:
a receiver that refuses every report (a rotated webhook secret) dead-letters a busy
gateway's whole traffic within the hour. The store is in memory here (replaying
100,001 letters through Redis is 200,000 round trips); the Redis side of the two
store calls the command uses is in `test_store_contract.py`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import orjson
import pytest

from llm_gateway import outbox_cli
from shared.store_memory import MemoryStore

FLOOD = 100_001  # one past what the command read before


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryStore]:
    store = MemoryStore()
    body = orjson.dumps({"type": "stream.completed", "data": {}}).decode()
    for i in range(FLOOD):
        item_id = f"usage_{i}"
        store._dead[item_id] = orjson.dumps({"id": item_id, "body": body, "attempt": 4})
    monkeypatch.setattr(outbox_cli, "open_store", lambda *_a, **_k: store)
    monkeypatch.setenv("LLMGW_REDIS_URL", "redis://unused")
    yield store


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    parser = argparse.ArgumentParser()
    outbox_cli.add_outbox_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["outbox", *argv])
    code = outbox_cli.run_outbox(args)
    return code, json.loads(capsys.readouterr().out)


def test_an_operator_replaying_every_dead_letter_replays_all_of_them(
    store: MemoryStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, status = _run(capsys, "status")
    assert code == 0 and status == {"pending": 0, "dead_letters": FLOOD}
    code, replayed = _run(capsys, "replay")
    assert code == 0 and replayed["not_found"] == []
    assert isinstance(replayed["replayed"], list) and len(replayed["replayed"]) == FLOOD
    assert (len(store._outbox), len(store._dead)) == (FLOOD, 0)


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_listing_no_dead_letters_is_refused_not_one_shown(limit: str) -> None:
    parser = argparse.ArgumentParser()
    outbox_cli.add_outbox_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["outbox", "dead-letters", "--limit", limit])
