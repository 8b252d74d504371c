"""Usage checkpoints: the edge's running tally of a live stream, kept in the store.

If an edge process dies mid-stream its webhook never comes; the control plane's
sweeper then settles the hold from the last checkpoint (DESIGN §5). While a stream
runs its edge rewrites the checkpoint every `CHECKPOINT_EVERY_SECONDS` (a heartbeat,
whether or not tokens flow) and at every `CHECKPOINT_EVERY_TOKENS` output tokens,
so at most that much usage is unbilled when a process is killed. Each write bumps
``beat``: a checkpoint that stops changing for `silent_after` seconds belongs to a
dead (or badly stalled) edge, and the sweeper settles it then instead of waiting
for the hold's deadline (issue 11.5). When the stream ends the edge writes a last
checkpoint with ``ended`` set: its report is on its way through the outbox, so the
sweeper leaves that hold to the report, for `ended_silent_after` and for as long as
the report waits in the outbox; past that, the edge died before enqueueing it, and
the hold is settled from this checkpoint, which carries what the report would bill.

A checkpoint carries the usage the edge's report would bill (`Meter.billing`),
its cache and reasoning parts included (DESIGN §11 "Prices"), so that the sweeper
prices a dead edge's stream as the report would have: a cache read at its own
rate, not the input's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

CHECKPOINT_EVERY_TOKENS = 64
CHECKPOINT_EVERY_SECONDS = 2.0
# Heartbeats a stream may miss (a slow store write, a busy event loop) before its
# edge counts as gone.
SILENT_AFTER_BEATS = 3
# How long a checkpoint outlives its hold's deadline (the edge's TTL on each write):
# past that, a hold with no checkpoint may have had a stream whose checkpoint expired
# (`control_plane.reports_wait`).
KEPT_PAST_DEADLINE_SECONDS = 3600


def checkpoint_key(reservation_id: str) -> str:
    return f"ckpt:{reservation_id}"


# The least margin the silence limit keeps past its missed heartbeats, whatever the
# resume grace: the default grace's. A grace of 0 means no resume (a client that
# leaves has its backend cancelled at once), not an edge or a store that may pause
# for less; with it as the margin, a 6 s pause settled a live stream and revoked it.
SILENCE_MARGIN_SECONDS = 10.0


def silent_after(resume_grace_seconds: float) -> float:
    """Seconds a running stream's checkpoint may stay unchanged before the sweeper
    settles it: a few missed heartbeats, plus the resume grace as a margin, never
    less than `SILENCE_MARGIN_SECONDS` (with the defaults 3 x 2 s + 10 s = 16 s)."""
    margin = max(resume_grace_seconds, SILENCE_MARGIN_SECONDS)
    return SILENT_AFTER_BEATS * CHECKPOINT_EVERY_SECONDS + margin


# How much longer than `silent_after` an ended checkpoint waits for its report. An
# honest edge enqueues the report within its last sends (`LLMGW_SLOW_CLIENT_TIMEOUT_
# SECONDS`, 10 s) and the end's own budget (`EventStream.finish_timeout`, 10 s); one
# killed in between leaves the ended checkpoint alone in the store.
ENDED_MARGIN_SECONDS = 60.0


def ended_silent_after(resume_grace_seconds: float) -> float:
    """Seconds an ended checkpoint may stay unchanged, its report in no outbox,
    before the sweeper settles it from it (76 s with the defaults)."""
    return silent_after(resume_grace_seconds) + ENDED_MARGIN_SECONDS


@dataclass(frozen=True, slots=True)
class UsageCheckpoint:
    jti: str
    reservation_id: str
    input_tokens: int
    output_tokens: int
    updated_at: str  # ISO 8601 UTC
    beat: int = 0  # bumped by every write: the sign of life the sweeper watches
    ended: bool = False  # the stream is over; its report is in the edge's outbox
    # The fallback of the chain that serves (issue 16.2); None: the grant's own model.
    model: str | None = None
    # Parts of the input and output above, as the backend reported them (DESIGN §11
    # "Prices"); 0 while only an estimate is known.
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def marker(self) -> tuple[int, str, int]:
        """What changes with every write (the timestamp alone may repeat)."""
        return (self.beat, self.updated_at, self.output_tokens)

    def dumps(self) -> bytes:
        # orjson writes a dataclass's fields in order, the same bytes as
        # `orjson.dumps(asdict(self))` at a tenth of the CPU (0.6 µs against 5.5 µs;
        # every stream writes three or more).
        return orjson.dumps(self)

    @classmethod
    def loads(cls, raw: bytes) -> UsageCheckpoint:
        """Raise ValueError when `raw` is not a checkpoint (its parts: `_parts`)."""
        try:
            doc = orjson.loads(raw)
            input_tokens, output_tokens = int(doc["input_tokens"]), int(doc["output_tokens"])
            cached, write, reasoning = _parts(doc, input_tokens, output_tokens)
            return cls(
                jti=str(doc["jti"]),
                reservation_id=str(doc["reservation_id"]),
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                updated_at=str(doc["updated_at"]),
                # Absent in checkpoints written before heartbeats (a rolling upgrade).
                beat=int(doc.get("beat", 0)),
                ended=doc.get("ended", False) is True,
                model=str(doc["model"]) if doc.get("model") else None,
                cached_input_tokens=cached,
                cache_write_tokens=write,
                reasoning_tokens=reasoning,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError("not a usage checkpoint") from exc


def _parts(doc: dict[str, Any], input_tokens: int, output_tokens: int) -> tuple[int, int, int]:
    """(cached, cache write, reasoning): 0 when absent (an older edge's checkpoint,
    in a rolling deploy) or not a count. A split that exceeds its whole proves
    nothing and is dropped, its totals billed at the plain rates: the webhook path
    refuses such a report outright, but refusing here would release the hold for
    nothing, and settling it raw would make `usage_cost_micro` refuse on every
    sweep, holding up the holds queued behind it."""
    cached = _count(doc.get("cached_input_tokens"))
    write = _count(doc.get("cache_write_tokens"))
    reasoning = _count(doc.get("reasoning_tokens"))
    if cached + write > input_tokens:
        cached = write = 0
    return cached, write, reasoning if reasoning <= output_tokens else 0


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
