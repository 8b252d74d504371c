"""The console (issue 17) at ``/console``: a static page for owners and platform
admins, on unless ``LLMGW_SERVE_CONSOLE=0``. It holds no logic the API does not
have: it signs in with ``/v1/auth/login`` and calls the public ``/v1/…`` routes
like any client, so every rule (roles, scopes, companies) is the API's.

Its files ship inside the package (``control_plane/console/``), the charting
library included (``vendor/``, Chart.js with its licence), so it works offline.
Only the files listed in `ASSETS` are served: no path from the URL ever reaches
the file system.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from control_plane.deps import get_deps
from control_plane.errors import NotFound

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
ASSETS = {
    "console.js": "text/javascript",
    "console.css": "text/css",
    "vendor/chart.umd.min.js": "text/javascript",
}
# The page loads only its own files and talks only to this origin.
SECURITY_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _serve(request: Request, name: str, media_type: str) -> Response:
    path = CONSOLE_DIR / name
    if not get_deps(request).settings.serve_console or not path.is_file():
        raise NotFound("There is no console here; the API lives under /v1.")
    return FileResponse(path, media_type=media_type, headers=SECURITY_HEADERS)


async def console_page(request: Request) -> Response:
    return _serve(request, "index.html", "text/html")


async def console_slash(request: Request) -> Response:
    return RedirectResponse("/console", status_code=308)


async def console_asset(request: Request) -> Response:
    name = str(request.path_params["name"])
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound("No such file.")
    return _serve(request, name, media_type)


routes: list[BaseRoute] = [
    Route("/console", console_page, methods=["GET"], include_in_schema=False),
    Route("/console/", console_slash, methods=["GET"], include_in_schema=False),
    Route("/console/{name:path}", console_asset, methods=["GET"], include_in_schema=False),
]
