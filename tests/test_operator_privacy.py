"""The operator keeps ids out of Kubernetes and stays quiet, on the real stack
(kube-apiserver + etcd, SeaweedFS, a Ray head, the operator as its own process):

- kopf's diff base and progress annotations hold no subject or record id;
- no INFO Event per timer tick, but one Event per phase transition;
- a ``secretRef`` request whose Secret is deleted or changed after it was accepted fails
  with its reason, while the model and the other requests carry on;
- counters count a batch once however often its tick repeats;
- the operator stages nothing on disk, and removes what a dead operator left;
- the session-end scan (``conftest.find_ids``) catches an id planted anywhere it looks.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lethe.store import Store
from lethe_dev import kubestack
from lethe_dev.localstack import StackState, free_port
from lethe_operator.__main__ import STAGING_NAME

from .conftest import ID_WATCH, LAST_APPLIED, find_ids, kubectl, remember_ids
from .harness import (
    Operator,
    apply,
    condition,
    digits_model,
    erasure_request,
    events_of,
    exists,
    get,
    metric,
    phase,
    s3_secret,
    serving,
    train_subjects,
    wait_for,
)

MODEL = "digits-privacy"
WINDOW = 15  # seconds: the Secrets are changed between acceptance and the batch


@pytest.fixture(scope="module")
def staging(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator's temporary directory base, with what a killed operator left."""
    base = tmp_path_factory.mktemp("op-privacy-tmp")
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = base / STAGING_NAME / str(dead.pid)
    left.mkdir(parents=True)
    (left / "digits-raw-copy.parquet").write_bytes(b"PAR1 rows of a raw dataset PAR1")
    (base / STAGING_NAME / "stray-file").write_bytes(b"left behind")
    return base


@pytest.fixture(scope="module")
def operator(
    kube: kubestack.KubeState,
    stack: StackState,
    store: Store,
    staging: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Operator]:
    log = tmp_path_factory.mktemp("operator-privacy") / "operator.log"
    op = Operator(
        kube.kubeconfig,
        free_port(),
        log,
        env={"LETHE_STAGING_DIR": str(staging), "TMPDIR": str(staging)},
    )
    policy = {"batchWindowSeconds": WINDOW, "maxBatchSize": 10, "ttlSecondsAfterFinished": 3600}
    apply(kube, s3_secret(stack), digits_model(MODEL, stack, store, policy=policy))
    with serving(kube, op, MODEL):
        yield op


def id_secret(name: str, subjects: list[str]) -> dict[str, Any]:
    remember_ids(*subjects)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "stringData": {"subjects": "".join(f"{s}\n" for s in subjects)},
    }


def secret_request(name: str, secret: str) -> dict[str, Any]:
    obj = erasure_request(name, [], MODEL)
    del obj["spec"]["subjects"]
    obj["spec"]["secretRef"] = {"name": secret}
    return obj


def status_of(kube: kubestack.KubeState, name: str) -> dict[str, Any]:
    return dict(get(kube, "erasurerequest", name).get("status") or {})


def deadline_gauge(op: Operator) -> float | None:
    return metric(op.metrics(), "lethe_nearest_deadline_seconds", model=MODEL, namespace="default")


def test_staging_is_cleaned_on_start_and_stays_empty(operator: Operator, staging: Path) -> None:
    """What a dead operator left under the staging directory is gone once a new one
    starts, and ingesting and training the model staged nothing on disk."""
    assert operator.proc is not None
    root = staging / STAGING_NAME
    assert sorted(p.name for p in root.iterdir()) == [str(operator.proc.pid)]
    assert list((root / str(operator.proc.pid)).iterdir()) == []
    assert [p.name for p in staging.iterdir()] == [STAGING_NAME]


def test_no_info_event_per_tick_but_model_transitions_are_posted(
    kube: kubestack.KubeState, operator: Operator
) -> None:
    time.sleep(6)  # a few more ticks (every 2 s)
    events = events_of(kube, MODEL)
    logging = [e for e in events if e.get("reason") == "Logging" and e.get("type") == "Normal"]
    assert logging == [], [e["message"] for e in logging]
    assert not any("succeeded" in str(e.get("message")) for e in events)
    ready = [e for e in events if e.get("reason") == "Serving"]
    assert ready and all(e["type"] == "Normal" for e in ready)
    assert "Ready=True" in ready[0]["message"]
    assert sum(int(e.get("count") or 1) for e in ready) == 1  # once, not every tick


