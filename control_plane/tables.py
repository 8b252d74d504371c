"""Table models (SQLModel). The schema itself is created by the hand-written
Alembic migrations in `migrations/versions/`; keep both in step.

Conventions: ids are uuid4 hex strings; money is BigInteger micro-credits; times
are timezone-aware UTC (`UTCDateTime` makes SQLite, which stores naive text, hand
back aware datetimes too).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import CursorResult, Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

ROLES = ("member", "owner", "admin")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def rowcount(result: object) -> int:
    """Rows matched by an UPDATE/DELETE (`Session.execute` is typed as a plain Result)."""
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with a Z, to the microsecond."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _id() -> Any:
    return Field(default_factory=new_id, sa_column=Column(String(32), primary_key=True))


def _fk(target: str) -> Any:
    return Field(sa_column=Column(String(32), ForeignKey(target), nullable=False))


def _str(length: int | None = None, *, nullable: bool = False) -> Any:
    kind = String(length) if length else Text()
    return Field(default=None if nullable else ..., sa_column=Column(kind, nullable=nullable))


def _money() -> Any:
    return Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))


def _counter() -> Any:
    return Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))


def _tokens() -> Any:
    return Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))


def _int(*, nullable: bool = False) -> Any:
    return Field(default=None if nullable else 0, sa_column=Column(Integer, nullable=nullable))


def _time(*, nullable: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    return Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class Company(SQLModel, table=True):
    __tablename__ = "companies"
    __table_args__ = (
        UniqueConstraint("name", name="uq_companies_name"),
        Index("uq_companies_external_id", "external_id", unique=True),
        CheckConstraint("held_micro >= 0", name="ck_companies_held_nonnegative"),
        CheckConstraint("balance_micro >= held_micro", name="ck_companies_available_nonnegative"),
    )
    id: str = _id()
    name: str = _str(200)
    balance_micro: int = _money()
    held_micro: int = _money()
    default_model: str | None = _str(200, nullable=True)
    created_at: datetime = _time()
    # Set for companies provisioned from a trusted external JWT (its `company_id`).
    external_id: str | None = _str(200, nullable=True)
    # A revoked company: none of its users can authenticate until it is reinstated.
    disabled_at: datetime | None = _time(nullable=True)


class User(SQLModel, table=True):
    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("email", name="uq_users_email"),
        Index("uq_users_external_id", "external_id", unique=True),
        Index("ix_users_company_id", "company_id"),
        CheckConstraint("role IN ('member', 'owner', 'admin')", name="ck_users_role"),
    )
    id: str = _id()
    company_id: str = _fk("companies.id")
    email: str = _str(320)
    password_hash: str | None = _str(nullable=True)
    role: str = _str(16)
    created_at: datetime = _time()
    external_id: str | None = _str(200, nullable=True)  # the external JWT's `sub`
    disabled_at: datetime | None = _time(nullable=True)  # a revoked user
    # The `iat` of the external JWT that last set `role` (migration 0014): an older
    # token's role is not taken (`external_auth.provision`).
    external_role_iat: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    # Access tokens carry the epoch they were issued in (migration 0019): moving it
    # on ends every sign-in of the user (`auth.access_token_principal`).
    sign_in_epoch: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        Index("ix_api_keys_user_id", "user_id"),
        # The keys revoked within a revocation's life, republished to the edges
        # (`revocation_republish`).
        Index(
            "ix_api_keys_revoked_at",
            "revoked_at",
            postgresql_where=text("revoked_at IS NOT NULL"),
            sqlite_where=text("revoked_at IS NOT NULL"),
        ),
    )
    id: str = _id()
    user_id: str = _fk("users.id")
    prefix: str = _str(16)
    key_hash: str = _str(64)
    scopes: str = _str()  # JSON array of scope strings
    created_at: datetime = _time()
    revoked_at: datetime | None = _time(nullable=True)
    last_used_at: datetime | None = _time(nullable=True)


class SigningKey(SQLModel, table=True):
    __tablename__ = "signing_keys"
    kid: str = Field(sa_column=Column(String(64), primary_key=True))
    private_key_encrypted: str = _str()
    public_jwk: str = _str()  # JSON object
    created_at: datetime = _time()
    retired_at: datetime | None = _time(nullable=True)


class Reservation(SQLModel, table=True):
    __tablename__ = "reservations"
    __table_args__ = (
        UniqueConstraint("jti", name="uq_reservations_jti"),
        Index("ix_reservations_company_id", "company_id"),
        Index("ix_reservations_status_expires_at", "status", "expires_at"),
        # The stream tokens revoked with no `revocations` row (a deleted session's, a
        # silent stream's) that the edges must still refuse (`stream_revocations`).
        Index(
            "ix_reservations_revoked_at",
            "revoked_at",
            postgresql_where=text("revoked_at IS NOT NULL"),
            sqlite_where=text("revoked_at IS NOT NULL"),
        ),
        CheckConstraint(
            "status IN ('active', 'settled', 'released')", name="ck_reservations_status"
        ),
    )
    id: str = _id()
    company_id: str = _fk("companies.id")
    user_id: str = _fk("users.id")
    jti: str = _str(64)
    session_id: str = _str(32)
    request_id: str = _str(128)
    model: str = _str(200)
    provider: str = _str(100)
    hold_micro: int = _money()
    input_estimate: int = _int()
    max_tokens: int = _int()
    # The prices at init, as exact decimal strings: settlement uses these, not
    # whatever the catalog says when the webhook arrives.
    price_input_per_mtok: str = _str(40)
    price_output_per_mtok: str = _str(40)
    # Cache read / write rates (DESIGN §11 "Prices"); NULL: the input price.
    price_cached_input_per_mtok: str | None = _str(40, nullable=True)
    price_cache_write_per_mtok: str | None = _str(40, nullable=True)
    status: str = _str(16)
    charged_micro: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    created_at: datetime = _time()
    expires_at: datetime = _time()
    settled_at: datetime | None = _time(nullable=True)
    api_key_id: str | None = _str(32, nullable=True)  # the key the stream was opened with
    # Its token revoked at the edges with no `revocations` row: its chat session was
    # deleted, or the sweeper settled it as silent (`stream_revocations`).
    revoked_at: datetime | None = _time(nullable=True)
    # The fallback chain signed into the token (issue 16.2): `[{"model", "provider",
    # "price_input_per_mtok", "price_output_per_mtok"}]`, after `model`. Settlement
    # bills a served model only if it is `model` or one of these, at its price here.
    fallbacks: list[dict[str, str]] | None = Field(
        default=None, sa_column=Column(JSON(), nullable=True)
    )


class UsageRecord(SQLModel, table=True):
    __tablename__ = "usage_records"
    __table_args__ = (
        UniqueConstraint("reservation_id", name="uq_usage_records_reservation_id"),
        Index("ix_usage_records_company_created", "company_id", "created_at"),
        Index("ix_usage_records_user_created", "user_id", "created_at"),
        Index("ix_usage_records_company_model_created", "company_id", "model", "created_at"),
    )
    id: str = _id()
    reservation_id: str = _str(32)
    jti: str = _str(64)
    company_id: str = _fk("companies.id")
    user_id: str = _fk("users.id")
    session_id: str = _str(32)
    model: str = _str(200)
    provider: str = _str(100)
    status: str = _str(16)
    finish_reason: str | None = _str(64, nullable=True)
    input_tokens: int = _int()
    output_tokens: int = _int()
    # Parts of input_tokens read from / written to the vendor's cache, and the part
    # of output_tokens spent reasoning (DESIGN §11 "Prices"; 0 when unknown).
    cached_input_tokens: int = _tokens()
    cache_write_tokens: int = _tokens()
    reasoning_tokens: int = _tokens()
    usage_source: str = _str(16)
    cost_micro: int = _money()
    created_at: datetime = _time()
    api_key_id: str | None = _str(32, nullable=True)  # migration 0008
    ttft_ms: int | None = _int(nullable=True)  # first_token_at - started_at, migration 0008


class LedgerEntry(SQLModel, table=True):
    """Append-only. Every change to a company's balance or held amount writes one.

    A reservation has at most one row of each kind (one hold, one charge, one
    release): the unique index is the database's own guard against settling twice.
    Entries without a reservation have a NULL there, and NULLs never collide.

    `user_id` is the reservation's user, copied onto its rows (NULL exactly when
    `reservation_id` is, a CHECK): a member's ledger (its own streams' rows and the
    company's own) is then two ranges of one index, not a pick through the whole
    company's ledger (`billing.credits_page`, migration 0013)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        # Partial: only admin grants and adjustments carry a key, and the stream rows
        # (all but a few) then cost this index nothing (migration 0013).
        Index(
            "uq_ledger_entries_company_idempotency_key",
            "company_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
            sqlite_where=text("idempotency_key IS NOT NULL"),
        ),
        Index("ix_ledger_entries_company_created", "company_id", "created_at"),
        Index("uq_ledger_entries_reservation_kind", "reservation_id", "kind", unique=True),
        Index("ix_ledger_entries_company_user_created", "company_id", "user_id", "created_at"),
        CheckConstraint(
            "kind IN ('grant', 'hold', 'release', 'charge', 'adjustment')",
            name="ck_ledger_entries_kind",
        ),
        CheckConstraint(
            "(user_id IS NULL) = (reservation_id IS NULL)", name="ck_ledger_entries_user"
        ),
    )
    id: str = _id()
    company_id: str = _fk("companies.id")
    kind: str = _str(16)
    amount_micro: int = _money()
    reservation_id: str | None = _str(32, nullable=True)
    user_id: str | None = _str(32, nullable=True)  # the reservation's user, migration 0013
    reason: str | None = _str(500, nullable=True)
    actor: str | None = _str(100, nullable=True)
    request_id: str | None = _str(128, nullable=True)
    idempotency_key: str | None = _str(200, nullable=True)
    created_at: datetime = _time()


