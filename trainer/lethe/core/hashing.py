"""Stable hashes: shard and slice assignment, content addresses, keyed hashes of ids.

Everything here must give the same answer on every machine and Python version, so
nothing uses ``hash()``; all hashes are SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bucket(namespace: str, value: str, buckets: int) -> int:
    digest = hashlib.sha256(f"{namespace}\0{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def shard_of(subject_id: str, shards: int) -> int:
    """Subject-affine sharding: every record of one person lands in one shard."""
    return _bucket("lethe-shard", subject_id, shards)


def slice_of(subject_id: str, slices: int) -> int:
    """Subject-affine slicing: one person's records share one slice, so erasing a
    person retrains from a single first slice rather than from the earliest of many."""
    return _bucket("lethe-slice", subject_id, slices)


def is_test_subject(subject_id: str, test_fraction: float) -> bool:
    """The held-out test set is split by subject so no person is in both sides."""
    return _bucket("lethe-test", subject_id, 1_000_000) < int(test_fraction * 1_000_000)


def keyed_hash(key: bytes, value: str) -> str:
    """How ids appear in plans and certificates: HMAC-SHA256 under the model's secret
    key, never in the clear and never with a salt stored beside it, so that whoever
    reads a certificate cannot test guesses of an id without the key."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """Names an HMAC key without revealing it (certificates say which key hashed them)."""
    return "hmac:" + keyed_hash(key, "lethe-key-id")[:16]


def stable_id(prefix: str, parts: Iterable[str], length: int = 16) -> str:
    """A deterministic id (batch ids, request ids, Ray run names): same input, same id,
    so a restarted process finds its own earlier work instead of starting it twice."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\n")
    return f"{prefix}-{h.hexdigest()[:length]}"
