"""Money arithmetic: integer micro-credits, exact decimals, one rounding rule.

A price of ``p`` credits per million tokens is ``p`` micro-credits per token. A
stream costs ``ceil(input_tokens * input_per_mtok + output_tokens * output_per_mtok)``
micro-credits (DESIGN §9 "Money"): the one rounding is a ceiling, applied once to
the exact decimal sum, so we never undercharge by a rounding and never round twice.

Cache-aware prices (DESIGN §11 "Prices"): `input_tokens` is the total input, of
which `cached_input_tokens` were read from the vendor's cache and
`cache_write_tokens` written to it, each at its own rate; the rest at the input
rate. Reasoning tokens are part of `output_tokens` and cost what output costs. Still
one ceiling, on the whole sum. A hold cannot know how the input will split, so it
prices every input token at the dearest of the three input rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Context, Decimal
from typing import Any

from shared import input_size
from shared.catalog import Price
from shared.decimals import parse_decimal

MICRO = 1_000_000
# The input estimate lives with the other input sizing (`shared.input_size`); it is
# re-exported here because the hold is priced from it.
estimate_input_tokens = input_size.estimate_input_tokens
MAX_CREDITS = Decimal(10**12)  # one amount; balances are bigints of micro-credits
# The context every price is computed in. Python's default (28 significant digits)
# rounds each product and sum: a price has up to 22 digits (10^9, 12 places), a count
# up to 10 (2^31), so a sum past 10^16 micro-credits lost its fraction and the ceiling
# came out 1 below the formula's (DESIGN §9: exact). 64 digits hold any sum of four
# such products exactly.
EXACT = Context(prec=64)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """What a stream used. Callers keep ``cached_input_tokens + cache_write_tokens <=
    input_tokens`` and ``reasoning_tokens <= output_tokens`` (`split_problem`)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


def split_problem(usage: TokenUsage) -> str | None:
    """What is wrong with a usage's split, or None: a part larger than its whole
    would price tokens that were never used (or, at a cheap cache rate, make the
    uncached remainder negative)."""
    counts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
    )
    if any(n < 0 for n in counts):
        return "token counts must not be negative"
    if usage.cached_input_tokens + usage.cache_write_tokens > usage.input_tokens:
        return "cached_input_tokens + cache_write_tokens must not exceed input_tokens"
    if usage.reasoning_tokens > usage.output_tokens:
        return "reasoning_tokens must not exceed output_tokens"
    return None


def cost_micro(input_tokens: int, output_tokens: int, price: Price) -> int:
    return usage_cost_micro(TokenUsage(input_tokens, output_tokens), price)


def usage_cost_micro(usage: TokenUsage, price: Price) -> int:
    """The exact price of `usage`, one ceiling. ValueError on an impossible split."""
    problem = split_problem(usage)
    if problem is not None:
        raise ValueError(problem)
    uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
    terms = (
        (uncached, price.input_per_mtok),
        (usage.cached_input_tokens, price.cached_input_rate),
        (usage.cache_write_tokens, price.cache_write_rate),
        (usage.output_tokens, price.output_per_mtok),
    )
    return _ceiling(terms)


def _ceiling(terms: tuple[tuple[int, Decimal], ...]) -> int:
    """ceil(sum of count * rate), every step in `EXACT`."""
    total = Decimal(0)
    for count, rate in terms:
        total = EXACT.add(total, EXACT.multiply(Decimal(count), rate))
    return math.ceil(total)


def hold_cost_micro(input_tokens: int, output_tokens: int, price: Price) -> int:
    """The hold for an input estimate and `max_tokens`: every input token at the
    dearest input rate (a cache write can cost more than a plain input token)."""
    worst = max(price.input_per_mtok, price.cached_input_rate, price.cache_write_rate)
    return _ceiling(((input_tokens, worst), (output_tokens, price.output_per_mtok)))


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
