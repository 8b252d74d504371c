"""Budgets' arithmetic, without I/O (issue 16.3): periods, what fits, thresholds.

A budget caps what one user, one API key or one team may spend (in micro-credits)
per period. Periods are UTC calendar periods: a day from 00:00, a week from Monday
00:00, a month from the 1st 00:00; ``none`` is one period that never resets. Each
(budget, period start) pair has its own ``spent``/``held`` counters, so a new
period starts at zero without any job resetting anything: the first hold of the
period creates its row.

A hold fits a budget when ``spent + held + hold <= amount``: holds count against a
budget as against the balance, so concurrent streams can never overshoot it. A
stream is charged to the period its hold was taken in, even when it ends after
midnight: the money was promised from that period's allowance.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from control_plane.errors import ValidationFailed
from control_plane.validation import NUL, credits_amount, one_of

SCOPES = ("user", "api_key", "team")
PERIODS = ("day", "week", "month", "none")
THRESHOLDS = (80, 100)  # percent of the amount spent: one webhook each, per period
# The start of the one period of a budget without a period (any fixed instant will do).
NO_PERIOD_START = datetime(1970, 1, 1, tzinfo=UTC)
# The longest period (a 31-day month): a period that started longer ago has ended,
# whatever the budget's period is now (an edit may have changed it since).
LONGEST_PERIOD = timedelta(days=31)
ID_MAX = 64


def period_start(period: str, now: datetime) -> datetime:
    """The start of the period that contains `now` (UTC)."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())  # Monday is 0
    if period == "month":
        return day.replace(day=1)
    assert period == "none", period
    return NO_PERIOD_START


def resets_at(period: str, start: datetime) -> datetime | None:
    """When the `period` that contains `start` ends; None for ``none``.

    `start` is usually that period's own start, but not always: a hold settles on
    the counters row it was counted on, whose start belongs to the budget's period
    at the time (`budgets.settle_many`). Once an owner has made a daily budget
    monthly, a threshold event of a hold taken on 31 January asked for the month
    that began on the 31st, a day February does not have: the settlement raised,
    on every redelivery and every sweep, and the stream was never billed. The end
    is taken from the start of the period that contains `start`, a valid date for
    any instant."""
    if period == "none":
        return None
    begin = period_start(period, start)
    if period == "day":
        return begin + timedelta(days=1)
    if period == "week":
        return begin + timedelta(days=7)
    year, month = (begin.year + 1, 1) if begin.month == 12 else (begin.year, begin.month + 1)
    return begin.replace(year=year, month=month)


def fits(amount: int, spent: int, held: int, hold: int) -> bool:
    return spent + held + hold <= amount


def available(amount: int, spent: int, held: int) -> int:
    return max(0, amount - spent - held)


def due(amount: int, spent: int, sent: Collection[int]) -> list[int]:
    """The thresholds (percent of `amount`) that `spent` has reached in its period
    and that no event told yet (`sent`): each one once per period. Reached, not
    crossed by the last charge: an amount lowered under the spend already made (or
    a webhook set after the spend passed a threshold) is told by the next charge,
    where a crossing never happens (the spend starts above both thresholds). A zero
    budget has no thresholds (nothing can be spent from it)."""
    if amount <= 0:
        return []
    return [p for p in THRESHOLDS if p not in sent and p * amount <= spent * 100]


@dataclass(frozen=True, slots=True)
class BudgetInput:
    """A validated budget body; `None` fields were not sent (a PATCH)."""

    scope: str | None = None
    target_id: str | None = None
    amount_micro: int | None = None
    period: str | None = None


FIELDS = ("scope", "target_id", "amount", "period")
PATCHABLE = ("amount", "period")


def _target_id(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= ID_MAX:
        raise ValidationFailed("target_id", f"must be an id of 1-{ID_MAX} characters")
    if NUL in value:
        raise ValidationFailed("target_id", "must not contain NUL")
    return value


def _amount(value: Any) -> int:
    micro = credits_amount(value, "amount")
    if micro < 0:
        raise ValidationFailed("amount", "must not be negative")
    return micro


def parse_budget(doc: dict[str, Any], *, partial: bool) -> BudgetInput:
    """A POST body (every field required) or a PATCH body (`partial`: ``amount``
    and/or ``period``; the scope and the target of a budget never change)."""
    allowed = PATCHABLE if partial else FIELDS
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise ValidationFailed(unknown[0], f"is not a field ({', '.join(allowed)})")
    if partial:
        if not doc:
            raise ValidationFailed("amount", "send amount and/or period")
        return BudgetInput(
            amount_micro=_amount(doc["amount"]) if "amount" in doc else None,
            period=one_of(doc["period"], "period", PERIODS) if "period" in doc else None,
        )
    for name in FIELDS:
        if name not in doc:
            raise ValidationFailed(name, "is required")
    return BudgetInput(
        scope=one_of(doc["scope"], "scope", SCOPES),
        target_id=_target_id(doc["target_id"]),
        amount_micro=_amount(doc["amount"]),
        period=one_of(doc["period"], "period", PERIODS),
    )
