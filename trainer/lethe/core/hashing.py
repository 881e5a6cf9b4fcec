"""Stable hashes: shard and slice assignment, content addresses, salted ids.

Everything here must give the same answer on every machine and Python version, so
nothing uses ``hash()``; all hashes are SHA-256.
"""

from __future__ import annotations

import hashlib
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


def salted_hash(salt: str, value: str) -> str:
    """How ids appear in plans and certificates: never in the clear."""
    return hashlib.sha256(f"{salt}\0{value}".encode()).hexdigest()


def salted_hashes(salt: str, values: Iterable[str]) -> list[str]:
    return sorted({salted_hash(salt, v) for v in values})


def stable_id(prefix: str, parts: Iterable[str], length: int = 16) -> str:
    """A deterministic id (batch ids, request ids, Ray run names): same input, same id,
    so a restarted process finds its own earlier work instead of starting it twice."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\n")
    return f"{prefix}-{h.hexdigest()[:length]}"
