"""What a signed-in caller reads about itself (``/v1/auth/login``, ``/v1/me``,
``/v1/models``): whether it may still sign in, who it is with its company's
credits and the budgets that cap it, and the model catalog its company sees. Data
functions that take a DB session; nothing here writes."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from control_plane import budget_admin, company_llm
from control_plane.auth import ensure_not_revoked
from control_plane.company_llm import CompanyCatalog
from control_plane.tables import Company, User, utcnow
from shared.catalog import Catalog


def check_not_revoked(session: Session, user: User) -> None:
    """403 ``revoked`` for a revoked user, or a user of a revoked or deleted company."""
    ensure_not_revoked(user, session.get(Company, user.company_id))


def me(
    session: Session, user_id: str, api_key_id: str | None
) -> tuple[User, Company, list[dict[str, Any]]] | None:
    """The user, its company and the budgets that cap its requests (its own, its
    key's, its teams'); None once the user or its company is gone."""
    user = session.get(User, user_id)
    if user is None:
        return None
    company = session.get(Company, user.company_id)
    if company is None:
        return None
    mine = budget_admin.my_budgets(session, company.id, user.id, api_key_id, utcnow())
    return user, company, mine


def company_models(session: Session, catalog: Catalog, company_id: str) -> CompanyCatalog | None:
    """The packaged catalog merged with the company's overrides; None for a company
    that is gone."""
    company = session.get(Company, company_id)
    if company is None:
        return None
    overrides = company_llm.load_overrides(session, company_id)
    keyed = company_llm.keyed_providers(session, company_id)
    return company_llm.company_catalog(catalog, overrides, company.default_model, keyed)
