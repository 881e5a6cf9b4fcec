"""Parquet encoding of data, index and test files, and content-addressed writes.

Data and test files: record_id, subject_id, label (class id), features (float32 list).
Index files: record_id, subject_id, slice. Encoding is deterministic, so the same
rows always give the same bytes and therefore the same key.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lethe.core.hashing import sha256_hex
from lethe.core.manifest import FileRef
from lethe.errors import IntegrityFailure
from lethe.store import Store


def data_table(
    record_ids: list[str], subject_ids: list[str], labels: np.ndarray, features: np.ndarray
) -> pa.Table:
    n, d = features.shape if features.ndim == 2 else (0, 0)
    flat = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            "record_id": pa.array(record_ids, pa.string()),
            "subject_id": pa.array(subject_ids, pa.string()),
            "label": pa.array(np.asarray(labels, dtype=np.int32)),
            "features": pa.FixedSizeListArray.from_arrays(flat, d)
            if n
            else pa.array([], pa.list_(pa.float32(), max(d, 1))),
        }
    )


def with_label_ids(table: pa.Table, labels: np.ndarray) -> pa.Table:
    """``table`` with its label column replaced by class ids (int32, as data files hold)."""
    i = table.schema.get_field_index("label")
    return table.set_column(i, "label", pa.array(np.asarray(labels, dtype=np.int32)))


def index_table(record_ids: list[str], subject_ids: list[str], slices: list[int]) -> pa.Table:
    return pa.table(
        {
            "record_id": pa.array(record_ids, pa.string()),
            "subject_id": pa.array(subject_ids, pa.string()),
            "slice": pa.array(slices, pa.int32()),
        }
    )


def encode(table: pa.Table) -> bytes:
    table = table.sort_by("record_id") if table.num_rows else table
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False)
    return buf.getvalue()


def column_names(body: bytes) -> list[str]:
    """A Parquet file's columns, from its footer alone."""
    return pq.read_schema(io.BytesIO(body)).names


def decode(body: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(body), columns=columns)


class Tombstoned(IntegrityFailure, ValueError):
    """A write would recreate a file that was purged because it held erased records."""


def write_content_addressed(
    store: Store,
    table: pa.Table,
    key_for: Callable[[str], str],
    tombstone_for: Callable[[str], str] | None = None,
) -> FileRef:
    """Write ``table`` under its content hash. With ``tombstone_for``, refuse to write
    bytes that were once purged (the same bytes hold the same erased rows)."""
    body = encode(table)
    sha = sha256_hex(body)
    key = key_for(sha)
    if tombstone_for is not None and store.exists(tombstone_for(sha)):
        raise Tombstoned(
            f"{key}: these exact bytes were purged by an erasure and may not be written again"
        )
    if not store.exists(key):
        store.put(key, body)
    return FileRef(key, sha, table.num_rows)


def read_table(store: Store, ref: FileRef, columns: list[str] | None = None) -> pa.Table:
    return decode(store.get(ref.key), columns)


def features_and_labels(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    if table.num_rows == 0:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    col = table.column("features").combine_chunks()
    d = col.type.list_size
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)
    y = table.column("label").to_numpy().astype(np.int64)
    return x, y


def hashed_mask(
    column: pa.ChunkedArray | pa.Array, id_hash: Callable[[str], str], hashes: set[str]
) -> np.ndarray:
    """True where the keyed hash of the row's id is in ``hashes``."""
    values = column.to_pylist()
    return np.fromiter((id_hash(str(v)) in hashes for v in values), bool, len(values))


def drop_rows(table: pa.Table, mask: np.ndarray) -> pa.Table:
    return table.filter(pa.array(~mask))


def isin(column: pa.ChunkedArray, values: Iterable[str]) -> np.ndarray:
    return pc.is_in(column, value_set=pa.array(list(values), pa.string())).to_numpy(
        zero_copy_only=False
    )
