"""Key pools (issue 16.1): a provider with several API keys, and what each key is doing.

Pure core, shared by the edge (which picks keys and records what the backend said of
them) and the control plane (which shows a company's admins each key's state).

- A key is named by `key_id`: a short hash prefix, so an id can be shown, logged and
  used in store keys without revealing the key (48 bits of a SHA-256 of a
  high-entropy secret say nothing usable about it).
- A key's state lives in the shared store under `state_key(scope, provider, id)`,
  where `scope` is ``platform`` for the edge's own keys and ``co:<company id>`` for a
  company's: one company's 429s and 401s never touch another's keys (nor the
  platform's), whatever ids they share.
- The stored value is ``bad <strikes> <until>`` (the backend refused the key:
  401/403; ``bad`` alone as an older release wrote it) or the Unix time until which
  the key rests after a 429 (its `Retry-After`). A resting key's value outlives its
  rest by `REMEMBER_SECONDS`, so "least recently rate-limited first" still knows it
  was limited.
- A bad key is skipped for a while, then tried again like any usable key: each
  refusal in a row doubles the wait (`bad_value`), from 5 minutes to a day. A key
  skipped a whole day on its first refusal stayed out of rotation that long after a
  vendor's passing fault (an authentication blip), the pool's load on the others;
  a key really revoked costs one refused attempt at each retry, about nine in its
  first day.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

PLATFORM = "platform"
BAD = b"bad"  # as an older release marked a key: bad for the whole of its TTL
# A key refused once is skipped this long, then tried again (it may have been
# restored, or the refusal was the vendor's passing fault); each refusal in a row
# doubles it, up to BAD_MAX_SECONDS. The strikes are remembered that long after the
# last skip ends.
BAD_FIRST_SECONDS = 300.0
BAD_MAX_SECONDS = 24 * 3600.0
REMEMBER_SECONDS = 3600
# A 429 without a usable Retry-After rests the key this long.
DEFAULT_REST_SECONDS = 10.0
MAX_REST_SECONDS = 3600.0
MAX_KEYS = 20
# A request every key of the platform's pool answered 429 rests those keys only when
# another company's request met the same within this long (`stream_edge.key_pool`).
CORROBORATE_SECONDS = 60.0


def key_id(key: str) -> str:
    """The id shown for a key (never the key): 12 hex digits of a SHA-256."""
    return hashlib.sha256(b"llm-gateway key id\x00" + key.encode("utf-8")).hexdigest()[:12]


def company_scope(company_id: str) -> str:
    return f"co:{company_id}"


def state_key(scope: str, provider: str, kid: str) -> str:
    return f"keypool:{scope}:{provider}:{kid}"


def limited_key(scope: str, provider: str) -> str:
    """Where the last company whose request every key answered 429 is kept (a key id is
    12 hex digits: no state key has this name)."""
    return f"keypool:{scope}:{provider}:all-limited"


def rests_pool(last_company: bytes | None, company_id: str) -> bool:
    """Whether a request every key of the platform's shared pool answered 429 rests
    those keys (pure; a company's own pool rests as on any 429, only its own streams
    use it): only when another company's request also met every key refusing it
    (`last_company`, within `CORROBORATE_SECONDS`). Load is everyone's, while a
    request too large for the vendor's per-minute limit is one company's, refused
    alike by every key, and would otherwise rest the pool for every tenant."""
    return last_company is not None and last_company != company_id.encode("utf-8")


@dataclass(frozen=True, slots=True)
class KeyState:
    """`state`: ``ok``, ``resting`` (until `rest_until`) or ``bad``. `rest_until`
    also orders usable keys: the end of their last rest (0: never rate limited that
    we remember), so the least recently limited comes first."""

    state: str
    rest_until: float = 0.0
    strikes: int = 0  # refusals in a row (`bad_value`), remembered past the skip

    def public(self, kid: str) -> dict[str, object]:
        doc: dict[str, object] = {"id": kid, "state": self.state}
        if self.state == "resting":
            doc["resting_until"] = int(self.rest_until)
        return doc


OK = KeyState("ok")


def parse_state(raw: bytes | None, now: float) -> KeyState:
    """A stored value as a state; anything unreadable counts as ok (never locks a key)."""
    if raw is None:
        return OK
    if raw == BAD:
        return KeyState("bad", strikes=1)
    if raw.startswith(BAD + b" "):
        try:
            _, count, until_text = raw.split(b" ")
            strikes, until = int(count), float(until_text)
        except ValueError:
            return OK
        return KeyState("bad" if until > now else "ok", strikes=max(strikes, 1))
    try:
        until = float(raw)
    except ValueError:
        return OK
    return KeyState("resting" if until > now else "ok", until)


def bad_value(previous: KeyState, now: float) -> tuple[bytes, float]:
    """A key refused once more after `previous`: its stored value and that value's TTL."""
    strikes = previous.strikes + 1
    skip = min(BAD_FIRST_SECONDS * 2 ** min(strikes - 1, 32), BAD_MAX_SECONDS)
    return b"bad %d %r" % (strikes, now + skip), skip + BAD_MAX_SECONDS


def rest_seconds(retry_after: float | None) -> float:
    if retry_after is None or retry_after <= 0:
        return DEFAULT_REST_SECONDS
    return min(retry_after, MAX_REST_SECONDS)


@dataclass(frozen=True, slots=True)
class Pick:
    """The keys to try, in order, and when the first resting one is back (None: none
    rests)."""

    order: tuple[int, ...]
    next_free_at: float | None
    all_bad: bool


def order_keys(states: Sequence[KeyState], now: float, rng: random.Random | None = None) -> Pick:
    """Usable keys (neither resting nor bad), least recently rate-limited first; keys
    never limited come first, shuffled, so streams spread across them."""
    rng = rng or random.Random()
    usable = [i for i, s in enumerate(states) if s.state == "ok"]
    rng.shuffle(usable)
    usable.sort(key=lambda i: states[i].rest_until)  # stable: the shuffle breaks ties
    resting = [s.rest_until for s in states if s.state == "resting"]
    return Pick(
        order=tuple(usable),
        next_free_at=min(resting) if resting else None,
        all_bad=bool(states) and all(s.state == "bad" for s in states),
    )
