"""The same change sent twice at once (a double click, a retrying script, two tabs of
the console): the second must answer as if it came after the first.

The two requests overlap without any clock, as in `test_identity_owners`: a
connection of the test holds the company's row while both are sent and lets go once
PostgreSQL shows both waiting. On PostgreSQL: SQLite runs one write transaction at a
time, so there the second always sees the first.
"""

from __future__ import annotations

import httpx

from tests.session_races import turn_and_delete_queued
from tests.test_control_plane import CP, data_of
from tests.test_identity_owners import _at_once, pg_cp

__all__ = ["pg_cp"]


def _audited(client: httpx.Client, company_id: str, kind: str) -> int:
    query = {"company_id": company_id, "kind": kind}
    return len(data_of(client.get("/v1/admin/audit", params=query))["items"])


def test_a_webhook_deleted_twice_at_once_is_204_then_404(pg_cp: CP) -> None:
    """Attack: an owner deletes its company's webhook twice at once. Both read the row
    and deleted it: the second deleted nothing, answered 204 and logged a second
    deletion in the audit (SQLAlchemy's "expected to delete 1 row(s); 0 were
    matched" warning, a 500 where warnings are errors, as in this suite)."""
    client, company_id = pg_cp.owner_client("1")
    path = f"/v1/admin/companies/{company_id}/webhook"
    data_of(client.put(path, json={"url": "https://example.com/hook"}), 201)
    answers = _at_once(pg_cp, company_id, [lambda: client.delete(path)] * 2)
    assert sorted(r.status_code for r in answers) == [204, 404], [r.text for r in answers]
    assert _audited(client, company_id, "admin.webhook.delete") == 1


def test_an_agent_deleted_twice_at_once_is_204_then_404(pg_cp: CP) -> None:
    """Attack: an owner deletes an agent twice at once: the second deleted a row
    already gone, answered 204 and audited a second deletion (a 500 where
    warnings are errors)."""
    client, company_id = pg_cp.owner_client("1")
    base = f"/v1/admin/companies/{company_id}/agents"
    data_of(client.post(base, json={"name": "helper", "system_prompt": "Be brief."}), 201)
    answers = _at_once(pg_cp, company_id, [lambda: client.delete(f"{base}/helper")] * 2)
    assert sorted(r.status_code for r in answers) == [204, 404], [r.text for r in answers]
    assert _audited(client, company_id, "admin.agent.deleted") == 1


def test_a_session_deleted_while_a_turn_is_appended_is_deleted_whole(pg_cp: CP) -> None:
    """Attack: a member deletes a chat session while its next turn's init appends to
    it (two tabs, or a client deleting what it still sends to). The delete removed
    the messages it saw, then the session; the init's message, committed between the
    two, still pointed at it: a foreign-key violation and a 500 `internal_error`
    (measured: 201 and 500, the session left in place).

    The test holds the session's row until the init waits on it, then sends the
    delete and lets go once both wait: the init goes first, as PostgreSQL queues them.
    """
    client, _ = pg_cp.owner_client("10")
    session_id = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)["session_id"]
    answers = list(turn_and_delete_queued(pg_cp, client, session_id, turn_first=True))
    assert [r.status_code for r in answers] == [201, 204], [r.text for r in answers]
    assert client.get(f"/v1/sessions/{session_id}").status_code == 404
