"""Budgets, teams and company webhooks (issue 16.3).

* ``teams`` / ``team_members``: named groups of a company's users.
* ``budgets``: a spend limit on a user, an API key or a team, per period.
* ``budget_periods``: one budget's ``spent``/``held`` for one period (its UTC
  start), created by the period's first hold, so a new period needs no reset job.
* ``reservation_budgets``: which budget periods a hold counted against.
* ``company_webhooks``: the company's event URL and its encrypted signing secret.
* ``budget_events``: the outbox of ``budget.threshold`` webhooks, one per budget x
  period x threshold (unique key).

Keep `control_plane/tables.py` in step.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _time(name: str, *, nullable: bool = False, primary_key: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, primary_key=primary_key)


def _money(name: str) -> sa.Column[Any]:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")


def _company() -> sa.Column[Any]:
    return sa.Column("company_id", sa.String(32), sa.ForeignKey("companies.id"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.String(32), primary_key=True),
        _company(),
        sa.Column("name", sa.String(200), nullable=False),
        _time("created_at"),
        sa.UniqueConstraint("company_id", "name", name="uq_teams_company_name"),
    )
    op.create_table(
        "team_members",
        sa.Column("team_id", sa.String(32), sa.ForeignKey("teams.id"), primary_key=True),
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id"), primary_key=True),
    )
    op.create_index("ix_team_members_user_id", "team_members", ["user_id"])
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(32), primary_key=True),
        _company(),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("target_id", sa.String(64), nullable=False),
        _money("amount_micro"),
        sa.Column("period", sa.String(16), nullable=False),
        _time("created_at"),
        _time("updated_at"),
        sa.CheckConstraint("scope IN ('user', 'api_key', 'team')", name="ck_budgets_scope"),
        sa.CheckConstraint("period IN ('day', 'week', 'month', 'none')", name="ck_budgets_period"),
        sa.CheckConstraint("amount_micro >= 0", name="ck_budgets_amount_nonnegative"),
    )
    op.create_index("ix_budgets_company_id", "budgets", ["company_id"])
    op.create_index("ix_budgets_scope_target", "budgets", ["scope", "target_id"])
    op.create_table(
        "budget_periods",
        sa.Column("budget_id", sa.String(32), sa.ForeignKey("budgets.id"), primary_key=True),
        _time("period_start", primary_key=True),
        _money("spent_micro"),
        _money("held_micro"),
        sa.CheckConstraint("held_micro >= 0", name="ck_budget_periods_held_nonnegative"),
    )
    op.create_table(
        "reservation_budgets",
        sa.Column("reservation_id", sa.String(32), primary_key=True),
        sa.Column("budget_id", sa.String(32), primary_key=True),
        _time("period_start"),
        _money("hold_micro"),
    )
    op.create_table(
        "company_webhooks",
        sa.Column("company_id", sa.String(32), sa.ForeignKey("companies.id"), primary_key=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=False),
        _time("created_at"),
        _time("updated_at"),
    )
    op.create_table(
        "budget_events",
        sa.Column("id", sa.String(32), primary_key=True),
        _company(),
        sa.Column("budget_id", sa.String(32), nullable=False),
        _time("period_start"),
        sa.Column("percent", sa.Integer(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _time("created_at"),
        _time("next_attempt_at"),
        _time("delivered_at", nullable=True),
        sa.UniqueConstraint(
            "budget_id", "period_start", "percent", name="uq_budget_events_budget_period_percent"
        ),
    )
    op.create_index("ix_budget_events_due", "budget_events", ["delivered_at", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_budget_events_due", table_name="budget_events")
    op.drop_table("budget_events")
    op.drop_table("company_webhooks")
    op.drop_table("reservation_budgets")
    op.drop_table("budget_periods")
    op.drop_index("ix_budgets_scope_target", table_name="budgets")
    op.drop_index("ix_budgets_company_id", table_name="budgets")
    op.drop_table("budgets")
    op.drop_index("ix_team_members_user_id", table_name="team_members")
    op.drop_table("team_members")
    op.drop_table("teams")
