"""Crash and repeat: kill the erasing process after each step, run it again, and get
exactly what an uninterrupted run gets (same data, same lineages, same accuracy),
without training anything twice."""

from __future__ import annotations

import json

import pytest

from lethe.core.plan import ErasureRequest
from lethe.erasure import STEPS, Engine, request_uid
from lethe.faults import CRASH_ENV
from lethe.generations import read_live
from lethe.layout import ModelLayout
from lethe.predict import ensemble_accuracy
from lethe.store import Store
from lethe.training import RayTrainer, train_model
from lethe.verify import verify

from .conftest import ingest_small, lethe_cli, small_table, training_subjects, unique_model


def fingerprint(store: Store, layout: ModelLayout) -> dict:
    g = read_live(store, layout).generation
    return {
        "data": [
            [(s.data.sha256, s.lineage, s.checkpoint is not None) for s in sh.slices]
            for sh in g.shards
        ],
        "index": [sh.index.sha256 for sh in g.shards],
        "test": g.test.sha256,
        "quarantine": g.quarantine,
        "accuracy": g.accuracy,
    }


def trained_twins(store: Store, trainer: RayTrainer, tag: str, seed: int):
    """Two identical trained models (3 shards x 3 slices) and the table they hold."""
    table = small_table(subjects=80, seed=seed)
    a, cfg_a, _ = ingest_small(store, unique_model(f"{tag}-a"), table, shards=3, slices=3)
    b, cfg_b, _ = ingest_small(store, unique_model(f"{tag}-b"), table, shards=3, slices=3)
    train_model(store, a, trainer)
    train_model(store, b, trainer)
    assert fingerprint(store, a) == fingerprint(store, b)
    return (a, cfg_a), (b, cfg_b), table


@pytest.fixture(scope="module")
def twins(store: Store, trainer: RayTrainer):
    """Two identical trained models: A is erased without interruption, B with crashes."""
    a, b, table = trained_twins(store, trainer, "twin", seed=4)
    return a, b, training_subjects(table, a[1])


@pytest.mark.parametrize("step", STEPS)
def test_crash_after_step_then_repeat(store: Store, trainer: RayTrainer, twins, step: str) -> None:
    (a, cfg_a), (b, cfg_b), subjects = twins
    subject = subjects[STEPS.index(step) * 7 % len(subjects)]
    Engine(store, a, trainer, evaluate=lambda g: ensemble_accuracy(store, g)).erase(
        [ErasureRequest(request_uid(cfg_a.name, [subject], []), (subject,))]
    )

    crashed = lethe_cli("erase", "--model", cfg_b.name, "--subject", subject, env={CRASH_ENV: step})
    assert crashed.returncode == 75, crashed.stderr
    again = lethe_cli("erase", "--model", cfg_b.name, "--subject", subject, "--json")
    assert again.returncode == 0, again.stderr
    trained_before_crash = "retraining" in crashed.stderr
    trained_after_crash = "retraining" in again.stderr
    if step != "purge-data":  # that one runs beside the retrain: it may be anywhere then
        assert trained_before_crash != trained_after_crash
        assert trained_before_crash == (STEPS.index(step) >= STEPS.index("retrain"))
    assert fingerprint(store, a) == fingerprint(store, b)
    result = json.loads(again.stdout.splitlines()[-1])
    cert = store.get_json(next(iter(result["certificates"].values())))
    # each slice is trained exactly once across the two processes (and their attempts)
    (retrained,) = cert["retrained"].values()
    trained = sum(r["slices_trained"] for r in cert["shard_runs"])
    assert trained == cfg_b.slices - retrained["first_slice"], cert["shard_runs"]
    verdict = verify(store, cert)
    assert verdict.ok, verdict.failures
    # the runs and their cost survive the crash: each run reported itself to S3
    assert any(r["slices_trained"] for r in cert["shard_runs"]), cert["shard_runs"]
    assert cert["cost"]["cpu_seconds"] > 0 and result["shards_retrained"] == 1
