"""The erasure engine: resolve, plan, quarantine, patch, retrain, commit, purge, certify.

Every step is idempotent and keeps its progress in S3, never in this process:
- the plan is written once (If-None-Match) and reloaded by a repeated run;
- generation changes go through compare-and-swap on CURRENT and are re-derived
  from the live generation when they lose (``generations.update``);
- data, index and checkpoint keys are content/lineage addressed, so redoing a
  write writes the same key;
- each finished step leaves a small marker object with its time, which a repeated
  run skips past and the certificate reads its timings from.
So a process killed at any point and started again with the same requests ends
in the same state, and two processes erasing from one model never lose an update.

What "erased" means here (see shared DESIGN.md, invariants):
- the erased rows leave every data, index, test and source object, with every
  version, in ``prepare`` (step "purge-data"), whether or not a retrain ever
  succeeds; only checkpoints trained on them wait, out of service;
- before a file is purged its tombstone is written: nothing may write those bytes
  again (ingest, a patch), and no checkpoint trained on them is ever adopted;
- a shard's retrain is claimed in S3 (a lease on its final lineage), so a second
  writer waits for the first instead of training the same lineage again;
- every Ray Train run reports its own resources under the batch, so a certificate's
  runs and cost are right after any crash.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from lethe import dataio
from lethe.certs import Keys
from lethe.checkpoints import adopt_checkpoints, tombstoned_among, tombstoned_shas
from lethe.core.config import ModelConfig
from lethe.core.cost import ShardRun, total_cost
from lethe.core.hashing import key_id, shard_of, stable_id
from lethe.core.manifest import FileRef, Generation
from lethe.core.plan import (
    NOTHING_HELD,
    ErasurePlan,
    ErasureRequest,
    RequestPlan,
    ShardPlan,
    estimate_cost,
)
from lethe.erased import (
    ErasedRows,
    EraseOrder,
    HashedIds,
    drop_order,
    locate,
    read_order,
    recover,
    write_order,
)
from lethe.errors import ErasureFailed, IntegrityFailure
from lethe.faults import FAULTS, Faults
from lethe.generations import Live, read_consistent, read_live, update
from lethe.layout import ModelLayout, sha_of_key
from lethe.store import NotFound, PreconditionFailed, Store

STEPS = (
    "plan",
    "quarantine",
    "patch",
    "purge-data",
    "retrain",
    "commit",
    "purge",
    "certify",
)


class Trainer(Protocol):
    def train(self, cfg: ModelConfig, tasks: list[Any]) -> list[ShardRun]: ...


class IntegrityError(ErasureFailed, IntegrityFailure):
    """S3 contradicts what an erasure relies on (a live object holds erased rows)."""

    exit_code = IntegrityFailure.exit_code

    def __init__(self, message: str) -> None:
        super().__init__("IntegrityError", message)


def load_keys(keys: Keys | None) -> Keys:
    """The model's keys, or those in $LETHE_KEYS_DIR (``lethe keys init`` makes them)."""
    if keys is not None:
        return keys
    where = os.environ.get("LETHE_KEYS_DIR")
    if not where:
        raise ErasureFailed(
            "NoKeys",
            "no signing/HMAC keys: set LETHE_KEYS_DIR (create them with `lethe keys init`)",
        )
    return Keys.load(where)


