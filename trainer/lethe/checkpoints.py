"""Which checkpoints a generation can use, and which shard slices still need training.

A checkpoint lives at a key derived from its lineage hash, so "is slice r of shard
k trained for the current data" is just "does that key exist". This is what makes
training resumable: a run that died after slice 3 left slices 0..3 behind.
"""

from __future__ import annotations

from collections.abc import Iterable

from lethe.core.manifest import Generation
from lethe.layout import ModelLayout
from lethe.store import Store


def adopt_checkpoints(
    store: Store, layout: ModelLayout, gen: Generation, shards: Iterable[int]
) -> bool:
    """Fill in, in place, every missing checkpoint of ``shards`` that exists in S3.
    Returns True if anything changed."""
    changed = False
    for k in shards:
        for r, sl in enumerate(gen.shards[k].slices):
            if sl.checkpoint is None:
                key = layout.checkpoint(k, r, sl.lineage)
                if store.exists(key):
                    sl.checkpoint = key
                    changed = True
    return changed


def pending_slices(gen: Generation) -> dict[int, int]:
    """Shard -> first slice to train, for every shard that is not fully trained."""
    out = {}
    for k, shard in enumerate(gen.shards):
        first = shard.first_untrained_slice()
        if first is not None:
            out[k] = first
    return out
