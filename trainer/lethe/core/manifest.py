"""Generation manifests: immutable snapshots of a model's data and checkpoints.

A generation lists, per shard and slice, the data file, its lineage hash and the
checkpoint trained on it (or none yet), plus the shard index files, the test set,
which shards are quarantined (and by which erasure batches), and the test accuracy
of the ensemble. Every change makes a new generation; see ``lethe.generations``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from lethe.core.config import ModelConfig
from lethe.core.lineage import shard_lineages


@dataclass(frozen=True)
class FileRef:
    key: str
    sha256: str
    rows: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "rows": self.rows}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileRef:
        return cls(key=d["key"], sha256=d["sha256"], rows=int(d["rows"]))


@dataclass
class SliceState:
    data: FileRef
    lineage: str
    checkpoint: str | None = None  # key of the checkpoint for this lineage, once trained

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data.to_json(), "lineage": self.lineage, "checkpoint": self.checkpoint}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SliceState:
        return cls(FileRef.from_json(d["data"]), d["lineage"], d.get("checkpoint"))


@dataclass
class ShardState:
    index: FileRef
    slices: list[SliceState]
    train_seconds: float = 0.0  # in-worker training time of the last full run (cost estimates)
    # wall time of that run minus its training: Ray's fixed start-up, which every run
    # pays, a full retrain included (cost estimates)
    overhead_seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(s.data.rows for s in self.slices)

    @property
    def trained(self) -> bool:
        return all(s.checkpoint is not None for s in self.slices)

    @property
    def final_checkpoint(self) -> str | None:
        return self.slices[-1].checkpoint if self.slices else None

    def first_untrained_slice(self) -> int | None:
        for r, s in enumerate(self.slices):
            if s.checkpoint is None:
                return r
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index.to_json(),
            "slices": [s.to_json() for s in self.slices],
            "train_seconds": self.train_seconds,
            "overhead_seconds": self.overhead_seconds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardState:
        return cls(
            FileRef.from_json(d["index"]),
            [SliceState.from_json(s) for s in d["slices"]],
            float(d.get("train_seconds", 0.0)),
            float(d.get("overhead_seconds", 0.0)),
        )


@dataclass(frozen=True)
class Monolithic:
    """A measured full retrain: one model (S=1, R=1) trained on all the training data
    with the same trainer. Cost estimates scale it to the rows a generation holds
    instead of extrapolating from the shards, whose small runs train at another rate."""

    train_seconds: float  # in-worker training, as ShardState.train_seconds
    rows: int  # training rows it was measured on
    overhead_seconds: float | None = None  # the run's fixed start-up, if known
    measured_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.train_seconds > 0 or self.rows <= 0:
            raise ValueError("a monolithic measurement needs positive seconds and rows")
        if self.overhead_seconds is not None and self.overhead_seconds < 0:
            raise ValueError("a monolithic measurement's overhead must not be negative")

    def to_json(self) -> dict[str, Any]:
        return {
            "train_seconds": self.train_seconds,
            "rows": self.rows,
            "overhead_seconds": self.overhead_seconds,
            "measured_at": self.measured_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Monolithic:
        overhead = d.get("overhead_seconds")
        return cls(
            float(d["train_seconds"]),
            int(d["rows"]),
            None if overhead is None else float(overhead),
            float(d.get("measured_at", 0.0)),
        )


@dataclass
class Generation:
    number: int
    parent: int | None
    config: ModelConfig
    shards: list[ShardState]
    test: FileRef
    quarantine: dict[int, list[str]] = field(default_factory=dict)  # shard -> batch ids holding it
    accuracy: float | None = None
    reason: str = ""
    created: float = field(default_factory=time.time)
    monolithic: Monolithic | None = None  # carried to successors (a deep copy)

    @property
    def training_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def quarantined_shards(self) -> list[int]:
        return sorted(k for k, holders in self.quarantine.items() if holders)

    def live_shards(self) -> list[int]:
        """Constituents that serve predictions: trained and not quarantined."""
        q = set(self.quarantined_shards)
        return [k for k, s in enumerate(self.shards) if k not in q and s.trained]

    def referenced_keys(self) -> set[str]:
        keys = {self.test.key}
        for s in self.shards:
            keys.add(s.index.key)
            for sl in s.slices:
                keys.add(sl.data.key)
                if sl.checkpoint:
                    keys.add(sl.checkpoint)
        return keys

    def successor(self, reason: str) -> Generation:
        """A mutable copy to build the next generation from."""
        nxt = copy.deepcopy(self)
        nxt.parent = self.number
        nxt.number = self.number + 1
        nxt.reason = reason
        nxt.created = time.time()
        return nxt

    def set_shard_data(self, k: int, index: FileRef, slice_files: list[FileRef]) -> None:
        """Replace a shard's data, keeping every checkpoint whose lineage still holds."""
        old = self.shards[k]
        lineages = shard_lineages(
            self.config.trainer_fingerprint(), k, [f.sha256 for f in slice_files]
        )
        slices = []
        for r, (f, lin) in enumerate(zip(slice_files, lineages, strict=True)):
            kept = (
                old.slices[r].checkpoint
                if r < len(old.slices) and old.slices[r].lineage == lin
                else None
            )
            slices.append(SliceState(f, lin, kept))
        self.shards[k] = ShardState(index, slices, old.train_seconds, old.overhead_seconds)

    def to_json(self) -> dict[str, Any]:
        out = {
            "generation": self.number,
            "parent": self.parent,
            "created": self.created,
            "reason": self.reason,
            "config": self.config.to_json(),
            "shards": [s.to_json() for s in self.shards],
            "test": self.test.to_json(),
            "quarantine": {str(k): v for k, v in sorted(self.quarantine.items()) if v},
            "accuracy": self.accuracy,
        }
        if self.monolithic is not None:  # absent otherwise: older manifests stay as written
            out["monolithic"] = self.monolithic.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Generation:
        return cls(
            number=int(d["generation"]),
            parent=d.get("parent"),
            config=ModelConfig.from_json(d["config"]),
            shards=[ShardState.from_json(s) for s in d["shards"]],
            test=FileRef.from_json(d["test"]),
            quarantine={int(k): list(v) for k, v in d.get("quarantine", {}).items()},
            accuracy=d.get("accuracy"),
            reason=d.get("reason", ""),
            created=float(d.get("created", 0.0)),
            monolithic=Monolithic.from_json(d["monolithic"]) if d.get("monolithic") else None,
        )
