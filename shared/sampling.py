"""OpenAI's sampling parameters a client may pass through to the backend (pure).

``temperature``, ``top_p``, ``presence_penalty``, ``frequency_penalty``, ``seed``,
``user`` and ``stop``: one rule for both ways in, init's body and the edge's
``/v1/chat/completions`` (a stream token's body goes upstream without passing init).
The edge once passed them on as sent (1,000 stop sequences, a temperature of
``"hot"``, a 1,000-character end-user id), each then refused (or not) by whichever
vendor served it. Ranges are OpenAI's; `STOP_MAX` is OpenAI's 4 (Gemini takes 5); a
null means "not set" and is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from shared.input_size import InputRejected

STOP_MAX = 4
USER_MAX = 256  # OpenAI's end-user id
SAMPLING_PARAMS = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "stop",
)
_RANGES: tuple[tuple[str, float, float], ...] = (
    ("temperature", 0.0, 2.0),
    ("top_p", 0.0, 1.0),
    ("presence_penalty", -2.0, 2.0),
    ("frequency_penalty", -2.0, 2.0),
)


def _bad(name: str, problem: str) -> InputRejected:
    return InputRejected("invalid_parameter", name, problem)


def _number(value: Any, name: str, low: float, high: float) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, "must be a number")
    if not low <= value <= high:
        raise _bad(name, f"must be between {low:g} and {high:g}")
    return value


def _user(value: Any) -> str:
    if not isinstance(value, str):
        raise _bad("user", "must be a string")
    if not value.strip():
        raise _bad("user", "must not be empty")
    if len(value) > USER_MAX:
        raise _bad("user", f"must be at most {USER_MAX} characters")
    return value


def _stop(value: Any) -> list[str]:
    """A string or 1-`STOP_MAX` non-empty strings, always sent on as a list."""
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= STOP_MAX
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _bad("stop", f"must be a string or 1-{STOP_MAX} strings")
    return stops


def check_sampling_params(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling parameters present (not null) in a request body, validated;
    `InputRejected` (``invalid_parameter``, naming the field) for the first bad one."""
    params: dict[str, Any] = {}
    for name, low, high in _RANGES:
        value = doc.get(name)
        if value is not None:
            params[name] = _number(value, name, low, high)
    seed = doc.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or abs(seed) >= 2**63:
            raise _bad("seed", "must be a 64-bit integer")
        params["seed"] = seed
    user = doc.get("user")
    if user is not None:
        params["user"] = _user(user)
    stop = doc.get("stop")
    if stop is not None:
        params["stop"] = _stop(stop)
    return params