class AuditEvent(SQLModel, table=True):
    """Who moved money and why: one row per ledger entry, written in the same
    transaction. The ledger stays the source of truth for amounts; this records the
    actor (a user id, ``admin-token``, ``edge-webhook``, ``sweeper``), the request
    and the context (`details`)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_company_created", "company_id", "created_at"),
        Index("ix_audit_events_created", "created_at"),
    )
    id: str = _id()
    actor: str = _str(100)
    action: str = _str(32)
    company_id: str | None = Field(
        default=None, sa_column=Column(String(32), ForeignKey("companies.id"), nullable=True)
    )
    amount_micro: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    reservation_id: str | None = _str(32, nullable=True)
    request_id: str | None = _str(128, nullable=True)
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    created_at: datetime = _time()
    # What an admin action acted on, e.g. ``api_key:<id>`` (migration 0008).
    target: str | None = _str(200, nullable=True)


class WebhookEvent(SQLModel, table=True):
    __tablename__ = "webhook_events"
    webhook_id: str = Field(sa_column=Column(String(200), primary_key=True))
    reservation_id: str = _str(32)
    received_at: datetime = _time()


class ChatSession(SQLModel, table=True):
    __tablename__ = "chat_sessions"
    __table_args__ = (
        Index("ix_chat_sessions_user_updated", "user_id", "updated_at"),
        # An owner's listing (company-wide, newest first); migration 0004.
        Index("ix_chat_sessions_company_updated", "company_id", "updated_at", "id"),
    )
    id: str = _id()
    company_id: str = _fk("companies.id")
    user_id: str = _fk("users.id")
    title: str = _str(200)
    created_at: datetime = _time()
    updated_at: datetime = _time()
    # What the session holds, kept by `chat_sessions.append_messages` (its caps).
    message_count: int = _counter()
    content_bytes: int = _counter()


class ChatMessage(SQLModel, table=True):
    __tablename__ = "chat_messages"
    __table_args__ = (UniqueConstraint("session_id", "seq", name="uq_chat_messages_session_seq"),)
    id: str = _id()
    session_id: str = _fk("chat_sessions.id")
    role: str = _str(16)
    content: str = _str()
    created_at: datetime = _time()
    seq: int = _int()
    # An assistant's tool calls (OpenAI's shape) and a tool result's call id (0005g).
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, sa_column=Column(JSON(), nullable=True)
    )
    tool_call_id: str | None = _str(256, nullable=True)


class CompanyProvider(SQLModel, table=True):
    """A company's own key for one provider, Fernet-encrypted (``LLMGW_ENCRYPTION_KEY``)."""

    __tablename__ = "company_providers"
    __table_args__ = (
        UniqueConstraint("company_id", "provider", name="uq_company_providers_company_provider"),
    )
    id: str = _id()
    company_id: str = _fk("companies.id")
    provider: str = _str(100)
    api_key_encrypted: str | None = _str(nullable=True)
    # The pool's other keys (issue 16.1): a Fernet-encrypted JSON array, after
    # `api_key_encrypted` (the first key, which older code reads alone).
    extra_keys_encrypted: str | None = _str(nullable=True)
    created_at: datetime = _time()
    updated_at: datetime = _time()


