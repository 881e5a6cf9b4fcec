"""Erased means erased in every case, and the proof holds up (issue: integrity).

Each test forces one way an erasure used to fail off the happy path, on the real
SeaweedFS (bucket versioning on) and a real Ray head: a failed retrain, a stale
concurrent retrain, a second writer on the same lineage, ids rewritten at ingest,
purged files written back, a checkpoint without its lineage record, a crash that
lost the run reports, and a certificate edited after the fact.
"""

from __future__ import annotations

import copy
import gzip
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from lethe import dataio
from lethe.certs import Keys
from lethe.checkpoints import adopt_checkpoints
from lethe.core.hashing import shard_of, slice_of
from lethe.core.plan import ErasureRequest
from lethe.erasure import Engine, request_uid
from lethe.generations import read_live
from lethe.ingest import IngestError, ingest_table
from lethe.layout import ModelLayout
from lethe.predict import ensemble_accuracy
from lethe.store import Store
from lethe.training import RayTrainer, StaleLineage, shard_tasks, train_model
from lethe.verify import verify
from lethe_dev.localstack import StackState

from .conftest import (
    ingest_small,
    lethe_cli,
    small_config,
    small_table,
    trained_small,
    training_subjects,
    unique_model,
)


def engine(store: Store, layout: ModelLayout, trainer: RayTrainer, **kw) -> Engine:
    return Engine(
        store,
        layout,
        trainer,
        evaluate=lambda g: ensemble_accuracy(store, g),
        retry_backoff_seconds=0.1,
        **kw,
    )


def req(model: str, subjects=(), records=()) -> ErasureRequest:
    return ErasureRequest(request_uid(model, subjects, records), tuple(subjects), tuple(records))


def ids_in_every_version(store: Store, prefix: str) -> set[str]:
    """Every record and subject id in any version of any Parquet object under prefix."""
    out: set[str] = set()
    for key, version, marker in store.list_versions(prefix):
        if marker or not key.endswith(".parquet"):
            continue
        t = dataio.decode(store.get_version(key, version))
        for col in ("record_id", "subject_id"):
            if col in t.column_names:
                out |= set(t.column(col).to_pylist())
    return out


# -- data that survives an erasure --------------------------------------------------------
def test_failed_retrain_leaves_no_erased_row_in_any_version(
    store: Store, trainer: RayTrainer
) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=2)
    subject = training_subjects(table, cfg)[0]
    r = lethe_cli(
        "erase", "--model", cfg.name, "--subject", subject, env={"LETHE_INJECT_TRAIN_FAILURE": "1"}
    )
    assert r.returncode == 3, r.stderr
    # the retrain never succeeded, and yet no version of any object holds the person
    assert subject not in ids_in_every_version(store, layout.root)
    assert list(store.list_keys(layout.tombstones_prefix))  # and they may not come back
    assert read_live(store, layout).generation.quarantined_shards == [shard_of(subject, 2)]
    # every failed attempt is accounted for, each with its own report
    batch_runs = list(store.list_keys(layout.root + "erasures/"))
    assert sum("/runs/" in k for k in batch_runs) == 3


def test_stale_concurrent_retrain_cannot_land(store: Store, trainer: RayTrainer) -> None:
    """A's retrain read the generation before B's patch; B retrains, purges and
    certifies; A's stale run then trains on a file B purged. It must not leave a
    checkpoint behind, and B's certificate must still verify (forced, not timed)."""
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=3)
    same = [s for s in training_subjects(table, cfg) if shard_of(s, 2) == 1]
    a, b = same[0], same[-1]
    k = 1
    ea, eb = engine(store, layout, trainer), engine(store, layout, trainer)
    plan_a = ea.prepare([req(cfg.name, [a])])
    stale = read_live(store, layout).generation
    first = stale.shards[k].first_untrained_slice()
    stale_tasks = shard_tasks(layout, stale, {k: first}, "stale", plan_a.batch_id)

    result_b = eb.erase([req(cfg.name, [b])])
    cert_b = store.get_json(next(iter(result_b["certificates"].values())))
    assert verify(store, cert_b).ok

    with pytest.raises(StaleLineage):
        trainer.train(stale.config, stale_tasks)
    tombstoned = {k.rsplit("/", 1)[-1][:-5] for k in store.list_keys(layout.tombstones_prefix)}
    (t,) = stale_tasks
    stale_lineages = [
        r for r in range(len(t.data)) if {d["sha256"] for d in t.data[: r + 1]} & tombstoned
    ]
    assert stale_lineages
    for r in stale_lineages:  # nothing trained on a purged file is left
        assert not store.exists(t.checkpoints[r])
        assert not store.exists(ModelLayout.checkpoint_lineage_record(t.checkpoints[r]))
    assert verify(store, cert_b).ok, verify(store, cert_b).failures

    # A finishes on the live data: B's retrain covered both patches, A adopts it
    ea.retrain(plan_a)
    result_a = ea.finish(plan_a)
    cert_a = store.get_json(next(iter(result_a["certificates"].values())))
    assert verify(store, cert_a).ok
    # honest about who trained what: the runs are B's, and A ran none that trained
    runs = cert_a["retrained"][str(k)]["runs"]
    assert runs and all(r and plan_a.batch_id not in r for r in runs)
    assert not any(r["slices_trained"] for r in cert_a["shard_runs"])


