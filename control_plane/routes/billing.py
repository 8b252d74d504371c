"""``GET /v1/usage`` and ``GET /v1/credits``: newest first, keyset-paginated; a page
reads index ranges of about its own size, whatever the caller's role."""

from __future__ import annotations

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import billing, policy
from control_plane.auth import authenticate
from control_plane.deps import get_deps
from control_plane.errors import Forbidden
from control_plane.pagination import Page, page_request
from control_plane.policy import Principal
from control_plane.responses import ok
from control_plane.tables import Company, LedgerEntry
from shared.pricing import format_credits


def _reader(principal: Principal) -> str:
    if not policy.can_read_own_data(principal) or principal.company_id is None:
        raise Forbidden("This needs a user with the llm:chat:read scope.")
    return principal.company_id


async def usage(request: Request) -> Response:
    principal = await authenticate(request)
    _reader(principal)
    req = page_request(request.query_params)
    page = await get_deps(request).db.transaction(lambda s: billing.usage_page(s, principal, req))
    return ok(page.public(billing.usage_public))


async def credits(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = _reader(principal)
    req = page_request(request.query_params)

    def read(s: Session) -> tuple[Company | None, Page[LedgerEntry]]:
        return billing.credits_page(s, principal, company_id, req)

    company, page = await get_deps(request).db.transaction(read)
    if company is None:
        raise Forbidden("Your company no longer exists.")
    return ok(
        {
            "balance": format_credits(company.balance_micro),
            "held": format_credits(company.held_micro),
            "available": format_credits(company.balance_micro - company.held_micro),
            "entries": [billing.entry_public(e) for e in page.items],
            "next_cursor": page.next_cursor,
        }
    )


routes: list[BaseRoute] = [
    Route("/v1/usage", usage, methods=["GET"]),
    Route("/v1/credits", credits, methods=["GET"]),
]
