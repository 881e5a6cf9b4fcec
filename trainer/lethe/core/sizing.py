"""Choosing S (shards) and R (slices): what erasures will cost, before training.

The SISA paper's analysis (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021)
plus the two fixed costs it leaves out and that dominate small models: every
retrain run's start-up (Ray Train's is ~8 s) and each erasure's own steps.

- A shard holds 1/S of the rows and trains in 1/S of the full training time (the
  slice schedule gives every shard about e epochs' worth of work).
- A person's records share one slice (``lethe.core.hashing.slice_of``), uniformly
  at random; the retrain starts at the earliest affected slice. One request in a
  shard retrains (2R+1)/(3R) of that shard's training on average.
- K requests in one batch touch S(1-(1-1/S)^K) shards on average.

Seconds here are run-seconds, what a bill charges: shards retrained side by side
finish sooner on the clock but cost the same. For one request (one shard) the two
agree. Accuracy is not modelled: smaller shards usually cost accuracy.

Plain Python: no network, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

DAY = 86_400.0
DEFAULT_RUN_OVERHEAD = 8.0  # a Ray Train run that does nothing took 7.5-8 s (README benchmark)
DEFAULT_MIN_ROWS_PER_SHARD = 1_000
DEFAULT_MAX_CHECKPOINTS = 256
DEFAULT_TOLERANCE = 0.10  # fewer shards win when within this much of the cheapest
SHARD_OPTIONS = tuple(2**i for i in range(11))  # 1 .. 1024
SLICE_OPTIONS = (1, 2, 4, 8, 16)

ACCURACY_NOTE = (
    "Accuracy is not modelled: smaller shards usually cost accuracy (each constituent "
    "sees less data). Train the shape you pick and compare its test accuracy with a "
    "monolithic model's before relying on it."
)


def expected_shards_touched(shards: int, requests: float) -> float:
    """SISA paper: K requests touch S*(1-(1-1/S)^K) shards on average."""
    return shards * (1.0 - (1.0 - 1.0 / shards) ** requests)


def ideal_speedup(shards: int, slices: int) -> float:
    """SISA paper: one request costs (2R+1)/(3R) of one shard's training, so
    S*3R/(2R+1) times less than a full retrain, with no fixed costs at all."""
    return shards * 3.0 * slices / (2.0 * slices + 1.0)


def _slice_terms(slices: int) -> list[tuple[float, float]]:
    """Per slice j: its share of a shard's training (slice j trains on j+1 slices'
    rows) and the chance that one request sits after it (slice > j)."""
    total = slices * (slices + 1) / 2.0
    return [((j + 1) / total, (slices - 1 - j) / slices) for j in range(slices)]


def retrain_fraction(slices: int, requests_in_shard: int = 1) -> float:
    """Expected share of one shard's training that ``requests_in_shard`` requests in
    it retrain: slice j is retrained unless every request sits after it.
    One request: (2R+1)/(3R)."""
    if requests_in_shard <= 0:
        return 0.0
    return sum(w * (1.0 - after**requests_in_shard) for w, after in _slice_terms(slices))


def full_retrain_seconds(full_train_seconds: float, run_overhead_seconds: float = 0.0) -> float:
    """A full retrain is one run: all the training plus one run's start-up."""
    return full_train_seconds + run_overhead_seconds


def expected_batch_seconds(
    shards: int,
    slices: int,
    requests: int,
    full_train_seconds: float,
    run_overhead_seconds: float = 0.0,
    erasure_overhead_seconds: float = 0.0,
) -> float:
    """Expected run-seconds of one erasure batch of ``requests`` requests.

    Requests fall into shards binomially; averaged over that, slice j of a shard is
    retrained with probability 1-(1-p(1-a_j))^K (p=1/S, a_j: chance a request sits
    after slice j), which is exact for the model above, not an approximation."""
    if requests <= 0:
        return 0.0
    p = 1.0 / shards
    train = full_train_seconds * sum(
        w * (1.0 - (1.0 - p * (1.0 - after)) ** requests) for w, after in _slice_terms(slices)
    )
    runs = expected_shards_touched(shards, requests)
    return erasure_overhead_seconds + train + run_overhead_seconds * runs


