"""The eight erasure steps against SeaweedFS and Ray, and the proof."""

from __future__ import annotations

import json

from lethe import dataio
from lethe.core.hashing import shard_of, slice_of
from lethe.core.plan import ErasureRequest
from lethe.erasure import Engine, request_uid
from lethe.generations import read_live
from lethe.layout import ModelLayout
from lethe.predict import ensemble_accuracy
from lethe.store import Store
from lethe.training import RayTrainer
from lethe.verify import verify

from .conftest import lethe_cli, trained_small, training_subjects


def engine(
    store: Store, layout: ModelLayout, trainer: RayTrainer, log: list | None = None
) -> Engine:
    return Engine(
        store,
        layout,
        trainer,
        evaluate=lambda g: ensemble_accuracy(store, g),
        progress=(lambda s, m: log.append((s, m))) if log is not None else (lambda s, m: None),
        retry_backoff_seconds=0.1,
    )


def req(model: str, subjects=(), records=()) -> ErasureRequest:
    return ErasureRequest(request_uid(model, subjects, records), tuple(subjects), tuple(records))


def rows_of(store: Store, gen, subject: str) -> int:
    n = 0
    for shard in gen.shards:
        for sl in shard.slices:
            t = dataio.read_table(store, sl.data, ["subject_id"])
            n += t.column("subject_id").to_pylist().count(subject)
        n += dataio.read_table(store, shard.index).column("subject_id").to_pylist().count(subject)
    return n + dataio.read_table(store, gen.test).column("subject_id").to_pylist().count(subject)


def test_one_erasure_end_to_end(store: Store, trainer: RayTrainer) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=3, slices=3)
    before = read_live(store, layout).generation
    # a subject in a late slice, so the retrain resumes from a checkpoint
    subject = [s for s in training_subjects(table, cfg) if slice_of(s, 3) == 2][0]
    k = shard_of(subject, 3)
    old_files = {sl.data.key for sl in before.shards[k].slices} | {before.shards[k].index.key}
    log: list = []
    result = engine(store, layout, trainer, log).erase([req(cfg.name, [subject])])

    after = read_live(store, layout).generation
    assert rows_of(store, after, subject) == 0
    assert result["records_erased"] == 6 and result["shards"] == [k]
    runs = result["shard_runs"]
    assert [(r["shard"], r["first_slice"], r["slices_trained"]) for r in runs] == [(k, 2, 1)]
    assert after.quarantine == {} and after.live_shards() == [0, 1, 2]
    # the other shards and the clean slices of shard k kept their checkpoints
    for j in range(3):
        for r in range(3):
            same = before.shards[j].slices[r].checkpoint == after.shards[j].slices[r].checkpoint
            assert same == (j != k or r < 2)
    steps = [s for s, _ in log]
    assert steps[:4] == ["resolve", "plan", "quarantine", "patch"]
    # the data purge runs beside the retrain and its commit; both end before the rest
    assert sorted(steps[4:7]) == ["commit", "purge-data", "retrain"]
    assert steps.index("retrain") < steps.index("commit")
    assert steps[7:] == ["purge", "certify"]
    # the purge removed every version of the replaced files and their checkpoints
    replaced = old_files - after.referenced_keys()
    assert replaced and all(store.versions_of(key) == [] for key in replaced)
    assert store.versions_of(before.shards[k].slices[2].checkpoint) == []
    # the certificate names nobody and verifies
    cert_key = result["certificates"][request_uid(cfg.name, [subject], [])]
    raw = store.get(cert_key).decode()
    assert subject not in raw and "rec-" not in raw
    cert = json.loads(raw)
    assert cert["outcome"] == "Erased" and cert["generation_after"] == after.number
    assert cert["timings"]["time_to_forget_seconds"] < cert["timings"]["erasure_seconds"]
    assert cert["cost"]["cpu_seconds"] > 0 and cert["cost"]["full_retrain_usd"] > 0
    # speed-ups compare like with like: measured seconds against the full retrain's
    acc = cert["accounting"]
    assert acc["erasure_seconds"] == cert["timings"]["erasure_seconds"]
    assert acc["full_retrain_seconds"] == cert["estimate"]["full_seconds"]
    assert abs(acc["speedup"] - acc["full_retrain_seconds"] / acc["erasure_seconds"]) < 1e-3
    assert acc["full_retrain_basis"] == "extrapolated from the shards' training rate"
    assert "speedup" not in cert["cost"] and "full_basis" in cert["estimate"]
    verdict = verify(store, cert)
    assert verdict.ok, verdict.failures
    # repeating the request is a no-op returning the same result
    assert engine(store, layout, trainer).erase([req(cfg.name, [subject])]) == result


def test_quarantine_is_immediate_and_nothing_leaks_to_logs(
    store: Store, trainer: RayTrainer
) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=2)
    subject = training_subjects(table, cfg)[0]
    seen: dict = {}

    def progress(step: str, msg: str) -> None:
        assert subject not in msg
        if step == "quarantine":
            g = read_live(store, layout).generation
            seen["quarantined"] = g.quarantined_shards
            seen["live"] = g.live_shards()

    e = engine(store, layout, trainer)
    e.progress = progress
    e.erase([req(cfg.name, [subject])])
    k = shard_of(subject, 2)
    assert seen["quarantined"] == [k] and k not in seen["live"]


