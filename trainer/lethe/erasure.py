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
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lethe import dataio
from lethe.checkpoints import adopt_checkpoints
from lethe.core.config import ModelConfig
from lethe.core.cost import ShardRun, total_cost
from lethe.core.hashing import salted_hash, salted_hashes, shard_of, stable_id
from lethe.core.manifest import FileRef, Generation
from lethe.core.plan import ErasurePlan, ErasureRequest, RequestPlan, ShardPlan, estimate_cost
from lethe.generations import Live, read_live, update
from lethe.layout import ModelLayout, sha_of_key
from lethe.store import NotFound, Store

STEPS = ("plan", "quarantine", "patch", "retrain", "commit", "purge", "certify")
CRASH_ENV = "LETHE_CRASH_AFTER"  # fault injection for the crash-and-repeat tests


class Trainer(Protocol):
    def train(self, cfg: ModelConfig, tasks: list[Any]) -> list[ShardRun]: ...


class ErasureFailed(RuntimeError):
    """The batch could not finish; the data stays erased and the shards quarantined."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Engine:
    store: Store
    layout: ModelLayout
    trainer: Trainer | None
    evaluate: Callable[[Generation], float | None] | None = None
    progress: Callable[[str, str], None] = lambda step, msg: None
    retries: int = 2
    retry_backoff_seconds: float = 2.0
    _tables: dict[str, Any] = field(default_factory=dict)

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
        plan = self.prepare(requests, requested_at)
        self.retrain(plan)
        return self.finish(plan)

    # The parts below let a control plane run the retrain elsewhere (a Ray job):
    # prepare and finish need no torch; retrain does.
    def result_of(self, requests: list[ErasureRequest]) -> dict[str, Any] | None:
        if not requests:
            raise ValueError("no requests")
        try:
            return self.store.get_json(self.layout.result(batch_id(self.model, requests)))
        except NotFound:
            return None

    def prepare(
        self, requests: list[ErasureRequest], requested_at: float | None = None
    ) -> ErasurePlan:
        """Steps 1-4: resolve, plan, quarantine, patch. After this the data is gone."""
        plan = self._plan(batch_id(self.model, requests), requests, requested_at or time.time())
        _crash_point("plan")
        if plan.record_hashes:
            self._once(plan, "quarantine", lambda: self._quarantine(plan))
            self._once(plan, "patch", lambda: self._patch(plan))
        return plan

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
        """Steps 7-8: purge and certify."""
        if plan.record_hashes:
            if not self.committed(plan):
                raise ErasureFailed("NotRetrained", f"batch {plan.batch_id} is not committed yet")
            self._once(plan, "purge", lambda: self._purge(plan))
        return self._certify(plan)

    # -- steps 1 and 2: resolve and plan -----------------------------------------------
    def _plan(self, batch: str, requests: list[ErasureRequest], requested_at: float) -> ErasurePlan:
        key = self.layout.plan(batch)
        try:
            return ErasurePlan.from_json(self.store.get_json(key))
        except NotFound:
            pass
        self.progress("resolve", f"resolving {len(requests)} request(s)")
        gen = read_live(self.store, self.layout).generation
        plan = make_plan(self.store, gen, batch, self.model, requests, requested_at)
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
        hashes = set(plan.record_hashes)
        replaced: set[str] = set()

        def filtered(ref: FileRef, key_for: Callable[[str], str]) -> FileRef | None:
            table = self._table(ref)
            mask = dataio.hashed_mask(table.column("record_id"), plan.salt, hashes)
            if not mask.any():
                return None
            replaced.add(ref.key)
            return dataio.write_content_addressed(
                self.store, dataio.drop_rows(table, mask), key_for
            )

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
        return {"generation": live.generation.number, "replaced": sorted(replaced)}

    def _table(self, ref: FileRef) -> Any:
        if ref.key not in self._tables:
            self._tables.clear()  # hold one shard's files at a time, not the dataset
            self._tables[ref.key] = dataio.read_table(self.store, ref)
        return self._tables[ref.key]

    # -- steps 5 and 6: retrain and commit -------------------------------------------
    def _retrain_and_commit(self, plan: ErasurePlan) -> dict[str, Any]:
        from lethe.training import shard_tasks

        affected = plan.affected_shards
        for _round in range(10):  # another batch may change a shard under us: retrain again
            gen = read_live(self.store, self.layout).generation
            adopt_checkpoints(self.store, self.layout, gen, affected)
            todo = {
                k: r for k in affected if (r := gen.shards[k].first_untrained_slice()) is not None
            }
            if todo:
                if self.trainer is None:
                    raise ErasureFailed("NoTrainer", "retraining needs a trainer (Ray)")
                tasks = shard_tasks(self.layout, gen, todo, f"{self.model}-{plan.batch_id}")
                self.progress("retrain", f"retraining shard(s) {sorted(todo)} on Ray Train")
                for run in self._train_with_retries(gen.config, tasks):
                    self.store.put_json(
                        self.layout.shard_run(plan.batch_id, run.shard), run.to_json()
                    )
                _crash_point("retrain")
            live, released_at = self._commit(plan)
            if released_at is not None:
                return {
                    "generation": live.generation.number,
                    "accuracy": live.generation.accuracy,
                    "released_at": released_at,
                }
        raise ErasureFailed("RetrainRace", "the affected shards kept changing under the retrain")

    def _train_with_retries(self, cfg: ModelConfig, tasks: list[Any]) -> list[ShardRun]:
        assert self.trainer is not None
        for attempt in range(self.retries + 1):
            try:
                return self.trainer.train(cfg, tasks)
            except Exception as e:
                if attempt == self.retries:
                    raise ErasureFailed(
                        "RetrainFailed",
                        f"{e} (after {attempt + 1} attempts; "
                        "the data stays erased and the shard quarantined)",
                    ) from e
                self.progress("retrain", f"attempt {attempt + 1} failed, retrying")
                time.sleep(self.retry_backoff_seconds * 2**attempt)
        raise AssertionError("unreachable")

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
        live = read_live(self.store, self.layout).generation
        live_keys = live.referenced_keys()
        hashes = set(plan.record_hashes)
        marker = self.layout.step(plan.batch_id, "purge-plan")
        try:
            tainted: set[str] = set(self.store.get_json(marker)["tainted"])
        except NotFound:
            tainted = set()
        prefixes = [self.layout.eval_prefix] + [
            p
            for k in plan.affected_shards
            for p in (self.layout.data_prefix(k), self.layout.index_prefix(k))
        ]
        for prefix in prefixes:
            for key, version, is_marker in list(self.store.list_versions(prefix)):
                if is_marker or key in tainted or not key.endswith(".parquet"):
                    continue
                ids = dataio.decode(self.store.get_version(key, version), ["record_id"])
                if dataio.hashed_mask(ids.column("record_id"), plan.salt, hashes).any():
                    if key in live_keys:
                        raise RuntimeError(f"live object {key} still holds erased records")
                    tainted.add(key)
        # Remember what was tainted before deleting it: a repeated purge can no longer
        # find deleted files, but must still delete the checkpoints trained on them.
        if not self.store.put_json_if_absent(marker, {"tainted": sorted(tainted)}):
            tainted |= set(self.store.get_json(marker)["tainted"])
        tainted_shas = {sha_of_key(k) for k in tainted}

        doomed = set(tainted)
        for k in plan.affected_shards:
            doomed |= tainted_checkpoints(self.store, self.layout, k, tainted_shas, live_keys)
        doomed |= manifests_referencing(self.store, self.layout, doomed, live.number)
        deleted: dict[str, int] = {}
        for key in sorted(doomed):
            if key in live_keys:
                raise RuntimeError(f"refusing to purge live object {key}")
            deleted[key] = self.store.purge(key)
        self.progress("purge", f"{len(deleted)} object(s) deleted with every version")
        return {"deleted": sorted(deleted), "versions_deleted": sum(deleted.values())}

    # -- step 8: certify ---------------------------------------------------------------
    def _certify(self, plan: ErasurePlan) -> dict[str, Any]:
        markers = {s: self._marker(plan, s) for s in ("quarantine", "patch", "commit", "purge")}
        runs = [
            ShardRun.from_json(self.store.get_json(k))
            for k in self.store.list_keys(self.layout.shard_runs_prefix(plan.batch_id))
        ]
        live = read_live(self.store, self.layout).generation
        cfg = live.config
        full_resources = cfg.trainer.workers_per_shard
        cost = total_cost(
            runs,
            cfg.prices,
            plan.estimate.full_seconds * full_resources * cfg.trainer.cpus_per_worker,
            plan.estimate.full_seconds * full_resources * cfg.trainer.gpus_per_worker,
        )
        t0 = plan.requested_at
        q_at = (markers["quarantine"] or {}).get("at")
        commit = markers["commit"] or {}
        c_at = commit.get("released_at") or commit.get("at")  # shards back in service
        affected = plan.affected_shards
        timings = {
            "requested_at": t0,
            "quarantined_at": q_at,
            "patched_at": (markers["patch"] or {}).get("at"),
            "committed_at": c_at,
            "purged_at": (markers["purge"] or {}).get("at"),
            "time_to_forget_seconds": (q_at - t0) if q_at else 0.0,
            "erasure_seconds": (c_at - t0) if c_at else 0.0,
        }
        base = {
            "kind": "lethe.dev/ErasureCertificate",
            "version": 1,
            "bucket": self.store.bucket,
            "model_prefix": self.layout.prefix,
            "batch_id": plan.batch_id,
            "salt": plan.salt,
            "hash": "sha256(salt + NUL + id)",
            "generation_before": plan.base_generation,
            "generation_after": (markers["commit"] or {}).get("generation", plan.base_generation),
            "accuracy_after": (markers["commit"] or {}).get("accuracy"),
            "shards": affected,
            "lineages": {str(k): [s.lineage for s in live.shards[k].slices] for k in affected},
            "deleted_keys": (markers["purge"] or {}).get("deleted", []),
            "ray_runs": sorted(r.run_id for r in runs),
            "shard_runs": [r.to_json() for r in runs],
            "timings": timings,
            "cost": cost.to_json(),
            "estimate": plan.estimate.to_json(),
        }
        certificates = {}
        for req in plan.requests:
            cert = {
                **base,
                "request_uid": req.uid,
                "status": "nothing-to-erase" if req.nothing_to_erase else "erased",
                "subject_hashes": req.subject_hashes,
                "record_hashes": req.record_hashes,
                "records_erased": len(req.record_hashes),
                "request_shards": req.shards,
            }
            key = self.layout.certificate(req.uid)
            if not self.store.put_json_if_absent(key, cert):
                cert = self.store.get_json(key)
            certificates[req.uid] = key
        result = {
            "batch_id": plan.batch_id,
            "model": self.model,
            "requests": len(plan.requests),
            "records_erased": plan.records_erased,
            "shards_retrained": len({r.shard for r in runs}),
            "shards": affected,
            "certificates": certificates,
            "generation_before": base["generation_before"],
            "generation_after": base["generation_after"],
            "accuracy_after": base["accuracy_after"],
            "timings": timings,
            "cost": cost.to_json(),
            "estimate": plan.estimate.to_json(),
            "shard_runs": base["shard_runs"],
            "deleted_keys": len(base["deleted_keys"]),
        }
        self.store.put_json_if_absent(self.layout.result(plan.batch_id), result)
        _crash_point("certify")
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
        _crash_point(step)


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os._exit(75)


def batch_id(model: str, requests: Iterable[ErasureRequest]) -> str:
    return stable_id("batch", [model, *sorted(r.uid for r in requests)])


def request_uid(model: str, subjects: Iterable[str], records: Iterable[str]) -> str:
    """A deterministic uid for requests made on the command line (the operator uses
    the ErasureRequest's metadata.uid), so repeating a command resumes its batch."""
    return stable_id("req", [model, "subjects", *sorted(subjects), "records", *sorted(records)])


def make_plan(
    store: Store,
    gen: Generation,
    batch: str,
    model: str,
    requests: list[ErasureRequest],
    requested_at: float,
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
    for k in shards_to_read:
        index = dataio.read_table(store, gen.shards[k].index)
        mask = dataio.isin(index.column("subject_id"), subjects) | dataio.isin(
            index.column("record_id"), records
        )
        for i in np.flatnonzero(mask):
            found[index.column("record_id")[i].as_py()] = (
                index.column("subject_id")[i].as_py(),
                k,
                int(index.column("slice")[i].as_py()),
            )
    test = dataio.read_table(store, gen.test, ["record_id", "subject_id"])
    tmask = dataio.isin(test.column("subject_id"), subjects) | dataio.isin(
        test.column("record_id"), records
    )
    test_found = {
        test.column("record_id")[i].as_py(): test.column("subject_id")[i].as_py()
        for i in np.flatnonzero(tmask)
    }

    salt = secrets.token_hex(16)
    first: dict[int, int] = {}
    per_shard: dict[int, int] = {}
    for _subject, k, r in found.values():
        first[k] = min(first.get(k, r), r)
        per_shard[k] = per_shard.get(k, 0) + 1
    request_plans = []
    for req in requests:
        subj, recs = set(req.subjects), set(req.records)
        mine = [rid for rid, (s, _, _) in found.items() if s in subj or rid in recs]
        mine += [rid for rid, s in test_found.items() if s in subj or rid in recs]
        request_plans.append(
            RequestPlan(
                uid=req.uid,
                subject_hashes=salted_hashes(salt, subj),
                record_hashes=salted_hashes(salt, mine),
                shards=sorted({found[rid][1] for rid in mine if rid in found}),
            )
        )
    return ErasurePlan(
        batch_id=batch,
        model=model,
        salt=salt,
        base_generation=gen.number,
        requested_at=requested_at,
        requests=request_plans,
        shards=[ShardPlan(k, first[k], per_shard[k]) for k in sorted(first)],
        test_records=len(test_found),
        estimate=estimate_cost(gen, first),
        record_hashes=sorted({salted_hash(salt, rid) for rid in [*found, *test_found]}),
    )


def tainted_checkpoints(
    store: Store, layout: ModelLayout, shard: int, tainted_shas: set[str], live_keys: set[str]
) -> set[str]:
    """Checkpoints of ``shard`` (and their lineage records) trained on a tainted file.
    A checkpoint without its lineage record cannot be cleared, so it goes too."""
    keys = {key for key, _, _ in store.list_versions(layout.checkpoints_prefix(shard))}
    doomed: set[str] = set()
    for key in keys:
        if not key.endswith(".pt") or key in live_keys:
            continue
        record = ModelLayout.checkpoint_lineage_record(key)
        try:
            data = set(store.get_json(record)["data"]) if record in keys else None
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


def manifests_referencing(store: Store, layout: ModelLayout, keys: set[str], live: int) -> set[str]:
    """Generation manifests (other than the live one) that point at any of ``keys``."""
    out = set()
    for key, version, is_marker in list(store.list_versions(layout.generations_prefix)):
        if is_marker or key == layout.generation(live) or key in out:
            continue
        try:
            gen = Generation.from_json(json.loads(store.get_version(key, version)))
        except (ValueError, KeyError):
            out.add(key)  # unreadable manifest: nothing live can depend on it
            continue
        if gen.referenced_keys() & keys:
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