def expected_speedup(
    shards: int,
    slices: int,
    requests: int,
    full_train_seconds: float,
    run_overhead_seconds: float = 0.0,
    erasure_overhead_seconds: float = 0.0,
) -> float:
    """Full retrain seconds / expected erasure seconds, for one batch. With no fixed
    costs and one request this is the paper's S*3R/(2R+1)."""
    batch = expected_batch_seconds(
        shards,
        slices,
        requests,
        full_train_seconds,
        run_overhead_seconds,
        erasure_overhead_seconds,
    )
    full = full_retrain_seconds(full_train_seconds, run_overhead_seconds)
    return full / batch if batch > 0 else math.inf


def daily_seconds(
    shards: int,
    slices: int,
    requests_per_day: float,
    batch_window_seconds: float,
    full_train_seconds: float,
    run_overhead_seconds: float = 0.0,
    erasure_overhead_seconds: float = 0.0,
) -> float:
    """Expected run-seconds a day of erasures. Without a batch window every request is
    its own batch; with one, requests arrive at random (Poisson) and each window
    that caught any is one batch (the binomial terms become exponentials)."""
    if requests_per_day <= 0:
        return 0.0
    if batch_window_seconds <= 0:
        return requests_per_day * expected_batch_seconds(
            shards,
            slices,
            1,
            full_train_seconds,
            run_overhead_seconds,
            erasure_overhead_seconds,
        )
    windows = DAY / batch_window_seconds
    per_window = requests_per_day / windows
    p = 1.0 / shards
    train = full_train_seconds * sum(
        w * -math.expm1(-per_window * p * (1.0 - after)) for w, after in _slice_terms(slices)
    )
    runs = shards * -math.expm1(-per_window * p)
    batches = -math.expm1(-per_window)
    return windows * (train + run_overhead_seconds * runs + erasure_overhead_seconds * batches)


@dataclass
class Candidate:
    shards: int
    slices: int
    rows_per_shard: int
    checkpoints: int  # S x R model copies stored
    erasure_seconds: float  # one request, expected
    speedup: float  # full retrain seconds / erasure_seconds
    seconds_per_day: float  # erasures at the given load, expected
    speedup_per_day: float | None  # the monolithic model's seconds a day / these
    reason: str = ""
    recommended: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Recommendation:
    rows: int
    full_train_seconds: float
    full_retrain_seconds: float
    requests_per_day: float
    batch_window_seconds: float
    run_overhead_seconds: float
    erasure_overhead_seconds: float
    requests_per_batch: float  # expected, given that a batch happens
    candidates: list[Candidate]  # ranked: the recommendation first
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = [c.to_json() for c in self.candidates]
        d["recommended"] = self.best.to_json()
        return d


def evaluate(
    shards: int,
    slices: int,
    rows: int,
    full_train_seconds: float,
    requests_per_day: float,
    batch_window_seconds: float = 0.0,
    overhead_seconds: float = DEFAULT_RUN_OVERHEAD,
    erasure_overhead_seconds: float = 0.0,
    shards_train_seconds: float | None = None,
) -> Candidate:
    """One shape at the given load; ``speedup_per_day`` is against S=1, R=1.
    ``shards_train_seconds``: what its S shards' training takes together, where it was
    measured (small shards often train slower per row than one model); otherwise
    ``full_train_seconds``."""

    def daily(s: int, r: int, train: float) -> float:
        return daily_seconds(
            s,
            r,
            requests_per_day,
            batch_window_seconds,
            train,
            overhead_seconds,
            erasure_overhead_seconds,
        )

    train = shards_train_seconds or full_train_seconds
    one = expected_batch_seconds(
        shards, slices, 1, train, overhead_seconds, erasure_overhead_seconds
    )
    day = daily(shards, slices, train)
    full = full_retrain_seconds(full_train_seconds, overhead_seconds)
    return Candidate(
        shards=shards,
        slices=slices,
        rows_per_shard=rows // shards,
        checkpoints=shards * slices,
        erasure_seconds=one,
        speedup=full / one if one > 0 else math.inf,
        seconds_per_day=day,
        speedup_per_day=daily(1, 1, full_train_seconds) / day if day > 0 else None,
    )


