"""A batch's data work runs in its job, which holds no key (issue 11: the operator
orchestrates, Ray does the data work).

The keyed side (the operator; here the engine with the model's keys) plans, quarantines
and writes the batch's erase order; ``python -m lethe.jobs retrain`` runs in a fresh
process *without* ``LETHE_KEYS_DIR`` (any use of the key would fail it), patches and
purges by the order and retrains; the keyed side certifies. On the real SeaweedFS and
Ray head: the result is byte for byte the in-process erasure's, a crash after any of the
job's steps ends the same, the order names no id and goes with every version, and an
order edited or pointing at changed bytes stops the job before anything is erased.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lethe import dataio
from lethe.core.manifest import FileRef
from lethe.core.plan import ErasureRequest
from lethe.erasure import Engine, request_uid
from lethe.faults import CRASH_ENV
from lethe.generations import read_live
from lethe.layout import ModelLayout
from lethe.predict import ensemble_accuracy
from lethe.store import Store
from lethe.training import RayTrainer, train_model
from lethe.verify import verify

from .conftest import ingest_small, small_table, training_subjects, unique_model
from .harness import versions_holding
from .test_crash import fingerprint, trained_twins

# the job's own steps, in order (a crash after each, then the job again)
JOB_STEPS = ("patch", "purge-plan", "purge-files", "purge-source", "purge-data", "commit")


def keyed(store: Store, layout: ModelLayout, trainer: RayTrainer | None = None) -> Engine:
    return Engine(store, layout, trainer, evaluate=lambda g: ensemble_accuracy(store, g))


def run_job(layout: ModelLayout, batch: str, env: dict[str, str] | None = None):
    """The batch's job in a fresh process, as Ray would start it, with no keys (and
    without the store's master URL: the erase order says how to reclaim)."""
    hidden = ("LETHE_KEYS_DIR", "LETHE_SEAWEEDFS_MASTER")
    clean = {k: v for k, v in os.environ.items() if k not in hidden}
    return subprocess.run(
        [sys.executable, "-m", "lethe.jobs", "retrain", "--model-prefix", layout.prefix]
        + ["--batch", batch],
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, **(env or {})},
        cwd=Path(__file__).parent.parent,
    )


def plan_and_order(store: Store, layout: ModelLayout, subject: str, model: str):
    """What the operator does before it submits the job."""
    engine = keyed(store, layout)
    request = ErasureRequest(request_uid(model, [subject], []), (subject,))
    plan = engine.prepare([request], patch=False)
    engine.order_erasure(plan)
    return engine, plan


@pytest.fixture(scope="module")
def twins(store: Store, trainer: RayTrainer):
    """A is erased in-process with the keys; B by the keyless job, with crashes."""
    a, b, table = trained_twins(store, trainer, "job", seed=9)
    return a, b, table, training_subjects(table, a[1])


def ids_of(table, subject: str) -> set[str]:
    owners = table.column("subject_id").to_pylist()
    records = table.column("record_id").to_pylist()
    return {subject} | {r for r, s in zip(records, owners, strict=True) if s == subject}


@pytest.mark.parametrize("crash_after", [None, *JOB_STEPS])
def test_keyless_job_erases_like_the_keyed_engine(
    store: Store, trainer: RayTrainer, twins, crash_after: str | None
) -> None:
    (a, cfg_a), (b, cfg_b), table, subjects = twins
    at = 0 if crash_after is None else 1 + JOB_STEPS.index(crash_after)
    subject = subjects[at * 5 % len(subjects)]
    ids = ids_of(table, subject)
    keyed(store, a, trainer).erase(
        [ErasureRequest(request_uid(cfg_a.name, [subject], []), (subject,))]
    )

    engine, plan = plan_and_order(store, b, subject, cfg_b.name)
    order = store.get_json(b.erase_order(plan.batch_id))
    assert not any(i in json.dumps(order) for i in ids)  # positions, never an id
    assert sum(len(f["rows"]) for f in order["files"]) == plan.records_erased > 0
    live = read_live(store, b).generation
    assert set(plan.affected_shards) <= set(live.quarantined_shards)  # before the job

    if crash_after is not None:
        crashed = run_job(b, plan.batch_id, {CRASH_ENV: crash_after})
        assert crashed.returncode == 75, crashed.stderr[-2000:]
    done = run_job(b, plan.batch_id)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["torch_imported"] is False
    assert engine.data_erased(plan) and engine.committed(plan)
    assert list(store.list_versions(b.erase_order(plan.batch_id))) == []  # every version gone
    result = engine.finish(plan)

    assert fingerprint(store, a) == fingerprint(store, b)  # the same bytes, lineages, accuracy
    assert versions_holding(store, b.root, ids) == []
    cert = store.get_json(next(iter(result["certificates"].values())))
    verdict = verify(store, cert)
    assert verdict.ok, verdict.failures
    assert cert["storage"]["state"] == "reclaimed", cert["storage"]  # vacuumed by the job
    (retrained,) = cert["retrained"].values()
    trained = sum(r["slices_trained"] for r in cert["shard_runs"])
    assert trained == cfg_b.slices - retrained["first_slice"]  # nothing trained twice


