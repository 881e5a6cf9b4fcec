"""Ingestion: split a dataset into SISA shards and slices and write generation 1.

Records go to shard H(subject) mod S and slice H'(subject) mod R; held-out
subjects (a stable hash of the subject id) form the test set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lethe import dataio
from lethe.core.config import ConfigError, ModelConfig
from lethe.core.hashing import is_test_subject, shard_of, slice_of
from lethe.core.lineage import shard_lineages
from lethe.core.manifest import FileRef, Generation, ShardState, SliceState
from lethe.erased import ErasedRows
from lethe.errors import UserError
from lethe.files import FileDecoder, FileUnreadable
from lethe.generations import create_first
from lethe.layout import ModelLayout
from lethe.sources import (
    BATCH_ROWS,
    SourceError,
    SourceObject,
    csv_convert_options,
    object_keys,
    read_batches,
    source_of,
)
from lethe.store import NotFound, Store


class IngestError(UserError, ValueError):
    """The dataset cannot be ingested; the message says why."""


class LayoutOwned(IngestError):
    """The S3 layout belongs to another model (another ShardedModel's UID)."""


def read_dataset(path: str | Path, cfg: ModelConfig | None = None) -> pa.Table:
    """A local dataset file as one table (small files: the CLI's sizing advice)."""
    p = Path(path)
    if not p.exists():
        raise IngestError(f"dataset not found: {p}")
    fmt = {".parquet": "parquet", ".csv": "csv", ".txt": "csv", ".jsonl": "jsonl"}.get(p.suffix)
    if fmt is None:
        raise IngestError(f"dataset {p}: unknown format (use .parquet, .csv or .jsonl)")
    return decode_dataset(p.read_bytes(), fmt, cfg)


def decode_dataset(body: bytes, fmt: str, cfg: ModelConfig | None = None) -> pa.Table:
    """A dataset object's bytes (``fmt``: parquet, csv or jsonl), ids read as strings."""
    if fmt == "csv":
        return pacsv.read_csv(io.BytesIO(body), convert_options=csv_convert_options(cfg))
    if fmt == "jsonl":
        import pyarrow.json as pajson

        return pajson.read_json(io.BytesIO(body))
    return pq.read_table(io.BytesIO(body))


def encode_dataset(table: pa.Table, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "csv":
        pacsv.write_csv(table, buf)
    elif fmt == "jsonl":
        for row in table.to_pylist():
            buf.write(json.dumps(row).encode() + b"\n")
    else:
        pq.write_table(table, buf)
    return buf.getvalue()


def source_rows_without(body: bytes, cfg: ModelConfig, erased: ErasedRows) -> tuple[bytes, int]:
    """The source dataset without the rows of erased subjects or records (policy
    ``patch``); returns the new bytes and how many rows went."""
    table = decode_dataset(body, cfg.source_format, cfg)
    c = cfg.columns
    mask = np.zeros(table.num_rows, bool)
    for column, match in ((c.record_id, erased.records), (c.subject_id, erased.subjects)):
        if column in table.column_names:  # not when it is a hive partition of a prefix
            mask |= match(table.column(column))
    removed = int(mask.sum())
    if not removed:
        return body, 0
    return encode_dataset(dataio.drop_rows(table, mask), cfg.source_format), removed


def check_owner(store: Store, layout: ModelLayout, owner: str | None) -> None:
    """Raise LayoutOwned if the layout records another owner (no record: legacy, ok)."""
    if owner is None:
        return
    try:
        recorded = store.get_json(layout.owner).get("uid")
    except NotFound:
        return
    if recorded != owner:
        raise LayoutOwned(
            f"s3://{store.bucket}/{layout.prefix} belongs to another model (uid {recorded})"
        )


def apply_source_policy_after_ingest(
    store: Store, cfg: ModelConfig, keys: list[str] | None = None
) -> None:
    """Policy ``delete-after-ingest``: the source's objects (``keys``, else what a
    listing finds) go, with every version."""
    if cfg.source_policy != "delete-after-ingest" or not cfg.source_uri.startswith("s3://"):
        return
    source = source_of(cfg)
    src = store.for_bucket(source.bucket)
    for key in object_keys(store, source) if keys is None else keys:
        src.purge(key)


def _feature_columns(schema: pa.Schema, cfg: ModelConfig) -> list[str]:
    """The feature columns (checked: present and numeric); none for file-backed records,
    whose features are their decoded files."""
    cols = cfg.columns
    available = schema.names
    roles = [("record id", cols.record_id), ("subject id", cols.subject_id), ("label", cols.label)]
    if cols.file:
        roles.append(("file", cols.file))
    for role, name in roles:
        if name not in available:
            raise IngestError(
                f"unknown {role} column {name!r}; the dataset has: {', '.join(available)}"
            )
    if cols.file:
        return []
    id_cols = {cols.record_id, cols.subject_id, cols.label}
    features = list(cols.features) or [c for c in available if c not in id_cols]
    missing = [c for c in features if c not in available]
    if missing:
        raise IngestError(
            f"unknown feature column(s) {missing}; the dataset has: {', '.join(available)}"
        )
    if not features:
        raise IngestError("the dataset has no feature columns")
    for c in features:
        t = schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise IngestError(f"feature column {c!r} is {t}, not numeric")
    return features


def _ids(batch: pa.RecordBatch, column: str, role: str) -> list[str]:
    """Ids as strings. Floats are refused: 42.0 is not an id anyone erases by."""
    col = batch.column(batch.schema.get_field_index(column))
    if pa.types.is_floating(col.type):
        raise IngestError(
            f"{role} column {column!r} is {col.type}: ids must be strings or integers "
            "(read CSV ids as strings)"
        )
    if col.null_count:
        raise IngestError("record and subject ids must not be empty (null found)")
    return pc.cast(col, pa.string()).to_pylist()


def _id_hash64(ids: list[str]) -> np.ndarray:
    """64-bit hashes of record ids: the duplicate check holds 8 bytes per record."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
            for i in ids
        ),
        np.uint64,
        len(ids),
    )


TEST = (-1, 0)  # the spill key of the held-out test rows


def _write_back(f: BinaryIO) -> None:
    """Write a file's dirty pages to disk and drop them from the page cache (Linux;
    elsewhere only flushed)."""
    f.flush()
    if hasattr(os, "fdatasync") and hasattr(os, "posix_fadvise"):
        os.fdatasync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class _Spill:
    """Pass one's output: every row on local disk, in Arrow IPC files per (shard, slice)
    and one for the test set, so pass two holds one slice at a time.

    Spilled bytes are written back and dropped from the page cache every SYNC_BYTES: a
    memory limit (a container's cgroup) counts dirty page cache, which the kernel can
    only drop once it is written, and cgroup v1 does not throttle a writer for it (a
    5 GB ingest under a 1.25 GiB limit was killed with 1.4 GiB of dirty spill)."""

    MAX_OPEN = 256  # open files at once; a key written again later gets another part
    SYNC_BYTES = 64 << 20

    def __init__(self, root: Path) -> None:
        self.root = root
        self.open: dict[tuple[int, int], tuple[pa.ipc.RecordBatchStreamWriter, BinaryIO]] = {}
        self.parts: dict[tuple[int, int], int] = {}
        self.schema: pa.Schema | None = None
        self.unsynced = 0

    def _path(self, key: tuple[int, int], part: int) -> Path:
        return self.root / f"{key[0]}-{key[1]}-{part}.arrow"

    def write(self, key: tuple[int, int], batch: pa.RecordBatch) -> None:
        self.schema = self.schema or batch.schema
        if key not in self.open:
            if len(self.open) >= self.MAX_OPEN:
                self._close(next(iter(self.open)))
            part = self.parts.get(key, 0)
            self.parts[key] = part + 1
            f = open(self._path(key, part), "wb")  # noqa: SIM115 - closed by _close
            self.open[key] = (pa.ipc.new_stream(f, self.schema), f)
        self.open[key][0].write_batch(batch.cast(self.schema))
        self.unsynced += batch.nbytes
        if self.unsynced >= self.SYNC_BYTES:
            for _, f in self.open.values():
                _write_back(f)
            self.unsynced = 0

    def _close(self, key: tuple[int, int]) -> None:
        writer, f = self.open.pop(key)
        writer.close()
        _write_back(f)
        f.close()

    def close(self) -> None:
        for key in list(self.open):
            self._close(key)

    @property
    def keys(self) -> list[tuple[int, int]]:
        return list(self.parts)

    def read(self, key: tuple[int, int], columns: list[str] | None = None) -> pa.Table:
        assert self.schema is not None
        tables = [self.schema.empty_table()]
        for part in range(self.parts.get(key, 0)):
            with pa.ipc.open_stream(str(self._path(key, part))) as r:
                tables.append(r.read_all())
        table = pa.concat_tables(tables)
        return table.select(columns) if columns else table


class _Pass1:
    """Reads the source's batches once: checks them, assigns each record its shard,
    slice or the test set, spills it, and keeps only what the whole dataset decides
    (label values, 64-bit record id hashes, row counts)."""

    def __init__(self, cfg: ModelConfig, spill: _Spill, files: FileDecoder | None) -> None:
        self.cfg = cfg
        self.spill = spill
        self.files = files
        self.features: list[str] | None = None
        self.num_features = 0
        self.labels: set[str] = set()
        self.hashes: list[np.ndarray] = []
        self.train_rows = np.zeros(cfg.shards, np.int64)

    def add(self, batch: pa.RecordBatch) -> None:
        cfg, c = self.cfg, self.cfg.columns
        if self.features is None:
            self.features = _feature_columns(batch.schema, cfg)
        elif self.features:
            _feature_columns(batch.schema, cfg)  # every file must have them
        record_ids = _ids(batch, c.record_id, "record id")
        subject_ids = _ids(batch, c.subject_id, "subject id")
        labels = [str(v) for v in batch.column(batch.schema.get_field_index(c.label)).to_pylist()]
        self.labels.update(labels)
        self.hashes.append(_id_hash64(record_ids))
        uris = shas = None
        if self.files is not None:  # fetched and decoded to check them, then let go
            uris = _ids(batch, c.file, "file")
            features, shas = self.files.decode_all(uris)
        else:
            features = np.column_stack(
                [
                    batch.column(batch.schema.get_field_index(f))
                    .to_numpy(zero_copy_only=False)
                    .astype(np.float32)
                    for f in self.features
                ]
            )
        if self.num_features and features.shape[1] != self.num_features:
            raise IngestError(
                f"records have {features.shape[1]} features here and {self.num_features} "
                "elsewhere (file-backed records: every file must decode to the same shape)"
            )
        self.num_features = features.shape[1]
        is_test = np.fromiter(
            (is_test_subject(s, cfg.test_fraction) for s in subject_ids), bool, len(subject_ids)
        )
        shard = np.fromiter(
            (shard_of(s, cfg.shards) for s in subject_ids), np.int64, len(subject_ids)
        )
        slice_ = np.fromiter(
            (slice_of(s, cfg.slices) for s in subject_ids), np.int64, len(subject_ids)
        )
        np.add.at(self.train_rows, shard[~is_test], 1)
        group = np.where(is_test, -1, shard * cfg.slices + slice_)
        rows = _spill_batch(record_ids, subject_ids, labels, features, uris, shas)
        for g in np.unique(group):
            idx = np.flatnonzero(group == g)
            key = TEST if g < 0 else (int(g) // cfg.slices, int(g) % cfg.slices)
            self.spill.write(key, rows.take(pa.array(idx)))

    def duplicates(self) -> int:
        """How many record ids occur more than once (their 64-bit hashes collide first;
        only then are the ids themselves compared, from the spill)."""
        if not self.hashes:
            return 0
        h = np.concatenate(self.hashes)
        self.hashes = []  # 8 bytes a record: held once, sorted in place, then let go
        h.sort()
        suspects = set(h[1:][h[1:] == h[:-1]].tolist())
        if not suspects:
            return 0
        seen: dict[str, int] = {}
        for key in self.spill.keys:
            ids = self.spill.read(key, ["record_id"]).column(0).to_pylist()
            for i, hv in zip(ids, _id_hash64(ids).tolist(), strict=True):
                if hv in suspects:
                    seen[i] = seen.get(i, 0) + 1
        return sum(1 for n in seen.values() if n > 1)


def _spill_batch(
    record_ids: list[str],
    subject_ids: list[str],
    labels: list[str],
    features: np.ndarray,
    uris: list[str] | None,
    shas: list[str] | None,
) -> pa.RecordBatch:
    """A batch's rows as its data file keeps them: the features, or a file-backed
    record's URI and the sha256 of its file (``files.FILE_COLUMNS``), never its pixels."""
    cols = {
        "record_id": pa.array(record_ids, pa.string()),
        "subject_id": pa.array(subject_ids, pa.string()),
        "label": pa.array(labels, pa.string()),
    }
    if uris is not None and shas is not None:
        cols["uri"] = pa.array(uris, pa.string())
        cols["file_sha256"] = pa.array(shas, pa.string())
    else:
        d = features.shape[1]
        flat = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1))
        cols["features"] = pa.FixedSizeListArray.from_arrays(flat, max(d, 1))
    return pa.RecordBatch.from_pydict(cols)


