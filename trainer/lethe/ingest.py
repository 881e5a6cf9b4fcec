"""Ingestion: split a dataset into SISA shards and slices and write generation 1.

Records go to shard H(subject) mod S and slice H'(subject) mod R; held-out
subjects (a stable hash of the subject id) form the test set.
"""

from __future__ import annotations

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
from lethe.generations import create_first
from lethe.layout import ModelLayout
from lethe.store import Store


class IngestError(ValueError):
    """The dataset cannot be ingested; the message says why."""


def read_dataset(path: str | Path) -> pa.Table:
    p = Path(path)
    if not p.exists():
        raise IngestError(f"dataset not found: {p}")
    if p.suffix == ".parquet":
        return pq.read_table(p)
    if p.suffix in (".csv", ".txt"):
        return pacsv.read_csv(p)
    raise IngestError(f"dataset {p}: unknown format (use .parquet or .csv)")


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


def _check_ids(record_ids: pa.ChunkedArray, subject_ids: pa.ChunkedArray) -> None:
    if record_ids.null_count or subject_ids.null_count:
        raise IngestError("record and subject ids must not be empty (null found)")
    n = len(record_ids)
    unique = pc.unique(record_ids)
    if len(unique) != n:
        counts = pc.value_counts(record_ids)
        dups = [str(v["values"]) for v in counts.to_pylist() if v["counts"] > 1]
        raise IngestError(
            f"duplicate record ids: {len(dups)} ids occur more than once "
            f"(e.g. {', '.join(dups[:3])})"
        )


def ingest_table(
    store: Store, layout: ModelLayout, table: pa.Table, cfg: ModelConfig
) -> Generation:
    cfg.validate()
    feature_cols = _check_columns(table, cfg)
    c = cfg.columns
    record_ids_col = pc.cast(table.column(c.record_id), pa.string())
    subject_ids_col = pc.cast(table.column(c.subject_id), pa.string())
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

    fingerprint = cfg.trainer_fingerprint()
    shards: list[ShardState] = []
    for k in range(cfg.shards):
        files: list[FileRef] = []
        for r in range(cfg.slices):
            t = rows((shard == k) & (slice_ == r) & ~is_test)
            files.append(
                dataio.write_content_addressed(
                    store, t, lambda sha, k=k, r=r: layout.data(k, r, sha)
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
        )
        lineages = shard_lineages(fingerprint, k, [f.sha256 for f in files])
        shards.append(
            ShardState(index, [SliceState(f, lin) for f, lin in zip(files, lineages, strict=True)])
        )
    test = dataio.write_content_addressed(store, rows(is_test), layout.test)
    gen = Generation(number=1, parent=None, config=cfg, shards=shards, test=test, reason="ingest")
    return create_first(store, layout, gen)


def ingest_file(
    store: Store, layout: ModelLayout, path: str | Path, cfg: ModelConfig
) -> Generation:
    return ingest_table(store, layout, read_dataset(path), cfg)


__all__ = ["IngestError", "ConfigError", "ingest_file", "ingest_table", "read_dataset"]
