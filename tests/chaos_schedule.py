"""What a seeded chaos run does, decided before it runs (pure): when each service is
killed and for how long it stays down, and what each client's turns are. The same
seed always gives the same plan, printed with any failure so that it can be run
again (`tests/test_chaos_money.py`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

# How a client plays one chat turn (`tests/chaos_clients.py`).
BEHAVIOURS = {
    "complete": 5,  # EventSource read to its `complete`
    "leave": 2,  # reads a few chunks, then hangs up for good
    "reconnect": 3,  # reads a few chunks, hangs up, resumes with Last-Event-ID
    "replay": 2,  # reads to the end and replays the usage webhook (twin, then inflated)
    "abandon": 1,  # init only, never streams
    "completions": 2,  # POST /v1/chat/completions, to [DONE]
    "completions_leave": 1,  # POST /v1/chat/completions, hangs up mid-way
    "upstream_error": 1,  # the backend fails mid-stream
    "no_usage": 1,  # the backend reports no usage: the edge counts
}


@dataclass(frozen=True, slots=True)
class Fault:
    at: float  # seconds after the load started
    service: str  # "edge", "cp" or "both"
    down_for: float  # seconds between the SIGKILL and the restart

    def __str__(self) -> str:
        return f"t={self.at:.2f}s SIGKILL {self.service}, restart after {self.down_for:.2f}s"


@dataclass(frozen=True, slots=True)
class TurnPlan:
    behaviour: str
    tokens: int  # the backend's answer length
    delay_ms: int  # between tokens
    max_tokens: int  # the init's (the hold's size)
    cut_after: int  # chunks read before hanging up (leave, reconnect, error_after)
    pause: float  # reconnect: seconds away before resuming


def faults(seed: int, window: float) -> list[Fault]:
    """The round's fault: the edge, the control plane or both killed at a random
    moment of the load. One a round: a restart takes seconds on a busy machine, and
    each kill of the control plane restarts the sweeper's silence watch (16 s)."""
    rng = random.Random(f"faults-{seed}")
    kind = rng.choice(["edge", "cp", "both"])
    return [Fault(round(rng.uniform(0.4, window - 1.0), 2), kind, round(rng.uniform(0, 0.8), 2))]


def turns(seed: int, worker: int, count: int) -> list[TurnPlan]:
    """`count` turns for one client (more than it will have time for)."""
    rng = random.Random(f"turns-{seed}-{worker}")
    names, weights = list(BEHAVIOURS), list(BEHAVIOURS.values())
    plans = []
    for _ in range(count):
        tokens = rng.randint(20, 140)
        plans.append(
            TurnPlan(
                behaviour=rng.choices(names, weights)[0],
                tokens=tokens,
                delay_ms=rng.randint(4, 20),
                max_tokens=rng.choice([tokens, tokens + 50, 400]),
                cut_after=rng.randint(1, tokens // 2),
                pause=round(rng.uniform(0, 1.0), 2),
            )
        )
    return plans
