"""Liveness, readiness, metrics, the public signing keys and the OpenAPI document.

These answer bare documents, not the ``/v1`` envelope (DESIGN §9)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane.deps import get_deps
from control_plane.metrics import CONTENT_TYPE
from control_plane.openapi import openapi_document
from control_plane.responses import json_response


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    failing = await get_deps(request).readiness.get()
    if failing:
        return json_response({"status": "unavailable", "failing": failing}, 503)
    return json_response({"status": "ok"})


async def metrics(request: Request) -> Response:
    deps = get_deps(request)
    try:
        deps.metrics.holds_active.set(await deps.hold_count.get())
    except Exception:  # a scrape must not fail because the database is down
        pass
    return Response(deps.metrics.render(), media_type=CONTENT_TYPE)


async def jwks(request: Request) -> Response:
    keys = await get_deps(request).published_keys.get()
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
