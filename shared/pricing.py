"""Money arithmetic: integer micro-credits, exact decimals, one rounding rule.

A price of ``p`` credits per million tokens is ``p`` micro-credits per token. A
stream costs ``ceil(input_tokens * input_per_mtok + output_tokens * output_per_mtok)``
micro-credits (DESIGN §9 "Money"): the one rounding is a ceiling, applied once to
the exact decimal sum, so we never undercharge by a rounding and never round twice.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Any

from shared import input_size
from shared.catalog import Price

MICRO = 1_000_000
# The input estimate lives with the other input sizing (`shared.input_size`); it is
# re-exported here because the hold is priced from it.
estimate_input_tokens = input_size.estimate_input_tokens


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
    more than six decimals so no amount is silently rounded."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("amount must be a decimal string or an integer")
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation as exc:
        raise ValueError("amount must be a decimal number") from exc
    if not amount.is_finite():
        raise ValueError("amount must be a finite number")
    micro = amount * MICRO
    if micro != micro.to_integral_value():
        raise ValueError("amount has more than six decimal places")
    if abs(micro) > 10**18:
        raise ValueError("amount is too large")
    return int(micro)
