"""Choosing S and R (lethe.core.sizing) and ``lethe recommend``: plain Python, no servers."""

from __future__ import annotations

import json
import math

import pytest

from lethe.cli import fmt_seconds, fmt_usd, fmt_x, main
from lethe.core.sizing import (
    daily_seconds,
    expected_batch_seconds,
    expected_shards_touched,
    expected_speedup,
    ideal_speedup,
    recommend,
    retrain_fraction,
)


def test_one_request_retrains_the_papers_share_of_a_shard() -> None:
    # Bourtoule et al.: a request in a random slice retrains (2R+1)/(3R) of a shard
    assert retrain_fraction(1) == pytest.approx(1.0)
    assert retrain_fraction(4) == pytest.approx(9 / 12)
    assert retrain_fraction(8) == pytest.approx(17 / 24)
    # the same by brute force: start at slice r, retrain slices r..R-1 (slice j: j+1 parts)
    R = 5
    brute = sum(sum(j + 1 for j in range(r, R)) for r in range(R)) / R / (R * (R + 1) / 2)
    assert retrain_fraction(R) == pytest.approx(brute)
    # two requests in one shard: the earlier of two uniform slices, by enumeration
    pairs = [min(a, b) for a in range(R) for b in range(R)]
    brute2 = sum(sum(j + 1 for j in range(r, R)) for r in pairs) / len(pairs) / (R * (R + 1) / 2)
    assert retrain_fraction(R, 2) == pytest.approx(brute2)
    assert retrain_fraction(R, 0) == 0.0


def test_without_fixed_costs_one_request_gives_the_ideal_speedup() -> None:
    for s, r in ((1, 1), (4, 1), (16, 8), (8, 4)):
        assert expected_speedup(s, r, 1, 100.0) == pytest.approx(ideal_speedup(s, r))
    assert ideal_speedup(16, 8) == pytest.approx(16 * 24 / 17)
    # 100 s of training, S=4, R=1: a quarter of it, plus one run's 8 s start-up
    assert expected_batch_seconds(4, 1, 1, 100.0, 8.0) == pytest.approx(25.0 + 8.0)
    assert expected_batch_seconds(4, 1, 1, 100.0, 8.0, 2.0) == pytest.approx(35.0)
    assert expected_batch_seconds(4, 4, 0, 100.0, 8.0, 2.0) == 0.0


def test_a_batch_touches_the_papers_number_of_shards() -> None:
    assert expected_shards_touched(8, 8) == pytest.approx(8 * (1 - (7 / 8) ** 8))
    assert math.isclose(expected_shards_touched(1, 5), 1.0)
    # R=1: each touched shard retrains whole, so seconds follow the shards touched
    got = expected_batch_seconds(8, 1, 8, 80.0, 5.0)
    assert got == pytest.approx(expected_shards_touched(8, 8) * (10.0 + 5.0))
    # with slices, by enumeration over where 3 requests fall (S=2, R=2)
    S, R, T = 2, 2, 60.0
    total = 0.0
    cells = [(k, r) for k in range(S) for r in range(R)]
    for a in cells:
        for b in cells:
            for c in cells:
                for k in range(S):
                    firsts = [r for kk, r in (a, b, c) if kk == k]
                    if firsts:
                        part = sum(j + 1 for j in range(min(firsts), R)) / (R * (R + 1) / 2)
                        total += part * T / S
    assert expected_batch_seconds(S, R, 3, T) == pytest.approx(total / len(cells) ** 3)


def test_costs_move_the_right_way() -> None:
    T, OV = 600.0, 8.0
    # more requests in a batch cost more, never more than all shards whole
    seconds = [expected_batch_seconds(8, 4, k, T, OV) for k in range(1, 60)]
    assert all(a < b for a, b in zip(seconds, seconds[1:], strict=False))
    assert seconds[-1] < T + 8 * OV
    # more shards make one request cheaper without fixed costs, more slices too
    assert all(
        expected_batch_seconds(s, 4, 1, T) > expected_batch_seconds(2 * s, 4, 1, T)
        for s in (1, 2, 4, 8)
    )
    assert all(
        expected_batch_seconds(8, r, 1, T) > expected_batch_seconds(8, r + 1, 1, T)
        for r in range(1, 10)
    )
    # batching never costs more a day than erasing each request alone
    for s, r in ((1, 1), (8, 4), (64, 2)):
        alone = daily_seconds(s, r, 200, 0, T, OV)
        assert alone == pytest.approx(200 * expected_batch_seconds(s, r, 1, T, OV))
        assert daily_seconds(s, r, 200, 3600, T, OV) <= alone
        # a tiny window is the same as none
        assert daily_seconds(s, r, 200, 1e-3, T, OV) == pytest.approx(alone, rel=1e-4)
    assert daily_seconds(8, 4, 0, 3600, T, OV) == 0.0


