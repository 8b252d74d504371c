"""Tokens per minute, per user and per company (issue 16.4, DESIGN §11).

``LLMGW_TPM_PER_USER`` / ``LLMGW_TPM_PER_COMPANY`` (0, the default: off). Fixed
one-minute windows in the store, shared by every control-plane process through
Redis, as `rate_limits` counts inits (same windows, another key), named on the
store's clock (`shared.store_clock`): replicas whose host clocks disagree count a
member in one window.

* At init, before anything is held, the init gate (`init_gate`, one step of the
  store with init's other counters) refuses a caller whose window is already full
  (no hold, no row: the common refusal changes nothing), with `refusal`.
* After the hold, `take` counts its token estimate (the input estimate plus
  ``max_tokens``: the worst case, like the credit hold) in the window of the
  init's instant on the store's clock, which the reservation's id carries
  (`counted_at`); past a limit it takes the tokens back and refuses, and the
  caller releases the hold.
* At settlement, `correct` replaces the estimate by the tokens actually used
  (input + output) in the window the init was counted in (its id's), while that
  window lasts on the store's clock; a settlement after it has ended changes
  nothing (the window is gone).

Refusals are 429 ``tpm_exceeded`` with ``Retry-After``: the seconds until the
window ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from control_plane.errors import StoreUnavailable, TpmExceeded
from control_plane.rate_limits import WINDOW_SECONDS, Window, window_at
from control_plane.settings import ControlPlaneSettings
from control_plane.time_ids import instant_of
from shared.store import CounterStore

log = logging.getLogger("control_plane.tpm")


@dataclass(frozen=True, slots=True)
class TpmLimits:
    per_user: int = 0  # 0: no limit
    per_company: int = 0

    @classmethod
    def of(cls, settings: ControlPlaneSettings) -> TpmLimits:
        return cls(settings.tpm_per_user, settings.tpm_per_company)

    @property
    def on(self) -> bool:
        return self.per_user > 0 or self.per_company > 0

    def scopes(self, user_id: str, company_id: str) -> list[tuple[str, str, int]]:
        pairs = (("user", user_id, self.per_user), ("company", company_id, self.per_company))
        return [(scope, subject, limit) for scope, subject, limit in pairs if limit > 0]


def counted_at(reservation_id: str) -> float | None:
    """The store-clock instant an init counted its tokens at: its reservation's id
    carries it (`time_ids`), for the settling replica, whose clocks may not be the
    minting one's. None: an id made before ids carried it (nothing to correct)."""
    return instant_of(reservation_id)


def tpm_key(scope: str, subject: str, window: Window) -> str:
    return f"tpm:{scope}:{subject}:{window.start}"


def refusal(scope: str, limit: int, window: Window) -> TpmExceeded:
    return TpmExceeded(
        f"Too many tokens for this {scope} ({limit} per minute); retry in {window.retry_after} s.",
        window.retry_after,
    )


def _unavailable() -> StoreUnavailable:
    log.exception("tokens-per-minute counter unavailable")
    return StoreUnavailable()


async def take(
    store: CounterStore,
    limits: TpmLimits,
    *,
    user_id: str,
    company_id: str,
    tokens: int,
    now: float,
) -> None:
    """Count `tokens` in the window of `now`; over a limit, take them back and refuse."""
    window = window_at(now)
    counted: list[str] = []
    try:
        for scope, subject, limit in limits.scopes(user_id, company_id):
            key = tpm_key(scope, subject, window)
            total = await store.add(key, tokens, WINDOW_SECONDS)
            counted.append(key)
            if total > limit:
                for back in counted:
                    await store.add(back, -tokens, WINDOW_SECONDS)
                raise refusal(scope, limit, window)
    except TpmExceeded:
        raise
    except Exception:
        raise _unavailable() from None


async def correct(
    store: CounterStore,
    limits: TpmLimits,
    *,
    user_id: str,
    company_id: str,
    held_tokens: int,
    used_tokens: int,
    counted_at: float | None,
    now: float,
) -> None:
    """Replace a settled stream's estimate by its actual tokens in the window it was
    counted in (`counted_at`, on the store's clock as `now`), if that window is
    still current. Best effort: a store error is logged, never fails the settlement
    (which has committed)."""
    if counted_at is None:
        return
    window = window_at(counted_at)
    delta = used_tokens - held_tokens
    if delta == 0 or now >= window.start + WINDOW_SECONDS:
        return
    try:
        for scope, subject, _ in limits.scopes(user_id, company_id):
            await store.add(tpm_key(scope, subject, window), delta, WINDOW_SECONDS)
    except Exception:
        log.exception("tokens-per-minute correction failed")
