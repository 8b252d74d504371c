"""Throwaway PostgreSQL databases made and dropped off the tests' path.

Each CREATE DATABASE (a WAL-logged copy of its template, fsynced) and each DROP
DATABASE costs the shared server 0.1 to 1.4 s, mostly waiting on the disk, and a
run makes several hundred. Two threads per test process do them in the
background: the next databases of each kind are made while a test runs, and a
test's database is dropped while the next test runs. A test still gets a database no
other test ever used, made exactly as before; only the waiting moves.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg


def create_database(server: str, template: str | None) -> str:
    """A new database on `server`, a copy of `template` (PostgreSQL's template1 by
    default); returns its name."""
    name = f"llmgw_t_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    return name


def drop_database(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class SpareDatabases:
    """One server's databases, `depth` spares kept ready per template. CREATEs run
    on one thread in the order asked and DROPs on another, so a short test does not
    wait for the last one's drop before its own database is made."""

    def __init__(self, server: str, depth: int = 2) -> None:
        self.server = server
        self.depth = depth
        self._creator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-create")
        self._dropper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-drop")
        self._spares: dict[str | None, deque[Future[str]]] = {}
        self._failed_drops: list[str] = []
        self._lock = threading.Lock()

    def take(self, template: str | None) -> str:
        """A database no test has used: the oldest spare (waiting for it if it is not
        ready yet), or a new one; then spares are started up to `depth` again."""
        with self._lock:
            spares = self._spares.setdefault(template, deque())
            if not spares:
                spares.append(self._creator.submit(create_database, self.server, template))
            taken = spares.popleft()
            while len(spares) < self.depth:
                spares.append(self._creator.submit(create_database, self.server, template))
        # A failed CREATE raises here, in the test that asked, as it did in line.
        return taken.result()

    def give_back(self, name: str) -> None:
        """Drop `name` in the background."""
        self._dropper.submit(self._drop, name)

    def _drop(self, name: str) -> None:
        try:
            drop_database(self.server, name)
        except psycopg.Error as exc:
            self._failed_drops.append(f"{name}: {exc}")

    def close(self) -> None:
        """Drop the unused spares and wait for every queued drop."""
        with self._lock:
            spares = [spare for queue in self._spares.values() for spare in queue]
            self._spares = {}
        # Run at the process's exit, when the threads take no new work: wait for
        # them, then drop the spares here.
        self._creator.shutdown(wait=True)
        self._dropper.shutdown(wait=True)
        for spare in spares:
            try:
                self._drop(spare.result())
            except psycopg.Error as exc:
                self._failed_drops.append(f"a spare: {exc}")
        for failure in self._failed_drops:
            print(f"tests: a throwaway database was not dropped: {failure}", file=sys.stderr)
