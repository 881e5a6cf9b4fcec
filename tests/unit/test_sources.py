"""Dataset sources without a server: URI parsing, messages without ids, image decoding."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lethe.files import FileUnreadable, decode_image, split_uri
from lethe.sources import Source, SourceError, _reason


def test_a_uri_says_what_it_is() -> None:
    assert Source.parse("builtin:digits").kind == "builtin"
    one = Source.parse("s3://b/data/x.csv", "csv")
    assert (one.kind, one.bucket, one.key, one.is_prefix) == ("s3", "b", "data/x.csv", False)
    prefix = Source.parse("s3://b/data/", "parquet")
    assert prefix.is_prefix and prefix.uri == "s3://b/data/"
    assert Source.parse("/tmp/x.parquet").kind == "local"
    with pytest.raises(SourceError, match="dataset.format: 'xlsx'"):
        Source.parse("s3://b/k", "xlsx")
    with pytest.raises(SourceError, match="dataset.uri"):
        Source.parse("s3://b/", "parquet")


def test_an_arrow_error_loses_the_row_it_quotes() -> None:
    e = pa.ArrowInvalid("CSV parse error: Expected 4 columns, got 3: r2,subj-secret-43,b")
    assert _reason(e) == "CSV parse error: Expected 4 columns, got 3"
    assert "secret" not in _reason(pa.ArrowInvalid('JSON parse error: bad: {"id": "secret"}'))


def _png(pixels: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, "PNG")
    return buf.getvalue()


def test_images_decode_to_scaled_channels_first_pixels() -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    x = decode_image(_png(gray), ())
    assert x.shape == (64,) and x.dtype == np.float32
    assert np.allclose(x, gray.reshape(-1) / 255.0)
    assert decode_image(_png(gray), (1, 4, 4)).shape == (16,)  # resized
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    x = decode_image(_png(rgb, "RGB"), (3, 8, 8))
    assert x.shape == (192,) and x[:64].min() == 1.0 and x[64:].max() == 0.0  # red plane first


def test_a_file_uri_must_be_s3() -> None:
    assert split_uri("s3://b/people/a.png") == ("b", "people/a.png")
    for bad in ("http://b/a.png", "s3://b", "s3:///a.png"):
        with pytest.raises(FileUnreadable, match="file column"):
            split_uri(bad)


def test_a_record_may_not_name_a_file_outside_its_datasets_bucket() -> None:
    """The ingest job reads with the cluster's keys: a tenant's dataset may not pull in
    (or, at erasure, delete) another bucket's objects. Refused before any fetch."""
    from lethe.core.config import ModelConfig
    from lethe.files import FileDecoder

    class NoStore:
        def for_bucket(self, bucket: str) -> None:
            raise AssertionError("fetched")

    cfg = ModelConfig(name="m", shards=1, slices=1, source_uri="s3://tenant-a/refs/")
    decoder = FileDecoder(NoStore(), cfg)  # type: ignore[arg-type]
    with pytest.raises(FileUnreadable, match="dataset's bucket 'tenant-a'") as e:
        decoder.decode_all(["s3://tenant-b/people/person-0042.png"])
    assert "person-0042" not in str(e.value)


def test_parquet_is_read_a_row_group_at_a_time_in_order(tmp_path) -> None:
    """Every row of every row group, in the file's order, in batches no larger than
    asked for (one read over the whole file kept what it read until the end)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from lethe.sources import _file_batches

    t = pa.table({"record_id": [f"r{i:04d}" for i in range(2500)], "x": np.arange(2500.0)})
    path = tmp_path / "k=v" / "part.parquet"
    path.parent.mkdir()
    pq.write_table(t, path, row_group_size=1000)
    batches = list(
        _file_batches(pafs.LocalFileSystem(), str(path), None, "parquet", str(tmp_path) + "/", 300)  # type: ignore[arg-type]
    )
    assert max(b.num_rows for b in batches) <= 300
    got = pa.Table.from_batches(batches)
    assert got.column("record_id").to_pylist() == t.column("record_id").to_pylist()
    assert set(got.column("k").to_pylist()) == {"v"}  # the hive partition, as a column
