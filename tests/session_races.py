"""A chat session's next turn (its init) and the session's deletion sent together,
queued on the session's row in a chosen order (PostgreSQL lets them go in that
order), as two tabs or a client deleting what it still sends to do."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg

from tests.polling import wait_until
from tests.test_control_plane import CP
from tests.test_identity_owners import _lock_waiters, _raw_url


def turn_and_delete_queued(
    cp: CP, client: httpx.Client, session_id: str, *, turn_first: bool
) -> tuple[httpx.Response, httpx.Response]:
    """Hold the session's row; send the turn (`and then?`) and the delete, the first
    of them waiting on the row before the second is sent; let go once both wait.
    The turn's answer, then the delete's."""
    url = _raw_url(cp)
    turn = {"query": "and then?", "session_id": session_id}
    with (
        ThreadPoolExecutor(2) as pool,
        psycopg.connect(url) as locker,
        psycopg.connect(url, autocommit=True) as watcher,
    ):
        locker.execute("SELECT id FROM chat_sessions WHERE id = %s FOR UPDATE", (session_id,))
        if turn_first:
            init = pool.submit(client.post, "/v1/chat/init", json=turn)
            wait_until(lambda: _lock_waiters(watcher) == 1, "the init never waited on the session")
            deleted = pool.submit(client.delete, f"/v1/sessions/{session_id}")
            wait_until(lambda: _lock_waiters(watcher) == 2, "the delete never waited")
        else:
            deleted = pool.submit(client.delete, f"/v1/sessions/{session_id}")
            wait_until(lambda: _lock_waiters(watcher) == 1, "the delete never waited")
            init = pool.submit(client.post, "/v1/chat/init", json=turn)
            wait_until(lambda: _lock_waiters(watcher) == 2, "the turn never waited on the session")
        locker.rollback()
        return init.result(), deleted.result()
