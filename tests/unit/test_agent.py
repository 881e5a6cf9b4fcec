"""The retrain agent's HTTP API and the operator's client of it, without Ray.

The agent runs here as a plain HTTP server (as it does inside the retrain service); the
retrain it would run on a Ray cluster is replaced by a counting stand-in
(``lethe.jobs.retrain``), and the Jobs API's ``/api/version`` by a one-route server.
The real thing, on a real Ray head, is in tests/test_agent.py.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from lethe import agent, jobs
from lethe.errors import UserError
from lethe_operator import raylaunch
from lethe_operator.raylaunch import RayJobs, find_agent, retrain_job

S3 = {"LETHE_BUCKET": "b", "LETHE_S3_ENDPOINT": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "r"}
GOOD = {"id": "lethe-batch-1-0", "job": "retrain", "modelPrefix": "p/m", "batch": "b-1", "s3": S3}


def call(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Calls(list):
    release: threading.Event


@pytest.fixture
def retrains(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Stand-in for the retrain (which needs Ray): records its calls; a batch named
    ``fail-*`` fails, one named ``slow-*`` waits for ``release``."""
    calls = Calls()
    release = calls.release = threading.Event()

    def retrain(store: Any, model_prefix: str, batch: str) -> dict[str, Any]:
        calls.append((model_prefix, batch))
        if batch.startswith("fail"):
            raise RuntimeError("shard 0 failed")
        if batch.startswith("slow"):
            release.wait(10)
        return {}

    monkeypatch.setattr(jobs, "retrain", retrain)
    return calls


@pytest.fixture
def server() -> Iterator[agent.Agent]:
    a = agent.Agent("127.0.0.1", 0, "session-a")
    yield a
    a.server.shutdown()


def url(a: agent.Agent, path: str) -> str:
    return f"{a.address}{agent.API}{path}"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"job": "train"}, "job"),
        ({"id": "../x"}, "id"),
        ({"batch": ""}, "batch"),
        ({"modelPrefix": "/abs"}, "modelPrefix"),
        ({"modelPrefix": "a/../b"}, "modelPrefix"),
        ({"s3": "x"}, "s3"),
        ({"s3": {"LETHE_S3_ENDPOINT": "http://e"}}, "s3.LETHE_BUCKET"),
    ],
)
def test_a_bad_job_is_refused_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(agent.BadRequest, match=rf"^{field.replace('.', '[.]')}:"):
        agent.RetrainJob.parse({**GOOD, **change})
    assert issubclass(agent.BadRequest, UserError)


def test_a_job_never_carries_s3_keys() -> None:
    body = {**GOOD, "s3": {**S3, "AWS_SECRET_ACCESS_KEY": "very-secret-value"}}
    with pytest.raises(agent.BadRequest) as e:
        agent.RetrainJob.parse(body)
    assert "AWS_SECRET_ACCESS_KEY" in str(e.value) and "very-secret-value" not in str(e.value)


def test_port_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(agent.PORT_ENV, raising=False)
    assert agent.port() == agent.DEFAULT_PORT
    for bad in ("http", "70000", "-1"):
        monkeypatch.setenv(agent.PORT_ENV, bad)
        with pytest.raises(ValueError, match=agent.PORT_ENV):
            agent.port()
    monkeypatch.setenv(agent.PORT_ENV, "0")
    monkeypatch.setenv(agent.HOST_ENV, "127.0.0.1")
    assert agent.start("s") is None  # port 0: off


def test_a_taken_port_leaves_the_agent_off(server: agent.Agent, monkeypatch) -> None:
    monkeypatch.setenv(agent.HOST_ENV, "127.0.0.1")
    monkeypatch.setenv(agent.PORT_ENV, str(server.server.server_address[1]))
    assert agent.start("s") is None


def test_jobs_run_once_and_report_like_ray_jobs(server: agent.Agent, retrains) -> None:
    assert call(url(server, "/health")) == (200, {"session": "session-a"})
    code, state = call(url(server, "/jobs"), {**GOOD, "batch": "slow-1"})
    assert code == 200 and state["status"] == "RUNNING" and state["end_time"] is None
    assert call(url(server, "/jobs"), {**GOOD, "batch": "slow-1"})[1]["status"] == "RUNNING"
    assert server.busy()
    retrains.release.set()
    code, state = call(url(server, f"/jobs/{GOOD['id']}?wait=10"))
    assert (code, state["status"], state["message"]) == (200, "SUCCEEDED", "")
    assert state["end_time"] >= state["start_time"]
    # posted twice, run once; posted again after it ended: still once
    call(url(server, "/jobs"), GOOD)
    assert retrains == [("p/m", "slow-1")]
    assert not server.busy()
    assert call(url(server, "/jobs")) == (200, {"ids": [GOOD["id"]]})