class CompanyModel(SQLModel, table=True):
    """A company's added or overridden model: a partial spec (JSON) merged over the
    packaged catalog's entry of the same id, if any."""

    __tablename__ = "company_models"
    __table_args__ = (
        UniqueConstraint("company_id", "model_id", name="uq_company_models_company_model"),
    )
    id: str = _id()
    company_id: str = _fk("companies.id")
    model_id: str = _str(200)
    provider: str = _str(100)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    updated_at: datetime = _time()


class Revocation(SQLModel, table=True):
    """An admin's revocation of a user, a company or one token (`jti`), or a user's
    sign-out of its own access token (`logout`), for audit and listing; the edge
    reads the copy in the store (`shared.revocations`)."""

    __tablename__ = "revocations"
    __table_args__ = (
        Index("ix_revocations_company_created", "company_id", "created_at"),
        # Every access-token request asks whether its jti was signed out (`auth`).
        Index("ix_revocations_kind_value", "kind", "value"),
        # The sweeper deletes expired sign-outs (`logout.purge_expired`).
        Index("ix_revocations_reason_expires", "reason", "expires_at"),
        # The revocations in force made within a revocation's life, republished to
        # the edges (`revocation_republish`).
        Index(
            "ix_revocations_in_force_created",
            "created_at",
            postgresql_where=text("lifted_at IS NULL"),
            sqlite_where=text("lifted_at IS NULL"),
        ),
        CheckConstraint("kind IN ('user', 'company', 'jti')", name="ck_revocations_kind"),
    )
    id: str = _id()
    kind: str = _str(16)
    value: str = _str(200)
    company_id: str | None = _str(32, nullable=True)
    reason: str | None = _str(500, nullable=True)
    actor: str = _str(100)
    # The role `actor` acted with (migration 0020; None before): a lift needs a rank
    # at least this one, whatever the actor's role later (`revoking.lift_revocation`).
    actor_role: str | None = _str(16, nullable=True)
    created_at: datetime = _time()
    expires_at: datetime = _time()  # when the store's copy lapses (the edge stops checking)
    lifted_at: datetime | None = _time(nullable=True)