def test_second_writer_waits_for_a_claimed_lineage(store: Store, trainer: RayTrainer) -> None:
    """A lineage being trained is claimed in S3: a second writer waits and adopts it
    instead of training it again (each checkpoint is written exactly once)."""
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=2)
    subject = training_subjects(table, cfg)[0]
    k = shard_of(subject, 2)
    e = engine(store, layout, trainer, claim_ttl_seconds=60)
    plan = e.prepare([req(cfg.name, [subject])])
    gen = read_live(store, layout).generation
    claim = layout.claim(k, gen.shards[k].slices[-1].lineage)
    store.put_json(claim, {"owner": "another-batch", "expires": time.time() + 120})

    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            e.retrain(plan)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    time.sleep(4)
    assert not done.is_set()  # waiting, not training
    assert not list(store.list_keys(layout.shard_runs_prefix(plan.batch_id)))
    # the other writer trains the lineage and lets go of its claim
    first = gen.shards[k].first_untrained_slice()
    trainer.train(gen.config, shard_tasks(layout, gen, {k: first}, "other-writer"))
    store.purge(claim)
    assert done.wait(120) and not errors, errors
    final = gen.shards[k].slices[-1]
    assert (
        len(store.versions_of(layout.checkpoint(k, len(gen.shards[k].slices) - 1, final.lineage)))
        == 1
    )
    cert = store.get_json(next(iter(e.finish(plan)["certificates"].values())))
    assert cert["retrained"][str(k)]["runs"][-1] == f"other-writer-shard{k}"
    assert verify(store, cert).ok


def test_checkpoint_without_lineage_record_is_never_adopted(store: Store) -> None:
    layout, cfg, _ = ingest_small(store, shards=1, slices=2)
    gen = read_live(store, layout).generation
    key = layout.checkpoint(0, 0, gen.shards[0].slices[0].lineage)
    store.put(key, b"a checkpoint whose writer died before its record")
    assert not adopt_checkpoints(store, layout, gen, [0])
    store.put_json(
        ModelLayout.checkpoint_lineage_record(key),
        {
            "data": [gen.shards[0].slices[0].data.sha256],
            "trainer": gen.config.trainer_fingerprint(),
        },
    )
    assert adopt_checkpoints(store, layout, gen, [0])


def test_csv_ids_are_read_as_strings(store: Store, trainer: RayTrainer, tmp_path: Path) -> None:
    table = small_table(subjects=60)
    ids = [f"{i:06d}" for i in range(table.num_rows)]  # 000042 must stay 000042
    subs = [f"{int(s.split('-')[1]):05d}" for s in table.column("subject_id").to_pylist()]
    table = table.set_column(0, "record_id", pa.array(ids)).set_column(
        1, "subject_id", pa.array(subs)
    )
    path = tmp_path / "people.csv"
    pacsv.write_csv(table, path)
    name = unique_model("csv")
    r = lethe_cli(
        "ingest",
        "--model",
        name,
        "--data",
        str(path),
        "--shards",
        "2",
        "--slices",
        "1",
        "--epochs",
        "2",
        "--hidden",
        "8",
        "--batch-size",
        "16",
    )
    assert r.returncode == 0, r.stderr
    layout = ModelLayout.of(name)
    assert "000042" in ids_in_every_version(store, layout.root)
    train_model(store, layout, trainer)
    result = engine(store, layout, trainer).erase([req(name, records=["000042"])])
    assert result["records_erased"] == 1
    assert "000042" not in ids_in_every_version(store, layout.root)


