"""Reading the live generation and committing new ones with compare-and-swap.

CURRENT names the live manifest. A commit writes ``generations/<n>.json`` with
If-None-Match (manifests are immutable), then replaces CURRENT with If-Match on
the ETag it read. A writer that loses the race re-reads and re-derives its change.
A manifest orphaned by a writer that crashed before its CAS is skipped (the next
free number is used); the purge removes orphans that hold erased data.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from lethe.core.hashing import sha256_hex
from lethe.core.manifest import Generation
from lethe.errors import IntegrityFailure, TransientError, UserError
from lethe.layout import ModelLayout
from lethe.store import NotFound, PreconditionFailed, Store

T = TypeVar("T")


class ModelNotFound(UserError, LookupError):
    """No model under the layout: nothing was ingested there (or the name is wrong)."""


class CommitConflict(TransientError, RuntimeError):
    """Too many lost compare-and-swaps in a row."""


@dataclass
class Live:
    generation: Generation
    etag: str


def read_live(store: Store, layout: ModelLayout) -> Live:
    try:
        body, etag = store.get_with_etag(layout.current)
    except NotFound:
        raise ModelNotFound(
            f"model not found: no s3://{store.bucket}/{layout.current} (was it ingested?)"
        ) from None
    pointer = json.loads(body)
    manifest = store.get(pointer["key"])
    if sha256_hex(manifest) != pointer["sha256"]:
        raise IntegrityFailure(f"{pointer['key']} does not match the hash in CURRENT")
    return Live(Generation.from_json(json.loads(manifest)), etag)


def load_generation(store: Store, layout: ModelLayout, n: int) -> Generation:
    return Generation.from_json(store.get_json(layout.generation(n)))


def _write_manifest(store: Store, layout: ModelLayout, gen: Generation) -> bytes:
    """Write gen under the first free number >= gen.number; returns the bytes written."""
    while True:
        body = json.dumps(gen.to_json(), sort_keys=True, indent=1).encode()
        key = layout.generation(gen.number)
        if store.put_if_absent(key, body):
            return body
        if store.get(key) == body:  # our own write, repeated after a crash
            return body
        gen.number += 1  # an orphan, or a concurrent writer: take the next number


def _pointer(layout: ModelLayout, gen: Generation, body: bytes) -> bytes:
    return json.dumps(
        {
            "generation": gen.number,
            "key": layout.generation(gen.number),
            "sha256": sha256_hex(body),
        },
        sort_keys=True,
    ).encode()


def create_first(store: Store, layout: ModelLayout, gen: Generation) -> Generation:
    """Generation 1 of a new model; fails if the model already exists."""
    body = _write_manifest(store, layout, gen)
    if not store.put_if_absent(layout.current, _pointer(layout, gen, body)):
        raise FileExistsError(f"model already exists: s3://{store.bucket}/{layout.current}")
    return gen


def commit(store: Store, layout: ModelLayout, live: Live, new: Generation) -> Live:
    """CAS ``new`` over ``live``; raises PreconditionFailed if CURRENT moved."""
    if store.get_with_etag(layout.current)[1] != live.etag:
        # moved already: writing the manifest would only leave an orphan, which (built on
        # an older generation) may point at files a concurrent erasure just purged
        raise PreconditionFailed(layout.current)
    new.number = max(new.number, live.generation.number + 1)
    new.parent = live.generation.number
    body = _write_manifest(store, layout, new)
    etag = store.put_if_match(layout.current, _pointer(layout, new, body), live.etag)
    return Live(new, etag)


def on_generation(
    store: Store, layout: ModelLayout, live: Live, read: Callable[[Generation], T]
) -> T:
    """``read(live.generation)``. A file it reads may be gone because a concurrent
    erasure committed past this generation and purged the file; then CURRENT has
    moved, and ``NotFound`` propagates only when it has not (a real loss), so the
    caller re-reads the live generation and tries again."""
    try:
        return read(live.generation)
    except NotFound:
        if store.get_with_etag(layout.current)[1] == live.etag:
            raise
        raise GenerationMoved() from None


class GenerationMoved(TransientError):
    """CURRENT moved while a generation's files were being read."""


def read_consistent(
    store: Store, layout: ModelLayout, read: Callable[[Generation], T], attempts: int = 100
) -> T:
    """``read`` applied to the live generation, retried on a newer one while a
    concurrent erasure purges the files of the one it read."""
    for _ in range(attempts):
        try:
            return on_generation(store, layout, read_live(store, layout), read)
        except GenerationMoved:
            continue
    raise CommitConflict(f"{layout.current} kept moving while its files were read")


def update(
    store: Store,
    layout: ModelLayout,
    change: Callable[[Generation], Generation | None],
    attempts: int = 100,
) -> Live:
    """Apply ``change`` to the live generation until a CAS wins.

    ``change`` gets the live generation and returns its successor, or None when the
    live generation already is what it wants (the step is done: idempotence).
    """
    for attempt in range(attempts):
        live = read_live(store, layout)
        try:
            new = on_generation(store, layout, live, change)
        except GenerationMoved:
            continue
        if new is None:
            return live
        try:
            return commit(store, layout, live, new)
        except PreconditionFailed:
            time.sleep(random.uniform(0.01, 0.05) * (1 + min(attempt, 10)))
    raise CommitConflict(f"gave up after {attempts} lost compare-and-swaps on {layout.current}")
