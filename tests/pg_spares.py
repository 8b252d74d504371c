"""Throwaway PostgreSQL databases made and dropped off the tests' path.

Each CREATE DATABASE (a WAL-logged copy of its template, fsynced) and each DROP
DATABASE costs the shared server 0.1 to 1.4 s, mostly waiting on the disk, and a
run makes several hundred. One thread per test process does both in the
background: the next database of each kind is made while a test runs, and a test's
database is dropped while the next test runs. A test still gets a database no
other test ever used, made exactly as before; only the waiting moves.
"""

from __future__ import annotations

import sys
import threading
import uuid
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
    """One server's databases, one spare kept ready per template. Every CREATE and
    DROP runs on one thread, in the order asked, so two never race on a template."""

    def __init__(self, server: str) -> None:
        self.server = server
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-spares")
        self._spares: dict[str | None, Future[str]] = {}
        self._failed_drops: list[str] = []
        self._lock = threading.Lock()

    def take(self, template: str | None) -> str:
        """A database no test has used: the spare made in advance (waiting for it if
        it is not ready yet), or a new one; the next spare is then started."""
        with self._lock:
            spare = self._spares.pop(template, None)
            if spare is None:
                spare = self._worker.submit(create_database, self.server, template)
            self._spares[template] = self._worker.submit(create_database, self.server, template)
        # A failed CREATE raises here, in the test that asked, as it did in line.
        return spare.result()

    def give_back(self, name: str) -> None:
        """Drop `name` after the work queued before it."""
        self._worker.submit(self._drop, name)

    def _drop(self, name: str) -> None:
        try:
            drop_database(self.server, name)
        except psycopg.Error as exc:
            self._failed_drops.append(f"{name}: {exc}")

    def close(self) -> None:
        """Drop the unused spares and wait for every queued drop."""
        with self._lock:
            spares, self._spares = list(self._spares.values()), {}
        # Run at the process's exit, when the thread takes no new work: wait for it,
        # then drop the spares here.
        self._worker.shutdown(wait=True)
        for spare in spares:
            try:
                self._drop(spare.result())
            except psycopg.Error as exc:
                self._failed_drops.append(f"a spare: {exc}")
        for failure in self._failed_drops:
            print(f"tests: a throwaway database was not dropped: {failure}", file=sys.stderr)