def test_batch_of_requests_shares_one_retrain(store: Store, trainer: RayTrainer) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=2)
    subjects = training_subjects(table, cfg)
    in_shard0 = [s for s in subjects if shard_of(s, 2) == 0][:3]
    records = [
        r
        for r, s in zip(
            table.column("record_id").to_pylist(),
            table.column("subject_id").to_pylist(),
            strict=True,
        )
        if s == in_shard0[2]
    ][:2]
    requests = [
        req(cfg.name, [in_shard0[0]]),
        req(cfg.name, [in_shard0[1]]),
        req(cfg.name, records=records),
        req(cfg.name, ["nobody-at-all"]),
    ]
    result = engine(store, layout, trainer).erase(requests)
    assert result["requests"] == 4 and result["shards"] == [0]
    assert len(result["shard_runs"]) == 1  # one retrain for the whole batch
    assert result["records_erased"] == 6 + 6 + 2
    certs = {uid: store.get_json(key) for uid, key in result["certificates"].items()}
    assert certs[requests[3].uid]["outcome"] == "NothingHeld"
    assert certs[requests[2].uid]["records_erased"] == 2
    after = read_live(store, layout).generation
    assert rows_of(store, after, in_shard0[0]) == rows_of(store, after, in_shard0[1]) == 0
    # only the two named records went: 4 remain, each in a data file and the index
    assert rows_of(store, after, in_shard0[2]) == 2 * 4
    for cert in certs.values():
        assert verify(store, cert).ok


def test_subject_with_no_records_is_not_an_error(store: Store, trainer: RayTrainer) -> None:
    layout, cfg, _ = trained_small(store, trainer, shards=2, slices=1)
    before = read_live(store, layout).generation.number
    r = lethe_cli("erase", "--model", cfg.name, "--subject", "nobody", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["records_erased"] == 0 and out["shard_runs"] == []
    assert read_live(store, layout).generation.number == before
    cert = store.get_json(next(iter(out["certificates"].values())))
    assert cert["outcome"] == "NothingHeld" and cert["held"]["subjects_unmatched"] == 1
    assert "Nothing held" in cert["summary"] and "nothing held" in r.stderr
    v = lethe_cli("verify", next(iter(out["certificates"].values())))
    assert v.returncode == 0 and "Nothing held" in v.stderr


def test_verify_catches_a_planted_leftover(store: Store, trainer: RayTrainer, tmp_path) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=2)
    subject = training_subjects(table, cfg)[-1]
    k, r = shard_of(subject, 2), slice_of(subject, 2)
    before = read_live(store, layout).generation
    old = before.shards[k].slices[r].data
    old_body = store.get(old.key)
    result = engine(store, layout, trainer).erase([req(cfg.name, [subject])])
    cert_key = result["certificates"][request_uid(cfg.name, [subject], [])]
    assert lethe_cli("verify", cert_key).returncode == 0

    # someone restores the old file from a backup, under its old name
    store.put(old.key, old_body)
    r1 = lethe_cli("verify", cert_key)
    assert r1.returncode == 1
    assert "deleted, but 1 version(s) remain" in r1.stderr
    assert "erased id(s)" in r1.stderr and old.key in r1.stderr
    store.purge(old.key)
    # ... or under a new name, where no deleted-keys list would find it
    planted = layout.data(k, r, "0" * 64)
    store.put(planted, old_body)
    r2 = lethe_cli("verify", cert_key)
    assert r2.returncode == 1 and planted in r2.stderr
    store.purge(planted)
    # a live checkpoint that does not match its data is caught too
    live = read_live(store, layout).generation
    store.purge(ModelLayout.checkpoint_lineage_record(live.shards[k].slices[-1].checkpoint))
    r3 = lethe_cli("verify", cert_key)
    assert r3.returncode == 1 and "lineage record missing" in r3.stderr


def test_failed_retrain_keeps_data_erased_and_shard_quarantined(
    store: Store, trainer: RayTrainer
) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=2)
    subject = training_subjects(table, cfg)[0]
    k = shard_of(subject, 2)
    r = lethe_cli(
        "erase", "--model", cfg.name, "--subject", subject, env={"LETHE_INJECT_TRAIN_FAILURE": "1"}
    )
    assert r.returncode == 3
    assert "RetrainFailed" in r.stderr and "injected training failure" in r.stderr
    assert "after 3 attempts" in r.stderr
    assert subject not in r.stderr
    gen = read_live(store, layout).generation
    assert rows_of(store, gen, subject) == 0  # forgotten ...
    assert gen.quarantined_shards == [k]  # ... and not serving
    # a later retry succeeds and releases the shard
    ok = lethe_cli("erase", "--model", cfg.name, "--subject", subject, "--json")
    assert ok.returncode == 0, ok.stderr
    gen = read_live(store, layout).generation
    assert gen.quarantined_shards == [] and gen.shards[k].trained


def test_cli_bad_input(store: Store, trainer: RayTrainer, tmp_path) -> None:
    r = lethe_cli("erase", "--model", "no-such-model", "--subject", "x")
    assert r.returncode == 2 and "model not found" in r.stderr
    bad = tmp_path / "subjects.txt"
    bad.write_text("ok-id\nnot ok\n")
    r = lethe_cli("erase", "--model", "no-such-model", "--subjects-file", str(bad))
    assert r.returncode == 2 and "line 2" in r.stderr
    r = lethe_cli("erase", "--model", "no-such-model")
    assert r.returncode == 2 and "name at least one" in r.stderr


def test_record_ids_of_test_subjects_are_erased_from_the_test_set(
    store: Store, trainer: RayTrainer
) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=1)
    gen = read_live(store, layout).generation
    test = dataio.read_table(store, gen.test)
    rid = test.column("record_id")[0].as_py()
    result = engine(store, layout, trainer).erase([req(cfg.name, records=[rid])])
    assert result["records_erased"] == 1 and result["shard_runs"] == []
    after = read_live(store, layout).generation
    assert rid not in dataio.read_table(store, after.test).column("record_id").to_pylist()
    assert store.versions_of(gen.test.key) == []
    cert = store.get_json(next(iter(result["certificates"].values())))
    assert verify(store, cert).ok
