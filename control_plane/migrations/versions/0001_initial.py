"""Initial schema: companies, users, API keys, signing keys, reservations, usage,
the credits ledger, processed webhooks, chat sessions and messages.

Hand-written (no autogenerate at runtime) so it runs identically on SQLite and
PostgreSQL. Keep `control_plane/tables.py` in step.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.Column[str]:
    return sa.Column("id", sa.String(32), primary_key=True)


def _ref(name: str, target: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(32), sa.ForeignKey(target), nullable=False)


def _money(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")


def _time(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "companies",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        _money("balance_micro"),
        _money("held_micro"),
        sa.Column("default_model", sa.String(200), nullable=True),
        _time("created_at"),
        sa.UniqueConstraint("name", name="uq_companies_name"),
        sa.CheckConstraint("held_micro >= 0", name="ck_companies_held_nonnegative"),
        sa.CheckConstraint(
            "balance_micro >= held_micro", name="ck_companies_available_nonnegative"
        ),
    )
    op.create_table(
        "users",
        _id(),
        _ref("company_id", "companies.id"),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        _time("created_at"),
        sa.UniqueConstraint("email", name="uq_users_email"),
        sa.CheckConstraint("role IN ('member', 'owner', 'admin')", name="ck_users_role"),
    )
    op.create_index("ix_users_company_id", "users", ["company_id"])
    op.create_table(
        "api_keys",
        _id(),
        _ref("user_id", "users.id"),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        _time("created_at"),
        _time("revoked_at", nullable=True),
        _time("last_used_at", nullable=True),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("private_key_encrypted", sa.Text(), nullable=False),
        sa.Column("public_jwk", sa.Text(), nullable=False),
        _time("created_at"),
        _time("retired_at", nullable=True),
    )
    op.create_table(
        "reservations",
        _id(),
        _ref("company_id", "companies.id"),
        _ref("user_id", "users.id"),
        sa.Column("jti", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        _money("hold_micro"),
        sa.Column("input_estimate", sa.Integer(), nullable=False),
        sa.Column("max_tokens", sa.Integer(), nullable=False),
        sa.Column("price_input_per_mtok", sa.String(40), nullable=False),
        sa.Column("price_output_per_mtok", sa.String(40), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("charged_micro", sa.BigInteger(), nullable=True),
        _time("created_at"),
        _time("expires_at"),
        _time("settled_at", nullable=True),
        sa.UniqueConstraint("jti", name="uq_reservations_jti"),
        sa.CheckConstraint(
            "status IN ('active', 'settled', 'released')", name="ck_reservations_status"
        ),
    )
    op.create_index("ix_reservations_company_id", "reservations", ["company_id"])
    op.create_index("ix_reservations_status_expires_at", "reservations", ["status", "expires_at"])
    op.create_table(
        "usage_records",
        _id(),
        sa.Column("reservation_id", sa.String(32), nullable=False),
        sa.Column("jti", sa.String(64), nullable=False),
        _ref("company_id", "companies.id"),
        _ref("user_id", "users.id"),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("finish_reason", sa.String(64), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("usage_source", sa.String(16), nullable=False),
        _money("cost_micro"),
        _time("created_at"),
        sa.UniqueConstraint("reservation_id", name="uq_usage_records_reservation_id"),
    )
    op.create_index(
        "ix_usage_records_company_created", "usage_records", ["company_id", "created_at"]
    )
    op.create_index("ix_usage_records_user_created", "usage_records", ["user_id", "created_at"])
    op.create_table(
        "ledger_entries",
        _id(),
        _ref("company_id", "companies.id"),
        sa.Column("kind", sa.String(16), nullable=False),
        _money("amount_micro"),
        sa.Column("reservation_id", sa.String(32), nullable=True),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("actor", sa.String(100), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        _time("created_at"),
        # NULLs are distinct in a unique constraint on both backends, so entries
        # without a key never collide.
        sa.UniqueConstraint(
            "company_id", "idempotency_key", name="uq_ledger_entries_company_idempotency_key"
        ),
        sa.CheckConstraint(
            "kind IN ('grant', 'hold', 'release', 'charge', 'adjustment')",
            name="ck_ledger_entries_kind",
        ),
    )
    op.create_index(
        "ix_ledger_entries_company_created", "ledger_entries", ["company_id", "created_at"]
    )
    op.create_table(
        "webhook_events",
        sa.Column("webhook_id", sa.String(200), primary_key=True),
        sa.Column("reservation_id", sa.String(32), nullable=False),
        _time("received_at"),
    )
    op.create_table(
        "chat_sessions",
        _id(),
        _ref("company_id", "companies.id"),
        _ref("user_id", "users.id"),
        sa.Column("title", sa.String(200), nullable=False),
        _time("created_at"),
        _time("updated_at"),
    )
    op.create_index("ix_chat_sessions_user_updated", "chat_sessions", ["user_id", "updated_at"])
    op.create_table(
        "chat_messages",
        _id(),
        _ref("session_id", "chat_sessions.id"),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        _time("created_at"),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.UniqueConstraint("session_id", "seq", name="uq_chat_messages_session_seq"),
    )


def downgrade() -> None:
    for table in (
        "chat_messages",
        "chat_sessions",
        "webhook_events",
        "ledger_entries",
        "usage_records",
        "reservations",
        "signing_keys",
        "api_keys",
        "users",
        "companies",
    ):
        op.drop_table(table)