def test_an_order_that_does_not_match_is_refused(store: Store, trainer: RayTrainer) -> None:
    """An order edited or pointing into other bytes. What the job can check without the
    key (the file's bytes, each file's count, each shard's first slice) stops it before
    anything is erased; positions moved within those bounds erase other rows, and the
    keyed side then refuses to certify. Messages name the batch and the file, never an
    id; the keyed side's order, written again, lets an untouched batch finish."""
    from lethe.erasure import IntegrityError

    table = small_table(subjects=40, seed=11)
    layout, cfg, _ = ingest_small(store, unique_model("job-edit"), table, shards=2, slices=2)
    train_model(store, layout, trainer)
    subjects = training_subjects(table, cfg)
    subject = subjects[3]
    ids = ids_of(table, subject)
    engine, plan = plan_and_order(store, layout, subject, cfg.name)
    key = layout.erase_order(plan.batch_id)
    good = store.get_json(key)
    before = fingerprint(store, layout)

    def edited(change) -> dict:
        bad = json.loads(json.dumps(good))
        change(bad["files"][0])
        return bad

    refused = {
        "is not the file it names": edited(lambda f: f["ref"].update(sha256="0" * 64)),
        "other rows than the plan's": edited(lambda f: f.update(rows=f["rows"][1:])),
        "past": edited(lambda f: f.update(rows=[f["ref"]["rows"] + 3])),
        "not the plan's shards": edited(lambda f: f.update(shard=7)),
    }
    for words, bad in refused.items():
        store.put_json(key, bad)
        r = run_job(layout, plan.batch_id)
        assert r.returncode != 0 and "OrderError" in r.stderr, r.stderr[-2000:]
        assert words in r.stderr or words == "past", r.stderr[-2000:]
        assert not any(i in r.stderr + r.stdout for i in ids)
        assert fingerprint(store, layout) == before  # nothing patched
        assert engine._marker(plan, "patch") is None

    store.purge(key)  # deleted behind the operator's back: the job stops, says so
    r = run_job(layout, plan.batch_id)
    assert r.returncode != 0 and "its erase order is missing" in r.stderr, r.stderr[-2000:]
    assert fingerprint(store, layout) == before and engine._marker(plan, "patch") is None
    engine.order_erasure(plan)  # the keyed side writes it again
    assert store.get_json(key) == good
    r = run_job(layout, plan.batch_id)
    assert r.returncode == 0, r.stderr[-2000:]
    result = engine.finish(plan)
    assert versions_holding(store, layout.root, ids) == []
    cert = store.get_json(next(iter(result["certificates"].values())))
    assert verify(store, cert).ok

    # Positions moved to another subject's rows of the same count and first slice: the
    # job cannot tell; the keyed side finds the erased records still live and refuses.
    engine2, plan2 = plan_and_order(store, layout, subjects[5], cfg.name)
    key2 = layout.erase_order(plan2.batch_id)
    order = store.get_json(key2)
    f = order["files"][0]
    index = dataio.read_table(store, FileRef.from_json(f["ref"]), ["subject_id", "slice"])
    mine = set(f["rows"])
    slices = index.column("slice").to_pylist()
    owners = index.column("subject_id").to_pylist()
    first = min(slices[i] for i in mine)
    other = next(
        s
        for s in sorted(set(owners))
        if s not in ids_of(table, subjects[5])
        and sorted(slices[i] for i in range(len(owners)) if owners[i] == s)
        == sorted(slices[i] for i in mine)
        and min(slices[i] for i in mine) == first
    )
    f["rows"] = [i for i in range(len(owners)) if owners[i] == other]
    store.put_json(key2, order)
    r = run_job(layout, plan2.batch_id)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(IntegrityError, match="still holds erased records") as e:
        engine2.finish(plan2)
    assert not any(i in str(e.value) for i in ids_of(table, subjects[5]) | ids_of(table, other))
    assert not store.exists(layout.result(plan2.batch_id))  # nothing certified


def test_one_engine_erases_batch_after_batch(store: Store, trainer: RayTrainer) -> None:
    """An engine kept for several erasures (a service, a benchmark) erases each batch's
    own rows: the first version kept the first batch's rows for good, left the second
    batch's in the data, and only the check before certifying stopped it."""
    table = small_table(subjects=40, seed=13)
    layout, cfg, _ = ingest_small(store, unique_model("one-engine"), table, shards=2, slices=2)
    train_model(store, layout, trainer)
    engine = keyed(store, layout, trainer)
    for subject in training_subjects(table, cfg)[:2]:
        result = engine.erase([ErasureRequest(request_uid(cfg.name, [subject], []), (subject,))])
        assert versions_holding(store, layout.root, ids_of(table, subject)) == []
        cert = store.get_json(next(iter(result["certificates"].values())))
        assert verify(store, cert).ok


def test_two_jobs_of_one_batch_at_once_erase_it_once(store: Store, trainer: RayTrainer) -> None:
    """Two writers: the same batch's job started twice at once (a retry racing a job
    Ray still runs). The data ends erased, the batch is certified once and verifies,
    and no slice is trained twice (the claims), whichever job finishes the work."""
    table = small_table(subjects=40, seed=17)
    layout, cfg, _ = ingest_small(store, unique_model("two-jobs"), table, shards=2, slices=2)
    train_model(store, layout, trainer)
    subject = training_subjects(table, cfg)[2]
    engine, plan = plan_and_order(store, layout, subject, cfg.name)
    clean = {k: v for k, v in os.environ.items() if k != "LETHE_KEYS_DIR"}
    argv = [sys.executable, "-m", "lethe.jobs", "retrain", "--model-prefix", layout.prefix]
    procs = [
        subprocess.Popen(
            [*argv, "--batch", plan.batch_id],
            env=clean,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert any(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
    if not engine.data_erased(plan) or not engine.committed(plan):
        assert run_job(layout, plan.batch_id).returncode == 0  # a retry finishes it
    result = engine.finish(plan)
    assert versions_holding(store, layout.root, ids_of(table, subject)) == []
    cert = store.get_json(next(iter(result["certificates"].values())))
    assert verify(store, cert).ok
    (retrained,) = cert["retrained"].values()
    trained = sum(r["slices_trained"] for r in cert["shard_runs"])
    assert trained == cfg.slices - retrained["first_slice"]  # nothing trained twice
