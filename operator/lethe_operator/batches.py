"""A ShardedModel's erasure batches: their typed status, and the one function that
decides a batch's next step.

``status.activeBatch`` (at most one) and ``status.failedBatches`` (waiting for a retry)
are read into :class:`ActiveBatch` and :class:`FailedBatch` and written back from them,
so their fields live here alone. :func:`next_step` is the batch's whole state machine,
a pure function of the batch, what S3 and Ray say about it (:class:`Facts`) and the
time, in the manner of KubeRay's RayJob controller (one switch over a typed status).
``control.advance_batch`` gathers the facts, performs the step and asks again.

The phases a request goes through are :class:`RequestPhase`; the demo, the bench and
the tests name them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

RETRY_BACKOFF_SECONDS = 5.0  # the first retry's wait; it doubles, up to MAX_BACKOFF
MAX_BACKOFF_SECONDS = 300.0
JOB_FAILED = frozenset({"FAILED", "STOPPED"})


class RequestPhase(StrEnum):
    """``ErasureRequest.status.phase`` (and each target's), in the order they come."""

    PENDING = "Pending"  # not accepted yet
    QUARANTINED = "Quarantined"  # its shards are out of service in every model
    DATA_ERASED = "DataErased"  # its rows are gone from every object version
    RETRAINING = "Retraining"  # its batch's retrain runs
    SUCCEEDED = "Succeeded"  # retrained and certified
    FAILED = "Failed"  # see the reason; a RetrainFailed request's data is erased

    @classmethod
    def progress(cls) -> tuple[RequestPhase, ...]:
        """The phases of a request on its way, in order (Failed is off that way)."""
        return tuple(p for p in cls if p is not cls.FAILED)

    @classmethod
    def finished(cls) -> tuple[RequestPhase, ...]:
        return (cls.SUCCEEDED, cls.FAILED)

    @classmethod
    def forgotten(cls) -> frozenset[str]:
        """The phases of a request whose shards are out of service already."""
        return frozenset({cls.QUARANTINED, cls.DATA_ERASED, cls.RETRAINING, cls.SUCCEEDED})


class Step(StrEnum):
    """What a batch needs next (``next_step``)."""

    REPORT = "Report"  # certified (its result is in S3): report it and close it
    CERTIFY = "Certify"  # data erased, retrained and committed: purge checkpoints, certify
    BACK_OFF = "BackOff"  # a retry waits for its time
    SUBMIT = "Submit"  # start the batch's job under the attempt's id (never twice)
    WAIT = "Wait"  # the job runs (it patches, purges, retrains)
    RETRY = "Retry"  # the job failed: another attempt, after a backoff
    FAIL = "Fail"  # it failed for the last time: the batch's requests fail


@dataclass(frozen=True)
class Facts:
    """What the store and Ray say about a batch now."""

    certified: bool = False  # its result is in S3
    committed: bool = False  # its retrained shards are committed (or it needs none)
    data_erased: bool = False  # its rows are gone from every object version (or none held)
    job: str | None = None  # its job's status (Ray's words); None: not known yet


@dataclass(frozen=True)
class ActiveBatch:
    """``status.activeBatch``: named before anything of it happens, never renamed."""

    id: str
    requests: tuple[str, ...]
    requested_at: float
    started: float
    attempt: int = 0
    first_attempt: int = 0  # the attempt this round of retries began with
    retry_at: float = 0.0  # a retry's attempt starts no earlier (0: at once)

    @property
    def job_id(self) -> str:
        """The retrain's deterministic id: the same after any restart."""
        return f"lethe-{self.id}-{self.attempt}"

    @property
    def tries(self) -> int:
        """Attempts that failed in this round."""
        return self.attempt - self.first_attempt

    def retried(self, now: float) -> ActiveBatch:
        """The next attempt, after a backoff that doubles with each failure."""
        wait = min(MAX_BACKOFF_SECONDS, RETRY_BACKOFF_SECONDS * 2**self.tries)
        return replace(self, attempt=self.attempt + 1, retry_at=now + wait)

    def failed(self, now: float) -> FailedBatch:
        return FailedBatch(self.id, self.attempt, now, self.requests, self.requested_at)

    @classmethod
    def from_status(cls, d: dict[str, Any]) -> ActiveBatch:
        started = float(d.get("started") or 0.0)
        return cls(
            id=str(d["id"]),
            requests=tuple(d.get("requests") or ()),
            requested_at=float(d.get("requestedAt") or started),
            started=started,
            attempt=int(d.get("attempt", 0)),
            first_attempt=int(d.get("firstAttempt", 0)),
            retry_at=float(d.get("retryAt") or 0.0),
        )

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "attempt": self.attempt,
            "firstAttempt": self.first_attempt,
            "requests": list(self.requests),
            "requestedAt": self.requested_at,
            "started": self.started,
        }
        if self.retry_at:
            out["retryAt"] = self.retry_at
        return out


@dataclass(frozen=True)
class FailedBatch:
    """An entry of ``status.failedBatches``: data erased, retrain failed, retried later."""

    id: str
    attempt: int
    failed_at: float
    requests: tuple[str, ...]
    requested_at: float

    def retry(self, now: float) -> ActiveBatch:
        """The batch active again, with a fresh round of attempts."""
        attempt = self.attempt + 1
        return ActiveBatch(self.id, self.requests, self.requested_at, now, attempt, attempt)

    @classmethod
    def from_status(cls, d: dict[str, Any]) -> FailedBatch:
        failed_at = float(d.get("failedAt") or 0.0)
        return cls(
            id=str(d["id"]),
            attempt=int(d.get("attempt", 0)),
            failed_at=failed_at,
            requests=tuple(d.get("requests") or ()),
            requested_at=float(d.get("requestedAt") or failed_at),
        )

    def to_status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "attempt": self.attempt,
            "failedAt": self.failed_at,
            "requests": list(self.requests),
            "requestedAt": self.requested_at,
        }


def active_batch(status: dict[str, Any]) -> ActiveBatch | None:
    raw = status.get("activeBatch")
    return ActiveBatch.from_status(raw) if raw else None


def failed_batches(status: dict[str, Any]) -> list[FailedBatch]:
    return [FailedBatch.from_status(b) for b in status.get("failedBatches") or []]


def due_for_retry(failed: list[FailedBatch], after_seconds: int, now: float) -> FailedBatch | None:
    """The oldest failed batch whose wait for another retry is over (``after_seconds``
    <= 0: failed batches are never retried by themselves)."""
    if after_seconds <= 0:
        return None
    due = [b for b in failed if now - b.failed_at >= after_seconds]
    return min(due, key=lambda b: b.failed_at, default=None)


def next_step(batch: ActiveBatch, facts: Facts, now: float, max_retries: int) -> Step:
    """The batch's next step. In order: a certified batch is reported; one whose data
    is erased and whose shards are committed is certified (whatever Ray says: both
    happen before its job ends); a retry waits for its time; then the job's status
    decides. A job that ended without both failed, whatever Ray says."""
    if facts.certified:
        return Step.REPORT
    if facts.committed and facts.data_erased:
        return Step.CERTIFY
    if now < batch.retry_at:
        return Step.BACK_OFF
    if facts.job is None:
        return Step.SUBMIT
    if facts.job in JOB_FAILED or facts.job == "SUCCEEDED":
        return Step.RETRY if batch.tries < max_retries else Step.FAIL
    return Step.WAIT
