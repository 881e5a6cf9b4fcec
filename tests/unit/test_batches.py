"""A batch's state machine (``lethe_operator.batches``) without a cluster: every step
``next_step`` can take, the retries' backoff, and the status round trip that a
restarted operator depends on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lethe_operator.batches import (
    MAX_BACKOFF_SECONDS,
    RETRY_BACKOFF_SECONDS,
    ActiveBatch,
    Facts,
    FailedBatch,
    RequestPhase,
    Step,
    active_batch,
    due_for_retry,
    failed_batches,
    next_step,
)

REPO = Path(__file__).resolve().parents[2]
NOW = 1_000_000.0
BATCH = ActiveBatch("batch-1", ("r1", "r2"), requested_at=NOW - 60, started=NOW - 30)


@pytest.mark.parametrize(
    ("facts", "step"),
    [
        (Facts(certified=True, committed=True, job="RUNNING"), Step.REPORT),
        # the data erased and the commit are what count, not how the job ended
        (Facts(committed=True, data_erased=True, job="FAILED"), Step.CERTIFY),
        (Facts(committed=True, data_erased=True), Step.CERTIFY),
        (Facts(), Step.SUBMIT),
        (Facts(data_erased=True), Step.SUBMIT),
        (Facts(job="PENDING"), Step.WAIT),
        (Facts(job="RUNNING"), Step.WAIT),
        # committed while its purge still runs: wait for the job, never certify early
        (Facts(committed=True, job="RUNNING"), Step.WAIT),
        (Facts(data_erased=True, job="RUNNING"), Step.WAIT),
        # a job that ended without both did not do its work, whatever Ray says
        (Facts(job="SUCCEEDED"), Step.RETRY),
        (Facts(committed=True, job="SUCCEEDED"), Step.RETRY),
        (Facts(data_erased=True, job="FAILED"), Step.RETRY),
        (Facts(job="FAILED"), Step.RETRY),
        (Facts(job="STOPPED"), Step.RETRY),
    ],
)
def test_next_step(facts: Facts, step: Step) -> None:
    assert next_step(BATCH, facts, NOW, max_retries=3) is step


def test_retries_back_off_doubling_then_the_batch_fails() -> None:
    batch, waits, t = BATCH, [], NOW
    for _ in range(3):
        assert next_step(batch, Facts(job="FAILED"), t, max_retries=3) is Step.RETRY
        batch = batch.retried(t)
        waits.append(batch.retry_at - t)
        # until its time, a retry only backs off, whatever Ray said about the last one
        assert next_step(batch, Facts(job="FAILED"), t, max_retries=3) is Step.BACK_OFF
        t = batch.retry_at
        assert next_step(batch, Facts(), t, max_retries=3) is Step.SUBMIT
    assert waits == [RETRY_BACKOFF_SECONDS * k for k in (1, 2, 4)]
    assert [batch.job_id, batch.tries] == ["lethe-batch-1-3", 3]
    assert next_step(batch, Facts(job="FAILED"), t, max_retries=3) is Step.FAIL
    assert next_step(BATCH, Facts(job="FAILED"), NOW, max_retries=0) is Step.FAIL


def test_backoff_is_capped() -> None:
    batch = ActiveBatch("b", (), NOW, NOW, attempt=20, first_attempt=0)
    assert batch.retried(NOW).retry_at - NOW == MAX_BACKOFF_SECONDS


def test_a_failed_batch_retried_starts_a_new_round_under_new_ids() -> None:
    failed = BATCH.retried(NOW).failed(NOW + 1)
    assert (failed.attempt, failed.requests, failed.requested_at) == (1, BATCH.requests, NOW - 60)
    again = failed.retry(NOW + 2)
    assert (again.attempt, again.first_attempt, again.tries, again.retry_at) == (2, 2, 0, 0.0)
    assert again.job_id == "lethe-batch-1-2"  # never the id of an attempt that ran
    assert next_step(again, Facts(), NOW + 2, max_retries=1) is Step.SUBMIT


def test_status_round_trips_and_keeps_its_field_names() -> None:
    batch = BATCH.retried(NOW)
    status = {"activeBatch": batch.to_status(), "failedBatches": [batch.failed(NOW).to_status()]}
    assert set(status["activeBatch"]) == {
        "id",
        "attempt",
        "firstAttempt",
        "requests",
        "requestedAt",
        "started",
        "retryAt",
    }
    assert active_batch(status) == batch
    assert failed_batches(status) == [batch.failed(NOW)]
    assert active_batch({}) is None and failed_batches({}) == []
    # a batch written before retryAt and requestedAt existed still reads
    old = ActiveBatch.from_status({"id": "b", "attempt": 1, "started": 5.0, "requests": ["x"]})
    assert (old.requested_at, old.retry_at, old.first_attempt) == (5.0, 0.0, 0)
    assert "retryAt" not in old.to_status()


def test_the_oldest_due_failed_batch_is_retried_first() -> None:
    failed = [
        FailedBatch("new", 0, NOW - 10, (), 0.0),
        FailedBatch("old", 0, NOW - 700, (), 0.0),
        FailedBatch("older", 0, NOW - 900, (), 0.0),
    ]
    assert due_for_retry(failed, 600, NOW).id == "older"
    assert due_for_retry(failed, 1000, NOW) is None
    assert due_for_retry(failed, 0, NOW) is None  # 0: never by itself


def test_request_phases_are_the_crds() -> None:
    crd = yaml.safe_load((REPO / "crds" / "lethe.dev_erasurerequests.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["phase"]["enum"] == [p.value for p in RequestPhase]
    target = status["properties"]["targets"]["items"]["properties"]["phase"]
    assert target["enum"] == [p.value for p in RequestPhase if p is not RequestPhase.PENDING]
    assert RequestPhase.progress()[-1] == RequestPhase.SUCCEEDED
    assert RequestPhase.forgotten() == {"Quarantined", "DataErased", "Retraining", "Succeeded"}
