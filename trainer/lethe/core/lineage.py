"""Lineage hashes: what a checkpoint was trained on.

The lineage of (shard k, slice r) hashes the content hashes of the data files of
slices 0..r of shard k and the trainer fingerprint. A checkpoint is stored under
its lineage hash, so it is valid exactly when its lineage matches the live data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence


def lineage_hash(trainer_fingerprint: str, shard: int, slice_shas: Sequence[str]) -> str:
    payload = {
        "trainer": trainer_fingerprint,
        "shard": shard,
        "slice": len(slice_shas) - 1,
        "data": list(slice_shas),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def shard_lineages(trainer_fingerprint: str, shard: int, slice_shas: Sequence[str]) -> list[str]:
    """Lineage of every slice of one shard (slice r covers data of slices 0..r)."""
    return [
        lineage_hash(trainer_fingerprint, shard, slice_shas[: r + 1])
        for r in range(len(slice_shas))
    ]
