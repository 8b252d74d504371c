"""Reservation ids that carry their init's instant on the store's clock (`time_ids`),
which the tokens-per-minute correction reads on whichever replica settles."""

from __future__ import annotations

import uuid

import pytest

from control_plane import time_ids, tpm
from control_plane.tables import new_id


@pytest.mark.parametrize("at", [0.0, 1_800_000_000.0, 1_800_000_059.999, 1_800_000_060.0004])
def test_a_time_id_carries_its_instant_to_the_millisecond(at: float) -> None:
    made = time_ids.time_id(at)
    assert len(made) == 32
    assert (uuid.UUID(made).version, uuid.UUID(made).variant) == (7, uuid.RFC_4122)
    carried = time_ids.instant_of(made)
    assert carried is not None and at - 0.001 < carried <= at
    # The minute the window is named by is the instant's, to its last millisecond.
    assert carried // 60 == at // 60
    assert tpm.counted_at(made) == carried


def test_ids_that_carry_no_instant_are_told_apart() -> None:
    for other in [new_id(), uuid.uuid4().hex, "", "7" * 32, "0" * 12 + "7" + "0" * 19, "x" * 32]:
        assert time_ids.instant_of(other) is None, other
    assert tpm.counted_at(new_id()) is None


def test_time_ids_are_random_past_their_millisecond() -> None:
    made = {time_ids.time_id(1_800_000_000.0) for _ in range(100)}
    assert len(made) == 100
    with pytest.raises(ValueError):
        time_ids.time_id(-1.0)
