"""A write that commits while its connection dies before the answer (a lost
acknowledgement: a network cut, a proxy or PostgreSQL's backend killed right after
the commit): its caller hears a cut connection though the write is in."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from sqlalchemy.exc import DBAPIError

from control_plane import db as db_module


def _marking(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, cut: list[str]) -> set[int]:
    """The threads that call `module.name` while nothing is `cut` yet: the lost answer
    is armed on those only (patched here)."""
    real = getattr(module, name)
    marked: set[int] = set()

    def mark(*args: Any, **kwargs: Any) -> Any:
        if not cut:
            marked.add(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, mark)
    return marked


def lose_the_answer_of(
    monkeypatch: pytest.MonkeyPatch,
    module: Any,
    name: str,
    cut: list[str],
    *,
    commits: bool = True,
) -> None:
    """The unit running `module.name` commits (or, not `commits`, rolls back), then
    its caller hears what a cut connection says (once): armed on that unit's thread
    only."""
    real_end = db_module._PooledUnit.end
    marked = _marking(monkeypatch, module, name, cut)

    def end_then_connection_lost(unit: Any, commit: bool) -> None:
        armed = commit and threading.get_ident() in marked
        real_end(unit, commit and (commits or not armed))
        if armed:
            marked.discard(threading.get_ident())
            cut.append("after the commit" if commits else "before the commit")
            lost = psycopg.OperationalError("server closed the connection unexpectedly")
            raise DBAPIError.instance("COMMIT", None, lost, psycopg.Error) from lost

    monkeypatch.setattr(db_module._PooledUnit, "end", end_then_connection_lost)


def lose_the_transaction_answer_of(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, cut: list[str]
) -> None:
    """`lose_the_answer_of` for a `Database.transaction` (a session's COMMIT)."""
    real_in = db_module.Database._in_transaction
    marked = _marking(monkeypatch, module, name, cut)

    def commit_then_connection_lost(db: Any, fn: Any) -> Any:
        result = real_in(db, fn)
        if threading.get_ident() in marked:
            marked.discard(threading.get_ident())
            cut.append("after the commit")
            lost = psycopg.OperationalError("server closed the connection unexpectedly")
            raise DBAPIError.instance("COMMIT", None, lost, psycopg.Error) from lost
        return result

    monkeypatch.setattr(db_module.Database, "_in_transaction", commit_then_connection_lost)
