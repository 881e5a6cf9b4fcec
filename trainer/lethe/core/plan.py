"""Erasure plans: which shards and slices an erasure touches, and what it will cost.

A plan never holds a subject id or a record id: only keyed hashes (HMAC under the
model's secret key, see ``lethe.core.hashing.keyed_hash``). The patch step finds
rows to drop by hashing each row's record id with that key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lethe.core.manifest import Generation
from lethe.core.sizing import (  # re-exported: their home is lethe.core.sizing
    expected_shards_touched as expected_shards_touched,
)
from lethe.core.sizing import ideal_speedup as ideal_speedup


@dataclass(frozen=True)
class ErasureRequest:
    """One person's (or one list's) request. ``uid`` names its certificate."""

    uid: str
    subjects: tuple[str, ...] = ()
    records: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.uid:
            raise ValueError("request uid: must not be empty")
        if not self.subjects and not self.records:
            raise ValueError(f"request {self.uid}: names no subject and no record")


ERASED, NOTHING_HELD = "Erased", "NothingHeld"


@dataclass
class RequestPlan:
    uid: str
    subject_hashes: list[str]  # every subject the request named, held or not
    record_hashes: list[str]  # the records this request resolved to
    shards: list[int]
    requested_record_hashes: list[str] = field(default_factory=list)  # named by record id
    subjects_unmatched: int = 0  # named subjects of whom no record was held
    records_unmatched: int = 0  # named record ids that were not held

    @property
    def outcome(self) -> str:
        """NothingHeld is its own outcome: the model held none of what was named."""
        return ERASED if self.record_hashes else NOTHING_HELD

    @property
    def nothing_to_erase(self) -> bool:
        return not self.record_hashes

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "subject_hashes": self.subject_hashes,
            "record_hashes": self.record_hashes,
            "shards": self.shards,
            "requested_record_hashes": self.requested_record_hashes,
            "subjects_unmatched": self.subjects_unmatched,
            "records_unmatched": self.records_unmatched,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RequestPlan:
        return cls(
            d["uid"],
            d["subject_hashes"],
            d["record_hashes"],
            d["shards"],
            list(d.get("requested_record_hashes", [])),
            int(d.get("subjects_unmatched", 0)),
            int(d.get("records_unmatched", 0)),
        )


@dataclass
class ShardPlan:
    shard: int
    first_slice: int
    records: int  # training records erased from this shard

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "first_slice": self.first_slice, "records": self.records}


BASIS_EXTRAPOLATED = "extrapolated from the shards' training rate"
BASIS_MEASURED = "measured"


@dataclass
class CostEstimate:
    """Seconds of the retrain and of a full retrain (one monolithic model on all the
    data), each with the fixed start-up of its runs; ``full_basis`` says where the
    full retrain's seconds come from. Work (rows seen by the optimiser, 'record-epochs')
    is information only: a speed-up is always seconds against seconds."""

    retrain_work: float
    full_work: float
    retrain_seconds: float
    full_seconds: float
    full_basis: str = BASIS_EXTRAPOLATED
    run_overhead_seconds: float = 0.0  # the fixed start-up each retrain run pays
    # the JSON of a plan written before seconds-only accounting, re-emitted as written
    # so that certificates issued from it still verify
    legacy_json: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def legacy(self) -> bool:
        return self.legacy_json is not None

    @property
    def speedup(self) -> float | None:
        """Estimated full retrain seconds / estimated retrain seconds."""
        return self.full_seconds / self.retrain_seconds if self.retrain_seconds > 0 else None

    def to_json(self) -> dict[str, Any]:
        if self.legacy_json is not None:
            return dict(self.legacy_json)
        return {
            "retrain_seconds": self.retrain_seconds,
            "full_seconds": self.full_seconds,
            "full_basis": self.full_basis,
            "speedup": self.speedup,
            "run_overhead_seconds": self.run_overhead_seconds,
            "retrain_work": self.retrain_work,
            "full_work": self.full_work,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CostEstimate:
        # values as stored, uncoerced: a certificate re-derives its estimate from the
        # stored plan, and 200 and 200.0 are different JSON
        est = cls(
            d.get("retrain_work", 0.0),
            d.get("full_work", 0.0),
            d["retrain_seconds"],
            d["full_seconds"],
            d.get("full_basis", BASIS_EXTRAPOLATED),
            d.get("run_overhead_seconds", 0.0),
        )
        if "full_basis" not in d:  # older plans: their "speedup" was a ratio of work
            est.legacy_json = dict(d)
        return est


@dataclass
class ErasurePlan:
    batch_id: str
    model: str
    key_id: str  # which HMAC key hashed the ids (never the key itself)
    base_generation: int
    requested_at: float
    requests: list[RequestPlan]
    shards: list[ShardPlan]
    test_records: int
    estimate: CostEstimate
    record_hashes: list[str] = field(default_factory=list)  # union over requests
    # keyed hashes of the URIs of erased file-backed records (None: no file column)
    file_hashes: list[str] | None = None

    @property
    def affected_shards(self) -> list[int]:
        return [s.shard for s in self.shards]

    @property
    def records_erased(self) -> int:
        return sum(s.records for s in self.shards) + self.test_records

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "model": self.model,
            "key_id": self.key_id,
            "base_generation": self.base_generation,
            "requested_at": self.requested_at,
            "requests": [r.to_json() for r in self.requests],
            "shards": [s.to_json() for s in self.shards],
            "test_records": self.test_records,
            "estimate": self.estimate.to_json(),
            "record_hashes": self.record_hashes,
            "file_hashes": self.file_hashes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ErasurePlan:
        return cls(
            batch_id=d["batch_id"],
            model=d["model"],
            key_id=d["key_id"],
            base_generation=int(d["base_generation"]),
            requested_at=float(d["requested_at"]),
            requests=[RequestPlan.from_json(r) for r in d["requests"]],
            shards=[ShardPlan(**s) for s in d["shards"]],
            test_records=int(d["test_records"]),
            estimate=CostEstimate.from_json(d["estimate"]),
            record_hashes=list(d.get("record_hashes", [])),
            file_hashes=d.get("file_hashes"),
        )


def slice_work(rows_per_slice: list[int], epochs_per_slice: float, start: int) -> float:
    """Rows the optimiser sees when training slices start..R-1 (slice r sees 0..r)."""
    cumulative = 0
    work = 0.0
    for r, n in enumerate(rows_per_slice):
        cumulative += n
        if r >= start:
            work += cumulative * epochs_per_slice
    return work


def run_overhead(gen: Generation) -> float:
    """The fixed start-up of one run: the least any shard run paid (runs that queued
    for a free slot paid more)."""
    return min((s.overhead_seconds for s in gen.shards), default=0.0)


def full_retrain(gen: Generation) -> tuple[float, float, str]:
    """A full retrain of ``gen``'s training data: (training seconds, the run's
    start-up seconds, basis). A measured monolithic run, scaled linearly to the rows
    held now, is the basis when there is one; otherwise the shards' recorded training
    rate applied to the whole data's work (small shards train at another rate, so
    this can be far off)."""
    cfg = gen.config
    rows = gen.training_rows
    m = gen.monolithic
    if m is not None:
        overhead = m.overhead_seconds if m.overhead_seconds is not None else run_overhead(gen)
        basis = (
            BASIS_MEASURED
            if m.rows == rows
            else f"{BASIS_MEASURED} on {m.rows:,} rows, scaled to {rows:,}"
        )
        return m.train_seconds * rows / m.rows, overhead, basis
    eps = cfg.trainer.epochs_per_slice(cfg.slices)
    work = 0.0
    seconds = 0.0
    for shard in gen.shards:
        work += slice_work([s.data.rows for s in shard.slices], eps, 0)
        seconds += shard.train_seconds
    rate = seconds / work if work else 0.0
    return rows * cfg.trainer.epochs * rate, run_overhead(gen), BASIS_EXTRAPOLATED


def estimate_cost(gen: Generation, first_slices: dict[int, int]) -> CostEstimate:
    """Seconds to retrain the affected shards from their first affected slice, against
    a full retrain (``full_retrain``). Seconds are what a bill charges: training at
    the shard's recorded rate plus the fixed start-up of a run (measured when the
    shards were trained), once per shard run and once for the full retrain."""
    cfg = gen.config
    eps = cfg.trainer.epochs_per_slice(cfg.slices)
    retrain_work = 0.0
    retrain_seconds = 0.0
    for k, first in first_slices.items():
        shard = gen.shards[k]
        rows = [s.data.rows for s in shard.slices]
        whole = slice_work(rows, eps, 0)
        part = slice_work(rows, eps, first)
        retrain_work += part
        retrain_seconds += shard.train_seconds * (part / whole if whole else 0.0)
    overhead = run_overhead(gen)
    full_train, full_overhead, basis = full_retrain(gen)
    return CostEstimate(  # floats throughout (epochs may be an int): see from_json
        float(retrain_work),
        float(gen.training_rows * cfg.trainer.epochs),
        float(retrain_seconds + overhead * len(first_slices)),
        float(full_train + full_overhead),
        basis,
        float(overhead),
    )


def one_request_estimate(gen: Generation) -> CostEstimate | None:
    """The expected cost of erasing one person: they sit in one shard and one slice,
    each in proportion to its rows. None until the shards' training times are known."""
    total = gen.training_rows
    if total == 0 or not any(s.train_seconds > 0 for s in gen.shards):
        return None
    out = estimate_cost(gen, {})  # the full retrain's side
    eps = gen.config.trainer.epochs_per_slice(gen.config.slices)
    for shard in gen.shards:
        rows = [s.data.rows for s in shard.slices]
        whole = slice_work(rows, eps, 0)
        for r, n in enumerate(rows):
            if n and whole:
                part = slice_work(rows, eps, r)
                out.retrain_work += part * n / total
                out.retrain_seconds += shard.train_seconds * part / whole * n / total
    out.retrain_seconds += out.run_overhead_seconds  # one shard run, whoever it is
    return out


def parse_id_lines(text: str, source: str) -> list[str]:
    """Ids one per line (subjects files, Secrets); blank lines and '#' comments skipped.
    Errors name the line, never the id."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if any(c.isspace() or not c.isprintable() for c in s):
            raise ValueError(
                f"{source}, line {n}: an id must be one token without spaces or control characters"
            )
        out.append(s)
    if not out:
        raise ValueError(f"{source}: names no subject")
    return out
