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

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from control_plane.errors import ModelNotInChain
from control_plane.tables import Reservation
from shared.catalog import ModelSpec, Price
from shared.route_claim import UpstreamRoute


@dataclass(frozen=True, slots=True)
class ChainEntry:
    model: ModelSpec
    input_estimate: int
    max_tokens: int  # at most the stream's: a fallback may allow less output
    hold_micro: int
    route: UpstreamRoute | None  # the company's own key for it, sealed into the token

    def record(self) -> dict[str, Any]:
        """What the reservation keeps of it (`Reservation.fallbacks`)."""
        return {
            "model": self.model.id,
            "provider": self.model.provider,
            "price_input_per_mtok": str(self.model.price.input_per_mtok),
            "price_output_per_mtok": str(self.model.price.output_per_mtok),
        }


def served_price(reservation: Reservation, model: str) -> tuple[str, Price] | None:
    """The provider and price of `model` if the reservation may be settled at it: its
    own model (None: keep the reservation's) or one of its chain; ModelNotInChain
    otherwise."""
    if not model or model == reservation.model:
        return None
    for entry in reservation.fallbacks or []:
        if entry.get("model") == model:
            return entry["provider"], Price(
                Decimal(entry["price_input_per_mtok"]), Decimal(entry["price_output_per_mtok"])
            )
    raise ModelNotInChain(
        f"{model[:200]!r} is neither this reservation's model nor one of its fallbacks."
    )