def ingest_table(
    store: Store,
    layout: ModelLayout,
    table: pa.Table,
    cfg: ModelConfig,
    owner: str | None = None,
) -> Generation:
    """Shard, slice and write an in-memory ``table`` as generation 1 (``ingest``)."""
    return ingest(store, layout, cfg, table.to_batches(max_chunksize=BATCH_ROWS), owner)


def ingest_source(
    store: Store,
    layout: ModelLayout,
    cfg: ModelConfig,
    owner: str | None = None,
    *,
    ray_data: bool = False,
    pinned: list[SourceObject] | None = None,
) -> Generation:
    """Ingest the model's source (``cfg.source_uri``), streamed: see ``ingest``.
    ``pinned``: read (and for ``delete-after-ingest``, delete) only those objects."""
    batches = read_batches(store, cfg, ray_data=ray_data, pinned=pinned)
    source_keys = None if pinned is None else [o.key for o in pinned]
    return ingest(store, layout, cfg, batches, owner, source_keys=source_keys)


def ingest(
    store: Store,
    layout: ModelLayout,
    cfg: ModelConfig,
    batches: Iterable[pa.RecordBatch],
    owner: str | None = None,
    source_keys: list[str] | None = None,
) -> Generation:
    """Shard, slice and write the records of ``batches`` as generation 1.
    ``source_keys``: the source's objects that ``delete-after-ingest`` deletes (default:
    what a listing finds).

    Two passes, so memory is bounded by one batch plus the largest slice file (and
    the test set, which evaluation reads whole), never by the dataset: the first
    checks and spills each batch to local disk by (shard, slice), the second writes
    each slice's content-addressed file from its spill. Refuses before writing any
    object if the model exists already, if ``owner`` differs from the layout's, or if
    a file would have bytes that an erasure purged (the source still holds erased
    people: patch the source, or erase them again after ingesting elsewhere)."""
    cfg.validate()
    if store.exists(layout.current):
        raise FileExistsError(f"model already exists: s3://{store.bucket}/{layout.current}")
    check_owner(store, layout, owner)
    files = FileDecoder(store, cfg) if cfg.columns.file else None
    with tempfile.TemporaryDirectory(prefix="lethe-ingest-") as tmp:
        spill = _Spill(Path(tmp))
        first = _Pass1(cfg, spill, files)
        try:
            for batch in batches:
                first.add(batch)
        except (SourceError, FileUnreadable) as e:
            raise IngestError(str(e)) from None
        finally:
            spill.close()
        if first.features is None:
            raise IngestError("the dataset has no records")
        dups = first.duplicates()
        if dups:
            # counts only: an error message goes to logs and Events, an id never does
            raise IngestError(f"duplicate record ids: {dups} ids occur more than once")
        empty = [k for k in range(cfg.shards) if not first.train_rows[k]]
        if empty:
            raise IngestError(
                f"empty shard(s) {empty}: {int(first.train_rows.sum())} training records "
                f"are too few for {cfg.shards} shards; use fewer shards"
            )
        classes = sorted(first.labels, key=lambda v: (len(v), v))
        cfg = ModelConfig(
            **{**cfg.__dict__, "num_features": first.num_features, "classes": tuple(classes)}
        )
        if cfg.trainer.input_shape and int(np.prod(cfg.trainer.input_shape)) != cfg.num_features:
            raise IngestError(
                f"trainer.input_shape {cfg.trainer.input_shape} does not match "
                f"{cfg.num_features} features"
            )
        if owner is not None and not store.put_json_if_absent(layout.owner, {"uid": owner}):
            check_owner(store, layout, owner)
        try:
            gen = _write_generation_1(store, layout, cfg, spill)
        except dataio.Tombstoned as e:
            raise IngestError(f"{e} (the dataset still holds erased people)") from None
    apply_source_policy_after_ingest(store, cfg, source_keys)
    return gen


