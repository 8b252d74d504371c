"""Issue 14's target table in `make bench`'s report: judged from the measured phases
(pure: bench/turn_report.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench import turn_report as tr
from bench.report import Cell, PathStats


def stats(ttft: tuple[float, float, float], per_s: float, cpu: tuple[float, ...] = ()) -> PathStats:
    return PathStats(100, 0, ttft, per_s, 3500, 0.1, 0.1, cpu)


def cpu(cp: float, edge: float = 0.0, mock: float = 0.0) -> tuple[float, ...]:
    # generator, mock, edge, control plane, rest of the machine
    return (0.1, mock, edge, cp, 0.2)


def results(
    cp_init_s: float,
    cp_turn_s: float,
    edge_s: float,
    inits_per_s: float,
    *,
    spread_per_s: float = 475.0,
    spread_stream_p95: float = 3.0,
) -> tr.TurnResults:
    inits = [
        tr.InitStats(c, 100, 0, (5.0, 8.0, 20.0), inits_per_s, cpu(cp_init_s)) for c in (1, 32, 128)
    ]
    direct = stats((1.0, 2.0, 3.0), 500.0, cpu(0.0, mock=0.2))
    turns = [
        tr.TurnStats(
            c,
            d,
            100,
            0,
            100,
            (4.0, 5.0, 6.0),
            (9.0, 12.0, 14.0),
            (2.0, spread_stream_p95 if spread else 3.0, 4.0),
            (10.0, 20.0, 30.0),
            spread_per_s if spread else 475.0,
            cpu(cp_turn_s, edge_s),
            direct,
            spread,
        )
        for c, d, spread in ((1, 0, False), (200, 20, False), (200, 20, True))
    ]
    return tr.TurnResults(inits, turns, None)


CELLS = [
    Cell(1, 0, stats((1.0, 2.0, 3.0), 500.0), stats((1.5, 3.0, 4.0), 400.0, cpu(0.05, 0.3))),
    Cell(200, 20, stats((10.0, 20.0, 30.0), 200.0), stats((12.0, 60.0, 80.0), 190.0, cpu(0.05))),
]


def verdicts(r: tr.TurnResults) -> dict[str, bool | None]:
    return {t.what.split(" (")[0].split(",")[0]: t.met for t in tr.targets(CELLS, r)}


def test_every_target_met_when_the_numbers_are_within() -> None:
    # 1 ms CPU per init, 2 + 1.5 ms per turn: 3.5 ms ÷ 2 ms of backend = 1.75.
    got = verdicts(results(0.1, 0.2, 0.15, 450.0))
    assert len(got) == 9 and all(got.values()), got


@pytest.mark.parametrize(
    ("what", "case"),
    [
        ("control-plane CPU per `/v1/chat/init`", results(1.5, 0.2, 0.15, 450.0)),
        ("gateway CPU per chat turn", results(0.1, 0.5, 0.15, 450.0)),
        ("gateway CPU per turn ÷ the backend's own CPU per stream", results(0.1, 0.5, 0.15, 450)),
        ("`/v1/chat/init` rate on 2 CPUs", results(0.1, 0.2, 0.15, 60.0)),
    ],
)
def test_a_target_missed_is_not_met(what: str, case: tr.TurnResults) -> None:
    assert verdicts(case)[what] is False


def test_nothing_measured_is_not_judged() -> None:
    items = tr.targets([], tr.TurnResults([], [], None))
    assert len(items) == 9
    assert all(t.met is None and t.label == "not measured" for t in items)
    assert all("nan" not in t.measured for t in items)


def test_a_slow_tail_at_c200_is_not_met() -> None:
    slow = Cell(200, 20, CELLS[1].direct, stats((12.0, 90.0, 99.0), 190.0, cpu(0.05)))
    items = tr.targets([CELLS[0], slow], results(0.1, 0.2, 0.15, 450.0))
    assert [t.met for t in items if t.what.startswith("TTFT p95")] == [False]


def test_the_table_has_a_row_per_target() -> None:
    rows = tr.target_rows(tr.targets(CELLS, results(0.1, 0.2, 0.15, 450.0)))
    assert len(rows) == 2 + 9
    assert all(row.endswith("| **met** |") for row in rows[2:])


def test_at_c200_the_worse_arrival_pattern_decides() -> None:
    # All clients starting together keep up (0.95 of direct); with the starts spread
    # the turns fall behind, or the stream's first token does: not met either way.
    behind = results(0.1, 0.2, 0.15, 450.0, spread_per_s=400.0)
    late = results(0.1, 0.2, 0.15, 450.0, spread_stream_p95=60.0)
    assert verdicts(behind)["whole turns/s at c = 200"] is False
    assert verdicts(late)["TTFT p95 over direct at c = 200"] is False
    measured = {t.what: t.measured for t in tr.targets(CELLS, behind)}
    row = measured["whole turns/s at c = 200, 20 ms between tokens, vs direct streams/s"]
    assert "0.95 with all clients starting together" in row and "0.80 with starts spread" in row


def test_the_spread_phase_does_not_change_the_cpu_verdicts() -> None:
    # A cheap spread phase would pull a median of three below the line; the CPU rows
    # are judged on the c = 1 and c = 200 phases alone, the spread one only listed.
    r = results(0.1, 0.5, 0.15, 450.0)
    cheap = replace(r.turns[2], cpu=cpu(0.01, 0.01))
    case = tr.TurnResults(r.inits, [r.turns[0], r.turns[1], cheap], None)
    got = verdicts(case)
    assert got["gateway CPU per chat turn"] is False
    assert got["gateway CPU per turn ÷ the backend's own CPU per stream"] is False
    row = next(
        t.measured for t in tr.targets(CELLS, case) if t.what.startswith("gateway CPU per c")
    )
    assert "c=200, spread/20 ms" in row
