"""The chat request the control plane stashes at init for the edge to run.

Keyed by the token's `jti` so only the holder of that token can start it; the TTL
outlives the token, and the token's first use deletes it (`Store.admit`): a resume
reads the stream's resume log, never the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from shared.hash_tags import company_tag


def stash_key(company_id: str, jti: str) -> str:
    return f"req:{company_tag(company_id)}:{jti}"


@dataclass(frozen=True, slots=True)
class StashedRequest:
    messages: list[dict[str, Any]]
    # Optional sampling parameters passed through to the backend (temperature, top_p, stop).
    params: dict[str, Any]

    def dumps(self) -> bytes:
        return orjson.dumps({"messages": self.messages, "params": self.params})

    @classmethod
    def loads(cls, raw: bytes) -> StashedRequest:
        doc = orjson.loads(raw)
        return cls(messages=list(doc["messages"]), params=dict(doc.get("params") or {}))
