"""What a token the gateway issued says, read by a test without its key: the test
looks at (or re-signs) what was granted; verifying is the edge's job."""

from __future__ import annotations

from typing import Any

import jwt


def claims_of(token: str) -> dict[str, Any]:
    """The token's claims, its signature unchecked."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def jti_of(token: str) -> str:
    return str(claims_of(token)["jti"])
