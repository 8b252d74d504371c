"""Demo data for ``llm-gateway dev``: company ``demo`` with 1,000 credits and its
owner ``demo@example.com`` / ``demo``."""

from __future__ import annotations

import asyncio

import orjson
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.audit import SEED_ACTOR
from control_plane.credentials import hash_password, new_api_key
from control_plane.db import Database
from control_plane.grants import move
from control_plane.policy import scopes_for_role
from control_plane.settings import ControlPlaneSettings
from control_plane.tables import ApiKey, Company, User, new_id, utcnow
from shared.pricing import MICRO
from shared.settings import ConfigError

DEMO_COMPANY = "demo"
DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo"
DEMO_ROLE = "owner"
DEMO_CREDITS_MICRO = 1_000 * MICRO


FOREIGN_DATABASE = (
    "llm-gateway dev would add the owner demo@example.com with the published password "
    "'demo' (and 1,000 credits) to a database that holds other users: point "
    "LLMGW_DATABASE_URL at a database of its own, or unset it"
)


def _holds_other_users(session: Session) -> bool:
    """No demo owner yet, but other users: a deployment's database, not dev's."""
    if session.scalars(select(col(User.id)).where(col(User.email) == DEMO_EMAIL)).first():
        return False
    return session.scalars(select(col(User.id)).limit(1)).first() is not None


def _seed(session: Session, password_hash: str, own_database_only: bool = False) -> str:
    if own_database_only and _holds_other_users(session):
        raise ConfigError(FOREIGN_DATABASE)
    company = session.scalars(select(Company).where(col(Company.name) == DEMO_COMPANY)).first()
    if company is None:
        company = Company(
            id=new_id(), name=DEMO_COMPANY, balance_micro=0, held_micro=0, created_at=utcnow()
        )
        session.add(company)
        session.flush()
        move(
            session,
            company.id,
            DEMO_CREDITS_MICRO,
            kind="grant",
            reason="demo credits",
            actor=SEED_ACTOR,
            request_id=None,
            idempotency_key="seed-demo",
        )
    user = session.scalars(select(User).where(col(User.email) == DEMO_EMAIL)).first()
    if user is None:
        user = User(
            id=new_id(),
            company_id=company.id,
            email=DEMO_EMAIL,
            password_hash=password_hash,
            role=DEMO_ROLE,
            created_at=utcnow(),
        )
        session.add(user)
        session.flush()
    key = new_api_key()
    session.add(
        ApiKey(
            id=new_id(),
            user_id=user.id,
            prefix=key.prefix,
            key_hash=key.key_hash,
            scopes=orjson.dumps(list(scopes_for_role(user.role))).decode(),
            created_at=utcnow(),
        )
    )
    return key.key


async def seed_demo_with(db: Database, *, own_database_only: bool = False) -> str:
    """`seed_demo` on an open `Database` (e.g. ``app.state.db``)."""
    password_hash = await asyncio.to_thread(hash_password, DEMO_PASSWORD)
    try:
        return await db.transaction(lambda s: _seed(s, password_hash, own_database_only))
    except IntegrityError:  # a concurrent seed created the company or user: use theirs
        return await db.transaction(lambda s: _seed(s, password_hash, own_database_only))


async def seed_demo(target: str | ControlPlaneSettings, *, own_database_only: bool = False) -> str:
    """Idempotently create the demo company (1,000 credits, granted once through the
    ledger) and its owner, then mint a NEW API key for that owner and return it
    (the plain ``sk_…``; only its hash is stored).

    `target` is the database URL or the `ControlPlaneSettings` (whose ``database_url`` is used).
    Run it after the migrations (`control_plane.migrate.upgrade(database_url)`, or
    once an app with ``LLMGW_AUTO_MIGRATE=1`` has started). It opens and closes its
    own small connection pool; with a running app, `seed_demo_with(app.state.db)`
    reuses the app's.

    `own_database_only` (``llm-gateway dev``): refuse (ConfigError) a database that
    holds users but no demo owner yet. An operator who ran ``dev`` with production's
    environment would otherwise publish an owner whose password is in the README,
    with 1,000 credits granted from nowhere, to every control plane on that database.
    """
    database_url = target.database_url if isinstance(target, ControlPlaneSettings) else target
    db = Database(database_url, pool_size=1)
    try:
        return await seed_demo_with(db, own_database_only=own_database_only)
    finally:
        await asyncio.to_thread(db.close)