def _data_rows(spilled: pa.Table, class_of: dict[str, int]) -> pa.Table:
    """Spilled rows as a data file's rows: labels as class ids."""
    labels = np.fromiter(
        (class_of[v] for v in spilled.column("label").to_pylist()), np.int32, spilled.num_rows
    )
    return dataio.with_label_ids(spilled, labels)


def _write_spilled(
    store: Store,
    spill: _Spill,
    key: tuple[int, int],
    class_of: dict[str, int],
    key_for: Callable[[str], str],
    tombstone: Callable[[str], str],
    index_columns: list[str],
) -> tuple[FileRef, pa.Table]:
    """One slice (or the test set) from its spill to S3, with the columns of it that the
    shard index keeps. Rows go in record-id order a row group at a time into a local
    file, hashed and uploaded from there: memory holds this key's spill and a row group,
    not the sorted copy, the encoded file and the upload buffer that ``encode`` needs.
    The bytes are ``encode``'s for the same rows."""
    spilled = spill.read(key)
    index_parts: list[pa.Table] = []

    def rows() -> Iterator[pa.Table]:
        for chunk in dataio.sorted_chunks(spilled):
            chunk = _data_rows(chunk, class_of)
            index_parts.append(chunk.select(index_columns))
            yield chunk

    path = spill.root / "out.parquet"
    schema = _data_rows(spilled.slice(0, 0), class_of).schema
    with open(path, "wb") as f:
        dataio.write_rows(f, schema, rows())
    ref = dataio.put_file_content_addressed(store, path, spilled.num_rows, key_for, tombstone)
    path.unlink()
    return ref, pa.concat_tables(index_parts)