class Agent(SQLModel, table=True):
    """A company's agent (issue 15.4): a model (None: the company's default), a system
    prompt and tools that init applies and the client cannot change, its own
    `max_tokens` cap and the features it needs. Names are slugs, unique per company."""

    __tablename__ = "agents"
    __table_args__ = (UniqueConstraint("company_id", "name", name="uq_agents_company_name"),)
    id: str = _id()
    company_id: str = _fk("companies.id")
    name: str = _str(64)
    model: str | None = _str(200, nullable=True)
    system_prompt: str | None = _str(nullable=True)
    tools: list[dict[str, Any]] | None = Field(
        default=None, sa_column=Column(JSON(), nullable=True)
    )
    max_tokens: int | None = _int(nullable=True)
    features: list[str] = Field(default_factory=list, sa_column=Column(JSON(), nullable=False))
    created_at: datetime = _time()
    updated_at: datetime = _time()


class Team(SQLModel, table=True):
    """A named group of a company's users: the target of ``team`` budgets."""

    __tablename__ = "teams"
    __table_args__ = (UniqueConstraint("company_id", "name", name="uq_teams_company_name"),)
    id: str = _id()
    company_id: str = _fk("companies.id")
    name: str = _str(200)
    created_at: datetime = _time()


class TeamMember(SQLModel, table=True):
    __tablename__ = "team_members"
    __table_args__ = (Index("ix_team_members_user_id", "user_id"),)
    team_id: str = Field(
        sa_column=Column(String(32), ForeignKey("teams.id"), primary_key=True, nullable=False)
    )
    user_id: str = Field(
        sa_column=Column(String(32), ForeignKey("users.id"), primary_key=True, nullable=False)
    )


