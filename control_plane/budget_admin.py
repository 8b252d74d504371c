"""Budgets, teams and the company's webhook as its admins manage them (issue 16.3,
DESIGN §11).

Use cases, each run in one transaction by `routes.admin_budgets`: they check who
asks (`policy.can_manage_budgets`), that every target (user, API key, team member)
belongs to the company and ranks at or below the caller, change the rows, and
record an ``admin.*`` audit event.

Who may: the platform admin, or an owner of the company with the ``llm:admin``
scope. A member of the company gets 403; anybody else 404 (a company one cannot
manage does not exist for them). A target in another company is 422: an owner
never budgets, or adds to a team, another company's users or keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.fernet import MultiFernet
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import accounts, audit, budgets, company_locks, company_webhooks, policy
from control_plane.budget_math import BudgetInput
from control_plane.errors import Conflict, Forbidden, NotFound, ValidationFailed
from control_plane.pagination import KeyPageRequest, read_key_page
from control_plane.policy import Principal
from control_plane.tables import (
    ApiKey,
    Budget,
    Company,
    CompanyWebhook,
    Team,
    TeamMember,
    User,
    iso,
    new_id,
)
from control_plane.validation import NUL

TEAM_NAME_MAX = 200
TEAM_USERS_MAX = 1000
BUDGETS_PER_COMPANY_MAX = 10_000
# What one request can be counted against is bounded (review 5): init holds on, and
# settlement moves, every budget that caps its user, key and teams, a few statements
# each under the company's row lock and on one of the database threads. With no
# bound an owner put 10,000 budgets on one member and each of its inits and
# settlements took ~25 s: ten of them held every database thread of the control
# plane, for every tenant. One budget per target and period, and at most
# `TEAMS_PER_USER_MAX` teams per user: at most 4 + 4 + 4 x 10 budgets per request.
TEAMS_PER_USER_MAX = 10
TEAMS_PER_COMPANY_MAX = 1_000


def company_for(session: Session, p: Principal, company_id: str, *, lock: bool = False) -> Company:
    """The company `p` manages budgets of; 403 for its own members, 404 otherwise.

    `lock`: a change takes the company row first, the lock order of init and
    settlement (`budgets`); deleting a budget's counters while an init inserts them
    would otherwise deadlock on PostgreSQL (the period row's foreign key)."""
    if not policy.can_manage_budgets(p, company_id):
        if p.company_id == company_id:
            raise Forbidden("Only an owner of this company (scope llm:admin) manages budgets.")
        raise NotFound("No such company.")
    company = session.get(Company, company_id, with_for_update=lock)
    if company is None:
        raise NotFound("No such company.")
    return company


def _audit(session: Session, p: Principal, action: str, company_id: str, **details: Any) -> None:
    audit.record(
        session,
        actor=accounts.actor_of(p),
        action=f"admin.{action}",
        company_id=company_id,
        details=details,
    )


def _company_user(
    session: Session, p: Principal, company_id: str, user_id: str, field: str
) -> User:
    user = session.get(User, user_id)
    if user is None or user.company_id != company_id:
        raise ValidationFailed(field, "no such user in this company")
    if not policy.ranks_at_least(p, user.role):
        raise Forbidden("Nobody manages the budget of a user ranked above itself.")
    return user


def check_target(session: Session, p: Principal, company_id: str, scope: str, target: str) -> None:
    """The budget's target exists in this company and `p` may manage it."""
    if scope == "user":
        _company_user(session, p, company_id, target, "target_id")
    elif scope == "api_key":
        key = session.get(ApiKey, target)
        if key is None:
            raise ValidationFailed("target_id", "no such API key in this company")
        owner = session.get(User, key.user_id)
        if owner is None or owner.company_id != company_id:
            raise ValidationFailed("target_id", "no such API key in this company")
        _company_user(session, p, company_id, owner.id, "target_id")
    else:
        team = session.get(Team, target)
        if team is None or team.company_id != company_id:
            raise ValidationFailed("target_id", "no such team in this company")


def _one_per_period(
    session: Session, company_id: str, budget: BudgetInput, budget_id: str | None = None
) -> None:
    """409 when the target already has a budget for this period: a second one adds
    nothing a lower amount would not, only work to every request it caps."""
    other = session.scalar(
        select(col(Budget.id)).where(
            col(Budget.company_id) == company_id,
            col(Budget.scope) == budget.scope,
            col(Budget.target_id) == budget.target_id,
            col(Budget.period) == budget.period,
        )
    )
    if other is not None and other != budget_id:
        raise Conflict(
            f"This {budget.scope} already has a budget for the period {budget.period!r} "
            f"({other}); change its amount instead."
        )


# --- teams -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TeamInput:
    name: str | None = None
    user_ids: list[str] | None = None


def parse_team(doc: dict[str, Any], *, partial: bool) -> TeamInput:
    unknown = sorted(set(doc) - {"name", "user_ids"})
    if unknown:
        raise ValidationFailed(unknown[0], "is not a field (name, user_ids)")
    name = doc.get("name")
    if name is not None or not partial:
        if not isinstance(name, str) or not 0 < len(name.strip()) <= TEAM_NAME_MAX:
            raise ValidationFailed("name", f"must be a name of 1-{TEAM_NAME_MAX} characters")
        if NUL in name:
            raise ValidationFailed("name", "must not contain NUL")
        name = name.strip()
    raw = doc.get("user_ids", None if partial else [])
    user_ids: list[str] | None = None
    if raw is not None:
        if not isinstance(raw, list) or len(raw) > TEAM_USERS_MAX:
            raise ValidationFailed("user_ids", f"must be a list of at most {TEAM_USERS_MAX} ids")
        if not all(isinstance(u, str) and 0 < len(u) <= 64 and NUL not in u for u in raw):
            raise ValidationFailed("user_ids", "must hold user ids (strings)")
        user_ids = sorted(set(raw))
    if partial and name is None and user_ids is None:
        raise ValidationFailed("name", "send name and/or user_ids")
    return TeamInput(name, user_ids)


def _members(session: Session, team_id: str) -> list[str]:
    stmt = select(col(TeamMember.user_id)).where(col(TeamMember.team_id) == team_id)
    return sorted(session.scalars(stmt))


def team_public(session: Session, team: Team, members: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": team.id,
        "company_id": team.company_id,
        "name": team.name,
        "user_ids": _members(session, team.id) if members is None else members,
        "created_at": iso(team.created_at),
    }


def _name_free(session: Session, company_id: str, name: str, team_id: str | None) -> None:
    stmt = select(col(Team.id)).where(col(Team.company_id) == company_id, col(Team.name) == name)
    other = session.scalar(stmt)
    if other is not None and other != team_id:
        raise Conflict(f"A team named {name!r} already exists in this company.")


def _set_members(
    session: Session, p: Principal, company_id: str, team_id: str, user_ids: list[str]
) -> None:
    """The team's members become `user_ids` (sorted, distinct), in a handful of
    statements whatever their number: one read of the current members, one of the
    users (locked), one count, one DELETE, one INSERT. The caller holds the team's
    row, so the current members cannot change meanwhile.

    The users' rows are locked (``FOR NO KEY UPDATE``, in id order: two edits over
    the same users cannot deadlock), which serialises what the company's row lock
    did before and no more: a user's team count (two edits adding the same user to
    two teams cannot both pass `TEAMS_PER_USER_MAX`) and its role (a change of role
    updates the row, so the rank is read as it is). That lock conflicts with no init
    nor settlement (their foreign keys take ``FOR KEY SHARE``); one per member read
    before, a team of 1,000 swapped held the company's row ~1 s (review rowlock)."""
    current = set(_members(session, team_id))
    wanted = set(user_ids)
    roles = _locked_roles(session, company_id, sorted(wanted | current))
    for index, user_id in enumerate(user_ids):
        role = roles.get(user_id)
        if role is None:
            raise ValidationFailed(f"user_ids[{index}]", "no such user in this company")
        if not policy.ranks_at_least(p, role):
            raise Forbidden("Nobody manages the budget of a user ranked above itself.")
    removed = sorted(current - wanted)
    # Nobody removes from a team a user ranked above itself either (a member gone
    # from the company has no role left to rank).
    if any(not policy.ranks_at_least(p, roles[u]) for u in removed if u in roles):
        raise Forbidden("Nobody manages the team of a user ranked above itself.")
    added = sorted(wanted - current)
    _check_team_counts(session, added, user_ids)
    if removed:
        session.execute(
            delete(TeamMember)
            .where(col(TeamMember.team_id) == team_id)
            .where(col(TeamMember.user_id).in_(removed))
        )
    if added:
        session.execute(insert(TeamMember), [{"team_id": team_id, "user_id": u} for u in added])


def _locked_roles(session: Session, company_id: str, user_ids: list[str]) -> dict[str, str]:
    """The role of each of `user_ids` that is in this company, its row locked for the
    transaction (another company's users are neither found nor locked)."""
    if not user_ids:
        return {}
    rows = session.execute(
        select(col(User.id), col(User.role))
        .where(col(User.id).in_(user_ids))
        .where(col(User.company_id) == company_id)
        .order_by(col(User.id))
        .with_for_update(key_share=True)
    )
    return {str(user_id): str(role) for user_id, role in rows}


def _check_team_counts(session: Session, added: list[str], user_ids: list[str]) -> None:
    """422 naming the first user `added` to a team who is in `TEAMS_PER_USER_MAX`
    teams already (`_set_members` holds the users' rows: the counts cannot race)."""
    if not added:
        return
    counts = dict(
        session.execute(
            select(col(TeamMember.user_id), func.count())
            .where(col(TeamMember.user_id).in_(added))
            .group_by(col(TeamMember.user_id))
        ).all()
    )
    for user_id in added:
        if counts.get(user_id, 0) >= TEAMS_PER_USER_MAX:
            raise ValidationFailed(
                f"user_ids[{user_ids.index(user_id)}]",
                f"is in {TEAMS_PER_USER_MAX} teams already, the most a user may be in",
            )


def create_team(
    session: Session, p: Principal, company_id: str, body: TeamInput, now: datetime
) -> dict[str, Any]:
    """Team creations queue on the company's configuration lock (they count its
    teams), not on its row (`company_locks`); the members as `_set_members`."""
    company = company_for(session, p, company_id)
    company_locks.hold_configuration(session, company.id)
    assert body.name is not None
    teams = session.scalar(
        select(func.count()).select_from(Team).where(col(Team.company_id) == company.id)
    )
    if (teams or 0) >= TEAMS_PER_COMPANY_MAX:
        raise Conflict(f"A company keeps at most {TEAMS_PER_COMPANY_MAX} teams.")
    _name_free(session, company.id, body.name, None)
    team = Team(id=new_id(), company_id=company.id, name=body.name, created_at=now)
    session.add(team)
    _audit(session, p, "team.create", company.id, team_id=team.id, name=team.name)
    session.flush()  # the company's key share (foreign keys) before its users' rows
    members = body.user_ids or []
    _set_members(session, p, company.id, team.id, members)
    return team_public(session, team, members)


def _team(session: Session, company_id: str, team_id: str, *, deleting: bool = False) -> Team:
    """The team, its row locked for the transaction: its edits and its deletion
    queue on it (each then reads the members the one before it left, or 404). An
    edit's lock (``FOR NO KEY UPDATE``) lets its own members' foreign keys in."""
    team = session.scalars(
        select(Team)
        .where(col(Team.id) == team_id)
        .with_for_update(key_share=not deleting)
        .execution_options(populate_existing=True)
    ).first()
    if team is None or team.company_id != company_id:
        raise NotFound("No such team.")
    return team


def list_teams(
    session: Session, p: Principal, company_id: str, req: KeyPageRequest
) -> dict[str, Any]:
    """A page of the company's teams by name, each with its members."""
    company_for(session, p, company_id)
    stmt = select(Team).where(col(Team.company_id) == company_id)
    page = read_key_page(session, stmt, col(Team.name), req)
    # The page's teams' members in one SELECT, not one per team (up to 1,000 each).
    members: dict[str, list[str]] = {t.id: [] for t in page.items}
    rows = session.execute(
        select(col(TeamMember.team_id), col(TeamMember.user_id)).where(
            col(TeamMember.team_id).in_(list(members))
        )
    )
    for team_id, user_id in rows:
        members[team_id].append(user_id)
    return page.public(lambda t: team_public(session, t, sorted(members[t.id])))


def update_team(
    session: Session, p: Principal, company_id: str, team_id: str, body: TeamInput
) -> dict[str, Any]:
    """Without the company's row, which every init and settlement of the company
    updates: an edit needs only the team's row (its members), its members' rows
    (`_set_members`) and the unique name (a concurrent twin: IntegrityError, 409 at
    the route). What an init reads of it changes at the commit, at once."""
    company_for(session, p, company_id)
    # The audit row's foreign key takes the company's key share before any other
    # lock: a team's deletion (the company's row, then the team's) and a role change
    # (the company's row, then the user's) must never find the team's or a member's
    # row held by an edit that waits for the company. Gone with a 404's rollback.
    _audit(session, p, "team.update", company_id, team_id=team_id)
    session.flush()
    team = _team(session, company_id, team_id)
    if body.name is not None:
        _name_free(session, company_id, body.name, team.id)
        team.name = body.name
    if body.user_ids is not None:
        _set_members(session, p, company_id, team.id, body.user_ids)
    session.flush()
    return team_public(session, team, body.user_ids)


def delete_team(session: Session, p: Principal, company_id: str, team_id: str) -> None:
    """The team, its memberships and the budgets on it: the company's row first, as
    deleting budgets needs (`company_for`), then the team's. Two statements for the
    members whatever their number: a role changes under the company's row too
    (`owners`), so their ranks are read as they are without locking each member."""
    company_for(session, p, company_id, lock=True)
    team = _team(session, company_id, team_id, deleting=True)
    above = session.scalar(
        select(func.count())
        .select_from(TeamMember)
        .join(User, col(User.id) == col(TeamMember.user_id))
        .where(col(TeamMember.team_id) == team.id)
        .where(col(User.role).not_in(policy.roles_at_or_below(p)))
    )
    if above:
        raise Forbidden("Nobody manages the team of a user ranked above itself.")
    session.execute(delete(TeamMember).where(col(TeamMember.team_id) == team.id))
    on_team = select(col(Budget.id)).where(
        col(Budget.scope) == "team", col(Budget.target_id) == team.id
    )
    for budget_id in list(session.scalars(on_team)):
        budgets.delete_budget(session, budget_id)
    session.delete(team)
    session.flush()
    _audit(session, p, "team.delete", company_id, team_id=team_id)


# --- budgets -----------------------------------------------------------------------


def _budget(session: Session, company_id: str, budget_id: str) -> Budget:
    budget = session.get(Budget, budget_id)
    if budget is None or budget.company_id != company_id:
        raise NotFound("No such budget.")
    return budget


def create_budget(
    session: Session, p: Principal, company_id: str, body: BudgetInput, now: datetime
) -> dict[str, Any]:
    company = company_for(session, p, company_id, lock=True)
    assert body.scope and body.target_id and body.period and body.amount_micro is not None
    check_target(session, p, company.id, body.scope, body.target_id)
    _one_per_period(session, company.id, body)
    count = session.scalar(
        select(func.count()).select_from(Budget).where(col(Budget.company_id) == company.id)
    )
    if (count or 0) >= BUDGETS_PER_COMPANY_MAX:
        raise Conflict(f"A company keeps at most {BUDGETS_PER_COMPANY_MAX} budgets.")
    budget = Budget(
        id=new_id(),
        company_id=company.id,
        scope=body.scope,
        target_id=body.target_id,
        amount_micro=body.amount_micro,
        period=body.period,
        created_at=now,
        updated_at=now,
    )
    session.add(budget)
    session.flush()
    _audit(session, p, "budget.create", company.id, **budgets.budget_public(budget))
    return budgets.standing_public(budgets.standing(session, budget, now))


def list_budgets(
    session: Session, p: Principal, company_id: str, now: datetime, req: KeyPageRequest
) -> dict[str, Any]:
    """A page of the company's budgets by id, each with its current period."""
    company_for(session, p, company_id)
    stmt = select(Budget).where(col(Budget.company_id) == company_id)
    page = read_key_page(session, stmt, col(Budget.id), req)
    listed = budgets.standings(session, page.items, now)
    return {"items": [budgets.standing_public(s) for s in listed], "next_cursor": page.next_cursor}


def update_budget(
    session: Session,
    p: Principal,
    company_id: str,
    budget_id: str,
    body: BudgetInput,
    now: datetime,
) -> dict[str, Any]:
    """A new amount and/or period. A new period counts from zero: spend is kept per
    (budget, period start), and the new period's start names a new row, or one of
    the old period's, whose spend is then zeroed (`budgets.rearm`). Thresholds the
    spend no longer reaches are re-armed."""
    company_for(session, p, company_id, lock=True)
    budget = _budget(session, company_id, budget_id)
    check_target(session, p, company_id, budget.scope, budget.target_id)
    new_period = body.period is not None and body.period != budget.period
    if new_period:
        moved = BudgetInput(budget.scope, budget.target_id, period=body.period)
        _one_per_period(session, company_id, moved, budget.id)
    if body.amount_micro is not None:
        budget.amount_micro = body.amount_micro
    if body.period is not None:
        budget.period = body.period
    budget.updated_at = now
    session.flush()
    budgets.rearm(session, budget, new_period=new_period, now=now)
    _audit(session, p, "budget.update", company_id, **budgets.budget_public(budget))
    return budgets.standing_public(budgets.standing(session, budget, now))


def remove_budget(session: Session, p: Principal, company_id: str, budget_id: str) -> None:
    company_for(session, p, company_id, lock=True)
    budget = _budget(session, company_id, budget_id)
    check_target(session, p, company_id, budget.scope, budget.target_id)
    budgets.delete_budget(session, budget.id)
    _audit(session, p, "budget.delete", company_id, budget_id=budget_id)


def my_budgets(
    session: Session, company_id: str, user_id: str, api_key_id: str | None, now: datetime
) -> list[dict[str, Any]]:
    """What `/v1/me` shows: the budgets that cap the caller's own requests."""
    mine = budgets.applicable(session, company_id, user_id, api_key_id)
    return [budgets.standing_public(s) for s in budgets.standings(session, mine, now)]


def set_webhook(
    session: Session, p: Principal, fernet: MultiFernet, company_id: str, url: str, now: datetime
) -> tuple[dict[str, Any], bool]:
    """Set the company's webhook URL: its public view (with the secret, the first
    time only) and whether the secret was generated now."""
    company_for(session, p, company_id, lock=True)
    row, secret = company_webhooks.set_url(session, fernet, company_id, url, now)
    _audit(session, p, "webhook.set", company_id, url=url, new_secret=secret is not None)
    return company_webhooks.webhook_public(row, secret), secret is not None


def _webhook(session: Session, company_id: str) -> CompanyWebhook:
    row = session.get(CompanyWebhook, company_id)
    if row is None:
        raise NotFound("This company has no webhook.")
    return row


def get_webhook(session: Session, p: Principal, company_id: str) -> dict[str, Any]:
    company_for(session, p, company_id)
    return company_webhooks.webhook_public(_webhook(session, company_id))


def delete_webhook(session: Session, p: Principal, company_id: str) -> None:
    # Locked as a set is: a second delete at once waits, then finds no row (404)
    # instead of deleting none and auditing a second deletion.
    company_for(session, p, company_id, lock=True)
    session.delete(_webhook(session, company_id))
    _audit(session, p, "webhook.delete", company_id)
