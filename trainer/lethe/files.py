"""File-backed records: a record whose content is an object in S3 (an image), named by
an ``s3://bucket/key`` URI in the dataset's file column (``columns.file``).

The object stays where it is and is read through a decode function when its record is
used (``columns.decode``: images built in, ``decode_image``: grayscale, or RGB for a
3-channel ``trainer.input_shape``, resized to its height and width, scaled to [0, 1];
or a user's ``package.module:fn``). At ingest
each object is fetched once, checked (it decodes, to the same size as the others) and
hashed; a data file holds the record's URI and that sha256 (``FILE_COLUMNS``), not its
pixels. Training and evaluation fetch and decode the objects of the rows they read
(``features_and_labels``), and refuse an object whose bytes changed since ingest: the
slice file's hash, and so the lineage, covers the file's bytes through it. An erasure
reads the URIs of the rows it drops and deletes those objects with every version; the
certificate keeps their keyed hashes (a URI may name a person), which ``verify``
checks against every object version of the buckets it names.
"""

from __future__ import annotations

import hashlib
import importlib
import io
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from lethe import dataio
from lethe.core.config import ConfigError, ModelConfig
from lethe.errors import IntegrityFailure, UserError
from lethe.store import NotFound, Store

FETCH_THREADS = 8
FILE_COLUMNS = ("uri", "file_sha256")  # a file-backed record's columns in its data file


class FileUnreadable(UserError, ValueError):
    """A record's file cannot be fetched or decoded; the message counts, never names."""


class FileChanged(IntegrityFailure, RuntimeError):
    """A record's file no longer has the bytes it had at ingest (edited, or deleted,
    behind Lethe's back): training on it would not be what the lineage says."""


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise FileUnreadable("file column: every value must be an s3://bucket/key URI")
    return bucket, key


def decode_image(body: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """An image's pixels as float32 in [0, 1], channels first, flattened. ``shape``
    (C, H, W) or (H, W) resizes; () keeps the image's own size, grayscale."""
    from PIL import Image

    with Image.open(io.BytesIO(body)) as img:
        channels = shape[0] if len(shape) == 3 else 1
        img = img.convert("RGB" if channels == 3 else "L")
        if len(shape) >= 2 and img.size != (shape[-1], shape[-2]):
            img = img.resize((shape[-1], shape[-2]))
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    if pixels.ndim == 3:
        pixels = pixels.transpose(2, 0, 1)
    return pixels.reshape(-1)


def decoder(cfg: ModelConfig) -> Callable[[bytes, tuple[int, ...]], Any]:
    """The model's decode function (``columns.decode``): the built-in ``image``, or a
    user's ``package.module:fn`` taking (the file's bytes, ``trainer.input_shape``)
    and returning its features (any float array; flattened)."""
    name = cfg.columns.decode
    if name == "image":
        return decode_image
    module, _, attr = name.partition(":")
    try:
        fn: Callable[[bytes, tuple[int, ...]], Any] = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"columns.decode: cannot import {name!r} ({type(e).__name__})") from None
    return fn


class FileDecoder:
    """Fetches and decodes the files of a batch of records (in threads: S3 latency,
    not CPU, is what a small image costs)."""

    def __init__(self, store: Store, cfg: ModelConfig) -> None:
        self.store = store
        self.shape = tuple(cfg.trainer.input_shape)
        self.decode = decoder(cfg)
        self.decoder_name = cfg.columns.decode
        self._buckets: dict[str, Store] = {}
        # An ingest job reads with the cluster's keys, not the tenant's: a record may
        # only name a file in its dataset's own bucket, never another tenant's.
        src = cfg.source_uri
        self.bucket = src.removeprefix("s3://").partition("/")[0] if src.startswith("s3://") else ""

    def _fetch(self, uri: str) -> bytes:
        bucket, key = split_uri(uri)
        if self.bucket and bucket != self.bucket:
            raise FileUnreadable(
                f"file column: every file must be in the dataset's bucket {self.bucket!r}"
            )
        if bucket not in self._buckets:
            self._buckets[bucket] = self.store.for_bucket(bucket)
        return self._buckets[bucket].get(key)

    def _one(self, uri: str) -> tuple[np.ndarray, str]:
        try:
            body = self._fetch(uri)
        except NotFound:
            raise FileUnreadable("file column: a record's file does not exist") from None
        try:
            pixels = np.asarray(self.decode(body, self.shape), np.float32).reshape(-1)
        except Exception as e:  # noqa: BLE001 - a user's decode function raises anything
            # the exception's type only: its message may quote the file
            raise FileUnreadable(
                f"file column: a record's file could not be decoded by "
                f"{self.decoder_name!r} ({type(e).__name__})"
            ) from None
        return pixels, hashlib.sha256(body).hexdigest()

    def decode_all(self, uris: list[str]) -> tuple[np.ndarray, list[str]]:
        """The files' pixels, one row each, and the sha256 of each file's bytes."""
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            done = list(pool.map(self._one, uris))
        pixels = [p for p, _ in done]
        sizes = {p.size for p in pixels}
        if len(sizes) > 1:
            raise FileUnreadable(
                f"file column: images decode to {len(sizes)} different sizes; set "
                "trainer.inputShape to resize them to one"
            )
        stacked = np.stack(pixels) if pixels else np.zeros((0, 0), np.float32)
        return stacked, [h for _, h in done]


def feature_columns(cfg: ModelConfig) -> list[str]:
    """The columns of a data or test file that ``features_and_labels`` reads."""
    return ["label", *FILE_COLUMNS] if cfg.columns.file else ["label", "features"]


def features_and_labels(
    store: Store, cfg: ModelConfig, table: pa.Table, files: FileDecoder | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a data or test file (``feature_columns``) as (features, labels): the
    features column, or, for file-backed records, each row's file fetched and decoded
    (by ``files``, which a caller reading many row groups keeps: it holds a client per
    bucket), refused (FileChanged) unless its bytes are those hashed at ingest."""
    if not cfg.columns.file:
        return dataio.features_and_labels(table)
    labels = table.column("label").to_numpy().astype(np.int64)
    if not table.num_rows:
        return np.zeros((0, cfg.num_features), np.float32), labels
    try:
        files = files or FileDecoder(store, cfg)
        pixels, shas = files.decode_all(table.column("uri").to_pylist())
    except FileUnreadable as e:
        raise FileChanged(f"{e} (it was read at ingest)") from None
    ingested = table.column("file_sha256").to_pylist()
    changed = sum(a != b for a, b in zip(shas, ingested, strict=True))
    if changed:
        raise FileChanged(
            f"file column: {changed} of {len(shas)} records' files changed since ingest"
        )
    return pixels.astype(np.float32, copy=False), labels


def purge_files(store: Store, uris: Iterable[str]) -> dict[str, int]:
    """Delete every version of the objects ``uris`` name; returns versions per URI."""
    out: dict[str, int] = {}
    buckets: dict[str, Store] = {}
    for uri in sorted(set(uris)):
        bucket, key = split_uri(uri)
        if bucket not in buckets:
            buckets[bucket] = store.for_bucket(bucket)
        out[uri] = buckets[bucket].purge(key)
    return out