def test_a_failed_retrain_is_a_failed_job_with_its_message(server: agent.Agent, retrains) -> None:
    call(url(server, "/jobs"), {**GOOD, "id": "lethe-f-0", "batch": "fail-1"})
    code, state = call(url(server, "/jobs/lethe-f-0?wait=10"))
    assert (code, state["status"]) == (200, "FAILED")
    assert state["message"] == "RuntimeError: shard 0 failed"


def test_unknown_ids_routes_and_bodies(server: agent.Agent, retrains) -> None:
    assert call(url(server, "/jobs/lethe-nope"))[0] == 404
    assert call(url(server, "/other"))[0] == 404
    code, out = call(url(server, "/jobs"), {**GOOD, "s3": {"LETHE_BUCKET": 3}})
    assert code == 400 and out["error"].startswith("s3:")
    code, out = call(url(server, "/jobs/x?wait=soon"))
    assert code == 400 and out["error"].startswith("wait:")
    assert retrains == []


class _Version(BaseHTTPRequestHandler):
    session = "session-a"

    def do_GET(self) -> None:  # noqa: N802
        if self.path != "/api/version":  # no Ray job by any id
            self.send_error(404)
            return
        data = json.dumps({"session_name": self.session}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def jobs_api() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Version)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_the_operator_uses_only_its_own_clusters_agent(
    server: agent.Agent, jobs_api: str, retrains, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = server.server.server_address[1]
    assert find_agent(jobs_api, port) is not None  # same session as the Jobs API
    raylaunch.forget_agent(jobs_api, port)
    monkeypatch.setattr(_Version, "session", "another-cluster")
    assert find_agent(jobs_api, port) is None  # an agent of another Ray cluster
    raylaunch.forget_agent(jobs_api, port)
    assert find_agent(jobs_api, 0) is None


def test_ensure_goes_to_the_agent_once(server: agent.Agent, jobs_api: str, retrains) -> None:
    jobs_ = RayJobs(jobs_api, S3, agent_port=server.server.server_address[1])
    args = ["retrain", "--model-prefix", "p/m", "--batch", "b-2"]
    first = jobs_.ensure("lethe-b-2-0", args)
    assert first.via == "agent" and first.status in ("RUNNING", "SUCCEEDED")
    assert jobs_.ensure("lethe-b-2-0", args).via == "agent"
    server.state("lethe-b-2-0", wait=10)
    assert jobs_.status("lethe-b-2-0").status == "SUCCEEDED"
    assert retrains == [("p/m", "b-2")]


def test_only_a_plain_retrain_can_run_on_the_agent() -> None:
    args = ["retrain", "--model-prefix", "p/m", "--batch", "b-1"]
    job = retrain_job("lethe-b-1-0", args, S3)
    assert job is not None and job.to_json() == {**GOOD, "id": "lethe-b-1-0", "batch": "b-1"}
    assert retrain_job("x", ["train", "--model-prefix", "p/m"], S3) is None
    # a model's own ray.env cannot reach a long-lived service: a Ray job runs it
    assert retrain_job("x", args, {**S3, "LETHE_FAULT": "1"}) is None


def test_two_writers_posting_one_id_at_once_start_one_run(server: agent.Agent, retrains) -> None:
    """Two operators (an old pod and its replacement, say) post the same job together."""
    body = {**GOOD, "batch": "slow-2"}
    threads = [threading.Thread(target=call, args=(url(server, "/jobs"), body)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    retrains.release.set()
    assert call(url(server, f"/jobs/{GOOD['id']}?wait=10"))[1]["status"] == "SUCCEEDED"
    assert retrains == [("p/m", "slow-2")]


def test_absurd_but_valid_input_is_bounded(server: agent.Agent, retrains) -> None:
    code, out = call(url(server, "/jobs"), {**GOOD, "modelPrefix": "p/" + "m" * 70_000})
    assert code == 400 and out["error"].startswith("body:")  # over 64 KiB: never read
    code, out = call(url(server, "/jobs"), {**GOOD, "modelPrefix": "p/" + "m" * 2000})
    assert code == 400 and out["error"].startswith("modelPrefix:")
    call(url(server, "/jobs"), GOOD)
    for wait in ("-5", "nan"):  # no wait at all, not an error and not a hang
        assert call(url(server, f"/jobs/{GOOD['id']}?wait={wait}"))[0] == 200
    assert retrains == [("p/m", "b-1")]


def test_the_operator_refuses_to_start_with_a_bad_agent_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lethe_operator.__main__ import main

    monkeypatch.setenv(agent.PORT_ENV, "eighty")
    with pytest.raises(SystemExit) as e:
        main(["--metrics-port", "0"])
    assert e.value.code == 2 and agent.PORT_ENV in capsys.readouterr().err
