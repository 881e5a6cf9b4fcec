"""dataio's streamed file work on real SeaweedFS: a patch (``without_rows``) reads and
writes a row group at a time and gives exactly the bytes (so the key) that encoding the
remaining rows whole gives, for any rows dropped, across row groups or all of them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lethe import dataio
from lethe.core.hashing import sha256_hex
from lethe.store import Store

from .conftest import small_table, unique_model

GROUP = 50  # rows per row group here (a real file has 65,536)


@pytest.mark.parametrize(
    "drop",
    ["none", "one", "spread", "first-group", "all"],
)
def test_a_patch_streamed_gives_the_bytes_of_the_rows_encoded_whole(
    store: Store, monkeypatch, drop: str
) -> None:
    monkeypatch.setattr(dataio, "ROW_GROUP_ROWS", GROUP)
    raw = small_table(subjects=40, per_subject=4)  # 160 rows
    features = np.stack([raw.column(f"x{i}").to_numpy() for i in range(6)], axis=1)
    table = dataio.data_table(
        raw.column("record_id").to_pylist(),
        raw.column("subject_id").to_pylist(),
        np.arange(raw.num_rows) % 3,
        features,
    )
    body = dataio.encode(table)
    assert pq.ParquetFile(pa.BufferReader(body)).num_row_groups == 4
    prefix = unique_model("stream")
    ref = dataio.write_content_addressed(store, table, lambda sha: f"{prefix}/in-{sha}.parquet")
    ids = sorted(table.column("record_id").to_pylist())
    chosen = {
        "none": set(),
        "one": {ids[77]},
        "spread": set(ids[3::7]),
        "first-group": set(ids[:GROUP]),
        "all": set(ids),
    }[drop]
    reads: list[int] = []
    real = pq.ParquetFile.read_row_group

    def read_row_group(self, i, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(i)
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    out = dataio.without_rows(
        store,
        ref,
        lambda col: dataio.isin(col, chosen),
        lambda sha: f"{prefix}/out-{sha}.parquet",
    )
    if not chosen:
        assert out is None
        return
    mask = dataio.isin(table.column("record_id"), chosen)
    expected = dataio.encode(dataio.drop_rows(table, mask))
    assert out is not None and out.rows == table.num_rows - len(chosen)
    assert out.sha256 == sha256_hex(expected)
    assert store.get(out.key) == expected
    assert len(reads) == 8  # each of the 4 groups twice (ids, then rows): never whole
