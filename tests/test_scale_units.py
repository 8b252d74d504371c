"""Pure checks behind the scale-out (issue 14.5), no servers: every key a stream's
admission script touches hashes to one Redis Cluster slot, different companies
spread, and the settings that select a cluster or PgBouncer parse strictly."""

from __future__ import annotations

import random
import uuid

import pytest
from redis.crc import key_slot

from control_plane import pending_inits
from control_plane.settings import ControlPlaneSettings
from shared.revocations import grant_keys, revocation_key
from shared.settings import ConfigError
from shared.stash import stash_key
from shared.store_redis import cluster_url
from shared.tokens import StreamGrant
from stream_edge import grants
from stream_edge.limits import slot_keys
from tests.conftest import new_webhook_secret

PREFIX = "llmgw:"


def _grant(company_id: str) -> StreamGrant:
    return StreamGrant(
        jti=uuid.uuid4().hex, user_id=uuid.uuid4().hex, company_id=company_id, role="member",
        scopes=("llm:chat:send",), session_id="s", model="mock-fast", max_tokens=16,
        max_input_tokens=100, reservation_id="r", request_id="q", issued_at=0, expires_at=60,
    )  # fmt: skip


def _slot(key: str) -> int:
    return int(key_slot((PREFIX + key).encode()))


# Random company ids, drawn from a seeded generator: every pytest-xdist worker must
# collect the same test ids.
_SEEDED = random.Random(7)


@pytest.mark.parametrize(
    "company_id", [uuid.UUID(int=_SEEDED.getrandbits(128)).hex for _ in range(5)]
)
def test_every_admission_key_of_a_stream_hashes_to_one_slot(company_id: str) -> None:
    grant = _grant(company_id)
    keys = [
        *grant_keys(grant),
        grants.used_key(grant.company_id, grant.jti),
        *slot_keys(grant),
        stash_key(grant.company_id, grant.jti),
    ]
    assert len({_slot(k) for k in keys}) == 1, keys
    # What the control plane writes for the same stream lands in that slot too.
    written = [
        stash_key(company_id, grant.jti),
        pending_inits.used_key(company_id, grant.jti),
        *(revocation_key(kind, value, company_id) for kind, value in
          (("user", grant.user_id), ("company", company_id), ("jti", grant.jti))),
    ]  # fmt: skip
    assert {_slot(k) for k in written} == {_slot(keys[0])}


def test_companies_spread_over_slots() -> None:
    slots = {_slot(grants.used_key(uuid.uuid4().hex, "j")) for _ in range(50)}
    assert len(slots) > 40


def test_cluster_urls_are_chosen_by_scheme_only() -> None:
    assert cluster_url("redis+cluster://h:7000/0") == "redis://h:7000/0"
    assert cluster_url("rediss+cluster://u:p@h:7000") == "rediss://u:p@h:7000"
    for plain in ("redis://h:6379/0", "rediss://h", "unix:///tmp/r.sock"):
        assert cluster_url(plain) is None


def _env(**extra: str) -> dict[str, str]:
    return {"LLMGW_WEBHOOK_SECRET": new_webhook_secret(), **extra}


def test_settings_accept_a_cluster_url_and_a_pgbouncer_flag() -> None:
    settings = ControlPlaneSettings.from_env(
        _env(LLMGW_REDIS_URL="redis+cluster://127.0.0.1:7000", LLMGW_DATABASE_PGBOUNCER="1")
    )
    assert settings.redis_url == "redis+cluster://127.0.0.1:7000"
    assert settings.database_pgbouncer is True
    assert ControlPlaneSettings.from_env(_env()).database_pgbouncer is False
    with pytest.raises(ConfigError, match="LLMGW_DATABASE_PGBOUNCER"):
        ControlPlaneSettings.from_env(_env(LLMGW_DATABASE_PGBOUNCER="maybe"))
    with pytest.raises(ConfigError, match="LLMGW_REDIS_URL"):
        ControlPlaneSettings.from_env(_env(LLMGW_REDIS_URL="memcached+cluster://h"))
