"""Erasure plans: which shards and slices an erasure touches, and what it will cost.

A plan never holds a subject id or a record id: only keyed hashes (HMAC under the
model's secret key, see ``lethe.core.hashing.keyed_hash``). The patch step finds
rows to drop by hashing each row's record id with that key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lethe.core.manifest import Generation


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


@dataclass
class CostEstimate:
    """Work in 'record-epochs' (rows seen by the optimiser), and the seconds and USD
    that the recorded training times of the model imply."""

    retrain_work: float
    full_work: float
    retrain_seconds: float
    full_seconds: float

    @property
    def speedup(self) -> float:
        return self.full_work / self.retrain_work if self.retrain_work else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {
            "retrain_work": self.retrain_work,
            "full_work": self.full_work,
            "retrain_seconds": self.retrain_seconds,
            "full_seconds": self.full_seconds,
            "speedup": self.speedup if self.retrain_work else None,
        }


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
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ErasurePlan:
        e = d["estimate"]
        return cls(
            batch_id=d["batch_id"],
            model=d["model"],
            key_id=d["key_id"],
            base_generation=int(d["base_generation"]),
            requested_at=float(d["requested_at"]),
            requests=[RequestPlan.from_json(r) for r in d["requests"]],
            shards=[ShardPlan(**s) for s in d["shards"]],
            test_records=int(d["test_records"]),
            estimate=CostEstimate(
                e["retrain_work"], e["full_work"], e["retrain_seconds"], e["full_seconds"]
            ),
            record_hashes=list(d.get("record_hashes", [])),
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


def estimate_cost(gen: Generation, first_slices: dict[int, int]) -> CostEstimate:
    """Retrain cost of the affected shards against a full retrain of one monolithic
    model on all data (e epochs), in work units and in seconds.

    Seconds are what a bill charges: training at the model's recorded rate plus the
    fixed start-up of a run (measured when the shards were trained), once per shard
    run for the retrain and once for the full retrain."""
    cfg = gen.config
    eps = cfg.trainer.epochs_per_slice(cfg.slices)
    full_rows = sum(s.rows for s in gen.shards)
    full_work = full_rows * cfg.trainer.epochs
    retrain_work = 0.0
    retrain_seconds = 0.0
    total_sisa_work = 0.0
    total_sisa_seconds = 0.0
    for k, shard in enumerate(gen.shards):
        rows = [s.data.rows for s in shard.slices]
        whole = slice_work(rows, eps, 0)
        total_sisa_work += whole
        total_sisa_seconds += shard.train_seconds
        if k in first_slices:
            part = slice_work(rows, eps, first_slices[k])
            retrain_work += part
            retrain_seconds += shard.train_seconds * (part / whole if whole else 0.0)
    rate = total_sisa_seconds / total_sisa_work if total_sisa_work else 0.0
    # the least any shard run paid: runs that queued for a free slot paid more
    overhead = min((s.overhead_seconds for s in gen.shards), default=0.0)
    return CostEstimate(
        retrain_work,
        full_work,
        retrain_seconds + overhead * len(first_slices),
        full_work * rate + overhead,
    )


def expected_shards_touched(shards: int, requests: int) -> float:
    """SISA paper: K requests touch S*(1-(1-1/S)^K) shards on average."""
    return shards * (1.0 - (1.0 - 1.0 / shards) ** requests)


def ideal_speedup(shards: int, slices: int) -> float:
    """SISA paper: one request costs (2R+1)/(3R) of one shard's training."""
    return shards * 3.0 * slices / (2.0 * slices + 1.0)


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
