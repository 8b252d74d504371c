"""The console's aggregates (DESIGN §11), on the public API:

* ``GET /v1/usage/summary?group_by=day,model,user,api_key&from=&to=&order=keys|cost``
  → ``{"items": [{"day"?, "model"?, "user_id"?, "api_key_id"?, "streams",
  "input_tokens", "output_tokens", "cost"}], "next_cursor"}``; ``order=cost`` lists
  the top spenders first; ``meta.labels`` names the ids for a reader
  (``{"user_id": {id: email}, "api_key_id": {id: prefix}}``), beside the items, which
  hold only their grouped keys and totals.
* ``GET /v1/usage/ttft?from=&to=`` → ``{"items": [{"model", "streams", "p50_ms",
  "p95_ms"}]}``.

Who: an owner (with ``llm:admin``) sees its company; a platform admin any one
company (``company_id``) or all of them, where ``group_by`` may add ``company``; a
member, or a key without the admin scope, gets 403. Nothing here writes. Both run
as heavy reads (`heavy_reads`): a fair share per company, a statement timeout.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import policy, usage_summary
from control_plane.auth import authenticate
from control_plane.deps import get_deps
from control_plane.errors import Forbidden
from control_plane.heavy_reads import caller_key
from control_plane.pagination import decode_summary_cursor, encode_summary_cursor, walk_began
from control_plane.policy import Principal
from control_plane.responses import ok
from control_plane.tables import utcnow
from control_plane.validation import optional_str, page_limit

# Per id key of the items, what a person reads for each id (`usage_summary.labels`).
Labels = dict[str, dict[str, str]]


def _scope(request: Request, p: Principal) -> str | None:
    """The company whose records the caller reads; None for every company."""
    company_id = optional_str(dict(request.query_params), "company_id", max_len=64)
    if company_id is None and not policy.is_platform_admin(p):
        company_id = p.company_id
    # The same rule as the audit: an owner (admin scope) for its own company only.
    if not policy.can_read_audit(p, company_id):
        raise Forbidden("Only an owner, for its own company, or a platform admin sees aggregates.")
    return company_id


def _query(request: Request, company_id: str | None) -> usage_summary.SummaryQuery:
    return usage_summary.parse_query(
        dict(request.query_params), utcnow().date(), across_companies=company_id is None
    )


async def summary(request: Request) -> Response:
    """Usage totals per group; ``cursor`` is opaque (old ``["seq", n]`` ones still work).

    A walk (``cursor``) reads the summary as it stood at its first page, for at most
    an hour: its positions are the groups' own cost and keys, not row offsets that
    records settling meanwhile would shift (a group skipped or shown twice)."""
    principal = await authenticate(request)
    company_id = _scope(request, principal)
    group_by = _query(request, company_id).group_by
    cursor = decode_summary_cursor(request.query_params.get("cursor"), len(group_by))
    offset, began, cost, keys = cursor or (0, None, 0, ())
    after = usage_summary.After(cost, keys) if began is not None else None
    as_of = walk_began(began, utcnow())
    # The default range is the walk's: a walk across midnight keeps its days.
    query = usage_summary.parse_query(
        dict(request.query_params), as_of.date(), across_companies=company_id is None
    )
    limit = page_limit(request.query_params.get("limit"))

    def read(s: Session) -> tuple[list[tuple[dict[str, Any], usage_summary.After]], Labels]:
        found = usage_summary.summary(s, query, company_id, limit, offset, after, as_of)
        return found, usage_summary.labels(s, [item for item, _ in found[:limit]])

    rows, labels = await get_deps(request).heavy_reads.run(caller_key(principal), read)
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1][1]
        next_cursor = encode_summary_cursor(as_of, last.cost_micro, last.keys)
    return ok(
        {"items": [item for item, _ in rows[:limit]], "next_cursor": next_cursor},
        meta={"from": query.start.isoformat(), "to": query.end.isoformat(), "labels": labels},
    )


async def ttft(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = _scope(request, principal)
    query = _query(request, company_id)
    rows = await get_deps(request).heavy_reads.run(
        caller_key(principal), lambda s: usage_summary.ttft(s, query, company_id)
    )
    return ok({"items": rows}, meta={"from": query.start.isoformat(), "to": query.end.isoformat()})


routes: list[BaseRoute] = [
    Route("/v1/usage/summary", summary, methods=["GET"]),
    Route("/v1/usage/ttft", ttft, methods=["GET"]),
]
