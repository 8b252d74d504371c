"""JSON responses and the success envelope ``{"success": true, "data", "meta"}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

# Answers carry transcripts, tokens and keys: a browser kept them all in its disk
# cache (past a sign-out, for the machine's next user) unless told not to. A route
# may say otherwise (the public JWKS is cacheable).
NO_STORE = {"Cache-Control": "no-store"}


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        headers={**NO_STORE, **(headers or {})},
        media_type="application/json",
    )


def ok(
    data: Any,
    status: int = 200,
    *,
    meta: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return json_response({"success": True, "data": data, "meta": meta or {}}, status, headers)


def no_content() -> Response:
    return Response(status_code=204, headers=NO_STORE)