def test_ids_stay_out_of_annotations_and_a_changed_secret_fails_only_its_request(
    kube: kubestack.KubeState, operator: Operator, store: Store
) -> None:
    real = train_subjects(5)
    # 500 subjects (the CRD's limit), most of them long ids no model holds
    many = [*real[:2], *(f"ghost-{i:03d}-" + "x" * 240 for i in range(498))]
    apply(
        kube,
        id_secret("privacy-list-gone", [real[2]]),
        id_secret("privacy-list-edited", [real[3]]),
        erasure_request("privacy-many", many, MODEL),
        secret_request("privacy-secret-gone", "privacy-list-gone"),
        secret_request("privacy-secret-edited", "privacy-list-edited"),
    )
    names = ("privacy-many", "privacy-secret-gone", "privacy-secret-edited")
    wait_for("acceptance", lambda: all(phase(kube, n) == "Quarantined" for n in names), timeout=30)
    # the lists are frozen now: one Secret goes, the other names someone else
    assert kubectl(kube, "delete", "secret", "privacy-list-gone").returncode == 0
    apply(kube, id_secret("privacy-list-edited", [real[4]]))
    for n in names:  # none of them is batched yet
        assert phase(kube, n) == "Quarantined", status_of(kube, n)

    # the deadline gauge keeps moving while the requests wait
    first = deadline_gauge(operator)
    time.sleep(3)
    second = deadline_gauge(operator)
    assert first is not None and second is not None and second < first

    wait_for(
        "the Secrets' requests to fail",
        lambda: (
            phase(kube, "privacy-secret-gone") == phase(kube, "privacy-secret-edited") == "Failed"
        ),
        timeout=120,
        state=lambda: [status_of(kube, n).get("phase") for n in names],
    )
    gone, edited = status_of(kube, "privacy-secret-gone"), status_of(kube, "privacy-secret-edited")
    assert gone["reason"] == "SecretNotFound", gone
    assert edited["reason"] == "SecretChanged", edited
    assert not gone.get("batchId") and not edited.get("batchId")  # never joined a batch
    wait_for(
        "the other request to succeed",
        lambda: phase(kube, "privacy-many") == "Succeeded",
        timeout=400,
        every=2,
        state=lambda: status_of(kube, "privacy-many"),
    )
    st = status_of(kube, "privacy-many")
    assert st["affectedRecords"] > 0 and st["subjectsUnmatched"] == 498

    # kopf's annotations: a digest of the ids, never an id, and small
    obj = get(kube, "erasurerequest", "privacy-many")
    annotations = dict(obj["metadata"].get("annotations") or {})
    annotations.pop(LAST_APPLIED, None)  # kubectl's own copy of the spec
    diffbase = json.loads(annotations["lethe.dev/last-handled-configuration"])
    assert diffbase["spec"]["subjects"].startswith("sha256:")
    text = json.dumps(annotations) + json.dumps(obj["metadata"].get("labels") or {})
    assert len(text) < 4000
    for request in names:
        o = get(kube, "erasurerequest", request)
        dump = json.dumps(
            {k: v for k, v in o["metadata"].items() if k not in ("managedFields",)}
            | {"status": o.get("status")}
        )
        dump = dump.replace(json.dumps(o["metadata"].get("annotations", {}).get(LAST_APPLIED)), "")
        assert not any(s in dump for s in [*real, *many[2:5]]), request

    # one Event per phase transition, Warnings with the failures' reasons
    reasons = [e["reason"] for e in events_of(kube, "privacy-many")]
    for transition in ("Quarantined", "DataErased", "Succeeded"):
        assert reasons.count(transition) == 1, reasons
    # a retrain that ends during the data purge beside it goes straight to Succeeded
    assert reasons.count("Retraining") <= 1, reasons
    assert "Logging" not in reasons
    for request, reason in (
        ("privacy-secret-gone", "SecretNotFound"),
        ("privacy-secret-edited", "SecretChanged"),
    ):
        evs = [e for e in events_of(kube, request) if e["reason"] == reason]
        assert evs and evs[0]["type"] == "Warning", events_of(kube, request)

    # the model carried on: Ready, its shards released, its counters counted once
    model = get(kube, "shardedmodel", MODEL)
    assert condition(model, "Ready") == "True"
    wait_for(
        "the shards released",
        lambda: get(kube, "shardedmodel", MODEL)["status"].get("quarantinedShards") == [],
        timeout=30,
    )
    text = operator.metrics()
    usd = metric(text, "lethe_retrain_cost_usd_total", model=MODEL, namespace="default")
    assert usd == pytest.approx(st["cost"]["usd"], rel=1e-6)
    failed = metric(
        text, "lethe_erasure_requests_total", model=MODEL, namespace="default", result="failed"
    )
    assert failed == 2.0


def test_the_scan_finds_a_planted_id_and_collects_deleted_requests(
    kube: kubestack.KubeState, operator: Operator, tmp_path: Path
) -> None:
    """The session-end scan: an id planted in an Event, a model's annotation or an
    operator log is found; in a request's spec it is not (it belongs there); a request
    deleted at once still has its ids collected by the watch."""
    planted = f"planted-{os.getpid()}-subject"
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"planted-{os.getpid()}", "namespace": "default"},
        "involvedObject": {"kind": "ShardedModel", "name": MODEL, "namespace": "default"},
        "reason": "Planted",
        "message": f"erased {planted} today",
        "type": "Normal",
    }
    log = tmp_path / "operator.log"
    log.write_text(f"ok\n2026-01-01 INFO lethe [default/x] erasing {planted}\n")
    annotation = "test.lethe.dev/marker"
    api = ID_WATCH[0].api
    try:
        apply(kube, event)
        r = kubectl(kube, "annotate", "shardedmodel", MODEL, f"{annotation}={planted}")
        assert r.returncode == 0, r.stderr
        found = find_ids(api, {planted}, [log])
        assert any(f.startswith("Event default/planted-") for f in found), found
        assert any(f.startswith(f"shardedmodels default/{MODEL}") for f in found), found
        assert any(f.startswith(f"{log}:2") for f in found), found
        # an id that is only part of a longer token is not a hit
        assert find_ids(api, {planted[:-3]}, [log]) == []
    finally:
        kubectl(kube, "delete", "event", event["metadata"]["name"])
        kubectl(kube, "annotate", "shardedmodel", MODEL, f"{annotation}-")
        log.unlink()
    assert find_ids(api, {planted}, []) == []

    # a request's own spec is where its ids belong; a request deleted at once is seen
    vanishing = f"vanishing-{os.getpid()}-subject"
    apply(kube, erasure_request("privacy-vanishing", [vanishing], "no-such-model"))
    kubectl(kube, "delete", "erasurerequest", "privacy-vanishing", "--wait=false")
    assert find_ids(api, {vanishing}, []) == []
    wait_for("the request to go", lambda: not exists(kube, "erasurerequest", "privacy-vanishing"))
    time.sleep(1)
    with ID_WATCH[0].lock:
        assert vanishing in ID_WATCH[0].ids  # seen by the watch, not by a list now