def test_recommend_respects_the_guards() -> None:
    rec = recommend(
        50_000, 300.0, 100, overhead_seconds=8.0, min_rows_per_shard=2_000, max_checkpoints=64
    )
    for c in rec.candidates:
        assert c.shards == 1 or c.rows_per_shard >= 2_000
        assert c.checkpoints <= 64 or (c.shards, c.slices) == (1, 1)
    assert max(c.shards for c in rec.candidates) == 16  # 50,000 / 32 < 2,000
    assert rec.best.recommended and sum(c.recommended for c in rec.candidates) == 1
    assert any("accuracy" in n.lower() for n in rec.notes)
    # the monolithic model is always there to compare with
    assert any((c.shards, c.slices) == (1, 1) for c in rec.candidates)
    with pytest.raises(ValueError):
        recommend(0, 300.0, 10)
    with pytest.raises(ValueError):
        recommend(1_000, 300.0, -1)


def test_recommend_prefers_fewer_shards_when_the_gain_is_small() -> None:
    # the benchmark's model: 120,000 rows, 147 s of training, Ray's 8 s start-up
    rec = recommend(120_000, 147.0, 100, overhead_seconds=8.0)
    best = rec.best
    cheapest = min(rec.candidates, key=lambda c: c.seconds_per_day)
    assert best.seconds_per_day <= cheapest.seconds_per_day * 1.10
    # no candidate with fewer shards is within 10% of the cheapest
    assert not any(
        c.shards < best.shards and c.seconds_per_day <= cheapest.seconds_per_day * 1.10
        for c in rec.candidates
    )
    assert best.shards > 1 and 10 < best.speedup < ideal_speedup(best.shards, best.slices)
    # a run start-up that dwarfs training: sharding saves (relatively) nothing
    huge = recommend(120_000, 147.0, 100, overhead_seconds=1e6)
    assert (huge.best.shards, huge.best.slices) == (1, 1)
    assert any("does not pay" in n for n in huge.notes)
    # batches so large that every batch touches every shard: S=1 again
    busy = recommend(120_000, 147.0, 100_000, batch_window_seconds=3600, overhead_seconds=8.0)
    assert busy.best.shards == 1
    assert busy.requests_per_batch == pytest.approx(100_000 / 24, rel=1e-3)
    # no requests at all: nothing to save, nothing to shard
    idle = recommend(120_000, 147.0, 0)
    assert (idle.best.shards, idle.best.slices) == (1, 1)


def test_recommended_shards_fall_as_fixed_costs_rise() -> None:
    picks = [
        recommend(1_000_000, 3_600.0, 50, overhead_seconds=o).best.shards
        for o in (0.0, 8.0, 60.0, 600.0, 36_000.0)
    ]
    assert all(a >= b for a, b in zip(picks, picks[1:], strict=False)), picks
    assert picks[0] > picks[-1] == 1


def test_numbers_for_people() -> None:
    assert fmt_seconds(0.0001667628069200009) == "0.00 s"
    assert fmt_seconds(12.345) == "12.3 s"
    assert fmt_seconds(252) == "4.2 min"
    assert fmt_seconds(3 * 3600) == "3.0 h"
    assert fmt_seconds(None) == "-"
    assert fmt_x(4.123) == "4.1x" and fmt_x(None) == "-" and fmt_x(math.inf) == "-"
    assert fmt_usd(0.000166) == "$0.00017" and fmt_usd(12.5) == "$12.50"


def test_cli_recommend_prints_a_table_or_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["recommend", "--rows", "120000", "--train-seconds", "147", "--requests-per-day", "100"]
    assert main(args) == 0
    shown = capsys.readouterr()
    assert "Recommended: 64 shard(s) x 1 slice(s)" in shown.out
    assert "accuracy" in shown.out and "15.1x" in shown.out
    assert not any(len(w) > 8 and w[0].isdigit() and "." in w for w in shown.out.split())
    assert shown.err == ""
    assert main([*args, "--json"]) == 0
    shown = capsys.readouterr()
    out = json.loads(shown.out.strip().splitlines()[-1])
    assert out["recommended"]["shards"] == 64 and len(out["candidates"]) > 8
    assert out["full_retrain_seconds"] == pytest.approx(155.0)
    # what is missing is said on stderr, exit 2
    assert main(["recommend", "--requests-per-day", "5"]) == 2
    assert "--train-seconds" in capsys.readouterr().err
