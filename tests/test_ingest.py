"""Ingestion: sharding, slicing, content addresses, index, test split, bad input."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lethe import dataio
from lethe.core.hashing import is_test_subject, sha256_hex, shard_of, slice_of
from lethe.generations import read_live
from lethe.ingest import IngestError, ingest_table
from lethe.layout import ModelLayout
from lethe.store import Store

from .conftest import ingest_small, lethe_cli, small_config, small_table, unique_model


def test_ingest_writes_generation_one(store: Store) -> None:
    layout, cfg, table = ingest_small(store, shards=3, slices=2)
    gen = read_live(store, layout).generation
    assert gen.number == 1 and gen.config.classes == ("class-0", "class-1", "class-2")
    seen = set()
    for k, shard in enumerate(gen.shards):
        index = dataio.read_table(store, shard.index)
        for r, sl in enumerate(shard.slices):
            body = store.get(sl.data.key)
            assert sha256_hex(body) == sl.data.sha256 and sl.data.key.endswith(
                f"shard={k}/slice={r}/{sl.data.sha256}.parquet"
            )
            t = dataio.decode(body)
            assert t.num_rows == sl.data.rows
            for s in t.column("subject_id").to_pylist():
                assert shard_of(s, 3) == k and slice_of(s, 2) == r
                assert not is_test_subject(s, cfg.test_fraction)
            seen |= set(t.column("record_id").to_pylist())
            assert sl.checkpoint is None
        assert index.num_rows == shard.rows
    test = dataio.read_table(store, gen.test)
    assert all(is_test_subject(s, cfg.test_fraction) for s in test.column("subject_id").to_pylist())
    assert seen | set(test.column("record_id").to_pylist()) == set(
        table.column("record_id").to_pylist()
    )
    assert test.num_rows > 0


def test_ingest_twice_is_refused(store: Store) -> None:
    layout, cfg, table = ingest_small(store)
    with pytest.raises(FileExistsError, match="already exists"):
        ingest_table(store, layout, table, cfg)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop_columns(["label"]), "unknown label column 'label'"),
        (
            lambda t: t.rename_columns(["rid" if c == "record_id" else c for c in t.column_names]),
            "unknown record id column 'record_id'",
        ),
        (lambda t: pa.concat_tables([t, t.slice(0, 3)]), "duplicate record ids: 3 ids"),
        (lambda t: t.append_column("name", pa.array(["x"] * t.num_rows)), "'name' is string"),
    ],
)
def test_bad_datasets_are_rejected(store: Store, mutate, message: str) -> None:
    name = unique_model("bad")
    with pytest.raises(IngestError, match=message):
        ingest_table(store, ModelLayout.of(name), mutate(small_table()), small_config(name))
    assert not store.exists(ModelLayout.of(name).current)


def test_empty_shard_is_rejected(store: Store) -> None:
    name = unique_model("empty")
    with pytest.raises(IngestError, match="empty shard"):
        ingest_table(
            store, ModelLayout.of(name), small_table(subjects=3), small_config(name, shards=40)
        )


def test_cli_ingest_reports_unknown_column(store: Store, tmp_path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(small_table(), path)
    r = lethe_cli(
        "ingest", "--model", unique_model("cli"), "--data", str(path), "--label-column", "target"
    )
    assert r.returncode == 2
    assert "unknown label column 'target'" in r.stderr
    r = lethe_cli(
        "ingest",
        "--model",
        unique_model("cli"),
        "--data",
        str(path),
        "--shards",
        "2",
        "--slices",
        "2",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert '"generation": 1' in r.stdout.splitlines()[-1]
