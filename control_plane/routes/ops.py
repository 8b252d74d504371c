"""Liveness, readiness, metrics, the public signing keys and the OpenAPI document.

These answer bare documents, not the ``/v1`` envelope (DESIGN §9)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane.deps import get_deps
from control_plane.ledger import active_hold_count
from control_plane.metrics import CONTENT_TYPE
from control_plane.openapi import openapi_document
from control_plane.responses import json_response
from control_plane.signing_keys import published_jwks


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    deps = get_deps(request)

    async def store_ok() -> bool:
        try:
            return await asyncio.wait_for(deps.store.ping(), timeout=5)
        except Exception:
            return False

    database, store = await asyncio.gather(deps.db.ping(), store_ok())
    failing = [name for name, good in (("database", database), ("store", store)) if not good]
    if failing:
        return json_response({"status": "unavailable", "failing": failing}, 503)
    return json_response({"status": "ok"})


async def metrics(request: Request) -> Response:
    deps = get_deps(request)
    try:
        deps.metrics.holds_active.set(await deps.db.transaction(active_hold_count))
    except Exception:  # a scrape must not fail because the database is down
        pass
    return Response(deps.metrics.render(), media_type=CONTENT_TYPE)


async def jwks(request: Request) -> Response:
    keys: list[dict[str, Any]] = await get_deps(request).db.transaction(published_jwks)
    return json_response({"keys": keys}, headers={"Cache-Control": "public, max-age=60"})


async def openapi(request: Request) -> Response:
    return json_response(openapi_document(request.app.routes))


routes: list[BaseRoute] = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/.well-known/jwks.json", jwks, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
