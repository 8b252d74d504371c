"""The control plane's database for tests that write its rows directly: migrated to
the newest schema, and a company funded on it to run use cases against."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from control_plane.db import create_sync_engine
from control_plane.grants import move
from control_plane.migrate import upgrade
from control_plane.tables import Company, User, new_id, utcnow

T = TypeVar("T")


@contextlib.contextmanager
def migrated_sessions(url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on `url` once migrated (objects stay readable after their commit);
    the engine is disposed of on exit."""
    upgrade(url)
    engine = create_sync_engine(url)
    try:
        yield sessionmaker(engine, expire_on_commit=False)
    finally:
        engine.dispose()


class FundedCompany:
    """A new company with one owner and `balance` micro-credits granted, and a way to
    run a use case in one transaction."""

    def __init__(self, sessions: sessionmaker[Session], balance: int) -> None:
        self.sessions = sessions
        self.company_id, self.user_id = new_id(), new_id()

        def setup(s: Session) -> None:
            s.add(Company(id=self.company_id, name=self.company_id, created_at=utcnow()))
            s.flush()
            s.add(
                User(
                    id=self.user_id,
                    company_id=self.company_id,
                    email=f"{self.user_id}@x.io",
                    role="owner",
                    created_at=utcnow(),
                )
            )
            s.flush()
            move(
                s,
                self.company_id,
                balance,
                kind="grant",
                reason=None,
                actor="admin-token",
                request_id=None,
            )

        self.tx(setup)

    def tx(self, fn: Callable[[Session], T]) -> T:
        with self.sessions.begin() as session:
            return fn(session)
