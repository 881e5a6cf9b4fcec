"""The operator end to end on the real stack: kube-apiserver + etcd, SeaweedFS, a Ray
head, and the operator as its own process (killed with SIGKILL in one test)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from lethe import kubestack
from lethe.localstack import StackState, free_port
from lethe.store import Store
from lethe.verify import verify
from lethe_operator.raylaunch import RayJobs

from .conftest import kubectl
from .harness import (
    Operator,
    apply,
    digits_model,
    erasure_request,
    get,
    phase,
    remove_model,
    s3_secret,
    train_subjects,
    wait_for,
    wait_ready,
)

MODEL = "digits-op"


def request(name: str, subjects: list[str]) -> dict:
    return erasure_request(name, subjects, MODEL)


@pytest.fixture(scope="module")
def operator(
    kube: kubestack.KubeState, stack: StackState, store: Store, tmp_path_factory
) -> Iterator[Operator]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = Operator(kube.kubeconfig, free_port(), log)
    apply(kube, s3_secret(stack), digits_model(MODEL, stack, store))
    op.start()
    try:
        wait_ready(kube, MODEL)
        yield op
    finally:
        op.stop()
        remove_model(kube, MODEL)
        print(op.tail())


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