def test_ingest_never_writes_a_purged_object_back(store: Store, trainer: RayTrainer) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=1)
    subject = training_subjects(table, cfg)[0]
    result = engine(store, layout, trainer).erase([req(cfg.name, [subject])])
    deleted = store.get_json(next(iter(result["certificates"].values())))["deleted_keys"]
    # re-running ingest fails before writing anything
    with pytest.raises(FileExistsError):
        ingest_table(store, layout, table, cfg)
    # with the model's pointer gone (a wiped model), ingest refuses the purged bytes
    store.purge(layout.current)
    with pytest.raises(IngestError, match="purged"):
        ingest_table(store, layout, table, cfg)
    for key in deleted:
        assert store.versions_of(key) == []


@pytest.mark.parametrize("policy", ["patch", "delete-after-ingest"])
def test_source_policy(store: Store, trainer: RayTrainer, policy: str) -> None:
    table = small_table(subjects=40, seed=7)
    name = unique_model(f"src-{policy[:5]}")
    src_key = f"sources/{name}.parquet"
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    store.put(src_key, buf.getvalue().to_pybytes())
    store.put(src_key, buf.getvalue().to_pybytes())  # an older version holds the rows too
    cfg = replace(
        small_config(name, shards=2, slices=1),
        source_uri=f"s3://{store.bucket}/{src_key}",
        source_policy=policy,
    )
    layout = ModelLayout.of(name)
    ingest_table(store, layout, table, cfg)
    if policy == "delete-after-ingest":
        assert store.versions_of(src_key) == []
        return
    train_model(store, layout, trainer)
    subject = training_subjects(table, cfg)[0]
    result = engine(store, layout, trainer).erase([req(name, [subject])])
    cert = store.get_json(next(iter(result["certificates"].values())))
    assert cert["source"]["state"] == "patched" and cert["source"]["rows_removed"] == 6
    assert len(store.versions_of(src_key)) == 1
    left = pq.read_table(pa.BufferReader(store.get(src_key)))
    assert subject not in left.column("subject_id").to_pylist()
    assert left.num_rows == table.num_rows - 6


def test_source_policy_patch_over_a_prefix(store: Store, trainer: RayTrainer) -> None:
    """``patch`` on a source prefix: every file under it is rewritten without the rows
    and keeps one version (older versions held them too); a file without them keeps its
    bytes; files that are not data are left alone."""
    table = small_table(subjects=40, seed=8)
    name = unique_model("src-prefix")
    half = table.num_rows // 2
    keys = [f"sources/{name}/part-{i}.parquet" for i in range(2)]
    for key, part in zip(keys, (table.slice(0, half), table.slice(half)), strict=True):
        buf = pa.BufferOutputStream()
        pq.write_table(part, buf)
        store.put(key, buf.getvalue().to_pybytes())
        store.put(key, buf.getvalue().to_pybytes())  # an older version holds the rows too
    store.put(f"sources/{name}/_SUCCESS", b"")
    cfg = replace(
        small_config(name, shards=2, slices=1),
        source_uri=f"s3://{store.bucket}/sources/{name}/",
        source_policy="patch",
    )
    layout = ModelLayout.of(name)
    ingest_table(store, layout, table, cfg)
    train_model(store, layout, trainer)
    subject = training_subjects(table, cfg)[0]
    untouched = (
        keys[1] if subject in table.slice(0, half).column("subject_id").to_pylist() else keys[0]
    )
    before = store.get(untouched)
    result = engine(store, layout, trainer).erase([req(name, [subject])])
    cert = store.get_json(next(iter(result["certificates"].values())))
    assert cert["source"]["state"] == "patched" and cert["source"]["rows_removed"] == 6
    rows = 0
    for key in keys:
        assert len(store.versions_of(key)) == 1
        left = pq.read_table(pa.BufferReader(store.get(key)))
        assert subject not in left.column("subject_id").to_pylist()
        rows += left.num_rows
    assert rows == table.num_rows - 6
    assert store.get(untouched) == before
    assert store.exists(f"sources/{name}/_SUCCESS")


# -- a proof that holds up ----------------------------------------------------------------
@pytest.fixture(scope="module")
def certified(store: Store, trainer: RayTrainer) -> tuple[ModelLayout, list[dict], list[str]]:
    """A model with two certificates in its chain (one Erased, one NothingHeld)."""
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=2)
    subject = training_subjects(table, cfg)[0]
    result = engine(store, layout, trainer).erase(
        [req(cfg.name, [subject]), req(cfg.name, ["no-such-person"])]
    )
    certs = [store.get_json(k) for k in result["certificates"].values()]
    certs.sort(key=lambda c: c["outcome"])  # Erased first
    return layout, certs, [subject]


