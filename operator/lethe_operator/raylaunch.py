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

**The retrain agent.** A batch's retrain goes to the cluster's retrain agent
(``lethe.agent``: an HTTP API of the warm retrain service on the head) when there is
one, so that no Ray job driver starts per batch; the job keeps its deterministic id
there. The operator uses an agent only if its Ray session is the Jobs API's, and only
for models without extra ``ray.env`` (a long-lived service cannot take a job's own
environment). Without one, or when it fails to answer, the retrain is a Ray job.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

from lethe import agent as retrain_agent
from lethe.errors import TransientError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_RECHECK_SECONDS = 30.0  # how long a found agent is taken as there
AGENT_MISSING_SECONDS = 5.0  # ... and a missing one as missing (it starts with a job)
AGENT_TIMEOUT_SECONDS = 5.0  # one call to the agent (a long-poll adds its wait)
# never in a job's runtime_env: they come from the cluster (see the module docstring)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class RayUnavailable(TransientError, RuntimeError):
    pass


@dataclass(frozen=True)
class JobStatus:
    submission_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str
    via: str = "jobs"  # "jobs": a Ray job; "agent": the cluster's retrain agent

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


def _http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    """One JSON call; None for a 404. Raises RayUnavailable for anything else."""
    req = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise RayUnavailable(f"{method} {url}: HTTP {e.code}: {e.read()[:300]!r}") from None
    except (OSError, ValueError) as e:
        raise RayUnavailable(f"{method} {url}: {type(e).__name__}: {e}") from None


