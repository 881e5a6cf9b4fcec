"""Where a model's records come from, read as a stream of record batches.

A source is ``builtin:NAME``, one object (``s3://bucket/key``), every object under a
prefix (``s3://bucket/prefix/``, hive partitions ``k=v`` in the keys become string
columns), or a local file or directory (the CLI). Formats: Parquet, CSV, JSON lines.
Ids are read as strings, always: type inference would turn '000042' into 42, and
then erasing by the real id would find nothing.

Two readers give the same batches: Arrow's file readers in this process (the CLI and
in-process callers) and Ray Data (an ingest job on the Ray cluster: the reads run as Ray tasks,
streamed to the job with Ray Data's back-pressure). Neither ever holds the dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lethe.core.config import ModelConfig
from lethe.errors import UserError
from lethe.store import DENIED, NotFound, S3Settings, Store, error_code

FORMATS = ("parquet", "csv", "jsonl")
SUFFIXES = {"parquet": (".parquet", ".parq"), "csv": (".csv", ".txt"), "jsonl": (".jsonl", ".json")}
BATCH_ROWS = 16_384  # rows per batch read: what ingestion holds at once (pass one makes
# a few copies of a batch; 65,536 rows held about 100 MiB more at 3 million rows)
# JSON lines go through Arrow's dataset scanner, which reads ahead 4 files and 16
# batches by default: one of each
READAHEAD = {"fragment_readahead": 1, "batch_readahead": 1}
HEADS_AT_ONCE = 8  # concurrent HEADs when pinning or checking a source's objects


class SourceError(UserError, ValueError):
    """The source cannot be read; the message names the setting or object."""


@dataclass(frozen=True)
class Source:
    """A parsed dataset URI: ``kind`` builtin | s3 | local; ``bucket``/``key`` for s3
    (``key`` ends with '/' for a prefix); ``path`` for local; ``name`` for builtin."""

    kind: str
    fmt: str
    bucket: str = ""
    key: str = ""
    path: str = ""
    name: str = ""

    @classmethod
    def parse(cls, uri: str, fmt: str = "parquet") -> Source:
        if fmt not in FORMATS:
            raise SourceError(f"dataset.format: {fmt!r} is not one of {', '.join(FORMATS)}")
        if uri.startswith("builtin:"):
            return cls("builtin", fmt, name=uri.removeprefix("builtin:"))
        if uri.startswith("s3://"):
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            if not bucket or not key:
                raise SourceError(f"dataset.uri: {uri!r} needs a bucket and a key")
            return cls("s3", fmt, bucket=bucket, key=key)
        if not uri:
            raise SourceError("dataset.uri: required")
        return cls("local", fmt, path=uri)

    @property
    def is_prefix(self) -> bool:
        return self.kind == "s3" and self.key.endswith("/")

    @property
    def uri(self) -> str:
        return {
            "builtin": f"builtin:{self.name}",
            "s3": f"s3://{self.bucket}/{self.key}",
        }.get(self.kind, self.path)


def source_of(cfg: ModelConfig) -> Source:
    return Source.parse(cfg.source_uri, cfg.source_format)


def object_keys(store: Store, src: Source) -> list[str]:
    """The S3 objects that make up ``src``: the object itself, or every object under the
    prefix whose name has the format's suffix (sorted; names starting with '_' or '.',
    such as ``_SUCCESS``, are not data)."""
    if src.kind != "s3":
        return []
    if not src.is_prefix:
        return [src.key]
    return sorted(
        k
        for k in store.for_bucket(src.bucket).list_keys(src.key)
        if k.endswith(SUFFIXES[src.fmt]) and not k.rsplit("/", 1)[-1].startswith(("_", "."))
    )


@dataclass(frozen=True)
class SourceObject:
    """One object of an S3 source, as the credentials that pinned it saw it."""

    key: str
    etag: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "etag": self.etag, "size": self.size}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SourceObject:
        return cls(str(d["key"]), str(d["etag"]), int(d["size"]))


def pin_objects(store: Store, src: Source, *, writable: bool = False) -> list[SourceObject]:
    """The objects of the S3 source ``src`` as ``store``'s credentials see them: listed
    and each one read-checked (a HEAD needs the right to read it) with those
    credentials; ``writable``: write-checked too (``Store.may_write``, which writes
    nothing). A control plane pins a model's source with the model's own keys, so that
    the jobs which then read it, and patch or delete it as ``dataset.sourcePolicy``
    says, with the cluster's keys touch only what the model's keys reach. Raises
    SourceError naming the field."""
    bucket = store.for_bucket(src.bucket)

    def pinned(key: str) -> SourceObject:
        obj = SourceObject(key, *bucket.head(key))
        if writable and not bucket.may_write(key):
            raise SourceError(
                "dataset.sourcePolicy: erasing from the source writes it, and the model's "
                f"S3 credentials may not write {src.uri}"
            )
        return obj

    try:
        keys = object_keys(store, src)
        with ThreadPoolExecutor(HEADS_AT_ONCE) as pool:
            objects = list(pool.map(pinned, keys))
    except NotFound:
        raise SourceError(f"dataset.uri: no object at {src.uri}") from None
    except botocore.exceptions.ClientError as e:
        code = error_code(e)
        if code in DENIED:
            raise SourceError(
                f"dataset.uri: the model's S3 credentials may not read {src.uri} ({code})"
            ) from None
        if code == "NoSuchBucket":
            raise SourceError(f"dataset.uri: no bucket {src.bucket!r}") from None
        raise
    if not objects:
        raise SourceError(f"dataset.uri: no {src.fmt} files at {src.uri}")
    return objects


def pin_source(store: Store, cfg: ModelConfig) -> list[SourceObject] | None:
    """``pin_objects`` for a model's source, write-checked when its ``sourcePolicy``
    changes the source; None for a source that is not in S3 (``builtin:``)."""
    src = source_of(cfg)
    if src.kind != "s3":
        return None
    return pin_objects(store, src, writable=cfg.source_policy != "external")


def check_pinned(store: Store, src: Source, objects: list[SourceObject]) -> None:
    """Refuse to read a pinned object that changed (or went) since it was pinned: the
    job reads what the model's credentials were shown to read, as it was then."""
    bucket = store.for_bucket(src.bucket)

    def changed(o: SourceObject) -> bool:
        try:
            return bucket.head(o.key) != (o.etag, o.size)
        except NotFound:
            return True

    with ThreadPoolExecutor(HEADS_AT_ONCE) as pool:
        stale = sum(pool.map(changed, objects))
    if stale:
        raise SourceError(
            f"dataset.uri: {stale} of the {len(objects)} objects of {src.uri} changed or "
            "went after the model's credentials were checked; ingested again when the "
            "spec changes or after erasurePolicy.retryFailedAfterSeconds"
        )


