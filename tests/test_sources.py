"""Datasets as users have them, on real SeaweedFS: a Parquet prefix of many files with
hive partitions, CSV, JSON lines; streamed ingestion in bounded pieces."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from lethe import dataio, ingest
from lethe.generations import read_live
from lethe.ingest import IngestError, ingest_source, ingest_table
from lethe.layout import ModelLayout
from lethe.store import Store

from .conftest import small_config, small_table, unique_model


def _files(store: Store, layout: ModelLayout) -> list[tuple[str, str]]:
    """Every data, index and test file of generation 1 (key, sha): what a format must
    not change."""
    gen = read_live(store, layout).generation
    out = [(gen.test.key.rsplit("/", 1)[-1], gen.test.sha256)]
    for shard in gen.shards:
        out.append((shard.index.key, shard.index.sha256))
        out += [(s.data.key, s.data.sha256) for s in shard.slices]
    return [(k.split("/", 2)[-1], sha) for k, sha in out]


def _table() -> pa.Table:
    t = small_table(subjects=40, per_subject=4)
    # ids a type-guessing reader would turn into numbers
    ids = pa.array([f"{i:06d}" for i in range(t.num_rows)], pa.string())
    return t.set_column(0, "record_id", ids)


def _put_parquet(src: Store, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    src.put(key, buf.getvalue())


@pytest.fixture(scope="module")
def source(store: Store) -> Store:
    src = store.for_bucket("lethe-sources")
    src.ensure_bucket()
    return src


def test_one_dataset_in_every_format_gives_the_same_files(store: Store, source: Store) -> None:
    table = _table()
    root = unique_model("fmt")
    # Parquet prefix: the label is a hive partition, each class in two files, plus files
    # that are not data (a marker, a README) and must be ignored
    for label in pc.unique(table.column("label")).to_pylist():
        part = table.filter(pc.equal(table.column("label"), label)).drop_columns(["label"])
        half = part.num_rows // 2
        _put_parquet(source, f"{root}/pq/label={label}/a.parquet", part.slice(0, half))
        _put_parquet(source, f"{root}/pq/label={label}/b.parquet", part.slice(half))
    source.put(f"{root}/pq/_SUCCESS", b"")
    source.put(f"{root}/pq/README.txt", b"not data")
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    source.put(f"{root}/data.csv", buf.getvalue())
    lines = [json.dumps(row) for row in table.to_pylist()]
    source.put(f"{root}/data.jsonl", ("\n".join(lines) + "\n").encode())

    features = tuple(c for c in table.column_names if c.startswith("x"))
    results = {}
    for fmt, uri in (
        ("memory", ""),
        ("parquet", f"s3://lethe-sources/{root}/pq/"),
        ("csv", f"s3://lethe-sources/{root}/data.csv"),
        ("jsonl", f"s3://lethe-sources/{root}/data.jsonl"),
    ):
        name = f"{root}-{fmt}"
        cfg = small_config(name)
        cfg = replace(cfg, columns=replace(cfg.columns, features=features))
        layout = ModelLayout.of(name)
        if fmt == "memory":
            ingest_table(store, layout, table, cfg)
        else:
            ingest_source(store, layout, replace(cfg, source_uri=uri, source_format=fmt))
        results[fmt] = _files(store, layout)
    assert results["parquet"] == results["memory"]
    assert results["csv"] == results["memory"]
    assert results["jsonl"] == results["memory"]
    gen = read_live(store, ModelLayout.of(f"{root}-csv")).generation
    held = set()
    for shard in gen.shards:
        held |= set(dataio.read_table(store, shard.index).column("record_id").to_pylist())
    assert (
        "000007" in held
        or "000007" in dataio.read_table(store, gen.test).column("record_id").to_pylist()
    )


def test_spilling_in_many_parts_gives_the_same_files(store: Store, monkeypatch) -> None:
    """Pass one keeps a bounded number of spill files open; a (shard, slice) written
    again after its file was closed gets another part, and the slice is the same."""
    table = _table()
    a, b = unique_model("spill"), unique_model("spill")
    ingest_table(store, ModelLayout.of(a), table, small_config(a, shards=3, slices=4))
    monkeypatch.setattr(ingest._Spill, "MAX_OPEN", 2)
    monkeypatch.setattr(ingest, "BATCH_ROWS", 7)  # many small batches
    ingest_table(store, ModelLayout.of(b), table, small_config(b, shards=3, slices=4))
    assert _files(store, ModelLayout.of(a)) == _files(store, ModelLayout.of(b))


def test_unreadable_sources_name_the_setting_and_no_id(store: Store, source: Store) -> None:
    root = unique_model("badsrc")
    name = f"{root}-m"
    cfg = small_config(name)
    with pytest.raises(IngestError, match=r"dataset.uri: no parquet files at s3://"):
        ingest_source(
            store, ModelLayout.of(name), replace(cfg, source_uri=f"s3://lethe-sources/{root}/none/")
        )
    # a CSV row with a column too few: the parse error quotes the row, the message not
    source.put(
        f"{root}/bad.csv",
        b"record_id,subject_id,label,x0\nr1,subj-secret-42,a,1.0\nr2,subj-secret-43,b\n",
    )
    with pytest.raises(IngestError) as e:
        ingest_source(
            store,
            ModelLayout.of(name),
            replace(cfg, source_uri=f"s3://lethe-sources/{root}/bad.csv", source_format="csv"),
        )
    assert "cannot read it as csv" in str(e.value) and "secret" not in str(e.value)
    assert not store.exists(ModelLayout.of(name).current)


def test_two_ingest_jobs_at_once_make_one_model(store: Store, source: Store) -> None:
    """Attempt n and n+1 of an ingest job running together (an operator that retried
    while the first was still alive), then a third run after both: one generation 1,
    readable, and every run reports it."""
    import os
    import subprocess
    import sys

    from lethe import jobs

    root = unique_model("twice")
    _put_parquet(source, f"{root}/data.parquet", _table())
    name = f"{root}-m"
    layout = ModelLayout.of(name)
    cfg = replace(small_config(name), source_uri=f"s3://lethe-sources/{root}/data.parquet")
    jobs.request_ingest(store, layout, cfg, owner="uid-1")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | store.settings.env()
    cmd = [sys.executable, "-m", "lethe.jobs", "ingest", "--model-prefix", layout.prefix]

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)

    runs = []
    for proc in [start(), start()] + [None]:  # two at once, then one more after both
        proc = proc or start()
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        runs.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["generation"] for r in runs] == [1, 1, 1]
    assert len({r["records"] for r in runs}) == 1
    assert read_live(store, layout).generation.number == 1
    assert store.get_json(layout.owner)["uid"] == "uid-1"


def test_a_file_deleted_behind_lethes_back_refuses_the_dataset(store: Store, source: Store) -> None:
    """A file-backed record whose image is gone: the ingest is refused with a message
    that names the column (never the record or its URI), and nothing is written."""
    import numpy as np
    from PIL import Image

    root = unique_model("files")
    table = small_table(subjects=20, per_subject=2)
    uris = []
    for i, rid in enumerate(table.column("record_id").to_pylist()):
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4), i % 255, np.uint8), "L").save(buf, "PNG")
        key = f"{root}/img/{rid}.png"
        source.put(key, buf.getvalue())
        uris.append(f"s3://lethe-sources/{key}")
    refs = table.select(["record_id", "subject_id", "label"]).append_column("image", pa.array(uris))
    _put_parquet(source, f"{root}/refs.parquet", refs)
    source.purge(uris[5].split("/", 3)[3])  # deleted, every version
    name = f"{root}-m"
    cfg = small_config(name)
    cfg = replace(
        cfg,
        columns=replace(cfg.columns, file="image"),
        source_uri=f"s3://lethe-sources/{root}/refs.parquet",
    )
    with pytest.raises(IngestError, match="file column: a record's file does not exist") as e:
        ingest_source(store, ModelLayout.of(name), cfg)
    assert "rec-" not in str(e.value) and "img/" not in str(e.value)
    assert not store.exists(ModelLayout.of(name).current)
