"""`llm-gateway dev` publishes an owner whose password is in the README: it must never
be reachable by others, nor land in a deployment's database (review 6)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.db import Database
from control_plane.migrate import upgrade
from control_plane.seed import DEMO_EMAIL, seed_demo
from control_plane.tables import Company, User, new_id, utcnow
from llm_gateway.dev import check_local_host
from shared.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def run_dev(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`llm-gateway dev` in `tmp_path`, with none of this machine's LLMGW_ settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMGW_")}
    return subprocess.run(
        [sys.executable, "-m", "llm_gateway.cli", "dev", *args],
        cwd=tmp_path,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "gateway.example.internal"])
def test_dev_refuses_to_listen_where_others_can_sign_in_as_the_demo_owner(
    tmp_path: Path, host: str
) -> None:
    """Before: `dev --host 0.0.0.0` with OPENAI_API_KEY set served `demo@example.com`
    / `demo` (an owner with 1,000 credits, gpt-4o-mini on the platform's key) to the
    whole network; checked from this machine's public address."""
    done = run_dev(tmp_path, "--host", host, "--port-base", "1", OPENAI_API_KEY="sk-platform")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "loopback" in lines[0] and host in lines[0]
    assert not (tmp_path / "var").exists()  # refused before any secret or database file


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_dev_listens_on_loopback(host: str) -> None:
    check_local_host(host)


def _add_user(db: Database) -> None:
    def add(session: Session) -> None:
        company = Company(
            id=new_id(), name="acme", balance_micro=0, held_micro=0, created_at=utcnow()
        )
        session.add(company)
        session.flush()
        session.add(
            User(
                id=new_id(),
                company_id=company.id,
                email="ops@acme.example",
                password_hash=None,
                role="owner",
                created_at=utcnow(),
            )
        )

    asyncio.run(db.transaction(add))


def _demo_rows(db: Database) -> tuple[int, int]:
    def count(session: Session) -> tuple[int, int]:
        users = session.scalars(select(col(User.id)).where(col(User.email) == DEMO_EMAIL)).all()
        demo = select(col(Company.id)).where(col(Company.name) == "demo")
        companies = session.scalars(demo).all()
        return len(users), len(companies)

    return asyncio.run(db.transaction(count))


def test_dev_never_seeds_the_demo_owner_into_a_database_of_other_users(
    tmp_path: Path, migrated_pg_url: str
) -> None:
    """Before: `dev` run with production's LLMGW_DATABASE_URL (a shell that sourced
    deploy/.env) added `demo@example.com` / `demo`, an owner with 1,000 credits granted
    from nowhere, which every production control plane then signed in."""
    upgrade(migrated_pg_url)
    db = Database(migrated_pg_url, pool_size=1)
    try:
        _add_user(db)
        done = run_dev(tmp_path, "--port-base", "1", LLMGW_DATABASE_URL=migrated_pg_url)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert "holds other users" in lines[-1], done.stderr
        assert _demo_rows(db) == (0, 0)
        with pytest.raises(ConfigError):
            asyncio.run(seed_demo(migrated_pg_url, own_database_only=True))
        assert _demo_rows(db) == (0, 0)
    finally:
        db.close()


def test_dev_seeds_its_own_database_again_and_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/dev.db"
    upgrade(url)
    first = asyncio.run(seed_demo(url, own_database_only=True))
    second = asyncio.run(seed_demo(url, own_database_only=True))
    assert first.startswith("sk_") and second.startswith("sk_") and first != second
    db = Database(url, pool_size=1)
    try:
        # Users added to dev's own database later do not lock dev out of it.
        _add_user(db)
        assert asyncio.run(seed_demo(url, own_database_only=True)).startswith("sk_")
        assert _demo_rows(db) == (1, 1)
    finally:
        db.close()
