"""Which rows an erasure removes, and how a data job that holds no key finds them.

The plan names the erased records only by keyed hashes (HMAC with the model's key), and
that key stays with whoever certifies (the operator, or the CLI). The data work of a
batch (patch, purge) runs in the batch's job on the Ray cluster, which has no key. So
the operator, after planning, writes an **erase order**: for each file that holds
erased rows (the affected shards' index files and the test file, as they are before
the patch), the *positions* of those rows. The job reads the ids at those positions
back into memory (never into S3, a log or a message), checks that it found exactly the
plan's number of records, and erases by the ids. Positions say nothing once the files
they point into are purged, and the order itself is purged with every version when the
data is erased.

Both ways answer one question, :class:`ErasedRows`: which rows of a record-id (or
subject-id) column are erased.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from lethe import dataio
from lethe.core.hashing import sha256_hex
from lethe.core.manifest import FileRef, Generation
from lethe.core.plan import ErasurePlan
from lethe.errors import IntegrityFailure
from lethe.layout import ModelLayout
from lethe.store import NotFound, Store

Column = pa.ChunkedArray | pa.Array


class OrderError(IntegrityFailure, RuntimeError):
    """The erase order is missing or does not match the plan (says which; never an id)."""


class ErasedRows(Protocol):
    def records(self, column: Column) -> np.ndarray:
        """True where the row's record id is erased."""
        ...

    def subjects(self, column: Column) -> np.ndarray:
        """True where the row's subject id is one whose rows are erased."""
        ...


@dataclass(frozen=True)
class HashedIds:
    """Erased rows by keyed hash: the engine holds the model's HMAC key."""

    id_hash: Callable[[str], str]
    record_hashes: frozenset[str]
    subject_hashes: frozenset[str]

    @classmethod
    def of(cls, plan: ErasurePlan, id_hash: Callable[[str], str]) -> HashedIds:
        return cls(
            id_hash,
            frozenset(plan.record_hashes)
            | {h for r in plan.requests for h in r.requested_record_hashes},
            frozenset(h for r in plan.requests for h in r.subject_hashes),
        )

    def records(self, column: Column) -> np.ndarray:
        return dataio.hashed_mask(column, self.id_hash, set(self.record_hashes))

    def subjects(self, column: Column) -> np.ndarray:
        return dataio.hashed_mask(column, self.id_hash, set(self.subject_hashes))


@dataclass(frozen=True, repr=False)
class RawIds:
    """Erased rows by their ids, read back from an erase order; held in memory only
    (``repr`` shows counts, never an id)."""

    record_ids: frozenset[str]
    subject_ids: frozenset[str]

    def __repr__(self) -> str:
        return f"RawIds({len(self.record_ids)} records, {len(self.subject_ids)} subjects)"

    def records(self, column: Column) -> np.ndarray:
        return dataio.isin(column, self.record_ids)

    def subjects(self, column: Column) -> np.ndarray:
        return dataio.isin(column, self.subject_ids)


# -- the erase order -----------------------------------------------------------------
@dataclass(frozen=True)
class FileRows:
    """Rows of one file by position: a shard's index, or the test file (shard None)."""

    ref: FileRef
    rows: tuple[int, ...]
    shard: int | None

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref.to_json(), "rows": list(self.rows), "shard": self.shard}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileRows:
        shard = d.get("shard")
        return cls(
            FileRef.from_json(d["ref"]),
            tuple(int(i) for i in d["rows"]),
            None if shard is None else int(shard),
        )


@dataclass(frozen=True)
class EraseOrder:
    """What a batch's data job erases and with which storage settings."""

    batch: str
    files: tuple[FileRows, ...]
    storage: dict[str, str | None]  # the model's reclaim backend and admin endpoint
    # sourcePolicy patch: the source objects the model's own keys may write
    # ({"keys": [...]}), or why none ({"refused": message}); None: no source to patch
    source: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "files": [f.to_json() for f in self.files],
            "storage": self.storage,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EraseOrder:
        return cls(
            str(d["batch"]),
            tuple(FileRows.from_json(f) for f in d["files"]),
            dict(d.get("storage") or {}),
            d.get("source"),
        )


