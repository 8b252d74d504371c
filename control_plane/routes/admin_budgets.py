"""``/v1/admin/companies/{id}/budgets…``, ``…/teams…`` and ``…/webhook`` (DESIGN §11).

Budgets ``{"scope": "user"|"api_key"|"team", "target_id", "amount", "period":
"day"|"week"|"month"|"none"}``; teams ``{"name", "user_ids"}``; the company's
webhook ``{"url"}``, whose secret is answered once, when it is generated. The
rules (who, which targets) are `budget_admin`'s; these handlers parse and answer.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import budget_admin, company_webhooks
from control_plane.auth import authenticate, caller_and_json
from control_plane.budget_math import parse_budget
from control_plane.deps import get_deps, path_id
from control_plane.errors import Conflict, ValidationFailed
from control_plane.pagination import key_page_request
from control_plane.responses import no_content, ok
from control_plane.tables import utcnow


async def list_budgets(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = path_id(request, "company_id")
    now = utcnow()
    req = key_page_request(request.query_params)
    page = await get_deps(request).db.transaction(
        lambda s: budget_admin.list_budgets(s, principal, company_id, now, req)
    )
    return ok(page)


async def create_budget(request: Request) -> Response:
    principal, doc = await caller_and_json(request)
    company_id = path_id(request, "company_id")
    body = parse_budget(doc, partial=False)
    now = utcnow()
    data = await get_deps(request).db.transaction(
        lambda s: budget_admin.create_budget(s, principal, company_id, body, now)
    )
    return ok(data, 201)


async def update_budget(request: Request) -> Response:
    principal, doc = await caller_and_json(request)
    company_id = path_id(request, "company_id")
    budget_id = path_id(request, "budget_id")
    body = parse_budget(doc, partial=True)
    now = utcnow()
    data = await get_deps(request).db.transaction(
        lambda s: budget_admin.update_budget(s, principal, company_id, budget_id, body, now)
    )
    return ok(data)


async def delete_budget(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = path_id(request, "company_id")
    budget_id = path_id(request, "budget_id")
    await get_deps(request).db.transaction(
        lambda s: budget_admin.remove_budget(s, principal, company_id, budget_id)
    )
    return no_content()


async def list_teams(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = path_id(request, "company_id")
    req = key_page_request(request.query_params)
    page = await get_deps(request).db.transaction(
        lambda s: budget_admin.list_teams(s, principal, company_id, req)
    )
    return ok(page)


async def create_team(request: Request) -> Response:
    principal, doc = await caller_and_json(request)
    company_id = path_id(request, "company_id")
    body = budget_admin.parse_team(doc, partial=False)
    now = utcnow()
    try:
        data = await get_deps(request).db.transaction(
            lambda s: budget_admin.create_team(s, principal, company_id, body, now)
        )
    except IntegrityError:  # a concurrent twin took the name
        raise Conflict(f"A team named {body.name!r} already exists in this company.") from None
    return ok(data, 201)


async def update_team(request: Request) -> Response:
    principal, doc = await caller_and_json(request)
    company_id = path_id(request, "company_id")
    team_id = path_id(request, "team_id")
    body = budget_admin.parse_team(doc, partial=True)
    try:
        data = await get_deps(request).db.transaction(
            lambda s: budget_admin.update_team(s, principal, company_id, team_id, body)
        )
    except IntegrityError:
        raise Conflict("Another team has this name, or the members changed meanwhile.") from None
    return ok(data)


async def delete_team(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = path_id(request, "company_id")
    team_id = path_id(request, "team_id")
    await get_deps(request).db.transaction(
        lambda s: budget_admin.delete_team(s, principal, company_id, team_id)
    )
    return no_content()


async def put_webhook(request: Request) -> Response:
    """Set the company's webhook URL; the first time, answer its new secret (once)."""
    principal, doc = await caller_and_json(request)
    company_id = path_id(request, "company_id")
    unknown = sorted(set(doc) - {"url"})
    if unknown:
        raise ValidationFailed(unknown[0], "is not a field (url)")
    deps = get_deps(request)
    url = company_webhooks.parse_url(
        doc.get("url"), allow_private=deps.settings.company_webhooks_allow_private
    )
    fernet = deps.fernet
    now = utcnow()

    def run(session: Session) -> tuple[dict[str, Any], bool]:
        return budget_admin.set_webhook(session, principal, fernet, company_id, url, now)

    try:
        data, created = await deps.db.transaction(run)
    except IntegrityError:  # a concurrent first PUT generated the secret: this one updates
        data, created = await deps.db.transaction(run)
    return ok(data, 201 if created else 200)


async def get_webhook(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = path_id(request, "company_id")
    data = await get_deps(request).db.transaction(
        lambda s: budget_admin.get_webhook(s, principal, company_id)
    )
    return ok(data)


async def delete_webhook(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = path_id(request, "company_id")
    await get_deps(request).db.transaction(
        lambda s: budget_admin.delete_webhook(s, principal, company_id)
    )
    return no_content()


BASE = "/v1/admin/companies/{company_id}"
routes: list[BaseRoute] = [
    Route(f"{BASE}/budgets", list_budgets, methods=["GET"]),
    Route(f"{BASE}/budgets", create_budget, methods=["POST"]),
    Route(f"{BASE}/budgets/{{budget_id}}", update_budget, methods=["PATCH"]),
    Route(f"{BASE}/budgets/{{budget_id}}", delete_budget, methods=["DELETE"]),
    Route(f"{BASE}/teams", list_teams, methods=["GET"]),
    Route(f"{BASE}/teams", create_team, methods=["POST"]),
    Route(f"{BASE}/teams/{{team_id}}", update_team, methods=["PATCH"]),
    Route(f"{BASE}/teams/{{team_id}}", delete_team, methods=["DELETE"]),
    Route(f"{BASE}/webhook", get_webhook, methods=["GET"]),
    Route(f"{BASE}/webhook", put_webhook, methods=["PUT"]),
    Route(f"{BASE}/webhook", delete_webhook, methods=["DELETE"]),
]
