"""S3 semantics Lethe relies on, against a real SeaweedFS with versioning on."""

from __future__ import annotations

import threading

import pytest

from lethe.core.manifest import Generation
from lethe.generations import ModelNotFound, load_generation, read_live, update
from lethe.layout import ModelLayout
from lethe.store import PreconditionFailed, Store

from .conftest import ingest_small, unique_model


def test_conditional_puts(store: Store) -> None:
    key = f"{unique_model('cas')}/obj"
    assert store.put_if_absent(key, b"1")
    assert not store.put_if_absent(key, b"2")
    _, etag = store.get_with_etag(key)
    new = store.put_if_match(key, b"3", etag)
    with pytest.raises(PreconditionFailed):
        store.put_if_match(key, b"4", etag)
    assert store.get_with_etag(key) == (b"3", new)


def test_purge_removes_every_version(store: Store) -> None:
    key = f"{unique_model('purge')}/obj"
    for body in (b"a", b"b", b"c"):
        store.put(key, body)
    store.client.delete_object(Bucket=store.bucket, Key=key)  # leaves a delete marker
    assert len(store.versions_of(key)) == 4
    assert store.purge(key) == 4
    assert store.versions_of(key) == []


def test_concurrent_updates_lose_nothing(store: Store) -> None:
    """Twelve writers each add themselves to a generation: every one must land."""
    layout, _, _ = ingest_small(store, shards=2, slices=1)
    writers = [f"w{i}" for i in range(12)]

    def add(me: str) -> None:
        def change(g: Generation) -> Generation | None:
            if me in g.quarantine.get(0, []):
                return None
            nxt = g.successor(f"add {me}")
            nxt.quarantine.setdefault(0, []).append(me)
            return nxt

        update(store, layout, change)

    threads = [threading.Thread(target=add, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live = read_live(store, layout).generation
    assert sorted(live.quarantine[0]) == sorted(writers)
    # Lost CAS attempts leave orphan manifests (numbers are skipped); the chain of
    # committed generations has exactly one link per writer.
    chain, g = [], live
    while g.parent is not None:
        chain.append(g.reason)
        g = load_generation(store, layout, g.parent)
    assert sorted(chain) == sorted(f"add {w}" for w in writers)


def test_orphaned_manifest_is_skipped(store: Store) -> None:
    """A writer that died after writing generations/2.json but before its CAS must not
    block the next writer, nor be mistaken for the live generation."""
    layout, _, _ = ingest_small(store, shards=2, slices=1)
    store.put(layout.generation(2), b'{"orphan": true}')
    live = update(store, layout, lambda g: g.successor("after orphan"))
    assert live.generation.number == 3 and live.generation.parent == 1
    assert read_live(store, layout).generation.reason == "after orphan"


def test_unknown_model(store: Store) -> None:
    with pytest.raises(ModelNotFound, match="model not found"):
        read_live(store, ModelLayout.of("no-such-model"))
