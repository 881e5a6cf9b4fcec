"""Two erasures of one model at once: serialised by CAS on CURRENT, no lost update."""

from __future__ import annotations

import threading

import pytest

from lethe import dataio
from lethe.core.hashing import shard_of
from lethe.core.manifest import FileRef, Generation
from lethe.core.plan import ErasureRequest
from lethe.erasure import Engine, manifests_referencing, request_uid
from lethe.generations import commit, read_consistent, read_live
from lethe.predict import ensemble_accuracy
from lethe.store import NotFound, PreconditionFailed, Store
from lethe.training import RayTrainer
from lethe.verify import verify

from .conftest import ingest_small, trained_small, training_subjects, unique_model
from .test_erasure import rows_of


def test_two_concurrent_erasures_on_one_shard(store: Store, trainer: RayTrainer) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=3)
    same_shard = [s for s in training_subjects(table, cfg) if shard_of(s, 2) == 1]
    first, second = same_shard[0], same_shard[-1]
    results: dict = {}
    errors: list = []

    def erase(subject: str) -> None:
        try:
            # separate engines, as two processes would have
            e = Engine(store, layout, trainer, evaluate=lambda g: ensemble_accuracy(store, g))
            results[subject] = e.erase(
                [ErasureRequest(request_uid(cfg.name, [subject], []), (subject,))]
            )
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=erase, args=(s,)) for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    live = read_live(store, layout).generation
    assert rows_of(store, live, first) == rows_of(store, live, second) == 0  # no lost update
    assert live.quarantine == {} and live.shards[1].trained
    for subject in (first, second):
        cert = store.get_json(next(iter(results[subject]["certificates"].values())))
        verdict = verify(store, cert)
        assert verdict.ok, verdict.failures


def test_a_read_of_a_generation_purged_under_it_retries_on_the_new_one(store: Store) -> None:
    """What broke two concurrent erasures: one planned/patched from generation N while
    the other committed N+1 and purged a file of N. The reader must move on to N+1."""
    layout, _cfg, _table = ingest_small(store)
    old = read_live(store, layout)
    index = old.generation.shards[0].index
    seen: list[int] = []

    def read(gen: Generation) -> int:
        seen.append(gen.number)
        if len(seen) == 1:  # a concurrent erasure commits past us and purges a file
            moved = FileRef(f"{index.key}.moved", index.sha256, index.rows)
            store.put(moved.key, store.get(index.key))
            nxt = gen.successor("concurrent erasure")
            nxt.set_shard_data(0, moved, [s.data for s in gen.shards[0].slices])
            commit(store, layout, old, nxt)
            store.purge(index.key)
        return dataio.read_table(store, gen.shards[0].index).num_rows

    rows = read_consistent(store, layout, read)
    assert len(seen) == 2 and seen[1] > seen[0]  # retried on the generation that moved on
    assert rows == index.rows
    with pytest.raises(NotFound):  # CURRENT did not move: a lost file is an error
        read_consistent(store, layout, lambda g: store.get(index.key))


def test_a_version_purged_after_a_listing_is_gone_not_an_error(store: Store) -> None:
    key = f"{unique_model()}/x.bin"
    version = store.put(key, b"held")
    assert [v for k, v, _ in store.list_versions(key) if k == key] == [version]
    store.purge(key)
    with pytest.raises(NotFound):
        store.get_version(key, version)


def test_a_commit_on_a_generation_current_left_writes_no_manifest(store: Store) -> None:
    """Two writers: the loser of the race must not leave an orphan manifest behind (built
    on an old generation, it could point at files the winner's erasure purged)."""
    layout, _cfg, _table = ingest_small(store)
    base = read_live(store, layout)
    commit(store, layout, base, base.generation.successor("the winner"))
    before = {k for k, _, _ in store.list_versions(layout.generations_prefix)}
    with pytest.raises(PreconditionFailed):
        commit(store, layout, base, base.generation.successor("the loser"))
    assert {k for k, _, _ in store.list_versions(layout.generations_prefix)} == before


def test_an_orphan_manifest_pointing_at_a_tombstoned_file_is_swept(store: Store) -> None:
    """A manifest written by a writer that died before its CAS, on a generation from
    before a purge, names a purged file: the purge's sweep finds it by the tombstone."""
    layout, _cfg, _table = ingest_small(store)
    live = read_live(store, layout).generation
    orphan = live.successor("a writer that died before its compare-and-swap")
    orphan.number = live.number + 5
    key = layout.generation(orphan.number)
    store.put_json(key, orphan.to_json())
    purged = live.shards[0].slices[0].data
    assert manifests_referencing(store, layout, set(), live.number, set()) == set()
    found = manifests_referencing(store, layout, set(), live.number, {purged.sha256})
    assert found == {key}
