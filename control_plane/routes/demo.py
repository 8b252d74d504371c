"""The demo page (`web/index.html`) at `/`: on in `dev`, elsewhere with
`LLMGW_SERVE_DEMO=1`. A static, dependency-free page; it talks to this API and
opens its EventSource straight on the edge (another origin, hence CORS there).

It is served with a Content-Security-Policy, as the console is: its one inline script
is allowed by its hash (computed from the file as served, so an edit cannot fall out
of step), it may connect only to this origin and the edge's, and no other site may
frame it. The page renders model output as text; the policy is the second wall."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane.deps import get_deps
from control_plane.errors import NotFound

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
_INLINE_SCRIPTS = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def security_headers(page: bytes, edge_public_url: str) -> dict[str, str]:
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode() + "'"
        for script in _INLINE_SCRIPTS.findall(page)
    ]
    script_src = " ".join(hashes) or "'none'"
    return {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {script_src}; "
            "style-src 'unsafe-inline'; img-src 'self' data:; "
            f"connect-src 'self' {origin_of(edge_public_url)}; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


async def demo_page(request: Request) -> Response:
    settings = get_deps(request).settings
    path = WEB_DIR / "index.html"
    if not settings.serve_demo or not path.is_file():
        raise NotFound("There is no page here; the API lives under /v1.")
    page = path.read_bytes()
    headers = security_headers(page, settings.edge_public_url)
    return Response(page, media_type="text/html", headers=headers)


routes: list[BaseRoute] = [Route("/", demo_page, methods=["GET"])]