class Budget(SQLModel, table=True):
    """A spend limit on one user, API key or team of a company, per period
    (`budget_math`). What was held and spent lives in `BudgetPeriod` rows."""

    __tablename__ = "budgets"
    __table_args__ = (
        Index("ix_budgets_company_id", "company_id"),
        Index("ix_budgets_scope_target", "scope", "target_id"),
        CheckConstraint("scope IN ('user', 'api_key', 'team')", name="ck_budgets_scope"),
        CheckConstraint("period IN ('day', 'week', 'month', 'none')", name="ck_budgets_period"),
        CheckConstraint("amount_micro >= 0", name="ck_budgets_amount_nonnegative"),
    )
    id: str = _id()
    company_id: str = _fk("companies.id")
    scope: str = _str(16)
    target_id: str = _str(64)
    amount_micro: int = _money()
    period: str = _str(16)
    created_at: datetime = _time()
    updated_at: datetime = _time()


class BudgetPeriod(SQLModel, table=True):
    """One budget's counters for one period (its UTC start): created by the period's
    first hold, so a new period starts at zero with no job resetting anything;
    deleted by the sweeper once the period has long ended (`budgets.prune_periods`)."""

    __tablename__ = "budget_periods"
    __table_args__ = (
        CheckConstraint("held_micro >= 0", name="ck_budget_periods_held_nonnegative"),
        Index("ix_budget_periods_start", "period_start"),  # retention (migration 0016)
    )
    budget_id: str = Field(
        sa_column=Column(String(32), ForeignKey("budgets.id"), primary_key=True, nullable=False)
    )
    period_start: datetime = Field(sa_column=Column(UTCDateTime(), primary_key=True))
    spent_micro: int = _money()
    held_micro: int = _money()


class ReservationBudget(SQLModel, table=True):
    """Which budget periods one reservation's hold was counted against: settlement
    and release move exactly those, whatever happened to the budgets since."""

    __tablename__ = "reservation_budgets"
    reservation_id: str = Field(sa_column=Column(String(32), primary_key=True))
    budget_id: str = Field(sa_column=Column(String(32), primary_key=True))
    period_start: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    hold_micro: int = _money()


class CompanyWebhook(SQLModel, table=True):
    """Where a company receives its own events (``budget.threshold``), and the
    Fernet-encrypted Standard Webhooks secret they are signed with."""

    __tablename__ = "company_webhooks"
    company_id: str = Field(
        sa_column=Column(String(32), ForeignKey("companies.id"), primary_key=True, nullable=False)
    )
    url: str = _str()
    secret_encrypted: str = _str()
    created_at: datetime = _time()
    updated_at: datetime = _time()


class BudgetEvent(SQLModel, table=True):
    """The outbox of ``budget.threshold`` webhooks: written in the settlement's
    transaction, delivered at least once by `budget_webhooks`. The unique key makes
    it one event per budget x period x threshold, among those an edit of the budget
    has not superseded (`budgets.rearm`, migration 0015)."""

    __tablename__ = "budget_events"
    __table_args__ = (
        Index(
            "uq_budget_events_budget_period_percent",
            "budget_id",
            "period_start",
            "percent",
            unique=True,
            postgresql_where=text("superseded_at IS NULL"),
            sqlite_where=text("superseded_at IS NULL"),
        ),
        Index("ix_budget_events_due", "delivered_at", "next_attempt_at"),
        Index("ix_budget_events_created", "created_at"),
        Index(  # a company's events backing off (`company_webhooks.expedite`, 0017)
            "ix_budget_events_backing_off",
            "company_id",
            "created_at",
            postgresql_where=text("backoff_until IS NOT NULL"),
            sqlite_where=text("backoff_until IS NOT NULL"),
        ),
    )
    id: str = _id()
    company_id: str = _fk("companies.id")
    budget_id: str = _str(32)
    period_start: datetime = _time()
    percent: int = _int()
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON(), nullable=False))
    attempts: int = _int()
    created_at: datetime = _time()
    next_attempt_at: datetime = _time()
    delivered_at: datetime | None = _time(nullable=True)
    superseded_at: datetime | None = _time(nullable=True)
    # Set with `next_attempt_at` by a failed attempt: backing off while the two are
    # equal, as against leased by a pass (`company_webhooks.expedite`).
    backoff_until: datetime | None = _time(nullable=True)
