"""A reservation's terms as plain values: what init writes and settlement reads back.

The hot paths move reservations as frozen dataclasses, not SQLModel objects (no
validation, instrumentation or identity map per row). `ReservationTerms` is the part
both sides carry, in the `reservations` table's column order; init's `NewReservation`
and settlement's `HeldRow` add what each of them needs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReservationTerms:
    id: str
    company_id: str
    user_id: str
    jti: str
    session_id: str
    request_id: str
    model: str
    provider: str
    hold_micro: int
    input_estimate: int
    max_tokens: int
    price_input_per_mtok: str
    price_output_per_mtok: str
    price_cached_input_per_mtok: str | None
    price_cache_write_per_mtok: str | None
