"""How many of an origin's connections one company may hold at once (pure).

An edge holds at most `LLMGW_EDGE_MAX_CONNECTIONS_PER_ORIGIN` connections to one
backend origin, and the platform's origins (its OpenAI, its Anthropic) are shared by
every company streaming through the edge. A stream holds its connection for its whole
life, and a held connection cannot be taken back without cutting the stream. So when
the cap is at or below a company's stream cap, one company inside its own limits could
hold every connection to a shared origin for as long as its streams ran, and every
other company's streams to it waited the connect timeout and failed (504).

The rule: one company holds at most `percent` of the cap (at least 1), whatever else
is free. What is left is always there for the others, so a newcomer's stream starts at
once rather than waiting on streams it cannot end. Round-robin among waiters would not
do: it orders who gets the next connection to come back, but with long streams none
comes back within the connect timeout. Letting a lone company use the whole cap would
not either: by the time another company arrives, the lone one holds it all. The price
is that a company alone on an edge gets `percent` of the cap, not all of it; an
operator whose backend serves one company sets the percentage to 100.
"""

from __future__ import annotations

DEFAULT_PERCENT = 75


def company_share(cap: int, percent: int = DEFAULT_PERCENT) -> int:
    """Connections one company may hold to one origin of `cap` connections."""
    if cap < 1 or not 1 <= percent <= 100:
        raise ValueError("cap must be at least 1 and percent between 1 and 100")
    return max(1, cap * percent // 100)
