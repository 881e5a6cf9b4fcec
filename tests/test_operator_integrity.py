"""Erased means erased, through the operator, off the happy path (issue 8), on the real
stack: kube-apiserver + etcd, SeaweedFS with versioning, a Ray head, and the operator
as its own process.

One operator and two small models serve the whole module, in a namespace of its own
(``allModels`` means every model of the namespace). Model B signs its certificates
with keys from a Secret (``spec.certificates.keysSecret``), model A with the
operator's own (``$LETHE_KEYS_DIR``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from lethe.certs import Keys
from lethe.erasure import resolve_shards
from lethe.faults import KILL_ENV
from lethe.faults import TRAIN_FAILURE_ENV as FAULT_ENV
from lethe.generations import read_live
from lethe.layout import ModelLayout
from lethe.store import Store
from lethe.verify import verify
from lethe_dev import kubestack
from lethe_dev.localstack import StackState, free_port
from lethe_operator.control import ADOPT_ANNOTATION, LAYOUT_OWNED
from lethe_operator.erasures import holder

from .conftest import kubectl
from .harness import (
    Operator,
    apply,
    digits_model,
    erasure_request,
    events_of,
    exists,
    get,
    metric,
    records_of,
    remove_model,
    s3_secret,
    train_subjects,
    versions_holding,
    wait_for,
    wait_ready,
)

NS = "integrity"
A, B = "integ-a", "integ-b"
B_KEYS = "integ-b-keys"
POLICY = {"batchWindowSeconds": 2, "maxBatchSize": 10, "ttlSecondsAfterFinished": 3600}
# accuracy does not matter here: as little training as a model can have
TRAINER = {"model": "mlp", "epochs": 2, "hidden": 32, "batchSize": 128, "learningRate": 0.003}


@pytest.fixture(scope="module")
def b_keys() -> Keys:
    return Keys.generate()


@pytest.fixture(scope="module")
def operator(
    kube: kubestack.KubeState,
    stack: StackState,
    store: Store,
    b_keys: Keys,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Operator]:
    kubectl(kube, "create", "namespace", NS)
    keys_secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": B_KEYS, "namespace": NS},
        "stringData": b_keys.secret_data(),
    }
    ray = {"address": stack.ray_dashboard, "maxRetries": 0}
    apply(
        kube,
        s3_secret(stack, namespace=NS),
        keys_secret,
        digits_model(A, stack, store, NS, ray=ray, policy=dict(POLICY), trainer=TRAINER),
        digits_model(
            B,
            stack,
            store,
            NS,
            ray=ray,
            policy=dict(POLICY),
            shards=2,
            slices=1,
            trainer=TRAINER,
            certificates={"keysSecret": {"name": B_KEYS}},
        ),
    )
    log = tmp_path_factory.mktemp("operator-integrity") / "operator.log"
    op = Operator(kube.kubeconfig, free_port(), log)
    op.start()
    try:
        wait_ready(kube, A, NS)
        wait_ready(kube, B, NS)
        yield op
    finally:
        # requests go through the finalizer while the operator still runs
        kubectl(kube, "-n", NS, "delete", "erasurerequests", "--all", "--wait=false")
        time.sleep(3)
        op.stop()
        for r in json.loads(kubectl(kube, "-n", NS, "get", "er", "-o", "json").stdout)["items"]:
            kubectl(
                kube,
                "-n",
                NS,
                "patch",
                "er",
                r["metadata"]["name"],
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
            )
        for model in (A, B):
            remove_model(kube, model, NS)
        print(op.tail())


def layout_of(kube: kubestack.KubeState, model: str) -> ModelLayout:
    spec = get(kube, "shardedmodel", model, NS)["spec"]
    return ModelLayout.of(f"{NS}.{model}", spec["storage"]["prefix"])


def request_status(kube: kubestack.KubeState, name: str) -> dict:
    return dict(get(kube, "erasurerequest", name, NS).get("status") or {})


def phase_of(kube: kubestack.KubeState, name: str) -> str:
    return str(request_status(kube, name).get("phase", ""))


def model_status(kube: kubestack.KubeState, model: str) -> dict:
    return dict(get(kube, "shardedmodel", model, NS).get("status") or {})


def idle(kube: kubestack.KubeState, model: str) -> bool:
    return "activeBatch" not in model_status(kube, model)


def patch_model(kube: kubestack.KubeState, model: str, spec: dict) -> None:
    r = kubectl(
        kube,
        "-n",
        NS,
        "patch",
        "shardedmodel",
        model,
        "--type=merge",
        "-p",
        json.dumps({"spec": spec}),
    )
    assert r.returncode == 0, r.stderr


def held_in_live(store: Store, layout: ModelLayout, subjects: list[str]) -> list[int]:
    """The shards whose live index still lists a record of these subjects."""
    return resolve_shards(store, read_live(store, layout).generation, [], records_of(subjects))


def certificate(store: Store, uri: str) -> dict:
    return store.get_json(uri.split("/", 3)[3])


def no_ids(obj: object, ids: list[str]) -> bool:
    text = json.dumps(obj)
    return not any(i in text for i in ids)


# -- (f) nothing held ---------------------------------------------------------------------
def test_unknown_subject_is_nothing_held(kube, operator: Operator, store: Store) -> None:
    nobody = ["nobody-at-all-7f3a"]
    apply(kube, erasure_request("nobody", nobody, A, NS))
    wait_for("Succeeded", lambda: phase_of(kube, "nobody") == "Succeeded", timeout=120)
    st = request_status(kube, "nobody")
    assert st["reason"] == "NothingHeld" and st["outcome"] == "NothingHeld"
    assert (st["subjectsUnmatched"], st["recordsUnmatched"], st["affectedRecords"]) == (1, 0, 0)
    (target,) = st["targets"]
    assert target["model"] == A and target["reason"] == "NothingHeld"
    succeeded = next(c for c in st["conditions"] if c["type"] == "Succeeded")
    assert succeeded["reason"] == "NothingHeld"
    assert "none of the 1 subject(s)" in succeeded["message"]
    assert "held by this model" in succeeded["message"]
    events = events_of(kube, "nobody", NS)
    assert any(e["reason"] == "NothingHeld" for e in events), events
    assert no_ids(st, nobody) and no_ids(events, nobody)
    cert = certificate(store, st["certificate"])
    assert cert["outcome"] == "NothingHeld"
    assert verify(store, cert).ok
    # the shard its id hashes to was quarantined on acceptance, and is back
    wait_for("the batch to close", lambda: idle(kube, A), timeout=30)
    assert read_live(store, layout_of(kube, A)).generation.quarantined_shards == []


def test_selector_matching_no_model_fails(kube, operator: Operator) -> None:
    selector = {"modelSelector": {"matchLabels": {"lethe.dev/team": "nobody"}}}
    apply(kube, erasure_request("unmatched", ["person-0001"], namespace=NS, targets=selector))
    wait_for("Failed", lambda: phase_of(kube, "unmatched") == "Failed", timeout=60)
    st = request_status(kube, "unmatched")
    assert st["reason"] == "NoModelMatched" and not st.get("targets")


# -- (c) deleted before its batch --------------------------------------------------------
def test_request_deleted_before_batching_releases_its_shards(
    kube, operator: Operator, store: Store
) -> None:
    patch_model(kube, A, {"erasurePolicy": {"batchWindowSeconds": 3600}})
    layout = layout_of(kube, A)
    subject = train_subjects(1, offset=150)
    try:
        apply(kube, erasure_request("changed-mind", subject, A, NS))
        wait_for("quarantine", lambda: phase_of(kube, "changed-mind") == "Quarantined", timeout=60)
        uid = get(kube, "erasurerequest", "changed-mind", NS)["metadata"]["uid"]
        live = read_live(store, layout).generation
        held = [k for k, hs in live.quarantine.items() if holder(uid) in hs]
        assert held and set(held) <= set(live.quarantined_shards)
        r = kubectl(kube, "-n", NS, "delete", "erasurerequest", "changed-mind", "--wait=false")
        assert r.returncode == 0, r.stderr
        wait_for(
            "the request to go", lambda: not exists(kube, "er", "changed-mind", NS), timeout=60
        )
        live = read_live(store, layout).generation
        assert not any(holder(uid) in hs for hs in live.quarantine.values())
        assert live.quarantined_shards == []
        assert held_in_live(store, layout, subject) != []  # cancelled: nothing erased
        assert idle(kube, A)
    finally:
        patch_model(kube, A, {"erasurePolicy": {"batchWindowSeconds": 2}})


# -- (e) every copy of a person ----------------------------------------------------------
def test_all_models_erases_every_copy(kube, operator: Operator, store: Store, b_keys) -> None:
    subject = train_subjects(1, offset=160)
    layouts = {m: layout_of(kube, m) for m in (A, B)}
    assert all(held_in_live(store, layouts[m], subject) for m in (A, B))
    apply(kube, erasure_request("everywhere", subject, namespace=NS, targets={"allModels": True}))
    wait_for(
        "Succeeded in both models",
        lambda: phase_of(kube, "everywhere") == "Succeeded",
        timeout=400,
        every=2,
        state=lambda: request_status(kube, "everywhere").get("targets"),
    )
    st = request_status(kube, "everywhere")
    targets = {t["model"]: t for t in st["targets"]}
    assert sorted(targets) == [A, B] and st["models"] == f"{A},{B}"
    assert {t["phase"] for t in targets.values()} == {"Succeeded"}
    assert {t["outcome"] for t in targets.values()} == {"Erased"}
    certs = {m: certificate(store, t["certificate"]) for m, t in targets.items()}
    assert certs[A]["model_prefix"] == layouts[A].prefix
    assert certs[B]["model_prefix"] == layouts[B].prefix
    assert targets[A]["batchId"] != targets[B]["batchId"]
    assert st["affectedRecords"] == sum(t["affectedRecords"] for t in targets.values()) > 0
    assert verify(store, certs[A]).ok  # the operator's keys
    assert verify(store, certs[B], b_keys).ok  # model B's own keys, from its Secret
    assert not verify(store, certs[B]).ok  # not signed with the operator's key
    for m in (A, B):
        assert held_in_live(store, layouts[m], subject) == []
        assert (
            versions_holding(store, layouts[m].root, set(subject) | set(records_of(subject))) == []
        )
    assert model_status(kube, B)["certificates"]["fingerprint"] == b_keys.fingerprint
    assert model_status(kube, A)["certificates"]["fingerprint"] == (
        Keys.load(os.environ["LETHE_KEYS_DIR"]).fingerprint
    )
    assert no_ids(st, subject)


# -- (d) a model recreated over an existing layout --------------------------------------
def test_replace_force_is_refused_until_adopted(kube, operator: Operator, store: Store) -> None:
    old = get(kube, "shardedmodel", B, NS)
    old_uid = old["metadata"]["uid"]
    fresh = {
        "apiVersion": old["apiVersion"],
        "kind": old["kind"],
        "metadata": {"name": B, "namespace": NS},
        "spec": old["spec"],
    }
    r = kubectl(kube, "replace", "--force", "-f", "-", stdin=json.dumps(fresh))
    assert r.returncode == 0, r.stderr
    new_uid = get(kube, "shardedmodel", B, NS)["metadata"]["uid"]
    assert new_uid != old_uid

    def ready() -> dict:
        return next(
            (c for c in model_status(kube, B).get("conditions", []) if c["type"] == "Ready"), {}
        )

    wait_for("the refusal", lambda: ready().get("reason") == LAYOUT_OWNED, timeout=60)
    cond = ready()
    assert cond["status"] == "False"
    assert old_uid in cond["message"] and ADOPT_ANNOTATION in cond["message"]
    layout = layout_of(kube, B)
    assert store.get_json(layout.owner)["uid"] == old_uid
    r = kubectl(kube, "-n", NS, "annotate", "shardedmodel", B, f"{ADOPT_ANNOTATION}={old_uid}")
    assert r.returncode == 0, r.stderr
    wait_for("Ready after adopting", lambda: ready().get("status") == "True", timeout=60)
    assert store.get_json(layout.owner)["uid"] == new_uid


def test_missing_keys_secret_is_a_condition(kube, operator: Operator, stack, store) -> None:
    """A model whose keys Secret is missing says so, and the others carry on."""
    name = "integ-nokeys"
    model = digits_model(name, stack, store, NS, certificates={"keysSecret": {"name": "absent"}})
    apply(kube, model)
    try:

        def reason() -> str:
            conds = model_status(kube, name).get("conditions", [])
            return next((c["reason"] for c in conds if c["type"] == "Ready"), "")

        wait_for("the condition", lambda: reason() == "KeysSecretNotFound", timeout=60)
        assert "certificates" not in model_status(kube, name)
        assert operator.proc is not None and operator.proc.poll() is None
    finally:
        kubectl(kube, "-n", NS, "delete", "shardedmodel", name, "--wait=true", "--timeout=30s")
        remove_model(kube, name, NS)


# -- (b) a member deleted after its batch is named, before its plan ---------------------
def test_member_deleted_mid_flight_keeps_the_batch(kube, operator: Operator, store: Store) -> None:
    wait_for("model A idle", lambda: idle(kube, A), timeout=60)
    layout = layout_of(kube, A)
    s1, s2 = train_subjects(2, offset=170)
    # the batch forms when both are waiting (and not before)
    patch_model(kube, A, {"erasurePolicy": {"batchWindowSeconds": 3600, "maxBatchSize": 2}})
    operator.stop()
    operator.start(**{KILL_ENV: "batched"})  # dies as soon as the batch is named
    apply(
        kube,
        erasure_request("mid-1", [s1], A, NS),
        erasure_request("mid-2", [s2], A, NS),
    )
    wait_for(
        "the operator to die at 'batched'",
        lambda: operator.proc is not None and operator.proc.poll() == -signal.SIGKILL,
        timeout=120,
        every=0.2,
    )
    patch_model(kube, A, {"erasurePolicy": {"batchWindowSeconds": 2, "maxBatchSize": 10}})
    active = model_status(kube, A)["activeBatch"]
    assert sorted(active["requests"]) == ["mid-1", "mid-2"]
    assert not store.exists(layout.plan(active["id"]))
    uids = {n: get(kube, "erasurerequest", n, NS)["metadata"]["uid"] for n in ("mid-1", "mid-2")}
    r = kubectl(kube, "-n", NS, "delete", "erasurerequest", "mid-1", "--wait=false")
    assert r.returncode == 0, r.stderr
    operator.start()
    wait_for("mid-1 to go", lambda: not exists(kube, "er", "mid-1", NS), timeout=120)
    assert store.exists(layout.plan(active["id"]))  # it went only once the plan existed
    wait_for("mid-2", lambda: phase_of(kube, "mid-2") == "Succeeded", timeout=400, every=2)
    st = request_status(kube, "mid-2")
    assert st["batchId"] == active["id"]  # the batch kept its id
    for name, uid in uids.items():
        cert = store.get_json(layout.certificate(uid))
        assert cert["batch_id"] == active["id"] and cert["records_erased"] > 0, name
        assert verify(store, cert).ok, name
    assert held_in_live(store, layout, [s1, s2]) == []
    ids = {s1, s2, *records_of([s1, s2])}
    assert versions_holding(store, layout.root, ids) == []


# -- (a) a failed retrain ----------------------------------------------------------------
def test_failed_retrain_is_purged_tracked_and_retried(
    kube, operator: Operator, store: Store
) -> None:
    wait_for("model A idle", lambda: idle(kube, A), timeout=60)
    layout = layout_of(kube, A)
    subject = train_subjects(1, offset=180)
    ids = set(subject) | set(records_of(subject))
    patch_model(
        kube,
        A,
        {
            "ray": {"env": {FAULT_ENV: "1"}},
            "erasurePolicy": {"retryFailedAfterSeconds": 3600, "ttlSecondsAfterFinished": 1},
        },
    )
    apply(kube, erasure_request("doomed", subject, A, NS))
    wait_for("Failed", lambda: phase_of(kube, "doomed") == "Failed", timeout=300, every=2)
    st = request_status(kube, "doomed")
    assert st["reason"] == "RetrainFailed"
    batch = st["batchId"]
    # the raw rows are gone already, from every version of every object
    assert versions_holding(store, layout.root, ids) == []
    assert held_in_live(store, layout, subject) == []
    assert [b["id"] for b in model_status(kube, A)["failedBatches"]] == [batch]
    # tracked: counted as pending, and the TTL (1 s) does not delete it
    text = operator.metrics()
    assert (metric(text, "lethe_pending_requests", model=A, namespace=NS) or 0) >= 1
    left = metric(text, "lethe_nearest_deadline_seconds", model=A, namespace=NS)
    assert left is not None and left < 30 * 86400 - 1
    time.sleep(8)  # the model's tick sweeps the TTL every 2 s
    assert phase_of(kube, "doomed") == "Failed"

    # the cause fixed, the operator's retry works from the plan in S3 and certifies it
    patch_model(kube, A, {"ray": {"env": None}, "erasurePolicy": {"retryFailedAfterSeconds": 1}})
    cert_key = layout.certificate(get(kube, "erasurerequest", "doomed", NS)["metadata"]["uid"])
    wait_for("the certificate", lambda: store.exists(cert_key), timeout=300, every=2)
    cert = store.get_json(cert_key)
    assert cert["batch_id"] == batch and cert["outcome"] == "Erased"
    assert verify(store, cert).ok
    # certified: now the TTL deletes it (through the finalizer); the certificate stays
    wait_for(
        "the TTL",
        lambda: not exists(kube, "er", "doomed", NS),
        timeout=60,
        state=lambda: get(kube, "erasurerequest", "doomed", NS),
    )
    assert store.exists(cert_key)
    wait_for("the batch to close", lambda: idle(kube, A), timeout=30)
    assert not model_status(kube, A).get("failedBatches")
    assert read_live(store, layout).generation.quarantined_shards == []
    assert versions_holding(store, layout.root, ids) == []