EDITS = {
    "record_hashes": lambda c: c["record_hashes"].__setitem__(0, "0" * 64),
    "subject_hashes": lambda c: c["subject_hashes"].__setitem__(0, "f" * 64),
    "hash.key_id": lambda c: c["hash"].__setitem__("key_id", "hmac:0000"),
    "retrained": lambda c: next(iter(c["retrained"].values()))["lineages"].__setitem__(0, "0"),
    "deleted_keys": lambda c: c["deleted_keys"].__setitem__(0, c["deleted_keys"][0] + "x"),
    "tombstones": lambda c: c["tombstones"].clear(),
    "generation_before": lambda c: c.__setitem__("generation_before", 0),
    "shards": lambda c: c.__setitem__("shards", []),
    "cost": lambda c: c["cost"].__setitem__("usd", 0.0),
    "shard_runs": lambda c: c.__setitem__("shard_runs", []),
    "outcome": lambda c: c.__setitem__("outcome", "NothingHeld"),
    "timings": lambda c: c["timings"].__setitem__("erasure_seconds", 0.1),
    "accounting": lambda c: c["accounting"].__setitem__("speedup", 99.0),
    "all hashes emptied": lambda c: [c[f].clear() for f in ("record_hashes", "subject_hashes")],
}


@pytest.mark.parametrize("field", list(EDITS))
def test_an_edited_certificate_fails_naming_the_field(
    store: Store, keys: Keys, certified, field: str
) -> None:
    layout, (cert, _), _ = certified
    edited = copy.deepcopy(cert)
    EDITS[field](edited)
    verdict = verify(store, edited, keys)
    assert not verdict.ok
    assert any(f.startswith("signature.value") for f in verdict.failures)
    if field != "all hashes emptied":  # and the claim itself is checked against S3
        assert any(f.startswith(field) for f in verdict.failures), verdict.failures


def test_an_edited_and_resigned_certificate_still_fails(
    store: Store, keys: Keys, certified
) -> None:
    """Even the holder of the signing key cannot certify what S3 does not show."""
    from lethe import certs

    layout, (cert, _), _ = certified
    edited = copy.deepcopy(cert)
    edited["deleted_keys"] = edited["deleted_keys"][1:]
    edited = certs.sign({k: v for k, v in edited.items() if k != "signature"}, keys)
    verdict = verify(store, edited, keys)
    assert any(f.startswith("deleted_keys") for f in verdict.failures), verdict.failures


def test_wrong_key_and_removed_link_fail(store: Store, keys: Keys, certified) -> None:
    layout, (cert, nothing), _ = certified
    assert verify(store, cert, keys).ok
    other = Keys.generate()
    v = verify(store, cert, keys, public_key=other.public_key)
    assert any(f.startswith("signature.key") for f in v.failures), v.failures
    # a chain link removed (the older entry): the newer one no longer links up
    first = min((cert, nothing), key=lambda c: c["chain"]["sequence"])
    later = max((cert, nothing), key=lambda c: c["chain"]["sequence"])
    slot = layout.certificate_chain(first["chain"]["sequence"])
    body = store.get(slot)
    store.purge(slot)
    try:
        v = verify(store, later, keys)
        assert any("chain" in f for f in v.failures), v.failures
    finally:
        store.put(slot, body)
    assert verify(store, later, keys).ok


def test_nothing_held_says_so(store: Store, keys: Keys, certified) -> None:
    _, (_, nothing), _ = certified
    assert nothing["outcome"] == "NothingHeld" and nothing["records_erased"] == 0
    assert nothing["held"]["subjects_unmatched"] == 1
    v = verify(store, nothing, keys)
    assert v.ok and any("Nothing held" in n for n in v.notes)