class RetrainAgent:
    """The client of a cluster's retrain agent (``lethe.agent``)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def status(self, submission_id: str, wait: float = 0.0) -> JobStatus | None:
        query = f"?wait={wait:g}" if wait else ""
        quoted = urllib.parse.quote(submission_id, safe="")
        info = _http(
            "GET", f"{self.url}/jobs/{quoted}{query}", timeout=AGENT_TIMEOUT_SECONDS + wait
        )
        if info is None:
            return None
        return JobStatus(submission_id, str(info["status"]), str(info["message"]), "agent")

    def submit(self, job: retrain_agent.RetrainJob) -> JobStatus:
        info = _http("POST", f"{self.url}/jobs", job.to_json(), timeout=AGENT_TIMEOUT_SECONDS)
        return JobStatus(job.id, str(info["status"]), str(info["message"]), "agent")

    def ids(self) -> list[str]:
        return list((_http("GET", f"{self.url}/jobs", timeout=AGENT_TIMEOUT_SECONDS) or {})["ids"])

    async def until_done(self, submission_id: str) -> None:
        """Long-poll until the job ended (or the agent stopped answering)."""
        import aiohttp

        quoted = urllib.parse.quote(submission_id, safe="")
        url = f"{self.url}/jobs/{quoted}?wait={retrain_agent.MAX_WAIT_SECONDS:g}"
        timeout = aiohttp.ClientTimeout(total=retrain_agent.MAX_WAIT_SECONDS + 10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                async with session.get(url) as r:
                    if r.status != 200 or (await r.json())["status"] in TERMINAL:
                        return


_agents_lock = threading.Lock()
_agents: dict[tuple[str, int], tuple[float, RetrainAgent | None]] = {}


def find_agent(address: str, port: int) -> RetrainAgent | None:
    """The retrain agent of the cluster whose Jobs API is ``address``: on the same host,
    at ``port``, and of the same Ray session; None if there is none (remembered for
    ``AGENT_RECHECK_SECONDS``, a missing one for ``AGENT_MISSING_SECONDS``)."""
    if port == 0:
        return None
    key = (address, port)
    with _agents_lock:
        hit = _agents.get(key)
    if hit is not None:
        checked, cached = hit
        if time.time() - checked < (AGENT_RECHECK_SECONDS if cached else AGENT_MISSING_SECONDS):
            return cached
    parts = urllib.parse.urlsplit(address)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    url = f"{parts.scheme}://{host}:{port}{retrain_agent.API}"
    found: RetrainAgent | None = None
    try:
        health = _http("GET", f"{url}/health", timeout=2) or {}
        version = _http("GET", f"{address}/api/version", timeout=5) or {}
        if health.get("session") and health.get("session") == version.get("session_name"):
            found = RetrainAgent(url)
    except RayUnavailable:
        pass
    with _agents_lock:
        _agents[key] = (time.time(), found)
    return found


def forget_agent(address: str, port: int) -> None:
    with _agents_lock:
        _agents.pop((address, port), None)


def retrain_job(
    submission_id: str, args: list[str], env: dict[str, str]
) -> retrain_agent.RetrainJob | None:
    """``python -m lethe.jobs ARGS`` as an agent job, or None when only a Ray job can run
    it: not a retrain, or an environment beyond where the data is."""
    if not args or args[0] != "retrain" or set(env) - retrain_agent.S3_FIELDS:
        return None
    opts = dict(zip(args[1::2], args[2::2], strict=False))
    if "--model-prefix" not in opts or "--batch" not in opts:
        return None
    return retrain_agent.RetrainJob(
        submission_id, opts["--model-prefix"], opts["--batch"], dict(env)
    )


class RayJobs:
    """The ``Launcher`` for ``spec.ray.address``: jobs of an existing cluster's Jobs API,
    a batch's retrain on the cluster's retrain agent when it has one. ``env`` becomes
    the jobs' ``runtime_env.env_vars``, without any S3 key."""

    def __init__(
        self,
        address: str,
        env: dict[str, str],
        python: str = "python",
        agent_port: int | None = None,
    ) -> None:
        self.address = address.rstrip("/")
        self.env = {k: v for k, v in env.items() if k not in SECRET_ENV}
        self.python = python
        self.agent_port = retrain_agent.port() if agent_port is None else agent_port

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        try:
            return _http(method, f"{self.address}{path}", body)
        except RayUnavailable as e:
            raise RayUnavailable(f"Ray Jobs API at {self.address}: {e}") from None

    def agent(self) -> RetrainAgent | None:
        return find_agent(self.address, self.agent_port)

    def _agent_status(self, submission_id: str) -> JobStatus | None:
        agent = self.agent()
        if agent is None:
            return None
        try:
            return agent.status(submission_id)
        except RayUnavailable:
            forget_agent(self.address, self.agent_port)  # gone: look again next time
            return None

    def status(self, submission_id: str) -> JobStatus | None:
        found = self._agent_status(submission_id)
        if found is not None:
            return found
        info = self._call("GET", f"/api/jobs/{submission_id}")
        if info is None:
            return None
        return JobStatus(submission_id, str(info.get("status")), str(info.get("message") or ""))

    def ensure(self, submission_id: str, args: list[str]) -> JobStatus:
        """The job with this id: started now if (and only if) it does not exist yet,
        on the retrain agent if it can run it, else as a Ray job."""
        existing = self.status(submission_id)
        if existing is not None:
            return existing
        job = retrain_job(submission_id, args, self.env)
        agent = self.agent() if job else None
        if job and agent:
            try:
                return agent.submit(job)
            except RayUnavailable:
                forget_agent(self.address, self.agent_port)
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

    async def until_done(self, job: JobStatus) -> None:
        """Return when the job has ended (or nothing tells any more): an agent job's
        long-poll, or a Ray job's log stream, which Ray closes when the job ends."""
        agent = self.agent() if job.via == "agent" else None
        if agent is not None:
            await agent.until_done(job.submission_id)
            return
        import aiohttp

        url = f"{self.address}/api/jobs/{job.submission_id}/logs/tail"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            async for _ in ws:  # the job's log lines: only the end matters here
                pass

    def submissions(self, prefix: str = "lethe-") -> list[str]:
        """Every job id with this prefix, on the agent and in the Jobs API."""
        jobs = self._call("GET", "/api/jobs/") or []
        out = [str(j.get("submission_id") or "") for j in jobs]
        agent = self.agent()
        if agent is not None:
            out += agent.ids()
        return [i for i in out if i.startswith(prefix)]
