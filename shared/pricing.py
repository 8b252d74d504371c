"""Money arithmetic: integer micro-credits, exact decimals, one rounding rule.

A price of ``p`` credits per million tokens is ``p`` micro-credits per token. A
stream costs ``ceil(input_tokens * input_per_mtok + output_tokens * output_per_mtok)``
micro-credits (DESIGN §9 "Money"): the one rounding is a ceiling, applied once to
the exact decimal sum, so we never undercharge by a rounding and never round twice.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from shared import input_size
from shared.catalog import Price
from shared.decimals import parse_decimal

MICRO = 1_000_000
# The input estimate lives with the other input sizing (`shared.input_size`); it is
# re-exported here because the hold is priced from it.
estimate_input_tokens = input_size.estimate_input_tokens
MAX_CREDITS = Decimal(10**12)  # one amount; balances are bigints of micro-credits


def cost_micro(input_tokens: int, output_tokens: int, price: Price) -> int:
    exact = input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok
    return math.ceil(exact)


def format_credits(micro: int) -> str:
    """Micro-credits as a decimal string with six places: 2100 -> "0.002100"."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}"


def parse_credits(value: Any) -> int:
    """A credits amount ("10.5", 10, "0.000001") as micro-credits; rejects floats and
    more than six decimal places so no amount is silently rounded, and magnitudes
    past 10^12 credits (`1e999999999` would overflow the arithmetic: a 500)."""
    try:
        amount = parse_decimal(value, max_abs=MAX_CREDITS, max_places=6, negative=True)
    except ValueError as exc:
        raise ValueError(f"amount {exc}") from None
    return int(amount.scaleb(6))
