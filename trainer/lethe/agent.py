"""The retrain agent: the operator's way to a batch's retrain without a Ray job per batch.

A Ray job costs seconds before its first useful instruction: the job's supervisor
actor, a new Python process, its imports, ``ray.init``. The cluster's retrain service
(``lethe.warm``) already runs there with the engine imported, so it also answers a
small HTTP API on the Ray head node, and runs ``lethe.jobs.retrain`` itself in one of
its threads: the same function, the same result as the job would have.

The API (JSON, under ``/lethe/v1``):

- ``GET /health`` -> ``{"session": <Ray session name>}``: the operator uses an agent
  only if it belongs to the cluster of the Jobs API address it was given (the Jobs
  API's ``/api/version`` names the same session).
- ``POST /jobs`` with ``{"id", "job": "retrain", "modelPrefix", "batch", "s3"}`` -> the
  job's state. Posting an id again returns that job's state: it never runs twice.
- ``GET /jobs/<id>?wait=<seconds>`` -> the job's state once it ended or the wait is
  over; 404 for an id this agent does not know (a restarted service forgot it).
- ``GET /jobs`` -> ``{"ids": [...]}``: every job it knows, oldest first.

A job's state is ``{"id", "status", "message", "start_time", "end_time"}`` with a Ray
job's status words (``RUNNING``, ``SUCCEEDED``, ``FAILED``) and times (ms). Bad input
is a 400 whose message names the field.

**Trust** is that of the Jobs API on the same head (whoever reaches either can have the
cluster retrain a model with the cluster's S3 keys): ``s3`` holds where the data is,
never a key; the keys come from the node's environment as for every worker.
**Port**: ``LETHE_AGENT_PORT`` (default 8267) in the Ray head's environment and in the
operator's; on Kubernetes the head's Service must expose it. It listens on
``LETHE_AGENT_HOST`` (default all addresses; ``lethe dev`` uses loopback). ``LETHE_AGENT=0`` on the
cluster turns the agent off; a port already taken leaves it off. Without an agent the
operator submits a Ray job per batch, as before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lethe.errors import UserError

log = logging.getLogger(__name__)

API = "/lethe/v1"
PORT_ENV = "LETHE_AGENT_PORT"
DEFAULT_PORT = 8267
HOST_ENV = "LETHE_AGENT_HOST"  # the address it listens on (like Ray's --dashboard-host)
DEFAULT_HOST = "0.0.0.0"
ENABLE_ENV = "LETHE_AGENT"  # "0": no agent; the operator submits a Ray job per batch
MAX_WAIT_SECONDS = 60.0  # the longest one long-poll is held
KEEP_FINISHED = 1000  # finished jobs remembered (their ids answer repeated posts)
# where the data is: the only settings a job may carry (never a key)
S3_FIELDS = frozenset({"LETHE_BUCKET", "LETHE_S3_ENDPOINT", "AWS_DEFAULT_REGION"})
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")

RUNNING, SUCCEEDED, FAILED = "RUNNING", "SUCCEEDED", "FAILED"


class BadRequest(UserError, ValueError):
    """A request the agent refuses; the message names the field."""


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


def port() -> int:
    """The agent's port (``LETHE_AGENT_PORT``); 0 turns the agent off."""
    raw = os.environ.get(PORT_ENV, "")
    try:
        value = int(raw) if raw else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{PORT_ENV}: not a port number: {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"{PORT_ENV}: {value} is not between 0 and 65535")
    return value


@dataclass(frozen=True)
class RetrainJob:
    """A batch's retrain, as the operator posts it."""

    id: str
    model_prefix: str
    batch: str
    s3: dict[str, str]

    @classmethod
    def parse(cls, body: Any) -> RetrainJob:
        if not isinstance(body, dict):
            raise BadRequest("body: a JSON object is required")
        if body.get("job") != "retrain":
            raise BadRequest("job: only 'retrain' runs on the agent")
        for name in ("id", "batch"):
            value = body.get(name)
            if not isinstance(value, str) or not _ID.match(value):
                raise BadRequest(f"{name}: letters, digits, '.', '_' or '-' (at most 253)")
        prefix = body.get("modelPrefix")
        if (
            not isinstance(prefix, str)
            or not prefix
            or len(prefix) > 1024
            or prefix.startswith("/")
            or ".." in prefix.split("/")
        ):
            raise BadRequest("modelPrefix: a relative key prefix (PREFIX/MODEL)")
        s3 = body.get("s3")
        if not isinstance(s3, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in s3.items()
        ):
            raise BadRequest("s3: an object of strings")
        extra = set(s3) - S3_FIELDS
        if extra:
            raise BadRequest(f"s3: only {sorted(S3_FIELDS)} (never keys); got {sorted(extra)}")
        if not s3.get("LETHE_BUCKET"):
            raise BadRequest("s3.LETHE_BUCKET: required")
        return cls(body["id"], prefix, body["batch"], dict(s3))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job": "retrain",
            "modelPrefix": self.model_prefix,
            "batch": self.batch,
            "s3": self.s3,
        }


