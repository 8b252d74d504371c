"""Ids that carry the instant they were made at: UUIDv7's layout (RFC 9562), as 32
hex digits like `tables.new_id`'s (UUIDv4) ones.

A reservation's id carries the store-clock instant its init counted its tokens at
(`tpm`): the settlement's correction, on whichever replica, finds the window the
init counted in from the row it already reads, with no column of its own and no
round trip (docs/architecture.md "Tokens per minute on the store's clock"). A
UUIDv4 (an id made before) carries no instant: its version digit is 4, not 7.
"""

from __future__ import annotations

import os
from collections.abc import Callable

_VERSION = 7
_HEX = frozenset("0123456789abcdef")


def time_id(at: float, randbytes: Callable[[int], bytes] = os.urandom) -> str:
    """An id whose first 48 bits are `at` in whole milliseconds; 74 random bits
    follow (a UUIDv4 has 122: still far past guessing)."""
    millis = int(at * 1000)
    if not 0 <= millis < 1 << 48:
        raise ValueError(f"an instant UUIDv7 cannot carry: {at!r}")
    rand = int.from_bytes(randbytes(10), "big")
    rand_a, rand_b = (rand >> 64) & 0xFFF, rand & ((1 << 62) - 1)
    value = millis << 80 | _VERSION << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return f"{value:032x}"


def instant_of(id_: str) -> float | None:
    """The instant `time_id` put in `id_` (whole milliseconds, epoch seconds); None
    for any other id."""
    if len(id_) != 32 or not _HEX.issuperset(id_):
        return None
    if id_[12] != str(_VERSION) or id_[16] not in "89ab":
        return None
    return int(id_[:12], 16) / 1000
