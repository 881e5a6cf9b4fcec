"""Which checkpoints a generation can use, and which shard slices still need training.

A checkpoint lives at a key derived from its lineage hash, so "is slice r of shard
k trained for the current data" is "does that key exist, with a lineage record that
names exactly the live data". This is what makes training resumable: a run that
died after slice 3 left slices 0..3 behind.

A worker writes the lineage record *before* the checkpoint, so a checkpoint never
exists without its record (a crash in between leaves a record alone, which a rerun
overwrites with the same bytes). A checkpoint whose record names a tombstoned file
(one purged because it held erased rows) is never adopted, however late it lands.
"""

from __future__ import annotations

from collections.abc import Iterable

from lethe.core.manifest import Generation
from lethe.layout import ModelLayout, sha_of_key
from lethe.store import NotFound, Store


def tombstoned_shas(store: Store, layout: ModelLayout) -> set[str]:
    """Content hashes of every file purged for holding erased rows (a LIST: for the
    purge's sweep and verify, which look at every checkpoint)."""
    return {sha_of_key(k) for k in store.list_keys(layout.tombstones_prefix)}


def tombstoned_among(store: Store, layout: ModelLayout, shas: Iterable[str]) -> set[str]:
    """Which of ``shas`` have a tombstone: one HEAD each, so the commit path costs the
    same however many erasures the model has had."""
    return {sha for sha in set(shas) if store.exists(layout.tombstone(sha))}


def lineage_record_ok(
    store: Store, checkpoint: str, data: list[str], trainer: str, tombstones: set[str]
) -> bool:
    """The checkpoint's record says it was trained on exactly ``data`` with ``trainer``,
    and on nothing that was purged."""
    try:
        record = store.get_json(ModelLayout.checkpoint_lineage_record(checkpoint))
    except NotFound:
        return False
    names = list(record.get("data", []))
    return names == data and record.get("trainer") == trainer and not set(names) & tombstones


def adopt_checkpoints(
    store: Store, layout: ModelLayout, gen: Generation, shards: Iterable[int]
) -> bool:
    """Fill in, in place, every missing checkpoint of ``shards`` that exists in S3 with
    a lineage record matching the live data. Returns True if anything changed."""
    changed = False
    fingerprint = gen.config.trainer_fingerprint()
    for k in shards:
        slices = gen.shards[k].slices
        if all(sl.checkpoint is not None for sl in slices):
            continue
        shas = [s.data.sha256 for s in slices]
        tombstones = tombstoned_among(store, layout, shas)
        for r, sl in enumerate(slices):
            if sl.checkpoint is not None:
                continue
            key = layout.checkpoint(k, r, sl.lineage)
            if lineage_record_ok(store, key, shas[: r + 1], fingerprint, tombstones) and (
                store.exists(key)
            ):
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
