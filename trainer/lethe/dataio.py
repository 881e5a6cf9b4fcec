"""Parquet encoding of data, index and test files, and content-addressed writes.

Data and test files: record_id, subject_id, label (class id), features (float32 list).
Index files: record_id, subject_id, slice. Encoding is deterministic, so the same
rows always give the same bytes and therefore the same key.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

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


ROW_GROUP_ROWS = 65_536  # rows per row group of every data, index and test file


def encode(table: pa.Table) -> bytes:
    """The bytes of a data, index or test file: rows in record-id order, row groups of
    ROW_GROUP_ROWS, the schema in its canonical form. The same rows always give the
    same bytes, however they were ordered, chunked or read: a patched file and a fresh
    ingest of its rows hash alike."""
    buf = io.BytesIO()
    write_rows(buf, table.schema, sorted_chunks(table))
    return buf.getvalue()


def canonical_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` as a file stores it whichever way its rows were built: a fixed-size
    list's child named "item" (Arrow's name, which files have always had; a Parquet
    file read back names it "element", and the name is written into the file, so a
    patch wrote other bytes than a fresh ingest of the same rows) and no metadata."""

    def canonical(t: pa.DataType) -> pa.DataType:
        if pa.types.is_fixed_size_list(t):
            child = pa.field("item", t.value_type, t.value_field.nullable)
            return pa.list_(child, t.list_size)
        return t

    return pa.schema([f.with_type(canonical(f.type)).remove_metadata() for f in schema])


def write_rows(sink: Any, schema: pa.Schema, chunks: Iterable[pa.Table]) -> None:
    """Write ``chunks`` (``sorted_chunks``' output, maybe transformed row for row) as
    one Parquet file, a row group each, in the canonical schema: ``encode``'s bytes,
    streamed."""
    schema = canonical_schema(schema)
    with pq.ParquetWriter(sink, schema, compression="zstd", write_statistics=False) as w:
        for chunk in chunks:
            w.write_table(chunk.cast(schema))


def sorted_chunks(table: pa.Table, rows: int | None = None) -> Iterator[pa.Table]:
    """``table``'s rows in record-id order, ``rows`` at a time. Gathered from each of
    its chunks separately: Arrow's ``take`` over a chunked table concatenates the whole
    table first, which would hold a second copy of it."""
    if not table.num_rows:
        yield table  # one empty row group, as pyarrow writes an empty table
        return
    rows = rows or ROW_GROUP_ROWS
    batches = [b for b in table.to_batches() if b.num_rows]
    starts = np.cumsum([0] + [b.num_rows for b in batches[:-1]])
    order = pc.sort_indices(table.column("record_id")).to_numpy().astype(np.int64)
    source = np.searchsorted(starts, order, side="right") - 1  # the chunk of each row
    for first in range(0, len(order), rows):
        idx, src = order[first : first + rows], source[first : first + rows]
        grouped = np.argsort(src, kind="stable")  # by chunk, in sorted order within one
        pieces = [
            batches[b].take(pa.array(idx[src == b] - starts[b]))
            for b in np.unique(src)  # ascending, as argsort grouped them
        ]
        gathered = pa.Table.from_batches(pieces, schema=table.schema).combine_chunks()
        back = np.empty_like(grouped)
        back[grouped] = np.arange(len(grouped))
        yield gathered.take(pa.array(back))


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
    return _put_addressed(
        store,
        sha256_hex(body),
        table.num_rows,
        key_for,
        tombstone_for,
        lambda k: store.put(k, body),
    )


