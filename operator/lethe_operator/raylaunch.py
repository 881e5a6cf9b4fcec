"""Submitting Lethe's Ray jobs through the Ray Jobs REST API of an existing cluster.

Submission ids are deterministic (derived from the batch id and the attempt), so a
restarted operator finds the job it already submitted instead of submitting again.

**Credentials: trusted-cluster only.** A job's ``runtime_env`` is metadata: the Jobs
API, the dashboard and Ray's state API show it to anyone who can reach the cluster. So
the job gets only where the data is (endpoint, bucket, region: ``S3Settings.public_env``)
and the model's non-secret ``ray.env``; ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
and ``AWS_SESSION_TOKEN`` are dropped even if a caller passes them. The job's driver and
its Ray Train workers take the keys from the Ray nodes' own environment (the raylet's,
which every worker inherits): the cluster is trusted to hold S3 credentials for the
buckets it serves, and the operator's admin allows only such clusters
(``LETHE_RAY_ADDRESSES``). A short-lived, prefix-scoped credential per job would need
STS, which SeaweedFS does not offer.
"""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# never in a job's runtime_env: they come from the cluster (see the module docstring)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class RayUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class JobStatus:
    submission_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def job_entrypoint(python: str, args: list[str]) -> str:
    """The shell command of a Lethe Ray job: ``python -m lethe.jobs ARGS``."""
    return " ".join(shlex.quote(a) for a in [python, "-m", "lethe.jobs", *args])


class Launcher(Protocol):
    """Runs ``python -m lethe.jobs ARGS`` as a Ray job with a deterministic id."""

    def status(self, submission_id: str) -> JobStatus | None: ...

    def ensure(self, submission_id: str, args: list[str]) -> JobStatus: ...


class RayJobs:
    """The ``Launcher`` for ``spec.ray.address``: jobs of an existing cluster's Jobs API.
    ``env`` becomes the jobs' ``runtime_env.env_vars``, without any S3 key."""

    def __init__(self, address: str, env: dict[str, str], python: str = "python") -> None:
        self.address = address.rstrip("/")
        self.env = {k: v for k, v in env.items() if k not in SECRET_ENV}
        self.python = python

    def _call(self, method: str, path: str, body: dict | None = None) -> dict | None:
        req = urllib.request.Request(
            f"{self.address}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise RayUnavailable(
                f"Ray Jobs API {method} {path}: HTTP {e.code}: {e.read()[:300]!r}"
            ) from None
        except OSError as e:
            raise RayUnavailable(f"Ray Jobs API at {self.address} unreachable: {e}") from None

    def status(self, submission_id: str) -> JobStatus | None:
        info = self._call("GET", f"/api/jobs/{submission_id}")
        if info is None:
            return None
        return JobStatus(submission_id, str(info.get("status")), str(info.get("message") or ""))

    def ensure(self, submission_id: str, args: list[str]) -> JobStatus:
        """The job with this id: submitted now if (and only if) it does not exist yet."""
        existing = self.status(submission_id)
        if existing is not None:
            return existing
        self._call(
            "POST",
            "/api/jobs/",
            {
                "entrypoint": job_entrypoint(self.python, args),
                "submission_id": submission_id,
                "runtime_env": {"env_vars": self.env},
                "metadata": {"app": "lethe"},
            },
        )
        st = self.status(submission_id)
        return st or JobStatus(submission_id, "PENDING", "")

    def submissions(self, prefix: str = "lethe-") -> list[str]:
        jobs = self._call("GET", "/api/jobs/") or []
        return [
            j["submission_id"] for j in jobs if str(j.get("submission_id") or "").startswith(prefix)
        ]
