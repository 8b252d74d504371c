"""The demo page (`web/index.html`) at `/`: on in `dev`, elsewhere with
`LLMGW_SERVE_DEMO=1`. A static, dependency-free page; it talks to this API and
opens its EventSource straight on the edge (another origin, hence CORS there)."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from control_plane.deps import get_deps
from control_plane.errors import NotFound

WEB_DIR = Path(__file__).resolve().parents[2] / "web"


async def demo_page(request: Request) -> Response:
    page = WEB_DIR / "index.html"
    if not get_deps(request).settings.serve_demo or not page.is_file():
        raise NotFound("There is no page here; the API lives under /v1.")
    return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache"})


routes: list[BaseRoute] = [Route("/", demo_page, methods=["GET"])]
