"""A stream's fallback chain at init (issue 16.2), and the served model at settlement.

At init the chain is fixed: the model's `fallbacks` as the company's view resolves
them (`company_llm.chain_of`: only models the company may use, at the terms its keys
allow), less any that cannot take this request (a feature, a content part, the
output budget or the context). The hold covers the most expensive model of the chain,
each priced with its own input estimate (its own image price…). The chain goes into
the signed token (the client cannot change it) and onto the reservation, with each
model's price, so that settlement bills the model that served at its own price —
and refuses a served model outside the chain.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from control_plane.errors import ModelNotInChain, ValidationFailed
from control_plane.ledger import Held
from shared.catalog import ModelSpec, Price
from shared.route_claim import SEALED_ROUTES_MAX_BYTES, UpstreamRoute, sealed_length


@dataclass(frozen=True, slots=True)
class ChainEntry:
    model: ModelSpec
    input_estimate: int
    max_tokens: int  # at most the stream's: a fallback may allow less output
    hold_micro: int
    route: UpstreamRoute | None  # the company's own key for it, sealed into the token

    def record(self) -> dict[str, Any]:
        """What the reservation keeps of it (`Reservation.fallbacks`), its cache rates
        included so a fallback's cached input is billed at its own rates too."""
        price = self.model.price
        record = {
            "model": self.model.id,
            "provider": self.model.provider,
            "price_input_per_mtok": str(price.input_per_mtok),
            "price_output_per_mtok": str(price.output_per_mtok),
        }
        if price.cached_input_per_mtok is not None:
            record["price_cached_input_per_mtok"] = str(price.cached_input_per_mtok)
        if price.cache_write_per_mtok is not None:
            record["price_cache_write_per_mtok"] = str(price.cache_write_per_mtok)
        return record


def served_price(reservation: Held, model: str) -> tuple[str, Price] | None:
    """The provider and price of `model` if the reservation may be settled at it: its
    own model (None: keep the reservation's) or one of its chain; ModelNotInChain
    otherwise."""
    if not model or model == reservation.model:
        return None
    for entry in reservation.fallbacks or []:
        if entry.get("model") == model:
            cached, write = (
                entry.get(f"price_{k}_per_mtok") for k in ("cached_input", "cache_write")
            )
            return entry["provider"], Price(
                Decimal(entry["price_input_per_mtok"]),
                Decimal(entry["price_output_per_mtok"]),
                cached_input_per_mtok=None if cached is None else Decimal(cached),
                cache_write_per_mtok=None if write is None else Decimal(write),
            )
    raise ModelNotInChain(
        f"{model[:200]!r} is neither this reservation's model nor one of its fallbacks."
    )


def sealed_size(routes: Iterable[UpstreamRoute | None]) -> int:
    """What `routes` take sealed in a stream token (`route_claim.sealed_length`)."""
    return sum(sealed_length(r) for r in routes if r is not None)


def check_token_room(
    model: ModelSpec, routes: Iterable[UpstreamRoute | None], field: str = "model"
) -> None:
    """422 (naming `field`) before any write when the routes sealed into a stream
    token of `model` (the company's key pool, once for the model and once for each
    fallback on a provider it keys) exceed `SEALED_ROUTES_MAX_BYTES`: the token would
    pass `STREAM_TOKEN_MAX_BYTES`, and an edge's header cap or the client's URL
    limit (httpx's, 64 KiB) refuse it, every stream of the model failing after its
    hold."""
    sealed = sealed_size(routes)
    if sealed > SEALED_ROUTES_MAX_BYTES:
        raise ValidationFailed(
            field,
            f"{model.id[:200]!r} with its fallbacks would carry {sealed} bytes of the "
            f"company's provider keys in its stream token, at most {SEALED_ROUTES_MAX_BYTES} "
            "fit; an owner can shorten the key pool or the model's fallbacks",
        )