def _write_generation_1(
    store: Store, layout: ModelLayout, cfg: ModelConfig, spill: _Spill
) -> Generation:
    fingerprint = cfg.trainer_fingerprint()
    class_of = {v: i for i, v in enumerate(cfg.classes)}
    # a file-backed record's URI too: the keyed side hashes it when it plans
    index_columns = ["record_id", "subject_id", *(["uri"] if cfg.columns.file else [])]
    shards: list[ShardState] = []
    for k in range(cfg.shards):
        files: list[FileRef] = []
        index_parts: list[pa.Table] = []
        for r in range(cfg.slices):
            ref, index_part = _write_spilled(
                store,
                spill,
                (k, r),
                class_of,
                lambda sha, k=k, r=r: layout.data(k, r, sha),
                layout.tombstone,
                index_columns,
            )
            files.append(ref)
            index_parts.append(
                index_part.append_column("slice", pa.array(np.full(ref.rows, r, np.int32)))
            )
        index = dataio.write_content_addressed(
            store,
            pa.concat_tables(index_parts),
            lambda sha, k=k: layout.index(k, sha),
            layout.tombstone,
        )
        lineages = shard_lineages(fingerprint, k, [f.sha256 for f in files])
        shards.append(
            ShardState(index, [SliceState(f, lin) for f, lin in zip(files, lineages, strict=True)])
        )
    test, _ = _write_spilled(
        store, spill, TEST, class_of, layout.test, layout.tombstone, ["record_id"]
    )
    gen = Generation(number=1, parent=None, config=cfg, shards=shards, test=test, reason="ingest")
    return create_first(store, layout, gen)


__all__ = [
    "IngestError",
    "ConfigError",
    "LayoutOwned",
    "check_owner",
    "ingest",
    "ingest_source",
    "ingest_table",
    "read_dataset",
]