def arrow_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    endpoint = settings.endpoint or ""
    scheme = "http" if endpoint.startswith("http://") else "https"
    return pafs.S3FileSystem(
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        region=settings.region,
        endpoint_override=endpoint.split("://", 1)[-1] or None,
        scheme=scheme,
        # an endpoint that does not answer fails in seconds (as the boto3 client does)
        connect_timeout=10,
    )


def _id_types(cfg: ModelConfig) -> dict[str, pa.DataType]:
    c = cfg.columns
    out = {c.record_id: pa.string(), c.subject_id: pa.string(), c.label: pa.string()}
    if c.file:
        out[c.file] = pa.string()
    return out


def csv_convert_options(cfg: ModelConfig | None) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(column_types=_id_types(cfg) if cfg else {})


def _local_files(src: Source) -> tuple[list[str], str]:
    p = Path(src.path)
    if not p.exists():
        raise SourceError(f"dataset not found: {p}")
    if p.is_dir():
        files = sorted(
            str(f)
            for f in p.rglob("*")
            if f.is_file()
            and f.name.endswith(SUFFIXES[src.fmt])
            and not f.name.startswith(("_", "."))
        )
        return files, str(p).rstrip("/") + "/"
    return [str(p)], ""


def _file_batches(
    filesystem: pafs.FileSystem, path: str, cfg: ModelConfig, fmt: str, base: str, rows: int
) -> Iterator[pa.RecordBatch]:
    """One file's records, ``rows`` at a time, with its hive partition values (``k=v``
    directories below ``base``) as string columns. Parquet is read a row group at a
    time and CSV a block at a time, so a read holds one of them."""
    parts = [
        segment.partition("=")[::2]
        for segment in path.removeprefix(base).split("/")[:-1]
        if base and "=" in segment
    ]
    if fmt == "parquet":
        with filesystem.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            # a row group at a time: one iter_batches over the whole file kept what it
            # read until the file's end (954 MiB held for an 805 MiB file; 213 this way)
            for group in range(pf.num_row_groups):
                batches = pf.iter_batches(batch_size=rows, row_groups=[group])
                yield from _with_columns(batches, parts)
    elif fmt == "csv":
        with filesystem.open_input_stream(path) as f:
            reader = pacsv.open_csv(f, convert_options=csv_convert_options(cfg))
            yield from _with_columns(reader, parts)
    else:  # JSON lines: Arrow has no streaming reader; one file at a time
        dataset = pads.dataset([path], filesystem=filesystem, format="json")
        yield from _with_columns(dataset.to_batches(batch_size=rows, **READAHEAD), parts)


