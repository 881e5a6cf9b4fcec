"""The operator end to end on the real stack: kube-apiserver + etcd, SeaweedFS, a Ray
head, and the operator as its own process (killed with SIGKILL in one test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lethe import kubestack
from lethe.core.hashing import is_test_subject
from lethe.datasets import TEST_FRACTION, digits_table
from lethe.localstack import StackState, free_port
from lethe.store import Store
from lethe.verify import verify
from lethe_operator.raylaunch import RayJobs

from .conftest import kubectl

MODEL = "digits-op"


class Operator:
    def __init__(self, kube: kubestack.KubeState, port: int, log: Path) -> None:
        self.kube, self.port, self.log = kube, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": self.kube.kubeconfig, "LETHE_RAY_PYTHON": sys.executable}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lethe_operator", "--metrics-port", str(self.port)],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            env=env,
        )  # noqa: SIM115

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()


def get(kube, kind: str, name: str) -> dict[str, Any]:
    r = kubectl(kube, "get", kind, name, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(what: str, check, timeout: float = 240, every: float = 1.0) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def phase(kube, name: str) -> str:
    return (get(kube, "erasurerequest", name).get("status") or {}).get("phase", "")


def apply(kube, obj: dict[str, Any]) -> None:
    r = kubectl(kube, "apply", "-f", "-", stdin=json.dumps(obj))
    assert r.returncode == 0, r.stderr


def request(name: str, subjects: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "lethe.dev/v1alpha1",
        "kind": "ErasureRequest",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"modelRef": {"name": MODEL}, "subjects": subjects, "reason": "test"},
    }


@pytest.fixture(scope="module")
def operator(kube, stack: StackState, store: Store, tmp_path_factory):
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = Operator(kube, free_port(), log)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "lethe-s3"},
        "stringData": {
            "AWS_ACCESS_KEY_ID": stack.env()["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": stack.env()["AWS_SECRET_ACCESS_KEY"],
        },
    }
    apply(kube, secret)
    apply(
        kube,
        {
            "apiVersion": "lethe.dev/v1alpha1",
            "kind": "ShardedModel",
            "metadata": {"name": MODEL, "namespace": "default"},
            "spec": {
                "storage": {
                    "bucket": store.bucket,
                    "prefix": f"op-{os.getpid()}",
                    "endpoint": stack.s3_endpoint,
                    "credentialsSecret": {"name": "lethe-s3"},
                },
                "dataset": {"uri": "builtin:digits"},
                "shards": 3,
                "slices": 2,
                "trainer": {
                    "model": "mlp",
                    "epochs": 6,
                    "hidden": 64,
                    "batchSize": 64,
                    "learningRate": 0.003,
                },
                "ray": {"address": stack.ray_dashboard, "maxRetries": 1},
                "erasurePolicy": {
                    "batchWindowSeconds": 4,
                    "maxBatchSize": 10,
                    "ttlSecondsAfterFinished": 3600,
                },
            },
        },
    )
    op.start()
    try:
        wait_for(
            "the model to be Ready",
            lambda: any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (get(kube, "shardedmodel", MODEL).get("status") or {}).get(
                    "conditions", []
                )
            ),
            timeout=300,
        )
        yield op
    finally:
        op.stop()
        print(log.read_text()[-5000:])


def train_subjects(n: int, offset: int = 0) -> list[str]:
    table, _ = digits_table()
    subs = sorted(
        {s for s in table.column("subject_id").to_pylist() if not is_test_subject(s, TEST_FRACTION)}
    )
    return subs[offset : offset + n]


def test_unknown_model_fails_with_reason(kube, operator) -> None:
    obj = request("for-nobody", ["person-0001"])
    obj["spec"]["modelRef"]["name"] = "no-such-model"
    apply(kube, obj)
    wait_for("Failed", lambda: phase(kube, "for-nobody") == "Failed", timeout=60)
    st = get(kube, "erasurerequest", "for-nobody")["status"]
    assert st["reason"] == "ModelNotFound"


def test_requests_are_batched_erased_and_certified(
    kube, operator, store: Store, stack: StackState
) -> None:
    subjects = train_subjects(3, offset=10)
    names = [f"erase-{i}" for i in range(3)]
    for name, subject in zip(names, subjects, strict=True):
        apply(kube, request(name, [subject]))
    wait_for(
        "quarantine",
        lambda: all(
            phase(kube, n) in ("Quarantined", "DataErased", "Retraining", "Succeeded")
            for n in names
        ),
        timeout=30,
    )
    wait_for("success", lambda: all(phase(kube, n) == "Succeeded" for n in names), timeout=300)
    statuses = [get(kube, "erasurerequest", n)["status"] for n in names]
    batches = {s["batchId"] for s in statuses}
    assert len(batches) == 1  # applied together: one batch, one retrain
    for st in statuses:
        assert st["timeToForgetSeconds"] < 10
        assert st["latencySeconds"] >= st["timeToForgetSeconds"]
        assert st["cost"]["cpuSeconds"] > 0
        cert_key = st["certificate"].split("/", 3)[3]
        cert = store.get_json(cert_key)
        assert verify(store, cert).ok
        assert not any(s in json.dumps(st) for s in subjects)  # no subject id in status
    jobs = RayJobs(stack.ray_dashboard, {}).submissions(f"lethe-{batches.pop()}")
    assert len(jobs) == 1
    model = get(kube, "shardedmodel", MODEL)["status"]
    assert model["quarantinedShards"] == [] and "activeBatch" not in model
    text = operator.metrics()
    assert (
        f'lethe_erasure_requests_total{{model="{MODEL}",namespace="default",'
        f'result="succeeded"}} 3.0' in text
    )
    usd = sum(s["cost"]["usd"] for s in statuses)
    line = next(
        x for x in text.splitlines() if x.startswith("lethe_retrain_cost_usd_total{") and MODEL in x
    )
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(usd, rel=1e-6)
    listed = kubectl(kube, "get", "erasurerequests")
    assert "Succeeded" in listed.stdout and "erase-0" in listed.stdout


def test_operator_killed_mid_batch_finishes_exactly_once(
    kube, operator, stack, store: Store
) -> None:
    subject = train_subjects(1, offset=40)[0]
    apply(kube, request("survivor", [subject]))
    wait_for(
        "retraining",
        lambda: phase(kube, "survivor") in ("Retraining", "Succeeded"),
        timeout=120,
        every=0.2,
    )
    operator.kill()
    operator.start()
    wait_for("success after restart", lambda: phase(kube, "survivor") == "Succeeded", timeout=300)
    st = get(kube, "erasurerequest", "survivor")["status"]
    assert RayJobs(stack.ray_dashboard, {}).submissions(f"lethe-{st['batchId']}") == [
        f"lethe-{st['batchId']}-0"
    ]  # submitted once, not again after the restart
    assert verify(store, store.get_json(st["certificate"].split("/", 3)[3])).ok
