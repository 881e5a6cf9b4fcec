"""Submitting Lethe's Ray jobs through the Ray Jobs REST API of an existing cluster.

Submission ids are deterministic (derived from the batch id and the attempt), so a
restarted operator finds the job it already submitted instead of submitting again.
"""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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
    def __init__(self, address: str, env: dict[str, str], python: str = "python") -> None:
        self.address = address.rstrip("/")
        self.env = env
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