def put_file_content_addressed(
    store: Store,
    path: Path,
    rows: int,
    key_for: Callable[[str], str],
    tombstone_for: Callable[[str], str] | None = None,
) -> FileRef:
    """``write_content_addressed`` for a file already encoded on local disk (``write_rows``),
    hashed and uploaded streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return _put_addressed(
        store, digest.hexdigest(), rows, key_for, tombstone_for, lambda k: store.put_file(k, path)
    )


def _put_addressed(
    store: Store,
    sha: str,
    rows: int,
    key_for: Callable[[str], str],
    tombstone_for: Callable[[str], str] | None,
    put: Callable[[str], object],
) -> FileRef:
    key = key_for(sha)
    if tombstone_for is not None and store.exists(tombstone_for(sha)):
        raise Tombstoned(
            f"{key}: these exact bytes were purged by an erasure and may not be written again"
        )
    if not store.exists(key):
        put(key)
    return FileRef(key, sha, rows)


def without_rows(
    store: Store,
    ref: FileRef,
    erased: Callable[[pa.ChunkedArray], np.ndarray],
    key_for: Callable[[str], str],
    tombstone_for: Callable[[str], str] | None = None,
) -> FileRef | None:
    """``ref``'s file without the rows that ``erased`` marks (given a record-id column),
    written content-addressed with the bytes ``encode`` gives those rows; None when it
    marks none. Streamed through local files a row group at a time: this holds a row
    group, not the file. (A file's rows are in record-id order, and dropping rows keeps
    that order, so regrouping the rest by ROW_GROUP_ROWS is ``encode``'s layout.)"""
    with tempfile.TemporaryDirectory(prefix="lethe-patch-") as tmp:
        source, out = Path(tmp, "in.parquet"), Path(tmp, "out.parquet")
        with open(source, "wb") as f:
            store.download(ref.key, f)
        pf = pq.ParquetFile(source)
        masks = [
            erased(pf.read_row_group(g, ["record_id"]).column("record_id"))
            for g in range(pf.num_row_groups)
        ]
        if not any(m.any() for m in masks):
            return None
        with open(out, "wb") as sink:
            write_rows(sink, pf.schema_arrow, _regrouped(pf, masks))
        kept = sum(len(m) - int(m.sum()) for m in masks)
        return put_file_content_addressed(store, out, kept, key_for, tombstone_for)


def _regrouped(pf: pq.ParquetFile, masks: list[np.ndarray]) -> Iterator[pa.Table]:
    """The rows of ``pf`` that ``masks`` (one per row group) leave, ROW_GROUP_ROWS at a
    time, each group one chunk (as ``sorted_chunks`` gives them)."""
    rows = ROW_GROUP_ROWS
    pending: list[pa.Table] = []
    held = 0
    written = False
    for group, mask in enumerate(masks):
        table = pf.read_row_group(group)
        if mask.any():
            table = table.filter(pa.array(~mask))
        while table.num_rows:
            take = min(rows - held, table.num_rows)
            pending.append(table.slice(0, take))
            table = table.slice(take)
            held += take
            if held == rows:
                yield pa.concat_tables(pending).combine_chunks()
                pending, held, written = [], 0, True
    if pending:
        yield pa.concat_tables(pending).combine_chunks()
    elif not written:  # no row left: one empty row group, as pyarrow writes an empty table
        yield pf.schema_arrow.empty_table()


def read_table(store: Store, ref: FileRef, columns: list[str] | None = None) -> pa.Table:
    return decode(store.get(ref.key), columns)


SCAN_ROWS = 16_384  # rows a scan holds at a time (``select_rows``)


def select_rows(
    store: Store,
    ref: FileRef,
    columns: list[str],
    match: Callable[[pa.RecordBatch], np.ndarray],
) -> pa.Table:
    """The rows of a Parquet object where ``match`` is true: those of ``columns`` that the
    file has, plus ``_row``, each row's position in the file. The object is read by
    ranged reads of its footer and those columns' chunks, decoded SCAN_ROWS rows at a
    time: what the keyed side reads of an index, test or slice file (ids, never the
    features), in memory bounded by a batch and the matches, not by the file."""
    parts: list[pa.Table] = []
    offset = 0
    with _RangedObject(store, ref.key) as f:
        pf = pq.ParquetFile(f)
        present = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=SCAN_ROWS, columns=present):
            rows = np.flatnonzero(match(batch))
            if len(rows):
                hits = pa.Table.from_batches([batch]).take(pa.array(rows, pa.int64()))
                parts.append(hits.append_column("_row", pa.array(rows + offset, pa.int64())))
            offset += batch.num_rows
    if parts:
        return pa.concat_tables(parts)
    schema = pa.schema([*(pf.schema_arrow.field(c) for c in present), ("_row", pa.int64())])
    return schema.empty_table()


class _RangedObject(io.RawIOBase):
    """A read-only, seekable file over one S3 object: each read is one ranged GET."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key
        self.length = store.size(key)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self.length - self.pos))
        data = self.store.get_range(self.key, self.pos, n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


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


def isin(column: pa.ChunkedArray | pa.Array, values: Iterable[str]) -> np.ndarray:
    """True where the row's id is one of ``values``; ids that are not strings (a
    source's integer ids) compare as their text, as the keyed hashes see them."""
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    found = pc.is_in(column, value_set=pa.array(list(values), pa.string()))
    return np.asarray(found.to_numpy(zero_copy_only=False), bool)
