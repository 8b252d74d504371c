"""The mock backend's app: every vendor's routes, the operator endpoints, errors.

``create_app()`` builds a fresh Starlette app per call; all mutable state lives on
``app.state.mock`` (a `MockServer`). One mock speaks four wire formats on the
vendors' real paths:

* OpenAI ``POST /v1/chat/completions``, ``GET /v1/models`` (`openai_api`)
* Anthropic ``POST /v1/messages`` (`anthropic_api`)
* Gemini ``POST /v1beta/models/{model}:(stream)GenerateContent``, also under ``/v1/``
  (`gemini_api`)
* an in-house SSE service ``POST /sse/chat`` (`inhouse_api`)

Errors, unknown paths included, answer in the shape of the vendor whose path was hit.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mock_llm import anthropic_api, gemini_api, inhouse_api, openai_api
from mock_llm.errors import MockAPIError
from mock_llm.script import MODEL_DEFAULTS, MockBehaviour
from mock_llm.server import MockServer, json_response


def vendor_of(path: str, anthropic_version: str | None = None) -> str:
    """Whose error shape a request gets. Anthropic's clients send ``anthropic-version``
    on every request, and its other paths (``/v1/complete``, ``/v1/models/…``) overlap
    OpenAI's: by path alone, an Anthropic client's unknown path got OpenAI's body."""
    if path.startswith("/v1/messages") or anthropic_version:
        return "anthropic"
    # Gemini's methods are `models/{model}:{method}`; OpenAI's model paths have no colon.
    if path.startswith("/v1beta/") or (path.startswith("/v1/models/") and ":" in path):
        return "google"
    return "openai"


def _operator_routes(server: MockServer) -> list[Route]:
    async def get_stats(request: Request) -> Response:
        return json_response(server.stats.snapshot())

    async def reset_stats(request: Request) -> Response:
        server.stats.reset()
        server.requests.clear()
        return json_response(server.stats.snapshot())

    async def get_requests(request: Request) -> Response:
        return json_response({"requests": list(server.requests)})

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    return [
        Route("/_mock/stats", get_stats, methods=["GET"]),
        Route("/_mock/reset", reset_stats, methods=["POST"]),
        Route("/_mock/requests", get_requests, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MockAPIError)
    vendor = vendor_of(request.url.path, request.headers.get("anthropic-version"))
    response = json_response(exc.body_for(vendor), exc.status)
    response.headers.update(exc.headers_for(vendor))
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    # Unknown paths and wrong methods also answer in the vendor's shape, for its clients.
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = MockAPIError(exc.status_code, exc.detail, code=code, headers=dict(exc.headers or {}))
    return await _api_error(request, error)  # keeps ``Allow`` on a 405


def create_app(
    api_key: str | None = None,
    models: Mapping[str, MockBehaviour] | None = None,
    service_token: str | None = None,
) -> Starlette:
    """A fresh mock backend. ``api_key`` turns on each vendor's key check (Bearer,
    ``x-api-key``, ``x-goog-api-key``); ``service_token`` makes ``/sse/chat`` require
    ``X-Service-Token``."""
    server = MockServer(MODEL_DEFAULTS if models is None else models, api_key, service_token)
    app = Starlette(
        routes=[
            *openai_api.routes(server),
            *anthropic_api.routes(server),
            *gemini_api.routes(server),
            *inhouse_api.routes(server),
            *_operator_routes(server),
        ],
        exception_handlers={MockAPIError: _api_error, HTTPException: _http_error},
    )
    app.state.mock = server
    return app
