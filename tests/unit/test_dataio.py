"""The keyed side reads ids, not features: ``dataio.select_rows`` fetches a Parquet
object's footer and the asked-for column chunks by ranged reads, a batch at a time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lethe import dataio
from lethe.core.hashing import sha256_hex
from lethe.core.manifest import FileRef


class RangedStore:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.fetched = 0

    def size(self, key: str) -> int:
        return len(self.body)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self.fetched += length
        return self.body[start : start + length]


def test_select_rows_fetches_the_ids_not_the_features() -> None:
    rng = np.random.default_rng(0)
    n, d = 4000, 64
    features = pa.FixedSizeListArray.from_arrays(
        pa.array(rng.normal(size=n * d).astype(np.float32)), d
    )
    table = pa.table(
        {
            "record_id": [f"rec-{i:06d}" for i in range(n)],
            "subject_id": [f"s-{i // 4:05d}" for i in range(n)],
            "features": features,
        }
    )
    body = dataio.encode(table)
    store = RangedStore(body)
    ref = FileRef("k", sha256_hex(body), n)
    wanted = {"rec-000007", "rec-003999", "rec-070000"}
    got = dataio.select_rows(
        store,  # type: ignore[arg-type]
        ref,
        ["record_id", "no-such-column"],
        lambda b: dataio.isin(b.column("record_id"), wanted),
    )
    assert got.column_names == ["record_id", "_row"]  # the columns the file has
    assert got.column("record_id").to_pylist() == ["rec-000007", "rec-003999"]
    assert got.column("_row").to_pylist() == [7, 3999]  # positions in the (sorted) file
    assert store.fetched < len(body) / 5, (store.fetched, len(body))
    none = dataio.select_rows(store, ref, ["record_id"], lambda b: np.zeros(b.num_rows, bool))  # type: ignore[arg-type]
    assert none.num_rows == 0 and none.column_names == ["record_id", "_row"]


def shuffled_table(n: int, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [f"r{j:07d}" for j in rng.permutation(n)]
    return pa.table(
        {
            "record_id": ids,
            "subject_id": [f"s{i[1:5]}" for i in ids],
            "label": pa.array(rng.integers(0, 3, n).astype(np.int32)),
            "features": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.normal(size=n * 3).astype(np.float32)), 3
            ),
        }
    )


def test_encode_is_the_same_bytes_however_the_rows_come(monkeypatch) -> None:
    """Row order and Arrow chunking never change a file's bytes; files longer than a
    row group get several (and files of one row group are what pyarrow always wrote)."""
    import io

    import pyarrow.parquet as pq

    monkeypatch.setattr(dataio, "ROW_GROUP_ROWS", 1000)
    t = shuffled_table(3500)
    body = dataio.encode(t)
    rechunked = pa.concat_tables([t.slice(i, 333) for i in range(0, t.num_rows, 333)])
    reversed_rows = t.take(pa.array(np.arange(t.num_rows)[::-1]))
    assert dataio.encode(rechunked) == body == dataio.encode(reversed_rows)
    meta = pq.ParquetFile(io.BytesIO(body)).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1000] * 3 + [500]
    assert pq.read_table(io.BytesIO(body)).equals(t.sort_by("record_id"))
    small = shuffled_table(999)
    plain = io.BytesIO()
    pq.write_table(small.sort_by("record_id"), plain, compression="zstd", write_statistics=False)
    assert dataio.encode(small) == plain.getvalue()
    empty = io.BytesIO()
    pq.write_table(t.slice(0, 0), empty, compression="zstd", write_statistics=False)
    assert dataio.encode(t.slice(0, 0)) == empty.getvalue()


def test_an_ingested_slice_streamed_from_its_spill_is_encodes_bytes(monkeypatch, tmp_path) -> None:
    """Ingest writes a slice from its spill a row group at a time through a local file;
    the object is byte for byte ``encode`` of the same rows (what a patch writes)."""
    from lethe import ingest

    monkeypatch.setattr(dataio, "ROW_GROUP_ROWS", 1000)
    t = shuffled_table(2600, seed=3)
    spilled = t.set_column(2, "label", pa.array([f"c{v}" for v in t.column("label").to_pylist()]))
    spill = ingest._Spill(tmp_path)
    for i in range(0, spilled.num_rows, 170):  # many small runs, as pass one writes them
        for batch in spilled.slice(i, 170).to_batches():
            spill.write((0, 0), batch)
        if i == 1020:
            spill.close()  # a key reopened gets another part
    spill.close()

    class PutStore:
        objects: dict[str, bytes] = {}

        def exists(self, key: str) -> bool:
            return key in self.objects

        def put_file(self, key: str, path) -> str:
            self.objects[key] = open(path, "rb").read()
            return "v1"

    store = PutStore()
    class_of = {"c0": 0, "c1": 1, "c2": 2}
    ref, index_part = ingest._write_spilled(
        store,  # type: ignore[arg-type]
        spill,
        (0, 0),
        class_of,
        lambda sha: f"data/{sha}",
        lambda sha: f"tomb/{sha}",
        ["record_id", "subject_id"],
    )
    expected = dataio.encode(t)
    assert store.objects[ref.key] == expected and ref.sha256 == sha256_hex(expected)
    assert ref.rows == t.num_rows
    assert index_part.column("record_id").to_pylist() == sorted(t.column("record_id").to_pylist())
    assert not (tmp_path / "out.parquet").exists()


def test_rows_read_back_from_a_file_encode_to_its_bytes() -> None:
    """A patch re-encodes rows read back from a file; a fresh ingest encodes rows built
    in memory (Arrow names a fixed-size list's child "item", a Parquet file read back
    names it "element", and the name is written into the file): the same rows give
    the same bytes either way, so that content addresses and tombstones agree."""
    import io

    import pyarrow.parquet as pq

    n = 40
    built = dataio.data_table(
        [f"r{i:03d}" for i in range(n)],
        [f"s{i}" for i in range(n)],
        np.arange(n) % 3,
        np.random.default_rng(0).random((n, 5), dtype=np.float32),
    )
    body = dataio.encode(built)
    read_back = pq.read_table(io.BytesIO(body))
    assert dataio.encode(read_back) == body
    assert dataio.encode(read_back.slice(3, 20)) == dataio.encode(built.slice(3, 20))