def locate(
    store: Store,
    gen: Generation,
    plan: ErasurePlan,
    id_hash: Callable[[str], str],
    storage: dict[str, str | None],
    source: dict[str, Any] | None = None,
) -> EraseOrder:
    """The order for ``plan``, from the files of ``gen`` (not patched yet): the keyed
    side's work, which reads only the record ids of the affected shards' index files
    and of the test file. ``source``: what the job may patch of the model's source."""
    hashes = set(plan.record_hashes)
    refs: list[tuple[FileRef, int | None]] = [
        (gen.shards[k].index, k) for k in plan.affected_shards
    ]
    if plan.test_records:
        refs.append((gen.test, None))
    files = []
    for ref, shard in refs:
        hits = dataio.select_rows(
            store,
            ref,
            ["record_id"],
            lambda b: dataio.hashed_mask(b.column("record_id"), id_hash, hashes),
        )
        files.append(FileRows(ref, tuple(hits.column("_row").to_pylist()), shard))
    order = EraseOrder(plan.batch_id, tuple(files), storage, source)
    found = sum(len(f.rows) for f in files)
    if found != plan.records_erased:
        raise OrderError(
            f"batch {plan.batch_id}: generation {gen.number} holds {found} of the plan's "
            f"{plan.records_erased} records (patched already?)"
        )
    return order


def write_order(store: Store, layout: ModelLayout, order: EraseOrder) -> None:
    store.put_json_if_absent(layout.erase_order(order.batch), order.to_json())


def read_order(store: Store, layout: ModelLayout, batch: str) -> EraseOrder:
    try:
        return EraseOrder.from_json(store.get_json(layout.erase_order(batch)))
    except NotFound:
        raise OrderError(f"batch {batch}: its erase order is missing") from None


def drop_order(store: Store, layout: ModelLayout, batch: str) -> None:
    """The order goes with every version once the data is erased."""
    store.purge(layout.erase_order(batch))


def recover(store: Store, order: EraseOrder, plan: ErasurePlan) -> RawIds:
    """The erased ids, read at the order's positions from the exact bytes it names.
    What the job can check without the key is checked: each file's count of rows and
    each shard's first slice against the plan. (An order whose positions were moved
    within those bounds erases other rows: the keyed side's check before it certifies,
    ``Engine.finish``, finds the erased records still there and refuses.)"""
    expected: dict[int | None, tuple[int, int | None]] = {
        s.shard: (s.records, s.first_slice) for s in plan.shards
    }
    if plan.test_records:
        expected[None] = (plan.test_records, None)
    if sorted(expected, key=str) != sorted((f.shard for f in order.files), key=str):
        raise OrderError(f"batch {order.batch}: the order's files are not the plan's shards")
    records: set[str] = set()
    subjects: set[str] = set()
    for f in order.files:
        where = f"batch {order.batch}: {f.ref.key}"
        try:
            body = store.get(f.ref.key)
        except NotFound:
            raise OrderError(f"{where} is gone") from None
        if sha256_hex(body) != f.ref.sha256:
            raise OrderError(f"{where} is not the file it names")
        count, first_slice = expected[f.shard]
        if len(set(f.rows)) != count or any(i < 0 or i >= f.ref.rows for i in f.rows):
            raise OrderError(f"{where}: the order names other rows than the plan's {count}")
        columns = ["record_id", "subject_id"] + ([] if f.shard is None else ["slice"])
        picked = dataio.decode(body, columns).take(pa.array(f.rows, pa.int64()))
        if first_slice is not None and min(picked.column("slice").to_pylist()) != first_slice:
            raise OrderError(f"{where}: the order's rows start in another slice than the plan's")
        records.update(str(v) for v in picked.column("record_id").to_pylist())
        subjects.update(str(v) for v in picked.column("subject_id").to_pylist())
    if len(records) != plan.records_erased:
        raise OrderError(
            f"batch {order.batch}: the order names {len(records)} records, "
            f"the plan {plan.records_erased}"
        )
    return RawIds(frozenset(records), frozenset(subjects))
