"""Init's store work before any credits are held, in one round trip (issue 14.3).

Four checks used to cost an init six Redis round trips: its user's and its company's
init rates (`rate_limits`), the tokens-per-minute precheck (`tpm`), the pending-init
cap (`pending_inits`) and the version of the company's cached LLM configuration
(`catalog_cache`). `Store.init_gate` runs them in that order as one atomic step
(a Lua script on Redis); this module names the keys, and turns a refusal into the
same 429 each check raised on its own. A refused init changes what the separate
checks changed: the init counters it passed, nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from control_plane import catalog_cache, pending_inits, rate_limits, tpm
from control_plane.errors import StoreUnavailable
from control_plane.settings import ControlPlaneSettings
from shared.store import InitGate, InitGateStore

log = logging.getLogger("control_plane.init_gate")


@dataclass(frozen=True, slots=True)
class Moment:
    """The clocks init's windows are read on: the init-rate window's (the app's
    clock, which tests fix), the TPM window's (the init's instant on that clock, as
    its reservation's id carries it) and the wall clock of the pending-init
    deadlines."""

    rate_now: float
    tpm_now: float
    wall_now: float


async def enter(
    store: InitGateStore,
    settings: ControlPlaneSettings,
    *,
    user_id: str,
    company_id: str,
    jti: str,
    expires_at: float,
    at: Moment,
    cache: catalog_cache.CatalogCache | None,
) -> catalog_cache.Lookup | None:
    """Count the init and add `jti` to the user's and the company's pending grants,
    or raise the 429 of the first check that refuses (503 when the store fails).
    Returns the lookup of the company's cached LLM configuration under the version
    read in the same step."""
    rate_window = rate_limits.window_at(at.rate_now)
    tpm_window = rate_limits.window_at(at.tpm_now)
    rates = (
        ("user", user_id, settings.init_rate_per_user),
        ("company", company_id, settings.init_rate_per_company),
    )
    tpms = tpm.TpmLimits.of(settings).scopes(user_id, company_id)
    pending_limits = [settings.max_pending_inits_per_user, settings.max_pending_inits_per_company]
    gate = InitGate(
        rate_keys=[rate_limits.limit_key(scope, who, rate_window) for scope, who, _ in rates],
        rate_limits=[n for _, _, n in rates],
        rate_window_seconds=rate_limits.WINDOW_SECONDS,
        tpm_keys=[tpm.tpm_key(scope, subject, tpm_window) for scope, subject, _ in tpms],
        tpm_limits=[n for _, _, n in tpms],
        pending_keys=pending_inits.keys(user_id, company_id),
        pending_limits=pending_limits,
        used_prefix=pending_inits.used_key(company_id, ""),
        member=jti,
        now=at.wall_now,
        expires_at=expires_at,
        fetch_key=catalog_cache.version_key(company_id) if cache is not None else None,
    )
    try:
        gated = await store.init_gate(gate)
    except Exception:
        log.exception("init's counters unavailable")
        raise StoreUnavailable() from None
    if gated.verdict == "rate":
        scope, _, per_minute = rates[gated.index]
        raise rate_limits.refusal(scope, per_minute, rate_window)
    if gated.verdict == "tpm":
        scope, _, per_minute = tpms[gated.index]
        raise tpm.refusal(scope, per_minute, tpm_window)
    if gated.verdict == "pending":
        scope, limit = pending_inits.SCOPES[gated.index], pending_limits[gated.index]
        raise pending_inits.refusal(scope, limit, gated.frees_at, at.wall_now)
    return catalog_cache.lookup_of(cache, gated.fetched)
