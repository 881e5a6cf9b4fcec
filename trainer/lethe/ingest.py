"""Ingestion: split a dataset into SISA shards and slices and write generation 1.

Records go to shard H(subject) mod S and slice H'(subject) mod R; held-out
subjects (a stable hash of the subject id) form the test set.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

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
from lethe.errors import UserError
from lethe.generations import create_first
from lethe.layout import ModelLayout
from lethe.store import NotFound, Store


class IngestError(UserError, ValueError):
    """The dataset cannot be ingested; the message says why."""


class LayoutOwned(IngestError):
    """The S3 layout belongs to another model (another ShardedModel's UID)."""


def _csv_options(cfg: ModelConfig | None) -> pacsv.ConvertOptions:
    """Ids are strings, always: type inference would turn '000042' into 42, and then
    erasing by the real id would find nothing."""
    if cfg is None:
        return pacsv.ConvertOptions()
    c = cfg.columns
    return pacsv.ConvertOptions(
        column_types={c.record_id: pa.string(), c.subject_id: pa.string(), c.label: pa.string()}
    )


def read_dataset(path: str | Path, cfg: ModelConfig | None = None) -> pa.Table:
    p = Path(path)
    if not p.exists():
        raise IngestError(f"dataset not found: {p}")
    if p.suffix == ".parquet":
        return pq.read_table(p)
    if p.suffix in (".csv", ".txt"):
        return pacsv.read_csv(p, convert_options=_csv_options(cfg))
    raise IngestError(f"dataset {p}: unknown format (use .parquet or .csv)")


def decode_dataset(body: bytes, fmt: str, cfg: ModelConfig | None = None) -> pa.Table:
    """A dataset object's bytes (``fmt``: parquet or csv), ids read as strings."""
    if fmt == "csv":
        return pacsv.read_csv(io.BytesIO(body), convert_options=_csv_options(cfg))
    return pq.read_table(io.BytesIO(body))


def encode_dataset(table: pa.Table, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "csv":
        pacsv.write_csv(table, buf)
    else:
        pq.write_table(table, buf)
    return buf.getvalue()


def source_rows_without(
    body: bytes,
    cfg: ModelConfig,
    id_hash: Callable[[str], str],
    subject_hashes: set[str],
    record_hashes: set[str],
) -> tuple[bytes, int]:
    """The source dataset without the rows of erased subjects or records (policy
    ``patch``); returns the new bytes and how many rows went."""
    table = decode_dataset(body, cfg.source_format, cfg)
    c = cfg.columns
    mask = dataio.hashed_mask(
        table.column(c.record_id), id_hash, record_hashes
    ) | dataio.hashed_mask(table.column(c.subject_id), id_hash, subject_hashes)
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


def apply_source_policy_after_ingest(store: Store, cfg: ModelConfig) -> None:
    """Policy ``delete-after-ingest``: the source object goes, with every version."""
    if cfg.source_policy != "delete-after-ingest" or not cfg.source_uri.startswith("s3://"):
        return
    bucket, _, key = cfg.source_uri.removeprefix("s3://").partition("/")
    store.for_bucket(bucket).purge(key)


def _check_columns(table: pa.Table, cfg: ModelConfig) -> list[str]:
    cols = cfg.columns
    available = table.column_names
    for role, name in (
        ("record id", cols.record_id),
        ("subject id", cols.subject_id),
        ("label", cols.label),
    ):
        if name not in available:
            raise IngestError(
                f"unknown {role} column {name!r}; the dataset has: {', '.join(available)}"
            )
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
        t = table.schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise IngestError(f"feature column {c!r} is {t}, not numeric")
    return features


def _ids(table: pa.Table, column: str, role: str) -> pa.ChunkedArray:
    """Ids as strings. Floats are refused: 42.0 is not an id anyone erases by."""
    t = table.schema.field(column).type
    if pa.types.is_floating(t):
        raise IngestError(
            f"{role} column {column!r} is {t}: ids must be strings or integers "
            "(read CSV ids as strings)"
        )
    return pc.cast(table.column(column), pa.string())


def _check_ids(record_ids: pa.ChunkedArray, subject_ids: pa.ChunkedArray) -> None:
    if record_ids.null_count or subject_ids.null_count:
        raise IngestError("record and subject ids must not be empty (null found)")
    n = len(record_ids)
    unique = pc.unique(record_ids)
    if len(unique) != n:
        counts = pc.value_counts(record_ids)
        dups = [str(v["values"]) for v in counts.to_pylist() if v["counts"] > 1]
        # counts only: an error message goes to logs and Events, an id never does
        raise IngestError(f"duplicate record ids: {len(dups)} ids occur more than once")


def ingest_table(
    store: Store,
    layout: ModelLayout,
    table: pa.Table,
    cfg: ModelConfig,
    owner: str | None = None,
) -> Generation:
    """Shard, slice and write ``table`` as generation 1. Refuses before writing any
    object if the model exists already, if ``owner`` differs from the layout's, or if
    a file would have bytes that an erasure purged (the source still holds erased
    people: patch the source, or erase them again after ingesting elsewhere)."""
    cfg.validate()
    if store.exists(layout.current):
        raise FileExistsError(f"model already exists: s3://{store.bucket}/{layout.current}")
    check_owner(store, layout, owner)
    if owner is not None and not store.put_json_if_absent(layout.owner, {"uid": owner}):
        check_owner(store, layout, owner)
    feature_cols = _check_columns(table, cfg)
    c = cfg.columns
    record_ids_col = _ids(table, c.record_id, "record id")
    subject_ids_col = _ids(table, c.subject_id, "subject id")
    _check_ids(record_ids_col, subject_ids_col)
    record_ids = record_ids_col.to_pylist()
    subject_ids = subject_ids_col.to_pylist()
    labels_raw = [str(v) for v in table.column(c.label).to_pylist()]
    classes = sorted(set(labels_raw), key=lambda v: (len(v), v))
    class_of = {v: i for i, v in enumerate(classes)}
    labels = np.fromiter((class_of[v] for v in labels_raw), np.int32, len(labels_raw))
    features = np.column_stack(
        [table.column(f).to_numpy().astype(np.float32) for f in feature_cols]
    )
    cfg = ModelConfig(
        **{**cfg.__dict__, "num_features": len(feature_cols), "classes": tuple(classes)}
    )
    if cfg.trainer.input_shape and int(np.prod(cfg.trainer.input_shape)) != len(feature_cols):
        raise IngestError(
            f"trainer.input_shape {cfg.trainer.input_shape} does not match "
            f"{len(feature_cols)} feature columns"
        )

    is_test = np.fromiter(
        (is_test_subject(s, cfg.test_fraction) for s in subject_ids), bool, len(subject_ids)
    )
    shard = np.fromiter((shard_of(s, cfg.shards) for s in subject_ids), np.int64, len(subject_ids))
    slice_ = np.fromiter((slice_of(s, cfg.slices) for s in subject_ids), np.int64, len(subject_ids))

    def rows(mask: np.ndarray) -> pa.Table:
        idx = np.flatnonzero(mask)
        return dataio.data_table(
            [record_ids[i] for i in idx], [subject_ids[i] for i in idx], labels[idx], features[idx]
        )

    empty = [k for k in range(cfg.shards) if not np.any((shard == k) & ~is_test)]
    if empty:
        raise IngestError(
            f"empty shard(s) {empty}: {int((~is_test).sum())} training records "
            f"are too few for {cfg.shards} shards; use fewer shards"
        )

    try:
        return _write_generation_1(
            store, layout, cfg, rows, shard, slice_, is_test, record_ids, subject_ids
        )
    except dataio.Tombstoned as e:
        raise IngestError(f"{e} (the dataset still holds erased people)") from None


def _write_generation_1(
    store: Store,
    layout: ModelLayout,
    cfg: ModelConfig,
    rows: Callable[[np.ndarray], pa.Table],
    shard: np.ndarray,
    slice_: np.ndarray,
    is_test: np.ndarray,
    record_ids: list[str],
    subject_ids: list[str],
) -> Generation:
    fingerprint = cfg.trainer_fingerprint()
    shards: list[ShardState] = []
    for k in range(cfg.shards):
        files: list[FileRef] = []
        for r in range(cfg.slices):
            t = rows((shard == k) & (slice_ == r) & ~is_test)
            files.append(
                dataio.write_content_addressed(
                    store, t, lambda sha, k=k, r=r: layout.data(k, r, sha), layout.tombstone
                )
            )
        in_shard = np.flatnonzero((shard == k) & ~is_test)
        index = dataio.write_content_addressed(
            store,
            dataio.index_table(
                [record_ids[i] for i in in_shard],
                [subject_ids[i] for i in in_shard],
                [int(slice_[i]) for i in in_shard],
            ),
            lambda sha, k=k: layout.index(k, sha),
            layout.tombstone,
        )
        lineages = shard_lineages(fingerprint, k, [f.sha256 for f in files])
        shards.append(
            ShardState(index, [SliceState(f, lin) for f, lin in zip(files, lineages, strict=True)])
        )
    test = dataio.write_content_addressed(store, rows(is_test), layout.test, layout.tombstone)
    gen = Generation(number=1, parent=None, config=cfg, shards=shards, test=test, reason="ingest")
    gen = create_first(store, layout, gen)
    apply_source_policy_after_ingest(store, cfg)
    return gen


def ingest_file(
    store: Store, layout: ModelLayout, path: str | Path, cfg: ModelConfig
) -> Generation:
    return ingest_table(store, layout, read_dataset(path, cfg), cfg)


__all__ = [
    "IngestError",
    "ConfigError",
    "LayoutOwned",
    "check_owner",
    "ingest_file",
    "ingest_table",
    "read_dataset",
]
