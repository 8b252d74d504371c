"""Small pure validators for JSON request bodies. Each raises `ValidationFailed`
naming the field, so a 422 always says what to fix."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

import orjson

from control_plane.errors import (
    BadRequest,
    InvalidCharacters,
    JsonTooComplex,
    JsonTooDeep,
    ValidationFailed,
)
from shared.input_size import (
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    escapes_nul,
    json_too_complex,
    json_too_deep,
)
from shared.pricing import parse_credits

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

# The days a query may name: a year inside each end of what `date` holds, so what
# callers do with them (the day after `to`, a window of days before it) cannot
# overflow into a 500.
FIRST_DAY = date(2, 1, 1)
LAST_DAY = date(9998, 12, 31)


NUL = "\x00"


def parse_json_object(body: bytes, *, allow_nul: bool = False) -> dict[str, Any]:
    """The request body as a JSON object: 400 when it is not JSON, opens more than
    `MAX_JSON_CONTAINERS` arrays and objects or nests deeper than `MAX_JSON_DEPTH`
    (it could not be stored or sent on), 422 when it is JSON but not an object, 400
    `invalid_characters` when a string in it holds NUL.

    Every check is linear and the first runs on the raw bytes, before the parse: this
    runs for anonymous bodies too (login), on the event loop.

    NUL is refused once here, for every body, because PostgreSQL cannot store it in
    a text column (DESIGN §11): a NUL in an email, a name or a message would
    otherwise fail the write with a 500. `allow_nul` is for the usage webhook,
    whose model output must settle whatever it contains."""
    if json_too_complex(body):
        raise JsonTooComplex(
            f"The request body has more than {MAX_JSON_CONTAINERS} arrays and objects."
        )
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest() from None
    if json_too_deep(doc):
        raise JsonTooDeep(
            f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep."
        )
    if not isinstance(doc, dict):
        raise ValidationFailed("body", "must be a JSON object")
    if not allow_nul and escapes_nul(body):
        raise InvalidCharacters()
    return doc


def without_nul(text: str) -> str:
    """`text` storable in any database: NUL becomes U+FFFD (the replacement
    character), so a model's stray NUL still shows where it was."""
    return text.replace(NUL, "\ufffd") if NUL in text else text


def required_str(doc: Mapping[str, Any], name: str, *, max_len: int = 200) -> str:
    value = doc.get(name)
    if value is None:
        raise ValidationFailed(name, "is required")
    return _check_str(value, name, max_len)


def optional_str(doc: Mapping[str, Any], name: str, *, max_len: int = 200) -> str | None:
    value = doc.get(name)
    return None if value is None else _check_str(value, name, max_len)


def _check_str(value: Any, name: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise ValidationFailed(name, "must be a string")
    if not value.strip():
        raise ValidationFailed(name, "must not be empty")
    if len(value) > max_len:
        raise ValidationFailed(name, f"must be at most {max_len} characters")
    return value


def optional_int(doc: Mapping[str, Any], name: str, *, low: int, high: int) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationFailed(name, "must be an integer")
    if not low <= value <= high:
        raise ValidationFailed(name, f"must be between {low} and {high}")
    return value


def credits_amount(value: Any, name: str) -> int:
    """A credits amount (``"10.5"``, ``10``) as integer micro-credits, any sign;
    floats and more than six decimals are refused so nothing is silently rounded."""
    try:
        return parse_credits(value)
    except ValueError as exc:
        raise ValidationFailed(name, str(exc)) from None


def parse_day(raw: str | None, name: str) -> date | None:
    """A query parameter ``YYYY-MM-DD`` (a UTC day from `FIRST_DAY` to `LAST_DAY`);
    None when absent."""
    if raw is None or raw == "":
        return None
    try:
        if len(raw) != 10:
            raise ValueError
        day = date.fromisoformat(raw)
    except ValueError:
        raise ValidationFailed(name, "must be a date YYYY-MM-DD") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise ValidationFailed(
            name, f"must be a day from {FIRST_DAY.isoformat()} to {LAST_DAY.isoformat()}"
        )
    return day


def one_of(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValidationFailed(name, f"must be one of {', '.join(allowed)}")
    return value


def page_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise ValidationFailed("limit", "must be an integer") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ValidationFailed("limit", f"must be between 1 and {MAX_LIMIT}")
    return value
