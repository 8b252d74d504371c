"""Waiting, in a test, for what the services finish in the background."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], what: str, within: float = 60.0) -> None:
    """Poll `condition` (a fact of the services: a row, a count, an answer; never a
    duration) until it holds; fail with `what` if it still does not after `within`
    seconds, a bound generous enough never to be reached by a passing test."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