def test_verify_looks_everywhere(store: Store, keys: Keys, certified) -> None:
    """A purged file restored anywhere, under any name or format, is found."""
    layout, (cert, _), (subject,) = certified
    row = f"record,{subject},label\n".encode()
    planted = {
        layout.root + "backup/rows.csv.gz": gzip.compress(b"record_id,subject_id\n" + row),
        layout.root + "checkpoints/x.parquet": _parquet_with(subject),
        layout.root + "data/notes.txt": b"someone kept " + subject.encode() + b" here\n",
        layout.root + "misc/blob.bin": b"\x00\x01" + subject.encode() + b"\xff\x00",
    }
    for key, body in planted.items():
        store.put(key, body)
    try:
        v = verify(store, cert, keys)
        for key in planted:
            assert any(f.startswith(key) for f in v.failures), (key, v.failures)
        # a .pt without a lineage record is flagged too
        orphan = layout.root + "checkpoints/shard=0/slice=0/" + "e" * 64 + ".pt"
        store.put(orphan, b"weights of unknown lineage")
        planted[orphan] = b""
        v = verify(store, cert, keys)
        assert any(f.startswith(orphan) and "lineage record" in f for f in v.failures)
    finally:
        for key in planted:
            store.purge(key)
    # outside the model's prefix only --bucket-wide looks
    outside = f"elsewhere/{unique_model('x')}.json"
    store.put(outside, json.dumps({"who": subject}).encode())
    try:
        assert verify(store, cert, keys).ok
        v = verify(store, cert, keys, bucket_wide=True)
        assert any(f.startswith(outside) for f in v.failures), v.failures
    finally:
        store.purge(outside)
    assert verify(store, cert, keys).ok


def _parquet_with(subject: str) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"subject_id": [subject], "x": [1.0]}), buf)
    return buf.getvalue().to_pybytes()


def test_no_erased_bytes_in_any_volume_file(
    store: Store, trainer: RayTrainer, stack: StackState
) -> None:
    """Deleted reaches the bytes: after the erasure the purged files' bytes are in no
    SeaweedFS volume file (the store's own vacuum, asked for by the purge). The table
    is this test's own: other tests' models hold byte-identical files of the default
    table, legitimately live, in the same volumes."""
    table = small_table(subjects=50, seed=1234)
    layout, cfg, table = trained_small(store, trainer, table=table, shards=2, slices=2)
    subject = training_subjects(table, cfg)[0]
    k, r = shard_of(subject, 2), slice_of(subject, 2)
    gen = read_live(store, layout).generation
    bodies = [store.get(gen.shards[k].slices[r].data.key), store.get(gen.shards[k].index.key)]
    result = engine(store, layout, trainer).erase([req(cfg.name, [subject])])
    cert = store.get_json(next(iter(result["certificates"].values())))
    assert cert["storage"]["state"] == "reclaimed", cert["storage"]
    for path in Path(stack.state_dir, "seaweedfs").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(b in data for b in bodies), path  # whole purged files


def test_certificates_are_locked_where_the_bucket_has_object_lock(store: Store, keys: Keys) -> None:
    """SeaweedFS honours S3 Object Lock: a certificate written to a locked bucket cannot
    be deleted, even by the credentials that wrote it."""
    from botocore.exceptions import ClientError

    from lethe import certs

    locked = store.for_bucket(f"lethe-lock-{unique_model('b')}")
    locked.client.create_bucket(Bucket=locked.bucket, ObjectLockEnabledForBucket=True)
    assert locked.object_lock_enabled() and not store.object_lock_enabled()
    layout = ModelLayout.of(unique_model("locked"))
    doc = certs.append(locked, layout, "req-1", lambda chain: {"kind": "test"}, keys)
    for key in (layout.certificate("req-1"), layout.certificate_chain(doc["chain"]["sequence"])):
        (version, _), *_ = locked.versions_of(key)
        retention = locked.client.get_object_retention(
            Bucket=locked.bucket, Key=key, VersionId=version
        )["Retention"]
        assert retention["Mode"] == "COMPLIANCE"
        with pytest.raises(ClientError):
            locked.client.delete_object(Bucket=locked.bucket, Key=key, VersionId=version)
        assert locked.versions_of(key)


def test_a_dead_writers_lease_is_taken_over_a_live_one_is_not(store: Store) -> None:
    """A retrain whose holder died must not block the lineage for ever; a live holder's
    lease must not be stolen; the same batch rerun after a crash takes its own back."""
    layout, cfg, _ = ingest_small(store, shards=1, slices=1)
    e = Engine(store, layout, None, claim_ttl_seconds=60)
    plan = type("P", (), {"batch_id": "batch-mine"})()
    key = layout.claim(0, "f" * 64)
    store.put_json(key, {"owner": "batch-other", "expires": time.time() + 60})
    assert not e._claim(plan, key)  # live: wait for it
    store.put_json(key, {"owner": "batch-other", "expires": time.time() - 1})
    assert e._claim(plan, key)  # expired: its holder died
    assert store.get_json(key)["owner"] == "batch-mine"
    store.put_json(key, {"owner": "batch-mine", "expires": time.time() + 60})
    assert e._claim(plan, key)  # our own, from before a crash
