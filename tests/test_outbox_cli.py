"""Operator commands. `llm-gateway outbox` over a store holding more dead letters
than one read of them:
a receiver that refuses every report (a rotated webhook secret) dead-letters a busy
gateway's whole traffic within the hour. The store is in memory here (replaying
100,001 letters through Redis is 200,000 round trips); the Redis side of the two
store calls the command uses is in `test_store_contract.py`. `llm-gateway admin`
with ids that are not ids."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import httpx
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


@pytest.mark.parametrize(
    ("argv", "route"),
    [
        (["delete-team", "c1", "../../../api-keys/K1"], "/v1/admin/companies/c1/teams/"),
        (["delete-budget", "../api-keys/K1#", "b1"], "/v1/admin/companies/"),
        (["revoke-api-key", "../revocations/R1"], "/v1/admin/api-keys/"),
        (["grant", "victim/credits?", "10"], "/v1/admin/companies/"),
        (["delete-agent", "c1", "../../../api-keys/K1"], "/v1/admin/companies/c1/agents/"),
        (["unrevoke", "../api-keys/K1"], "/v1/admin/revocations/"),
    ],
)
def test_an_id_pasted_into_the_admin_cli_cannot_aim_it_at_another_route(
    argv: list[str], route: str
) -> None:
    """An id copied from a ticket or a chat, holding `../` or `?`, turned `delete-team`
    into `DELETE /v1/admin/api-keys/K1` (httpx resolves the dot segments) and a grant
    into one for another company."""
    from llm_gateway.admin import _request, add_admin_parser

    parser = argparse.ArgumentParser()
    add_admin_parser(parser.add_subparsers(dest="command"))
    method, path, _, _ = _request(parser.parse_args(["admin", *argv]))
    url = httpx.Request(method, "http://cp" + path).url
    sent = url.raw_path.decode()
    assert sent == path and sent.startswith(route), sent  # nothing resolved away
    assert "/.." not in sent[len(route) :] and not url.query and not url.fragment, sent


def test_the_admin_cli_encodes_its_listing_filters() -> None:
    from llm_gateway.admin import _request, add_admin_parser

    parser = argparse.ArgumentParser()
    add_admin_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["admin", "list-api-keys", "--user-id", "u1&company_id=other"])
    _, path, _, _ = _request(args)
    assert httpx.Request("GET", "http://cp" + path).url.params.multi_items() == [
        ("user_id", "u1&company_id=other")
    ]


def test_listing_dead_letters_prints_no_members_conversation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack on erasure: a report refused by the control plane is a dead letter with
    its transcript (the model's answer and tool calls, when transcripts are on). An
    operator listing them (`outbox dead-letters`, after a rotated webhook secret:
    every report of the hour) printed each member's answers to its terminal, and on
    to the tickets and logs it pastes them into, long after an owner deleted the
    session they belonged to. The listing shows the sizes; the letter keeps the text
    for the replay."""
    store = MemoryStore()
    data = {
        "jti": "j1",
        "session_id": "s1",
        "status": "completed",
        "output_tokens": 7,
        "content": "the member's private answer",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup"}}],
    }
    body = orjson.dumps({"type": "stream.completed", "data": data}).decode()
    letter = orjson.dumps({"id": "usage_j1", "body": body, "attempt": 4})
    store._dead["usage_j1"] = letter
    monkeypatch.setattr(outbox_cli, "open_store", lambda *_a, **_k: store)
    monkeypatch.setenv("LLMGW_REDIS_URL", "redis://unused")
    parser = argparse.ArgumentParser()
    outbox_cli.add_outbox_parser(parser.add_subparsers(dest="command"))
    assert outbox_cli.run_outbox(parser.parse_args(["outbox", "dead-letters"])) == 0
    out = capsys.readouterr().out
    assert "private answer" not in out and "lookup" not in out, out
    shown = json.loads(out)["data"]
    assert shown["jti"] == "j1" and shown["output_tokens"] == 7
    assert (shown["content_chars"], shown["tool_calls_count"]) == (27, 1)
    assert store._dead["usage_j1"] == letter  # kept whole for the replay
