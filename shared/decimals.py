"""The one parser for decimal numbers that come from outside: credit amounts in
admin requests, prices in a company's model overrides and in ``models.yaml``.

`Decimal("1e999999999")` parses, and only the first arithmetic on it raises
`decimal.Overflow` — a 500 far from the input. `parse_decimal` bounds the
magnitude and the number of decimal places before any arithmetic, so every value
it returns can be multiplied and summed with token counts exactly, and every bad
one is a `ValueError` with a sentence for a 4xx answer.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

MAX_TEXT = 64  # characters: no real amount or price is longer


def parse_decimal(value: Any, *, max_abs: Decimal, max_places: int, negative: bool) -> Decimal:
    """`value` (a decimal string or an integer; never a float, which has already
    lost exactness) as a `Decimal` with ``|x| <= max_abs`` and at most `max_places`
    decimal places; `ValueError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a decimal string or an integer")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise ValueError(f"must be at most {MAX_TEXT} characters")
    if isinstance(value, int) and abs(value) > max_abs:  # before Decimal(a huge int)
        raise ValueError(f"must be at most {max_abs} in absolute value")
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise ValueError("must be a decimal number") from None
    if not number.is_finite():
        raise ValueError("must be a finite number")
    if number.is_zero():
        return Decimal(0)  # 0E+999999999 is zero, whatever its exponent says
    # Both checks read the exponent; neither computes with it.
    if number.adjusted() > max_abs.adjusted() or abs(number) > max_abs:
        raise ValueError(f"must be at most {max_abs} in absolute value")
    if number < 0 and not negative:
        raise ValueError("must not be negative")
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if exponent < -max_places and number != number.quantize(Decimal(1).scaleb(-max_places)):
        raise ValueError(f"must have at most {max_places} decimal places")
    return number