@dataclass
class Engine:
    store: Store
    layout: ModelLayout
    trainer: Trainer | None
    evaluate: Callable[[Generation], float | None] | None = None
    progress: Callable[[str, str], None] = lambda step, msg: None
    retries: int = 2
    retry_backoff_seconds: float = 2.0
    keys: Keys | None = None  # the model's HMAC + signing keys (default: $LETHE_KEYS_DIR)
    storage_backend: str | None = None  # for reclaiming deleted bytes (lethe.reclaim)
    storage_admin: str | None = None  # e.g. the SeaweedFS master URL
    claim_ttl_seconds: float = 60.0  # a retrain's lease on a lineage, renewed while it runs
    faults: Faults = FAULTS  # fault injection (``lethe.faults``; the tests' crashes)
    # the erase order of the batch this engine's job runs (``patch_by_order``)
    order: EraseOrder | None = None
    _erased_rows: dict[str, ErasedRows] = field(default_factory=dict)  # by batch, one kept

    @property
    def model(self) -> str:
        return self.layout.prefix.rsplit("/", 1)[-1]

    # -- public API ----------------------------------------------------------------
    def erase(
        self, requests: list[ErasureRequest], requested_at: float | None = None
    ) -> dict[str, Any]:
        """Run (or resume) the batch of ``requests`` to the end; returns its result."""
        done = self.result_of(requests)
        if done is not None:
            return done
        plan = self.prepare(requests, requested_at, purge=False)
        # The purge of the erased rows (and the store's reclaim of their bytes, seconds
        # on SeaweedFS) runs beside the retrain, which reads only the patched files; both
        # end before the certificate, and a failed retrain still waits for the purge.
        purging = _Background(lambda: self.purge_data(plan))
        try:
            self.retrain(plan)
        finally:
            purging.join()
        return self.finish(plan)

    # The parts below let a control plane run the retrain elsewhere (a Ray job):
    # prepare and finish need no torch; retrain does.
    def result_of(self, requests: list[ErasureRequest]) -> dict[str, Any] | None:
        if not requests:
            raise ValueError("no requests")
        return self.result_of_batch(batch_id(self.model, requests))

    def result_of_batch(self, batch: str) -> dict[str, Any] | None:
        try:
            return self.store.get_json(self.layout.result(batch))
        except NotFound:
            return None

    def prepare(
        self,
        requests: list[ErasureRequest],
        requested_at: float | None = None,
        batch: str | None = None,
        purge: bool = True,
        patch: bool = True,
    ) -> ErasurePlan:
        """Steps 1-4 and the data purge: resolve, plan, quarantine, patch, then delete
        every version of every object that held the erased rows. After this the data is
        gone, whatever happens to the retrain. ``batch`` names the batch explicitly: a
        batch is immutable once named, so an existing plan is used as it is.
        ``purge=False`` leaves the data purge to ``purge_data``, for a caller that runs
        it beside the retrain (``finish`` runs it if nobody did). ``patch=False`` stops
        after the quarantine: the batch's job patches and purges (``order_erasure``,
        ``run_batch``)."""
        batch = batch or batch_id(self.model, requests)
        plan = self._plan(batch, requests, requested_at or time.time())
        self.faults.crash_point("plan")
        if not patch:
            if plan.record_hashes:
                self._once(plan, "quarantine", lambda: self._quarantine(plan))
            return plan
        if plan.record_hashes:
            self._prewarm(plan)
            self._once(plan, "quarantine", lambda: self._quarantine(plan))
            self._once(plan, "patch", lambda: self._patch(plan))
            if purge:
                self.purge_data(plan)
        return plan

    def purge_data(self, plan: ErasurePlan) -> None:
        """Step "purge-data" (see ``prepare``); done once, safe to call again."""
        if plan.record_hashes:
            self._once(plan, "purge-data", lambda: self._purge_data(plan))

    def data_erased(self, plan: ErasurePlan) -> bool:
        """Whether the erased rows are gone from every object version (or none were held)."""
        return not plan.record_hashes or self._marker(plan, "purge-data") is not None

    def order_erasure(self, plan: ErasurePlan) -> None:
        """The keyed side, before the batch's job: write where the erased rows are, by
        position (``lethe.erased``), so that the job can patch and purge without the
        key. Done once; nothing to do once the data is erased."""
        if self.data_erased(plan) or self.store.exists(self.layout.erase_order(plan.batch_id)):
            return
        gen = read_live(self.store, self.layout).generation
        backend, admin = self._storage()
        storage: dict[str, str | None] = {"backend": backend, "admin": admin}
        source = writable_source(self.store, gen.config)
        order = locate(self.store, gen, plan, load_keys(self.keys).id_hash, storage, source)
        write_order(self.store, self.layout, order)

    def run_batch(self, plan: ErasurePlan) -> None:
        """The batch's job (on the Ray cluster, with no key): patch and purge the data
        by the batch's erase order, retrain and commit beside the purge. Safe to run
        again after a crash anywhere; the order goes once the data is erased."""
        self.patch_by_order(plan)
        purging = _Background(lambda: self.purge_data(plan))
        try:
            self.retrain(plan)
        finally:
            purging.join()
        drop_order(self.store, self.layout, plan.batch_id)

    def erase_data_by_order(self, plan: ErasurePlan) -> None:
        """``run_batch`` without the retrain: the data work alone (``make bench-ingest``)."""
        self.patch_by_order(plan)
        self.purge_data(plan)
        drop_order(self.store, self.layout, plan.batch_id)

    def patch_by_order(self, plan: ErasurePlan) -> None:
        """Take the batch's erase order (the rows by position) and patch; the ids are
        read back only when a step needs them."""
        if self.data_erased(plan):
            return
        self.order = read_order(self.store, self.layout, plan.batch_id)
        self.storage_backend = self.storage_backend or self.order.storage.get("backend")
        self.storage_admin = self.storage_admin or self.order.storage.get("admin")
        self._prewarm(plan)
        self._once(plan, "patch", lambda: self._patch(plan))

    def _prewarm(self, plan: ErasurePlan) -> None:
        """Warm retrain lanes start while the data is patched."""
        prewarm = getattr(self.trainer, "prewarm", None)
        if prewarm is not None:
            prewarm(read_live(self.store, self.layout).generation.config, len(plan.shards))

    def _erased(self, plan: ErasurePlan) -> ErasedRows:
        """Which rows ``plan`` erases: from its erase order if this engine runs the
        batch's job (read when first needed: a repeated job may need none), else by
        keyed hash. Kept for the batch at hand only: an engine may erase batch after
        batch (the first version kept the first batch's rows for good, and the check
        before certifying caught its second batch unpatched)."""
        rows = self._erased_rows.get(plan.batch_id)
        if rows is None:
            if self.order is not None and self.order.batch == plan.batch_id:
                rows = recover(self.store, self.order, plan)
            else:
                rows = HashedIds.of(plan, load_keys(self.keys).id_hash)
            self._erased_rows = {plan.batch_id: rows}
        return rows

    def plan_exists(self, batch: str) -> bool:
        return self.store.exists(self.layout.plan(batch))

    def load_plan(self, batch: str) -> ErasurePlan:
        return ErasurePlan.from_json(self.store.get_json(self.layout.plan(batch)))

    def retrain(self, plan: ErasurePlan) -> None:
        """Steps 5-6: retrain the affected shards and commit them back into service."""
        if plan.record_hashes:
            self._once(plan, "commit", lambda: self._retrain_and_commit(plan))

    def committed(self, plan: ErasurePlan) -> bool:
        """Whether steps 5-6 are done (or not needed) for this batch."""
        return not plan.record_hashes or self._marker(plan, "commit") is not None

    def finish(self, plan: ErasurePlan) -> dict[str, Any]:
        """Steps 7-8: purge what was trained on the erased rows, and certify."""
        self.purge_data(plan)
        if plan.record_hashes:
            if not self.committed(plan):
                raise ErasureFailed("NotRetrained", f"batch {plan.batch_id} is not committed yet")
            self._once(plan, "purge", lambda: self._purge(plan))
            self.check_erased(plan)
        drop_order(self.store, self.layout, plan.batch_id)  # a job that died after the purge
        return self._certify(plan)

    def check_erased(self, plan: ErasurePlan) -> None:
        """The keyed side's own look before it certifies: no record of the plan is left
        in the live index, data or test files of the shards it touched. (The job erased
        by an order it cannot authenticate; an order edited behind its back would have
        erased other rows.) Reads only their record ids."""
        erased = HashedIds.of(plan, load_keys(self.keys).id_hash)
        live = read_live(self.store, self.layout).generation
        refs = [live.test] + [
            ref
            for k in plan.affected_shards
            for ref in (live.shards[k].index, *(s.data for s in live.shards[k].slices))
        ]
        for ref in refs:
            left = dataio.select_rows(
                self.store, ref, ["record_id"], lambda b: erased.records(b.column("record_id"))
            )
            if left.num_rows:
                raise IntegrityError(
                    f"batch {plan.batch_id}: live object {ref.key} still holds erased "
                    "records after the data was erased (was the erase order edited?)"
                )

    # -- steps 1 and 2: resolve and plan -----------------------------------------------
    def _plan(self, batch: str, requests: list[ErasureRequest], requested_at: float) -> ErasurePlan:
        key = self.layout.plan(batch)
        try:
            return ErasurePlan.from_json(self.store.get_json(key))
        except NotFound:
            pass
        self.progress("resolve", f"resolving {len(requests)} request(s)")
        keys = load_keys(self.keys)
        plan = read_consistent(
            self.store,
            self.layout,
            lambda gen: make_plan(self.store, gen, batch, self.model, requests, requested_at, keys),
        )
        if not self.store.put_json_if_absent(key, plan.to_json()):
            plan = ErasurePlan.from_json(self.store.get_json(key))  # a concurrent twin won
        self.progress(
            "plan", f"{plan.records_erased} record(s) in shard(s) {plan.affected_shards or 'none'}"
        )
        return plan

    # -- step 3: quarantine ----------------------------------------------------------
    def _quarantine(self, plan: ErasurePlan) -> dict[str, Any]:
        def change(g: Generation) -> Generation | None:
            missing = [
                k for k in plan.affected_shards if plan.batch_id not in g.quarantine.get(k, [])
            ]
            if not missing:
                return None
            nxt = g.successor(f"quarantine {plan.batch_id}")
            for k in missing:
                nxt.quarantine.setdefault(k, []).append(plan.batch_id)
            return nxt

        live = update(self.store, self.layout, change)
        self.progress(
            "quarantine",
            f"shard(s) {plan.affected_shards} out of service (generation {live.generation.number})",
        )
        return {"generation": live.generation.number}

    # -- step 4: patch ---------------------------------------------------------------
    def _patch(self, plan: ErasurePlan) -> dict[str, Any]:
        erased = self._erased(plan)
        done: dict[str, FileRef | None] = {}  # a retried ``change`` filters nothing twice

        def filtered(ref: FileRef, key_for: Callable[[str], str]) -> FileRef | None:
            if ref.key not in done:
                done[ref.key] = dataio.without_rows(
                    self.store, ref, erased.records, key_for, self.layout.tombstone
                )
            return done[ref.key]

        def change(g: Generation) -> Generation | None:
            nxt = None
            for sp in plan.shards:
                k = sp.shard
                shard = g.shards[k]
                files = [s.data for s in shard.slices]
                new_files = list(files)
                for r in range(sp.first_slice, len(files)):
                    f = filtered(files[r], lambda sha, k=k, r=r: self.layout.data(k, r, sha))
                    if f is not None:
                        new_files[r] = f
                index = filtered(shard.index, lambda sha, k=k: self.layout.index(k, sha))
                if index is None and new_files == files:
                    continue
                nxt = nxt or g.successor(f"patch {plan.batch_id}")
                nxt.set_shard_data(k, index or shard.index, new_files)
            if plan.test_records:
                test = filtered(g.test, self.layout.test)
                if test is not None:
                    nxt = nxt or g.successor(f"patch {plan.batch_id}")
                    nxt.test = test
            return nxt

        live = update(self.store, self.layout, change)
        self.progress(
            "patch",
            f"{plan.records_erased} record(s) dropped from the data "
            f"(generation {live.generation.number})",
        )
        replaced = sorted(k for k, f in done.items() if f is not None)
        return {"generation": live.generation.number, "replaced": replaced}

    # -- purge of the raw data (right after the patch) ---------------------------------
    def _purge_data(self, plan: ErasurePlan) -> dict[str, Any]:
        """Every version of every data, index and test object that holds an erased row,
        every checkpoint trained on one, and every older manifest pointing at them.
        Tombstones go first, so nothing can write those bytes back and no run that
        trained on them can have its checkpoints adopted."""
        live = read_live(self.store, self.layout).generation
        marker = self.layout.step(plan.batch_id, "purge-plan")
        try:
            tainted: set[str] = set(self.store.get_json(marker)["tainted"])
        except NotFound:
            tainted = self._tainted(plan, live)
            # Remember what was tainted before deleting it: a repeated purge can no
            # longer find deleted files, but must still delete the checkpoints trained
            # on them (and needs no ids for that).
            if not self.store.put_json_if_absent(marker, {"tainted": sorted(tainted)}):
                tainted |= set(self.store.get_json(marker)["tainted"])
            self.faults.crash_point("purge-plan")
        for key in sorted(tainted):
            self.store.put_json_if_absent(
                self.layout.tombstone(sha_of_key(key)), {"batch": plan.batch_id, "key": key}
            )
        # What needs the erased ids runs before the files holding them are deleted:
        # the records' own files (their URIs are in those data files), then the source.
        files = self._step(
            plan, "purge-files", lambda: {"files": self._purge_files(live.config, tainted, plan)}
        )["files"]
        source = self._step(
            plan, "purge-source", lambda: self._erase_from_source(plan, live.config)
        )
        deleted = self._delete(plan, tainted, live)
        storage = self._reclaim()
        self.progress("purge-data", f"{len(deleted)} object(s) holding erased rows deleted")
        return {
            "deleted": sorted(deleted),
            "tombstones": sorted(sha_of_key(k) for k in tainted),
            "versions_deleted": sum(deleted.values()),
            "source": source,
            "files": files,
            "storage": storage,
        }

    def _tainted(self, plan: ErasurePlan, live: Generation) -> set[str]:
        """Every data, index and test object (any version) that holds an erased row."""
        erased = self._erased(plan)
        live_keys = live.referenced_keys()
        tainted: set[str] = set()
        prefixes = [self.layout.eval_prefix] + [
            p
            for k in plan.affected_shards
            for p in (self.layout.data_prefix(k), self.layout.index_prefix(k))
        ]
        for prefix in prefixes:
            for key, version, is_marker in list(self.store.list_versions(prefix)):
                if is_marker or key in tainted or not key.endswith(".parquet"):
                    continue
                try:
                    ids = dataio.decode(self.store.get_version(key, version), ["record_id"])
                except NotFound:
                    # Purged by a concurrent erasure since the listing; it tombstoned
                    # the file first, so its checkpoints are swept all the same.
                    continue
                if erased.records(ids.column("record_id")).any():
                    if key in live_keys:
                        raise IntegrityError(f"live object {key} still holds erased records")
                    tainted.add(key)
        return tainted

    def _purge_files(
        self, cfg: ModelConfig, tainted: set[str], plan: ErasurePlan
    ) -> dict[str, Any] | None:
        """File-backed records (``columns.file``): delete every version of the objects
        that the erased rows of ``tainted`` (every version) name. Returns the keyed hashes
        of their URIs (made when the batch was planned) and their buckets, for the
        certificate and ``verify``."""
        if not cfg.columns.file:
            return None
        from lethe.files import purge_files, split_uri

        erased = self._erased(plan)
        uris: set[str] = set()
        for key in sorted(tainted):
            for k, version, is_marker in list(self.store.list_versions(key)):
                if k != key or is_marker:
                    continue
                try:
                    body = self.store.get_version(key, version)
                except NotFound:
                    continue
                if "uri" not in dataio.column_names(body):
                    break  # an index file: none of its versions names a file
                t = dataio.decode(body, ["record_id", "uri"])  # not the features
                mask = erased.records(t.column("record_id"))
                uris |= {u for u, m in zip(t.column("uri").to_pylist(), mask, strict=True) if m}
        versions = purge_files(self.store, uris)
        if plan.file_hashes is None:  # planned before URIs were indexed: needs the key
            hashes = load_keys(self.keys).id_hashes(uris)
        else:
            hashes = plan.file_hashes
            if len(uris) != len(hashes):
                raise IntegrityError(
                    f"batch {plan.batch_id}: {len(uris)} file(s) named by the erased rows, "
                    f"{len(hashes)} planned"
                )
        return {
            "objects": len(hashes),
            "versions_deleted": sum(versions.values()),
            "buckets": sorted({split_uri(u)[0] for u in uris}),
            "hashes": sorted(hashes),
        }

    def _delete(self, plan: ErasurePlan, tainted: set[str], live: Generation) -> dict[str, int]:
        """Delete (every version) the tainted files, the checkpoints trained on any
        tombstoned file, and the manifests that point at either."""
        live_keys = live.referenced_keys()
        tombstones = tombstoned_shas(self.store, self.layout)
        doomed = set(tainted)
        for k in plan.affected_shards:
            doomed |= tainted_checkpoints(self.store, self.layout, k, tombstones, live_keys)
        doomed |= manifests_referencing(self.store, self.layout, doomed, live.number, tombstones)
        deleted: dict[str, int] = {}
        for key in sorted(doomed):
            if key in live_keys:
                raise IntegrityError(f"refusing to purge live object {key}")
            deleted[key] = self.store.purge(key)
        return deleted

    def _erase_from_source(self, plan: ErasurePlan, cfg: ModelConfig) -> dict[str, Any]:
        """Apply the model's source policy: ``patch`` rewrites the source object without
        the erased rows and deletes its older versions; otherwise say what holds."""
        from lethe.ingest import source_rows_without

        policy, uri = cfg.source_policy, cfg.source_uri
        if policy != "patch" or not uri.startswith("s3://"):
            what = {
                "delete-after-ingest": "deleted after ingest",
                "patch": "not an S3 object: not erased by Lethe",
            }.get(policy, "held outside Lethe: not erased by Lethe")
            return {"policy": policy, "state": what}
        from lethe.sources import object_keys, source_of

        source = source_of(cfg)
        granted = self.order.source if self.order is not None else None
        if granted is not None and "refused" in granted:
            return {"policy": policy, "state": f"not erased: {granted['refused']}"}
        # the batch's job patches what the keyed side found its model's keys may write
        # (its own keys are the cluster's); in one process, the process's keys decide
        keys = granted["keys"] if granted is not None else object_keys(self.store, source)
        src = self.store.for_bucket(source.bucket)
        erased = self._erased(plan)
        removed = found = 0
        for key in keys:  # a prefix: each of its files
            try:
                body = src.get(key)
            except NotFound:
                continue
            found += 1
            new_body, n = source_rows_without(body, cfg, erased)
            removed += n
            if n:
                version = src.put(key, new_body)
                src.purge_older_versions(key, version)
            else:
                # no row here (any more): still drop older versions that may hold them
                versions = src.versions_of(key)
                current = next((v for v, m in versions if not m), None)
                if current is not None and len(versions) > 1:
                    src.purge_older_versions(key, current)
        if not found:
            return {"policy": policy, "state": "source object gone"}
        return {"policy": policy, "state": "patched", "rows_removed": removed}

    def _storage(self) -> tuple[str, str | None]:
        """The store's backend and admin URL for reclaiming: the model's own settings
        win over this process's environment. The keyed side resolves them into the
        erase order, so the job reclaims as the operator would (the Ray cluster's
        environment need not know the store's master)."""
        from lethe.reclaim import backend_from_env, backend_of

        backend, admin = backend_from_env(self.store.settings.endpoint)
        if self.storage_backend:
            backend = backend_of(self.store.settings.endpoint, self.storage_backend)
            admin = self.storage_admin
        return backend, admin or self.storage_admin

    def _reclaim(self) -> dict[str, Any]:
        """Ask the store to reclaim the bytes of what was just deleted, where it can."""
        from lethe.reclaim import reclaim

        return reclaim(*self._storage()).to_json()

    # -- steps 5 and 6: retrain and commit -------------------------------------------
    def _retrain_and_commit(self, plan: ErasurePlan) -> dict[str, Any]:
        from lethe.training import StaleLineage, shard_tasks

        affected = plan.affected_shards
        for _round in range(20):  # another batch may change a shard under us: retrain again
            gen = read_live(self.store, self.layout).generation
            adopt_checkpoints(self.store, self.layout, gen, affected)
            todo = {
                k: r for k in affected if (r := gen.shards[k].first_untrained_slice()) is not None
            }
            if todo:
                claims = {k: self.layout.claim(k, gen.shards[k].slices[-1].lineage) for k in todo}
                mine = {k: r for k, r in todo.items() if self._claim(plan, claims[k])}
                if mine:
                    if self.trainer is None:
                        raise ErasureFailed("NoTrainer", "retraining needs a trainer (Ray)")
                    tasks = shard_tasks(
                        self.layout, gen, mine, f"{self.model}-{plan.batch_id}", plan.batch_id
                    )
                    self.progress("retrain", f"retraining shard(s) {sorted(mine)} on Ray Train")
                    try:
                        with self._holding([claims[k] for k in mine], plan):
                            self._train_with_retries(gen.config, tasks)
                    except StaleLineage:
                        continue  # a concurrent erasure purged our input: train the live data
                    self.faults.crash_point("retrain")
                for k in set(todo) - set(mine):
                    self.progress("retrain", f"shard {k} is being retrained by another batch")
                    self._wait_for_claim(claims[k])
            live, released_at = self._commit(plan)
            if released_at is not None:
                return {
                    "generation": live.generation.number,
                    "accuracy": live.generation.accuracy,
                    "released_at": released_at,
                    "retrained": self._retrained(live.generation, plan),
                }
        raise ErasureFailed("RetrainRace", "the affected shards kept changing under the retrain")

    def _retrained(self, gen: Generation, plan: ErasurePlan) -> dict[str, Any]:
        """Per affected shard: the live lineage, checkpoint and the Ray Train run that
        trained it, slice by slice (from the checkpoints' own records); slices from
        ``first_slice`` on were retrained for this erasure."""
        out: dict[str, Any] = {}
        for sp in plan.shards:
            shard = gen.shards[sp.shard]
            runs = []
            for sl in shard.slices:
                try:
                    rec = self.store.get_json(
                        ModelLayout.checkpoint_lineage_record(sl.checkpoint or "")
                    )
                    runs.append(rec.get("run_id"))
                except NotFound:
                    runs.append(None)
            out[str(sp.shard)] = {
                "first_slice": sp.first_slice,
                "lineages": [s.lineage for s in shard.slices],
                "checkpoints": [s.checkpoint for s in shard.slices],
                "runs": runs,
            }
        return out

    # -- claims: one writer per lineage ------------------------------------------------
    def _claim(self, plan: ErasurePlan, key: str) -> bool:
        """Lease ``key`` (a shard's final lineage) for this batch. True: ours to train.
        A lease this batch already holds (a rerun after a crash) or one that expired
        (its holder died) is taken over; a live lease of another batch is not."""
        body = {"owner": plan.batch_id, "expires": time.time() + self.claim_ttl_seconds}
        if self.store.put_json_if_absent(key, body):
            return True
        try:
            raw, etag = self.store.get_with_etag(key)
        except NotFound:
            return self.store.put_json_if_absent(key, body)
        held = json.loads(raw)
        if held.get("owner") != plan.batch_id and float(held.get("expires", 0)) > time.time():
            return False
        try:
            self.store.put_if_match(key, json.dumps(body).encode(), etag)
            return True
        except PreconditionFailed:
            return False

    @contextmanager
    def _holding(self, keys: list[str], plan: ErasurePlan) -> Iterator[None]:
        """Renew these leases while the body runs; release them afterwards."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.claim_ttl_seconds / 3):
                body = {"owner": plan.batch_id, "expires": time.time() + self.claim_ttl_seconds}
                for key in keys:
                    self.store.put_json(key, body)

        thread = threading.Thread(target=renew, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            for key in keys:
                self.store.purge(key)

    def _wait_for_claim(self, key: str, poll: float = 0.5) -> None:
        """Until another batch's lease on a lineage ends (released, or expired because
        its holder died); the next round then adopts its checkpoints or trains."""
        while True:
            try:
                held = self.store.get_json(key)
            except NotFound:
                return
            if float(held.get("expires", 0)) <= time.time():
                return
            time.sleep(poll)

    def _train_with_retries(self, cfg: ModelConfig, tasks: list[Any]) -> list[ShardRun]:
        from lethe.training import StaleLineage

        assert self.trainer is not None
        for attempt in range(self.retries + 1):
            try:
                return self.trainer.train(cfg, tasks)
            except StaleLineage:
                raise
            except Exception as e:
                if self._stale(tasks):
                    raise StaleLineage("the data changed under the run") from e
                if attempt == self.retries:
                    raise ErasureFailed(
                        "RetrainFailed",
                        f"{e} (after {attempt + 1} attempts; "
                        "the data stays erased and the shard quarantined)",
                    ) from e
                self.progress("retrain", f"attempt {attempt + 1} failed, retrying")
                time.sleep(self.retry_backoff_seconds * 2**attempt)
        raise AssertionError("unreachable")

    def _stale(self, tasks: list[Any]) -> bool:
        """Whether a run's input was purged while it ran (its failure is then no failure)."""
        shas = {d["sha256"] for t in tasks for d in t.data}
        return bool(tombstoned_among(self.store, self.layout, shas))

    def _commit(self, plan: ErasurePlan) -> tuple[Live, float | None]:
        """Adopt the new checkpoints and release the shards; returns the live generation
        and when the shards went back into service (None if they could not yet)."""
        released = False

        def change(g: Generation) -> Generation | None:
            nonlocal released
            nxt = g.successor(f"commit {plan.batch_id}")
            changed = adopt_checkpoints(self.store, self.layout, nxt, plan.affected_shards)
            released = all(nxt.shards[k].trained for k in plan.affected_shards)
            if released:
                for k in plan.affected_shards:
                    holders = nxt.quarantine.get(k, [])
                    if plan.batch_id in holders:
                        holders.remove(plan.batch_id)
                        changed = True
            if not changed:
                return None
            nxt.accuracy = None  # the ensemble changed; measured right after, off the path
            return nxt

        live = update(self.store, self.layout, change)
        if not released:
            return live, None
        released_at = time.time()
        live = self._record_accuracy()
        self.progress(
            "commit",
            f"shard(s) back in service (generation "
            f"{live.generation.number}, accuracy {live.generation.accuracy})",
        )
        return live, released_at

    def _record_accuracy(self) -> Live:
        """Measure the test accuracy of the live ensemble if it is not known yet. Kept out
        of the releasing commit, so the shards serve again without waiting for it."""

        def change(g: Generation) -> Generation | None:
            if g.accuracy is not None or self.evaluate is None:
                return None
            nxt = g.successor("accuracy")
            nxt.accuracy = self.evaluate(nxt)
            return nxt if nxt.accuracy is not None else None

        return update(self.store, self.layout, change)

    # -- step 7: purge ---------------------------------------------------------------
    def _purge(self, plan: ErasurePlan) -> dict[str, Any]:
        """After the commit: sweep again for checkpoints trained on purged files (a run
        that was stale when it wrote them), then reclaim the bytes."""
        live = read_live(self.store, self.layout).generation
        deleted = self._delete(plan, set(), live)
        storage = (
            self._reclaim() if deleted else (self._marker(plan, "purge-data") or {}).get("storage")
        )
        self.progress("purge", f"{len(deleted)} more object(s) deleted with every version")
        return {"deleted": sorted(deleted), "storage": storage}

    # -- step 8: certify ---------------------------------------------------------------
    def _certify(self, plan: ErasurePlan) -> dict[str, Any]:
        from lethe import certs

        keys = load_keys(self.keys)
        evidence = BatchEvidence.read(self.store, self.layout, plan)
        certificates: dict[str, str] = {}
        outcomes: dict[str, Any] = {}
        for req in plan.requests:

            def build(chain: dict[str, Any], req: RequestPlan = req) -> dict[str, Any]:
                return {**evidence.certificate_body(req), "chain": chain}

            certs.append(self.store, self.layout, req.uid, build, keys)
            key = self.layout.certificate(req.uid)
            certificates[req.uid] = key
            outcomes[req.uid] = {
                "outcome": req.outcome,
                "records_erased": len(req.record_hashes),
                "subjects_unmatched": req.subjects_unmatched,
                "records_unmatched": req.records_unmatched,
                "certificate": key,
            }
        base = evidence.certificate_body(plan.requests[0]) if plan.requests else {}
        runs = evidence.runs
        result = {
            "batch_id": plan.batch_id,
            "model": self.model,
            "requests": len(plan.requests),
            "records_erased": plan.records_erased,
            "shards_retrained": len({r.shard for r in runs if r.slices_trained}),
            "shards": plan.affected_shards,
            "certificates": certificates,
            "outcomes": outcomes,
            "generation_before": base.get("generation_before"),
            "generation_after": base.get("generation_after"),
            "accuracy_after": base.get("accuracy_after"),
            "timings": base.get("timings"),
            "cost": base.get("cost"),
            "estimate": plan.estimate.to_json(),
            "shard_runs": base.get("shard_runs", []),
            "deleted_keys": len(base.get("deleted_keys", [])),
            "storage": base.get("storage"),
        }
        self.store.put_json_if_absent(self.layout.result(plan.batch_id), result)
        self.faults.crash_point("certify")
        self.progress("certify", f"{len(certificates)} certificate(s) written")
        return result

    # -- markers ---------------------------------------------------------------------
    def _marker(self, plan: ErasurePlan, step: str) -> dict[str, Any] | None:
        try:
            return self.store.get_json(self.layout.step(plan.batch_id, step))
        except NotFound:
            return None

    def _write_marker(self, plan: ErasurePlan, step: str, body: dict[str, Any]) -> None:
        self.store.put_json_if_absent(
            self.layout.step(plan.batch_id, step), {**body, "at": time.time()}
        )

    def _once(self, plan: ErasurePlan, step: str, run: Callable[[], dict[str, Any]]) -> None:
        if self._marker(plan, step) is not None:
            return
        self._write_marker(plan, step, run())
        self.faults.crash_point(step)

    def _step(
        self, plan: ErasurePlan, step: str, run: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """``_once``, returning what the step found (now or when it first ran)."""
        self._once(plan, step, run)
        body = self._marker(plan, step) or {}
        return {k: v for k, v in body.items() if k != "at"}


class _Background:
    """A step run in a thread; ``join`` re-raises what it raised."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.error: BaseException | None = None

        def target() -> None:
            try:
                run()
            except BaseException as e:  # noqa: BLE001 - re-raised by join
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def writable_source(store: Store, cfg: ModelConfig) -> dict[str, Any] | None:
    """For an erase order (the keyed side, with the model's own keys): the source
    objects those keys may write, when ``sourcePolicy: patch`` has the job rewrite them
    with the cluster's keys; or why it may not (the certificate says the source was
    not erased, and why). None when there is nothing to patch."""
    from lethe.sources import SourceError, pin_objects, source_of

    if cfg.source_policy != "patch" or not cfg.source_uri.startswith("s3://"):
        return None
    try:
        return {"keys": [o.key for o in pin_objects(store, source_of(cfg), writable=True)]}
    except SourceError as e:
        return {"refused": str(e)}


def batch_id(model: str, requests: Iterable[ErasureRequest]) -> str:
    return stable_id("batch", [model, *sorted(r.uid for r in requests)])


def request_uid(model: str, subjects: Iterable[str], records: Iterable[str]) -> str:
    """A deterministic uid for requests made on the command line (the operator uses
    the ErasureRequest's metadata.uid), so repeating a command resumes its batch."""
    return stable_id("req", [model, "subjects", *sorted(subjects), "records", *sorted(records)])


CERTIFICATE_KIND, CERTIFICATE_VERSION = "lethe.dev/ErasureCertificate", 2


@dataclass
class BatchEvidence:
    """What S3 holds about one batch: its plan, step markers and the runs' own
    reports. A certificate is derived from it alone, so ``verify`` derives it again
    and compares, field by field: a certificate cannot claim what S3 does not show."""

    store: Store
    layout: ModelLayout
    plan: ErasurePlan
    markers: dict[str, dict[str, Any]]
    runs: list[ShardRun]
    config: ModelConfig

    @classmethod
    def read(cls, store: Store, layout: ModelLayout, plan: ErasurePlan) -> BatchEvidence:
        markers = {}
        for step in STEPS:
            try:
                markers[step] = store.get_json(layout.step(plan.batch_id, step))
            except NotFound:
                markers[step] = {}
        prefix = layout.shard_runs_prefix(plan.batch_id)
        runs = [ShardRun.from_json(store.get_json(k)) for k in store.list_keys(prefix)]
        runs.sort(key=lambda r: (r.shard, r.submitted_at, r.attempt))
        config = read_live(store, layout).generation.config
        return cls(store, layout, plan, markers, runs, config)

    def certificate_body(self, req: RequestPlan) -> dict[str, Any]:
        """The certificate of ``req``, unsigned and without its chain link."""
        plan, markers, runs, t = self.plan, self.markers, self.runs, self.config.trainer
        full = plan.estimate.full_seconds * t.workers_per_shard
        cost = total_cost(
            runs, self.config.prices, full * t.cpus_per_worker, full * t.gpus_per_worker
        )
        commit, data, purge = markers["commit"], markers["purge-data"], markers["purge"]
        body: dict[str, Any] = {
            "kind": CERTIFICATE_KIND,
            "version": CERTIFICATE_VERSION,
            "bucket": self.store.bucket,
            "model_prefix": self.layout.prefix,
            "batch_id": plan.batch_id,
            "request_uid": req.uid,
            "hash": {"alg": "hmac-sha256", "key_id": plan.key_id},
            "outcome": req.outcome,
            "summary": outcome_words(req),
            "subject_hashes": req.subject_hashes,
            "record_hashes": req.record_hashes,
            "requested_record_hashes": req.requested_record_hashes,
            "held": held_counts(req),
            "records_erased": len(req.record_hashes),
            "request_shards": req.shards,
            "generation_before": plan.base_generation,
            "generation_after": commit.get("generation", plan.base_generation),
            "accuracy_after": commit.get("accuracy"),
            "shards": plan.affected_shards,
            "retrained": commit.get("retrained", {}),
            "deleted_keys": sorted(set(data.get("deleted", [])) | set(purge.get("deleted", []))),
            "tombstones": data.get("tombstones", []),
            "source": data.get("source"),
            "files": data.get("files"),
            "storage": purge.get("storage") or data.get("storage"),
            "ray_runs": sorted({r.run_id for r in runs}),
            "shard_runs": [r.to_json() for r in runs],
            "timings": certificate_timings(plan, markers),
            "cost": cost.to_json(),
            "estimate": plan.estimate.to_json(),
        }
        if not plan.estimate.legacy:  # an older plan's certificate re-derives as it was issued
            from lethe.core.cost import accounting

            est = plan.estimate
            erasure = body["timings"]["erasure_seconds"]
            body["accounting"] = accounting(erasure, est.full_seconds, est.full_basis, cost)
        return body


def make_plan(
    store: Store,
    gen: Generation,
    batch: str,
    model: str,
    requests: list[ErasureRequest],
    requested_at: float,
    keys: Keys,
) -> ErasurePlan:
    """Steps 1 and 2: find the records through the index files, then plan."""
    cfg = gen.config
    subjects = {s for r in requests for s in r.subjects}
    records = {x for r in requests for x in r.records}
    # Subjects hash to their shard; record ids can be anywhere, so they need every index.
    shards_to_read = sorted(
        set(range(cfg.shards)) if records else {shard_of(s, cfg.shards) for s in subjects}
    )
    found: dict[str, tuple[str, int, int]] = {}  # record id -> (subject id, shard, slice)
    uris: set[str] = set()  # of file-backed records (their index names them)
    uris_indexed = True

    def named(batch: pa.RecordBatch) -> np.ndarray:
        return dataio.isin(batch.column("subject_id"), subjects) | dataio.isin(
            batch.column("record_id"), records
        )

    for k in shards_to_read:
        index = dataio.select_rows(
            store, gen.shards[k].index, ["record_id", "subject_id", "slice", "uri"], named
        )
        for rid, sid, r in zip(
            index.column("record_id").to_pylist(),
            index.column("subject_id").to_pylist(),
            index.column("slice").to_pylist(),
            strict=True,
        ):
            found[rid] = (sid, k, int(r))
        if "uri" in index.column_names:
            uris.update(index.column("uri").to_pylist())
        else:
            uris_indexed = False
    with_uri = ["uri"] if cfg.columns.file else []
    test = dataio.select_rows(store, gen.test, ["record_id", "subject_id", *with_uri], named)
    test_found = dict(
        zip(
            test.column("record_id").to_pylist(), test.column("subject_id").to_pylist(), strict=True
        )
    )
    if with_uri:
        uris.update(test.column("uri").to_pylist())

    first: dict[int, int] = {}
    per_shard: dict[int, int] = {}
    for _subject, k, r in found.values():
        first[k] = min(first.get(k, r), r)
        per_shard[k] = per_shard.get(k, 0) + 1
    held_subjects = {s for s, _, _ in found.values()} | set(test_found.values())
    held_records = set(found) | set(test_found)
    request_plans = []
    for req in requests:
        subj, recs = set(req.subjects), set(req.records)
        mine = [rid for rid, (s, _, _) in found.items() if s in subj or rid in recs]
        mine += [rid for rid, s in test_found.items() if s in subj or rid in recs]
        request_plans.append(
            RequestPlan(
                uid=req.uid,
                subject_hashes=keys.id_hashes(subj),
                record_hashes=keys.id_hashes(mine),
                shards=sorted({found[rid][1] for rid in mine if rid in found}),
                requested_record_hashes=keys.id_hashes(recs),
                subjects_unmatched=len(subj - held_subjects),
                records_unmatched=len(recs - held_records),
            )
        )
    return ErasurePlan(
        batch_id=batch,
        model=model,
        key_id=key_id(keys.hmac_key),
        base_generation=gen.number,
        requested_at=requested_at,
        requests=request_plans,
        shards=[ShardPlan(k, first[k], per_shard[k]) for k in sorted(first)],
        test_records=len(test_found),
        estimate=estimate_cost(gen, first),
        record_hashes=keys.id_hashes([*found, *test_found]),
        # an index from before URIs were indexed: the purge hashes what it finds
        file_hashes=keys.id_hashes(uris) if cfg.columns.file and uris_indexed else None,
    )


def held_counts(req: RequestPlan) -> dict[str, int]:
    return {
        "subjects_named": len(req.subject_hashes),
        "subjects_unmatched": req.subjects_unmatched,
        "records_named": len(req.requested_record_hashes),
        "records_unmatched": req.records_unmatched,
        "records_erased": len(req.record_hashes),
    }


def outcome_words(req: RequestPlan) -> str:
    """The certificate's outcome in plain words (counts only, never an id)."""
    named = []
    if req.subject_hashes:
        named.append(f"{len(req.subject_hashes)} subject(s)")
    if req.requested_record_hashes:
        named.append(f"{len(req.requested_record_hashes)} record id(s)")
    what = " and ".join(named) or "nothing"
    if req.outcome == NOTHING_HELD:
        return (
            f"Nothing held: none of the {what} named was found in this model's data, "
            "so nothing was erased or retrained."
        )
    unmatched = req.subjects_unmatched + req.records_unmatched
    tail = f" {unmatched} of the ids named matched nothing." if unmatched else ""
    return (
        f"Erased {len(req.record_hashes)} record(s) of the {what} named from every data, "
        f"index and test object and every version of them.{tail}"
    )


def certificate_timings(plan: ErasurePlan, markers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    t0 = plan.requested_at
    q_at = markers["quarantine"].get("at")
    commit = markers["commit"]
    c_at = commit.get("released_at") or commit.get("at")  # shards back in service
    return {
        "requested_at": t0,
        "quarantined_at": q_at,
        "patched_at": markers["patch"].get("at"),
        "data_purged_at": markers["purge-data"].get("at"),
        "committed_at": c_at,
        "purged_at": markers["purge"].get("at"),
        "time_to_forget_seconds": (q_at - t0) if q_at else 0.0,
        "erasure_seconds": (c_at - t0) if c_at else 0.0,
    }


def tainted_checkpoints(
    store: Store, layout: ModelLayout, shard: int, tainted_shas: set[str], live_keys: set[str]
) -> set[str]:
    """Checkpoints of ``shard`` (and their lineage records) trained on a tainted
    (tombstoned) file.
    A checkpoint without its lineage record cannot be cleared, so it goes too."""
    keys = {key for key, _, _ in store.list_versions(layout.checkpoints_prefix(shard))}
    doomed: set[str] = set()
    for key in keys:
        if not key.endswith(".pt") or key in live_keys:
            continue
        record = ModelLayout.checkpoint_lineage_record(key)
        try:  # read it even if the listing missed it: it is written before the checkpoint
            data: set[str] | None = set(store.get_json(record)["data"])
        except NotFound:
            data = None
        if data is None or data & tainted_shas:
            doomed |= {key, record}
    for key in keys:  # lineage records whose checkpoint is already gone
        if key.endswith(".json") and key[:-5] + ".pt" not in keys and key not in live_keys:
            try:
                if set(store.get_json(key)["data"]) & tainted_shas:
                    doomed.add(key)
            except NotFound:
                doomed.add(key)
    return doomed


def manifests_referencing(
    store: Store, layout: ModelLayout, keys: set[str], live: int, tombstones: set[str]
) -> set[str]:
    """Generation manifests (other than the live one) that point at any of ``keys`` or
    at a tombstoned file: also a manifest a concurrent writer built on a generation
    from before a purge and wrote after it (its compare-and-swap then lost: an orphan)."""
    out = set()
    for key, version, is_marker in list(store.list_versions(layout.generations_prefix)):
        if is_marker or key == layout.generation(live) or key in out:
            continue
        try:
            raw = store.get_version(key, version)
        except NotFound:
            continue  # purged since the listing
        try:
            gen = Generation.from_json(json.loads(raw))
        except (ValueError, KeyError):
            out.add(key)  # unreadable manifest: nothing live can depend on it
            continue
        refs = gen.referenced_keys()
        if refs & keys or {sha_of_key(k) for k in refs} & tombstones:
            out.add(key)
    return out


def resolve_shards(
    store: Store, gen: Generation, subjects: Iterable[str], records: Iterable[str]
) -> list[int]:
    """The training shards that hold any of these subjects or records. Subjects hash to
    their shard; record ids are looked up in the index files (ids only, no features)."""
    cfg = gen.config
    subjects, records = set(subjects), set(records)
    shards = {shard_of(s, cfg.shards) for s in subjects}
    if records:
        for k in range(cfg.shards):
            if k in shards:
                continue
            index = dataio.read_table(store, gen.shards[k].index, ["record_id"])
            if dataio.isin(index.column("record_id"), records).any():
                shards.add(k)
    return sorted(shards)


def hold_shards(store: Store, layout: ModelLayout, holder: str, shards: list[int]) -> Generation:
    """Quarantine ``shards`` on behalf of ``holder`` (a request accepted but not yet
    batched): instant forgetting, before any data is touched. Idempotent."""

    def change(g: Generation) -> Generation | None:
        missing = [k for k in shards if holder not in g.quarantine.get(k, [])]
        if not missing:
            return None
        nxt = g.successor(f"hold {holder}")
        for k in missing:
            nxt.quarantine.setdefault(k, []).append(holder)
        return nxt

    return update(store, layout, change).generation


def release_holds(store: Store, layout: ModelLayout, holders: set[str]) -> Generation:
    """Drop these holders from every shard's quarantine (their batch holds it now)."""

    def change(g: Generation) -> Generation | None:
        if not any(h in holders for hs in g.quarantine.values() for h in hs):
            return None
        nxt = g.successor("release holds")
        nxt.quarantine = {
            k: [h for h in hs if h not in holders] for k, hs in nxt.quarantine.items()
        }
        return nxt

    return update(store, layout, change).generation