@dataclass
class _Run:
    job: RetrainJob
    status: str = RUNNING
    message: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    ended: threading.Event = field(default_factory=threading.Event)

    def state(self) -> dict[str, Any]:
        return {
            "id": self.job.id,
            "status": self.status,
            "message": self.message,
            # milliseconds since the epoch, as the Jobs API gives them
            "start_time": round(self.started * 1000),
            "end_time": round(self.finished * 1000) if self.finished else None,
        }


class Agent:
    """The HTTP server, run by the retrain service in its own threads."""

    def __init__(self, host: str, port: int, session: str) -> None:
        self.session = session
        self.runs: dict[str, _Run] = {}
        self.lock = threading.Lock()
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                agent.handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                agent.handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # a request line holds a job id only; still, no access log

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.address = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def busy(self) -> bool:
        with self.lock:
            return any(r.status == RUNNING for r in self.runs.values())

    # HTTP -------------------------------------------------------------------------
    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(request.path)
        path = url.path.removeprefix(API)
        try:
            if method == "GET" and path == "/health":
                code, out = HTTPStatus.OK, {"session": self.session}
            elif method == "GET" and path == "/jobs":
                with self.lock:
                    code, out = HTTPStatus.OK, {"ids": list(self.runs)}
            elif method == "GET" and path.startswith("/jobs/"):
                query = urllib.parse.parse_qs(url.query)
                wait = _wait_seconds(query.get("wait", ["0"])[0])
                state = self.state(path.removeprefix("/jobs/"), wait)
                code, out = (
                    (HTTPStatus.OK, state)
                    if state
                    else (HTTPStatus.NOT_FOUND, {"error": "id: no such job"})
                )
            elif method == "POST" and path == "/jobs":
                length = int(request.headers.get("Content-Length") or 0)
                if length > 64 * 1024:
                    raise BadRequest("body: larger than 64 KiB")
                try:
                    body = json.loads(request.rfile.read(length) or b"null")
                except ValueError:
                    raise BadRequest("body: not JSON") from None
                code, out = HTTPStatus.OK, self.submit(RetrainJob.parse(body))
            else:
                code, out = HTTPStatus.NOT_FOUND, {"error": f"no {method} {API}{path}"}
        except BadRequest as e:
            code, out = HTTPStatus.BAD_REQUEST, {"error": str(e)}
        data = json.dumps(out).encode()
        request.send_response(code)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    # jobs -------------------------------------------------------------------------
    def submit(self, job: RetrainJob) -> dict[str, Any]:
        with self.lock:
            run = self.runs.get(job.id)
            if run is None:
                run = self.runs[job.id] = _Run(job)
                self._forget_old()
                threading.Thread(target=self._run, args=(run,), daemon=True).start()
            return run.state()

    def state(self, job_id: str, wait: float = 0.0) -> dict[str, Any] | None:
        with self.lock:
            run = self.runs.get(job_id)
        if run is None:
            return None
        run.ended.wait(wait)
        return run.state()

    def _run(self, run: _Run) -> None:
        from lethe import jobs
        from lethe.warm import store_for

        status, message = SUCCEEDED, ""
        try:
            jobs.retrain(store_for(run.job.s3), run.job.model_prefix, run.job.batch)
        except Exception as e:  # noqa: BLE001 - the operator reads it as the job's failure
            log.warning("retrain job failed: %s", type(e).__name__)
            status, message = FAILED, f"{type(e).__name__}: {e}"
        finally:
            with self.lock:
                run.status, run.message, run.finished = status, message, time.time()
            run.ended.set()

    def _forget_old(self) -> None:
        finished = [i for i, r in self.runs.items() if r.status != RUNNING]
        for job_id in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.runs[job_id]


def _wait_seconds(raw: str) -> float:
    try:
        return min(MAX_WAIT_SECONDS, max(0.0, float(raw)))
    except ValueError:
        raise BadRequest("wait: a number of seconds") from None


def start(session: str) -> Agent | None:
    """The agent on the configured host and port, or None (off, or the port taken)."""
    host = os.environ.get(HOST_ENV) or DEFAULT_HOST
    try:
        wanted = port()
    except ValueError as e:
        log.warning("retrain agent off: %s", e)
        return None
    if not enabled() or wanted == 0:
        return None
    try:
        return Agent(host, wanted, session)
    except OSError as e:
        log.warning("retrain agent off: cannot listen on %s:%s (%s)", host, wanted, e)
        return None