def recommend(
    rows: int,
    full_train_seconds: float,
    requests_per_day: float,
    batch_window_seconds: float = 0.0,
    overhead_seconds: float = DEFAULT_RUN_OVERHEAD,
    erasure_overhead_seconds: float = 0.0,
    min_rows_per_shard: int = DEFAULT_MIN_ROWS_PER_SHARD,
    max_checkpoints: int = DEFAULT_MAX_CHECKPOINTS,
    shard_options: tuple[int, ...] = SHARD_OPTIONS,
    slice_options: tuple[int, ...] = SLICE_OPTIONS,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Recommendation:
    """Rank (S, R) by expected erasure seconds a day; recommend the fewest shards (then
    slices) within ``tolerance`` of the cheapest, because shards cost accuracy and
    checkpoints cost storage, and a small gain is not worth either.

    S=1 (the monolithic model) is always a candidate; no other S leaves a shard
    fewer than ``min_rows_per_shard`` rows, and no R a slice without a row."""
    if rows <= 0 or full_train_seconds <= 0:
        raise ValueError("rows and full training seconds must be positive")
    if requests_per_day < 0 or batch_window_seconds < 0:
        raise ValueError("requests a day and the batch window must not be negative")
    if overhead_seconds < 0 or erasure_overhead_seconds < 0:
        raise ValueError("overheads must not be negative")

    def shape(s: int, r: int) -> Candidate:
        return evaluate(
            s,
            r,
            rows,
            full_train_seconds,
            requests_per_day,
            batch_window_seconds,
            overhead_seconds,
            erasure_overhead_seconds,
        )

    out: list[Candidate] = []
    for s in sorted({1, *shard_options}):
        per_shard = rows // s
        if s > 1 and per_shard < min_rows_per_shard:
            continue
        for r in sorted(set(slice_options)):
            if r > max(per_shard, 1) or (s * r > max_checkpoints and (s, r) != (1, 1)):
                continue
            out.append(shape(s, r))
    cheapest = min(out, key=lambda c: c.seconds_per_day)
    limit = cheapest.seconds_per_day * (1 + tolerance)
    good_enough = [c for c in out if c.seconds_per_day <= limit]
    pick = min(good_enough, key=lambda c: (c.shards, c.slices))
    pick.recommended = True
    pick.reason = (
        "cheapest" if pick is cheapest else f"fewest shards within {tolerance:.0%} of cheapest"
    )
    for c in out:
        if c is not pick:
            c.reason = _reason(c, pick)
    ranked = [pick, *sorted((c for c in out if c is not pick), key=_rank)]
    windows = DAY / batch_window_seconds if batch_window_seconds > 0 else 0.0
    per_window = requests_per_day / windows if windows else 1.0
    per_batch = per_window / -math.expm1(-per_window) if windows and per_window > 0 else 1.0
    notes = [ACCURACY_NOTE]
    if pick.shards == 1 and len(out) > 1:
        notes.append(
            "Sharding does not pay here: the fixed cost of a retrain run (or batches that "
            "touch every shard) outweighs what smaller shards save."
        )
    notes.append(
        "Seconds are run-seconds (what a bill charges), assuming training time in "
        "proportion to rows; shards retrained side by side finish sooner."
    )
    return Recommendation(
        rows=rows,
        full_train_seconds=full_train_seconds,
        full_retrain_seconds=full_retrain_seconds(full_train_seconds, overhead_seconds),
        requests_per_day=requests_per_day,
        batch_window_seconds=batch_window_seconds,
        run_overhead_seconds=overhead_seconds,
        erasure_overhead_seconds=erasure_overhead_seconds,
        requests_per_batch=per_batch,
        candidates=ranked,
        notes=notes,
    )


def _rank(c: Candidate) -> tuple[float, int, int]:
    return (c.seconds_per_day, c.shards, c.slices)


def _reason(c: Candidate, pick: Candidate) -> str:
    """Against the recommendation, in a few words."""
    if pick.seconds_per_day <= 0:
        return "no erasures expected"
    more = c.seconds_per_day / pick.seconds_per_day - 1.0
    if (c.shards, c.slices) == (1, 1):
        return f"monolithic, {more:+.0%} a day"
    if more < 0 and c.shards > pick.shards:
        return f"{more:+.0%} a day, {c.shards / pick.shards:g}x the shards"
    if more < 0:
        return f"{more:+.0%} a day, {c.checkpoints} checkpoints"
    return f"{more:+.0%} a day"