def _with_columns(
    batches: Iterable[pa.RecordBatch], parts: list[tuple[str, str]]
) -> Iterator[pa.RecordBatch]:
    for b in batches:
        for name, value in parts:
            if name not in b.schema.names:
                b = b.append_column(name, pa.array([value] * b.num_rows, pa.string()))
        yield b


def _files(
    store: Store | None, src: Source, pinned: list[SourceObject] | None = None
) -> tuple[pafs.FileSystem, list[str], str]:
    """The filesystem, the files and the partitions' base of a local or s3 source;
    ``pinned``: read those objects only (checked unchanged), not what a listing finds."""
    if src.kind == "local":
        files, base = _local_files(src)
        filesystem: pafs.FileSystem = pafs.LocalFileSystem()
    else:
        assert store is not None
        if pinned is None:
            keys = object_keys(store, src)
        else:
            check_pinned(store, src, pinned)
            keys = [o.key for o in pinned]
        files = [f"{src.bucket}/{k}" for k in keys]
        base = f"{src.bucket}/{src.key}" if src.is_prefix else ""
        filesystem = arrow_filesystem(store.settings)
    if not files:
        raise SourceError(f"dataset.uri: no {src.fmt} files at {src.uri}")
    return filesystem, files, base


def _with_string_ids(batch: pa.RecordBatch, cfg: ModelConfig) -> pa.RecordBatch:
    """JSON has no way to say a number is a string id: cast integer ids to strings."""
    types = _id_types(cfg)
    cols = []
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        if name in types and pa.types.is_integer(col.type):
            col = col.cast(pa.string())
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, names=batch.schema.names)


def read_batches(
    store: Store | None,
    cfg: ModelConfig,
    *,
    ray_data: bool = False,
    rows: int = BATCH_ROWS,
    pinned: list[SourceObject] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The source's records, ``rows`` at a time; ``ray_data``: read on the Ray cluster;
    ``pinned``: an S3 source's objects as ``pin_objects`` gave them (read only those)."""
    src = source_of(cfg)
    if src.kind == "builtin":
        from lethe.datasets import builtin

        try:
            table = builtin(src.name)
        except ValueError as e:
            raise SourceError(f"dataset.uri: {e}") from None
        yield from table.to_batches(max_chunksize=rows)
        return
    if src.kind == "s3" and store is None:
        raise SourceError("dataset.uri: an s3:// source needs S3 settings")
    if ray_data and src.kind == "s3":
        assert store is not None
        batches: Iterable[pa.RecordBatch] = _ray_data_batches(store, src, cfg, rows, pinned)
    else:
        filesystem, files, base = _files(store, src, pinned)
        batches = (
            b for path in files for b in _file_batches(filesystem, path, cfg, src.fmt, base, rows)
        )
    try:
        for batch in batches:
            if batch.num_rows:
                yield _with_string_ids(batch, cfg)
    except (OSError, pa.ArrowInvalid) as e:
        raise SourceError(f"dataset {src.uri}: cannot read it as {src.fmt}: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    """An Arrow error without the text it quotes: a CSV or JSON parse error ends with
    the offending row, and a row holds ids, which never go into a message."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    head, _, rest = first.partition(": ")
    return f"{head}: {rest.split(':', 1)[0]}" if rest else head


def _ray_data_batches(
    store: Store, src: Source, cfg: ModelConfig, rows: int, pinned: list[SourceObject] | None
) -> Iterator[pa.RecordBatch]:
    """Ray Data, one read task per file, two at a time, streamed to this process.

    The tasks take no CPU: reads wait on S3, and idle warm lanes may hold every CPU of
    the cluster (Ray Data's own file readers list files in a CPU task first, which
    then waits for a lane's TTL)."""
    import ray.data

    _, paths, base = _files(store, src, pinned)
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    ds = ds.map_batches(
        _read_files,
        fn_kwargs={
            "settings": store.settings,
            "cfg": cfg,
            "fmt": src.fmt,
            "base": base,
            "rows": rows,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=2),
    )
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from table.to_batches(max_chunksize=rows)
    except Exception as e:  # a read task's error arrives wrapped in Ray's
        cause = getattr(e, "cause", None) or e
        raise SourceError(
            f"dataset {src.uri}: cannot read it as {src.fmt}: {_reason(cause)}"
        ) from None


def _read_files(
    batch: pa.Table, settings: S3Settings, cfg: ModelConfig, fmt: str, base: str, rows: int
) -> Iterator[pa.Table]:
    """A Ray Data task: the files of ``batch`` (their paths), ``rows`` at a time."""
    filesystem = arrow_filesystem(settings)
    for path in batch.column("path").to_pylist():
        for b in _file_batches(filesystem, path, cfg, fmt, base, rows):
            if b.num_rows:
                yield pa.Table.from_batches([b])
