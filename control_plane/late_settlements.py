"""What a usage webhook's settlement implies outside the database, once per
settlement that commits, whether its answer reached the edge or not.

A settlement past the database's bound (`db_threads`,
``LLMGW_DATABASE_TIMEOUT_SECONDS``) answers 503 ``database_unavailable`` while its
transaction may still commit; the edge's redelivery then finds it settled and is a
duplicate, which counts nothing. Before, the route alone did what follows the commit,
so such a settlement was never counted in ``llmgw_cp_credits_charged_total`` /
``llmgw_cp_credits_released_total`` (DESIGN §8: the ledger had the money, the
counters never did), and its tokens-per-minute estimate was never corrected (the user
over-counted until the window ended: 429 ``tpm_exceeded``). The route does it for a
settlement answered in time (`count`, `after_commit`); `late` does the same for one that committed
after its 503 (the database job's ``late`` callback, on the loop).
"""

from __future__ import annotations

import logging

from control_plane import pending_inits, tpm
from control_plane.background import in_background
from control_plane.deps import Deps
from control_plane.settlement import Outcome
from control_plane.usage_events import parse_time
from shared.webhooks import UsageEvent

log = logging.getLogger("control_plane.late_settlements")


def count(deps: Deps, outcome: Outcome) -> None:
    """A settlement answered in time has committed: count its money (the route,
    before anything it awaits)."""
    deps.metrics.settled(outcome.charged_micro, outcome.released_micro)


def observe_lag(deps: Deps, event: UsageEvent) -> None:
    """A settlement's ``llmgw_cp_reconciliation_lag_seconds``: its stream's end to
    now, when its commit is known (once per settlement, as ``settled``). Both on the
    store's clock (`Deps.clock`; the edge dates ``ended_at`` by it): on the hosts'
    clocks, an edge 10 minutes behind made each of its settlements look 600 s late
    (LLMGWReconciliationLagHigh), and one ahead hid the lag (0.0)."""
    ended = parse_time(event.ended_at) if event.ended_at else None
    if ended is not None:
        deps.metrics.reconciliation_lag.observe(max(deps.clock() - ended.timestamp(), 0.0))


async def after_commit(deps: Deps, event: UsageEvent, outcome: Outcome) -> None:
    """The store's part of a delivery answered in time, settled or duplicate (the
    route, through `background.finish`): the hold has ended, so it is no longer a
    pending grant (12.6); a settlement's window is corrected."""
    if event.user_id:
        await pending_inits.forget(deps.store, event.user_id, event.company_id, event.jti)
    if not outcome.duplicate:
        await _correct(deps, event, outcome)


def late(deps: Deps, event: UsageEvent, outcome: Outcome) -> None:
    """`count` and `after_commit` for a settlement that committed after its webhook
    was answered 503 (`webhook_settlement.Late`, on the loop, never a duplicate):
    counted now, the store's part in the background (the hold no longer a pending
    grant, as the redelivery would say, should the edge have given up).

    Counted ``settled`` in ``llmgw_cp_webhooks_total`` too, once: its request was
    counted by the answer it got (503, or ``duplicate`` for a batch's event settled
    again alone) and its redelivery is a ``duplicate``, so without this the settlement
    the ledger has was never counted ``settled`` at all, nor its lag observed."""
    count(deps, outcome)
    deps.metrics.webhooks.labels(outcome="settled").inc()
    observe_lag(deps, event)
    in_background(after_commit(deps, event, outcome), "late-settlement")


async def _correct(deps: Deps, event: UsageEvent, outcome: Outcome) -> None:
    # Best effort: `tpm.correct` logs a store error, never raises it.
    await tpm.correct(
        deps.store,
        tpm.TpmLimits.of(deps.settings),
        user_id=outcome.user_id,
        company_id=event.company_id,
        held_tokens=outcome.held_tokens,
        used_tokens=event.input_tokens + event.output_tokens,
        counted_at=outcome.held_at,
        now=deps.clock(),  # the store's, which its window was named on (`held_at`)
    )
