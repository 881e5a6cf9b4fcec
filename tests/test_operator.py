"""The operator end to end on the real stack: kube-apiserver + etcd, SeaweedFS, a Ray
head, and the operator as its own process (killed with SIGKILL in every phase)."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator

import pytest

from lethe.core.manifest import Generation
from lethe.datasets import digits_table
from lethe.erasure import resolve_shards
from lethe.faults import KILL_ENV
from lethe.faults import TRAIN_FAILURE_ENV as FAULT_ENV
from lethe.generations import read_live
from lethe.layout import ModelLayout
from lethe.store import Store
from lethe.verify import verify
from lethe_dev import kubestack
from lethe_dev.localstack import StackState, free_port
from lethe_operator.raylaunch import RayJobs

from .conftest import kubectl
from .harness import (
    Operator,
    apply,
    assert_no_s3_keys_in_ray,
    condition,
    digits_model,
    erasure_request,
    get,
    phase,
    s3_secret,
    serving,
    train_subjects,
    wait_for,
)

MODEL = "digits-op"
# where the restart test kills the operator, in the order a request meets them
# in the order a batch passes them: its retrain job is submitted, then the data purged
# beside it
KILL_POINTS = ("accepted", "batched", "submitted", "erased", "retrained", "certified", "reported")


def request(name: str, subjects: list[str]) -> dict:
    return erasure_request(name, subjects, MODEL)


@pytest.fixture(scope="module")
def operator(
    kube: kubestack.KubeState, stack: StackState, store: Store, tmp_path_factory
) -> Iterator[Operator]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = Operator(kube.kubeconfig, free_port(), log)
    apply(kube, s3_secret(stack), digits_model(MODEL, stack, store))
    with serving(kube, op, MODEL):
        yield op


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
    # one kubectl apply: the batch window (4 s) then surely holds all three
    apply(kube, *[request(n, [s]) for n, s in zip(names, subjects, strict=True)])
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
    (batch,) = batches
    ray_jobs = RayJobs(stack.ray_dashboard, {})
    jobs = ray_jobs.submissions(f"lethe-{batch}")
    assert len(jobs) == 1
    # the cluster's retrain agent ran it (no Ray job driver per batch)
    assert ray_jobs.status(jobs[0]).via == "agent"
    uid = get(kube, "shardedmodel", MODEL)["metadata"]["uid"]
    train_job = f"lethe-train-{uid}-0"
    # No S3 key in any Ray job's, actor's or task's metadata (state API, Jobs REST API):
    # the train job got where the data is, its workers the keys from the head's env.
    meta = assert_no_s3_keys_in_ray(stack)
    (job,) = [j for j in meta["jobs"] if j.get("submission_id") == train_job]
    assert job["runtime_env"]["env_vars"]["LETHE_S3_ENDPOINT"] == stack.s3_endpoint
    (rest,) = [j for j in meta["rest_jobs"] if j.get("submission_id") == train_job]
    assert rest["runtime_env"]["env_vars"]["LETHE_BUCKET"] == store.bucket
    # the retrain's own actors (the warm retrain service, its lanes' Ray Train workers
    # and controllers) were read back too
    training = ("RetrainService", "TrainController", "RayTrainWorker")
    mine = [a for a in meta["actors"] if a.get("class_name") in training]
    assert {a["class_name"] for a in mine} >= {"RetrainService", "RayTrainWorker"}
    assert any("LETHE_S3_ENDPOINT" in (a["serialized_runtime_env"] or "") for a in mine)
    # the model was trained once; the batch's retrain is the only training since
    assert ray_jobs.submissions(f"lethe-train-{uid}") == [train_job]
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


def model_layout(kube: kubestack.KubeState) -> ModelLayout:
    spec = get(kube, "shardedmodel", MODEL)["spec"]
    return ModelLayout.of(f"default.{MODEL}", spec["storage"]["prefix"])


def live_number(store: Store, layout: ModelLayout) -> int:
    return read_live(store, layout).generation.number


def model_status(kube: kubestack.KubeState) -> dict:
    st = dict(get(kube, "shardedmodel", MODEL).get("status") or {})
    st.pop("conditions", None)
    return st


def batch_idle(kube: kubestack.KubeState) -> bool:
    return "activeBatch" not in model_status(kube)


def test_operator_killed_in_every_phase_finishes_exactly_once(
    kube, operator: Operator, stack: StackState, store: Store
) -> None:
    layout = model_layout(kube)
    twin, survivor = train_subjects(2, offset=40)
    # The twin: the same kind of request, never interrupted, counts the generations.
    before = live_number(store, layout)
    apply(kube, request("twin", [twin]))
    wait_for("the twin", lambda: phase(kube, "twin") == "Succeeded", timeout=300)
    wait_for("the batch to close", lambda: batch_idle(kube), timeout=30)
    twin_generations = live_number(store, layout) - before

    before = live_number(store, layout)
    operator.stop()
    for i, point in enumerate(KILL_POINTS):
        operator.start(**{KILL_ENV: point})
        if i == 0:
            apply(kube, request("survivor", [survivor]))
        wait_for(
            f"the operator to be killed at {point!r}",
            lambda: operator.proc is not None and operator.proc.poll() == -signal.SIGKILL,
            timeout=180,
            every=0.2,
        )
    operator.start()
    wait_for("success after restarts", lambda: phase(kube, "survivor") == "Succeeded", timeout=300)
    wait_for("the batch to close", lambda: batch_idle(kube), timeout=30)
    st = get(kube, "erasurerequest", "survivor")["status"]
    # one Ray submission, one patch of the index: the same generations as the twin
    assert RayJobs(stack.ray_dashboard, {}).submissions(f"lethe-{st['batchId']}") == [
        f"lethe-{st['batchId']}-0"
    ]
    assert live_number(store, layout) - before == twin_generations
    assert verify(store, store.get_json(st["certificate"].split("/", 3)[3])).ok
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds["Quarantined"] == conds["DataErased"] == conds["Succeeded"] == "True"


def shards_holding_records_of(store: Store, gen: Generation, subjects: list[str]) -> list[int]:
    """The shards whose index still lists a record of these subjects (read from S3)."""
    table, _ = digits_table()
    wanted = set(subjects)
    ids, owners = table.column("record_id").to_pylist(), table.column("subject_id").to_pylist()
    records = [r for r, s in zip(ids, owners, strict=True) if s in wanted]
    assert records
    return resolve_shards(store, gen, [], records)


def requests_by_name(kube: kubestack.KubeState) -> dict[str, dict]:
    r = kubectl(kube, "get", "erasurerequests", "-o", "json")
    assert r.returncode == 0, r.stderr
    return {o["metadata"]["name"]: o.get("status") or {} for o in json.loads(r.stdout)["items"]}


def test_fifty_requests_at_once_complete_in_a_few_batches(
    kube, operator: Operator, stack: StackState, store: Store
) -> None:
    patch_model(kube, {"erasurePolicy": {"maxBatchSize": 20, "batchWindowSeconds": 3}})
    subjects = train_subjects(50, offset=60)
    names = [f"bulk-{i:02d}" for i in range(50)]
    apply(kube, *[request(n, [s]) for n, s in zip(names, subjects, strict=True)])

    def done() -> dict[str, dict] | None:
        st = requests_by_name(kube)
        return st if all(st[n].get("phase") == "Succeeded" for n in names) else None

    def state() -> str:
        st = requests_by_name(kube)
        phases = Counter(st[n].get("phase", "") for n in names)
        batches = Counter(st[n].get("batchId", "") for n in names)
        return f"phases {dict(phases)}, batches {dict(batches)}, model {model_status(kube)}"

    statuses = wait_for("50 requests to succeed", done, timeout=900, every=2, state=state)
    batches = {statuses[n]["batchId"] for n in names}
    assert 3 <= len(batches) <= 5  # at most 20 to a batch: a few batches, not 50
    jobs = RayJobs(stack.ray_dashboard, {})
    submitted = {b: sorted(jobs.submissions(f"lethe-{b}")) for b in batches}
    assert submitted == {b: [f"lethe-{b}-0"] for b in batches}, submitted
    for n in names:
        assert statuses[n]["timeToForgetSeconds"] < 30
        assert verify(store, store.get_json(statuses[n]["certificate"].split("/", 3)[3])).ok
    live = read_live(store, model_layout(kube)).generation
    assert shards_holding_records_of(store, live, subjects) == []  # none of theirs is left
    assert live.quarantined_shards == []


def patch_model(kube: kubestack.KubeState, spec: dict) -> None:
    r = kubectl(
        kube, "patch", "shardedmodel", MODEL, "--type=merge", "-p", json.dumps({"spec": spec})
    )
    assert r.returncode == 0, r.stderr


def test_failing_ray_job_fails_the_request_then_a_later_retry_succeeds(
    kube, operator: Operator, stack: StackState, store: Store
) -> None:
    """Every Ray job of the batch fails (injected in the job's own environment): after
    ray.maxRetries the request is Failed with Ray's message, its records are already
    gone and its shards stay quarantined; once the cause is fixed the operator's own
    retry of the failed batch succeeds and certifies it."""
    patch_model(
        kube,
        {
            "ray": {"env": {FAULT_ENV: "1"}},
            "erasurePolicy": {"retryFailedAfterSeconds": 3600, "maxBatchSize": 10},
        },
    )
    subject = train_subjects(1, offset=130)[0]
    apply(kube, request("doomed", [subject]))
    wait_for("Failed", lambda: phase(kube, "doomed") == "Failed", timeout=400, every=2)
    st = get(kube, "erasurerequest", "doomed")["status"]
    assert st["reason"] == "RetrainFailed"
    assert "injected training failure" in st["message"]
    batch = st["batchId"]
    jobs = RayJobs(stack.ray_dashboard, {})
    assert sorted(jobs.submissions(f"lethe-{batch}")) == [f"lethe-{batch}-0", f"lethe-{batch}-1"]
    assert all(jobs.status(j).status == "FAILED" for j in jobs.submissions(f"lethe-{batch}"))
    live = read_live(store, model_layout(kube)).generation
    assert shards_holding_records_of(store, live, [subject]) == []  # erased already
    assert st["affectedShards"] and set(st["affectedShards"]) <= set(live.quarantined_shards)
    model = get(kube, "shardedmodel", MODEL)["status"]
    assert model["quarantinedShards"] == live.quarantined_shards
    assert [b["id"] for b in model["failedBatches"]] == [batch]
    assert condition(get(kube, "shardedmodel", MODEL), "Degraded") == "True"
    assert 'result="failed"' in operator.metrics()

    # Fix the cause; the failed batch is retried by the operator itself.
    patch_model(kube, {"ray": {"env": None}, "erasurePolicy": {"retryFailedAfterSeconds": 1}})
    wait_for("the retry", lambda: phase(kube, "doomed") == "Succeeded", timeout=300, every=2)
    st = get(kube, "erasurerequest", "doomed")["status"]
    assert sorted(jobs.submissions(f"lethe-{batch}"))[-1] == f"lethe-{batch}-2"
    assert verify(store, store.get_json(st["certificate"].split("/", 3)[3])).ok
    assert read_live(store, model_layout(kube)).generation.quarantined_shards == []
    wait_for("the batch to close", lambda: batch_idle(kube), timeout=30)
    assert not get(kube, "shardedmodel", MODEL)["status"].get("failedBatches")
