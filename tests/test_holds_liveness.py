"""Holds that end in time (issues 11.4, 11.5): a hold's deadline covers the longest
stream a token can start, and a stream whose edge went silent is settled from its
checkpoint long before that deadline, exactly once. Pure rules here; the SIGKILL
end-to-end check is in `test_e2e_edge_crash.py`, the sweeps on a real control plane
in `test_credits_sweeper.py`."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from control_plane.chat_init import hold_deadline
from shared.settings import ConfigError, Settings
from shared.tokens import LEEWAY_SECONDS
from tests.conftest import new_webhook_secret

BASE = {"LLMGW_WEBHOOK_SECRET": new_webhook_secret()}


def _latest_stream_end(settings: Settings, issued: int) -> float:
    """The last moment a stream of a token issued at `issued` can still run: started
    at expiry (plus the verifier's leeway), living its maximum, then its resume grace."""
    exp = issued + settings.token_ttl_seconds
    return exp + LEEWAY_SECONDS + settings.max_stream_seconds + settings.resume_grace_seconds


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LLMGW_TOKEN_TTL_SECONDS": "300"},
        {"LLMGW_MAX_STREAM_SECONDS": "3600", "LLMGW_HOLD_GRACE_SECONDS": "4000"},
        {"LLMGW_RESUME_GRACE_SECONDS": "600", "LLMGW_HOLD_GRACE_SECONDS": "2000"},
    ],
)
def test_the_hold_deadline_outlives_the_longest_stream(env: dict[str, str]) -> None:
    """11.4: with the defaults (900 s streams) a 600 s grace let the sweeper settle a
    live stream as `failed` and turned its real report into a duplicate."""
    settings = Settings.from_env({**BASE, **env})
    issued = 1_800_000_000
    deadline = hold_deadline(issued, settings).timestamp()
    assert deadline > _latest_stream_end(settings, issued)


@pytest.mark.parametrize(
    "env",
    [
        {"LLMGW_HOLD_GRACE_SECONDS": "600"},  # shorter than the default 900 s stream
        {"LLMGW_MAX_STREAM_SECONDS": "3600"},  # longer streams, the default grace
        {"LLMGW_RESUME_GRACE_SECONDS": "600", "LLMGW_HOLD_GRACE_SECONDS": "1200"},
    ],
)
def test_settings_that_let_a_stream_outlive_its_hold_fail_at_start(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="LLMGW_HOLD_GRACE_SECONDS") as caught:
        Settings.from_env({**BASE, **env})
    assert "\n" not in str(caught.value)


def test_the_hold_deadline_is_a_utc_instant() -> None:
    settings = Settings.from_env(BASE)
    deadline = hold_deadline(1_800_000_000, settings)
    assert deadline.tzinfo is UTC
    assert deadline == datetime.fromtimestamp(
        1_800_000_000 + settings.token_ttl_seconds + settings.hold_grace_seconds, UTC
    )
    assert math.isclose(settings.hold_grace_seconds, 1200)  # the documented default (.env.example)
