"""Usage checkpoints: the edge's running tally of a live stream, kept in the store.

If an edge process dies mid-stream its webhook never comes; the control plane's
sweeper then settles the hold from the last checkpoint (DESIGN §5). The edge writes
one every few seconds and at every 64 output tokens, so at most that much usage is
unbilled when a process is killed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import orjson

CHECKPOINT_EVERY_TOKENS = 64
CHECKPOINT_EVERY_SECONDS = 2.0


def checkpoint_key(reservation_id: str) -> str:
    return f"ckpt:{reservation_id}"


@dataclass(frozen=True, slots=True)
class UsageCheckpoint:
    jti: str
    reservation_id: str
    input_tokens: int
    output_tokens: int
    updated_at: str  # ISO 8601 UTC

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes) -> UsageCheckpoint:
        """Raise ValueError when `raw` is not a checkpoint."""
        try:
            doc = orjson.loads(raw)
            return cls(
                jti=str(doc["jti"]),
                reservation_id=str(doc["reservation_id"]),
                input_tokens=int(doc["input_tokens"]),
                output_tokens=int(doc["output_tokens"]),
                updated_at=str(doc["updated_at"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError("not a usage checkpoint") from exc
