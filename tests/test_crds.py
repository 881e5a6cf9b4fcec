"""The CRDs on a real kube-apiserver (with etcd): examples apply, malformed manifests
are rejected by the API server itself with a message naming the field."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lethe import kubestack

from .conftest import kubectl

EXAMPLES = Path(__file__).parent.parent / "examples"


def apply(kube: kubestack.KubeState, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return kubectl(kube, "apply", "-f", "-", stdin=json.dumps(obj))


MODEL: dict[str, Any] = yaml.safe_load((EXAMPLES / "shardedmodel-digits.yaml").read_text())
REQUEST: dict[str, Any] = yaml.safe_load((EXAMPLES / "erasurerequest-subjects.yaml").read_text())


def test_every_example_applies(kube: kubestack.KubeState) -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        r = kubectl(kube, "apply", "-f", str(path))
        assert r.returncode == 0, f"{path.name}: {r.stderr}"
    got = kubectl(kube, "get", "shardedmodel", "digits", "-o", "json")
    spec = json.loads(got.stdout)["spec"]
    # defaults are filled in by the API server
    assert spec["erasurePolicy"]["deadlineSeconds"] == 2592000
    assert spec["dataset"]["columns"]["recordId"] == "record_id"
    assert spec["ray"]["maxRetries"] == 3
    cols = kubectl(kube, "get", "erasurerequests")
    assert cols.returncode == 0
    header = cols.stdout.splitlines()[0].split()
    for column in (
        "MODELS",
        "PHASE",
        "RECORDS",
        "SHARDS",
        "FORGET(S)",
        "LATENCY(S)",
        "COST(USD)",
        "AGE",
    ):
        assert column in header
    assert kubectl(kube, "get", "er").returncode == 0  # short name


def _with(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with each dotted path set (or deleted), under its own name."""
    obj = copy.deepcopy(base)
    first = next(iter(changes))
    obj["metadata"]["name"] = "bad-" + first.replace(".", "-").replace("_", "-").lower()[:40]
    for path, value in changes.items():
        keys = path.split(".")
        cur = obj
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        if value is DELETE:
            del cur[keys[-1]]
        else:
            cur[keys[-1]] = value
    return obj


class _Delete:
    def __str__(self) -> str:
        return "DELETE"


DELETE = _Delete()  # a field removed instead of set
NO_REF = "spec.modelRef"  # with a selector or allModels instead of modelRef
ONE_TARGET = "exactly one of modelRef, modelSelector and allModels: true"

MALFORMED = [
    # (base, {field path: bad value, ...}, text the API server's message must contain)
    (MODEL, {"spec.shards": 0}, "spec.shards"),
    (MODEL, {"spec.shards": "eight"}, "spec.shards"),
    (MODEL, {"spec.slices": -1}, "spec.slices"),
    (MODEL, {"spec.storage": DELETE}, "spec.storage"),
    (MODEL, {"spec.storage.bucket": "Not_A_Bucket"}, "spec.storage.bucket"),
    (MODEL, {"spec.storage.endpoint": "ftp://x"}, "spec.storage.endpoint"),
    (MODEL, {"spec.storage.backend": "nfs"}, "spec.storage.backend"),
    (MODEL, {"spec.storage.adminEndpoint": "master:9333"}, "spec.storage.adminEndpoint"),
    (MODEL, {"spec.dataset.uri": "/local/file.csv"}, "spec.dataset.uri"),
    (MODEL, {"spec.dataset.format": "xlsx"}, "spec.dataset.format"),
    (MODEL, {"spec.dataset.sourcePolicy": "shred"}, "spec.dataset.sourcePolicy"),
    (MODEL, {"spec.dataset.sourcePolicy": "patch"}, "sourcePolicy must be external"),
    (MODEL, {"spec.dataset.testFraction": 1.5}, "spec.dataset.testFraction"),
    (MODEL, {"spec.trainer.model": "resnet; rm -rf /"}, "spec.trainer.model"),
    (MODEL, {"spec.trainer.epochs": 0}, "spec.trainer.epochs"),
    (MODEL, {"spec.trainer.batchSize": 0}, "spec.trainer.batchSize"),
    (MODEL, {"spec.trainer.gpusPerWorker": -1}, "spec.trainer.gpusPerWorker"),
    (MODEL, {"spec.trainer.inputShape": []}, "spec.trainer"),
    (MODEL, {"spec.ray": {}}, "spec.ray"),
    (
        MODEL,
        {"spec.ray": {"address": "http://r:8265", "rayJob": {"clusterSelector": {"a": "b"}}}},
        "spec.ray",
    ),
    (MODEL, {"spec.ray.address": "ray://head:10001"}, "spec.ray.address"),
    (MODEL, {"spec.prices.gpuHourUSD": -2}, "spec.prices.gpuHourUSD"),
    (MODEL, {"spec.erasurePolicy.deadlineSeconds": 5}, "spec.erasurePolicy.deadlineSeconds"),
    (MODEL, {"spec.erasurePolicy.maxBatchSize": 0}, "spec.erasurePolicy.maxBatchSize"),
    (MODEL, {"spec.certificates.keysSecret": {}}, "spec.certificates.keysSecret.name"),
    (REQUEST, {NO_REF: DELETE}, ONE_TARGET),
    (REQUEST, {"spec.modelRef.name": "Bad_Name"}, "spec.modelRef.name"),
    (REQUEST, {"spec.modelSelector": {"matchLabels": {"team": "a"}}}, ONE_TARGET),
    (REQUEST, {"spec.allModels": True}, ONE_TARGET),
    (REQUEST, {NO_REF: DELETE, "spec.allModels": False}, ONE_TARGET),
    (REQUEST, {NO_REF: DELETE, "spec.modelSelector": {}}, "an empty selector"),
    (
        REQUEST,
        {
            NO_REF: DELETE,
            "spec.modelSelector": {"matchExpressions": [{"key": "t", "operator": "In"}]},
        },
        "In and NotIn need values",
    ),
    (
        REQUEST,
        {
            NO_REF: DELETE,
            "spec.modelSelector": {
                "matchExpressions": [{"key": "t", "operator": "Near", "values": ["a"]}]
            },
        },
        "spec.modelSelector.matchExpressions[0].operator",
    ),
    (REQUEST, {NO_REF: DELETE, "spec.modelSelector": {"matchLabels": []}}, "spec.modelSelector"),
    (REQUEST, {"spec.subjects": []}, "spec.subjects"),
    (REQUEST, {"spec.subjects": ["has space"]}, "spec.subjects[0]"),
    (REQUEST, {"spec.subjects": ["a", "a"]}, "spec.subjects[1]"),
    (REQUEST, {"spec.subjects": DELETE}, "exactly one of subjects, recordIds and secretRef"),
    (REQUEST, {"spec.recordIds": ["r1"]}, "exactly one of subjects, recordIds and secretRef"),
    (REQUEST, {"spec.secretRef": {"key": "x"}}, "spec.secretRef.name"),
    (REQUEST, {"spec.reason": "x" * 2000}, "spec.reason"),
]


@pytest.mark.parametrize(
    ("base", "changes", "needle"),
    MALFORMED,
    ids=["+".join(f"{p}={str(v)[:20]}" for p, v in m[1].items()) for m in MALFORMED],
)
def test_malformed_manifest_is_rejected_naming_the_field(kube, base, changes, needle) -> None:
    obj = _with(base, changes)
    r = apply(kube, obj)
    assert r.returncode != 0, f"accepted: {json.dumps(obj)}"
    assert needle in r.stderr, r.stderr
    assert kubectl(kube, "get", obj["kind"].lower(), obj["metadata"]["name"]).returncode != 0


def test_specs_are_immutable(kube: kubestack.KubeState) -> None:
    req = copy.deepcopy(REQUEST)
    req["metadata"]["name"] = "immutable-request"
    assert apply(kube, req).returncode == 0
    req["spec"]["subjects"] = ["someone-else"]
    r = apply(kube, req)
    assert r.returncode != 0 and "spec is immutable" in r.stderr
    model = copy.deepcopy(MODEL)
    model["metadata"]["name"] = "immutable-model"
    assert apply(kube, model).returncode == 0
    model["spec"]["shards"] = 7
    r = apply(kube, model)
    assert r.returncode != 0 and "shards and slices cannot change" in r.stderr
    model["spec"]["shards"] = MODEL["spec"]["shards"]
    model["spec"]["trainer"]["epochs"] = 5  # other fields may change
    assert apply(kube, model).returncode == 0


PLACEMENT = [
    # (field path, new value; DELETE unsets it), the field the refusal must name
    ("spec.storage.bucket", "another-bucket", "storage.bucket"),
    ("spec.storage.prefix", "elsewhere", "storage.prefix"),
    ("spec.storage.endpoint", "https://s3.example.com", "storage.endpoint"),
    ("spec.storage.endpoint", DELETE, "storage.endpoint"),
    ("spec.dataset.uri", "s3://lethe/other.parquet", "dataset.uri"),
]


def test_placement_is_immutable(kube: kubestack.KubeState) -> None:
    """Where a model's data lives, and where it came from, cannot change: an update of
    any of them is refused, naming the field and saying to create a new model."""
    model = copy.deepcopy(MODEL)
    model["metadata"]["name"] = "placed-model"
    assert apply(kube, model).returncode == 0
    for path, value, field in PLACEMENT:
        changed = _with(model, {path: value})
        changed["metadata"]["name"] = "placed-model"
        r = apply(kube, changed)
        assert r.returncode != 0, f"{path} changed to {value}"
        assert f"{field} cannot change after creation" in r.stderr, r.stderr
        assert "create a new ShardedModel" in r.stderr, r.stderr
        assert f"spec.{field}" in r.stderr, r.stderr  # the error's path is the field
    # the other fields still change
    model["spec"]["dataset"]["testFraction"] = 0.25
    model["spec"]["storage"]["backend"] = "seaweedfs"
    assert apply(kube, model).returncode == 0


def test_request_targets_apply_and_print(kube: kubestack.KubeState) -> None:
    """modelSelector and allModels requests are valid; the MODELS column shows targets."""
    for name, target in (
        (
            "to-selected",
            {"modelSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}},
        ),
        ("to-every-model", {"allModels": True}),
    ):
        req = copy.deepcopy(REQUEST)
        req["metadata"]["name"] = name
        del req["spec"]["modelRef"]
        req["spec"].update(target)
        r = apply(kube, req)
        assert r.returncode == 0, r.stderr
    r = kubectl(
        kube,
        "patch",
        "erasurerequest",
        "to-every-model",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "status": {
                    "phase": "Quarantined",
                    "models": "a,b",
                    "targets": [
                        {"model": "a", "phase": "Quarantined"},
                        {"model": "b", "phase": "DataErased", "batchId": "batch-x"},
                    ],
                }
            }
        ),
    )
    assert r.returncode == 0, r.stderr
    line = next(
        x for x in kubectl(kube, "get", "erasurerequests").stdout.splitlines() if "to-every" in x
    )
    assert line.split()[1:3] == ["a,b", "Quarantined"], line


def test_rbac_is_enforced(kube: kubestack.KubeState, tmp_path: Path) -> None:
    """A service account with no role is refused: authorization is really on."""
    assert kubectl(kube, "create", "serviceaccount", "nobody").returncode == 0
    token = kubectl(kube, "create", "token", "nobody").stdout.strip()
    assert token.count(".") == 2  # a signed JWT: service-account tokens work
    cfg = tmp_path / "nobody.kubeconfig"
    kubestack.write_kubeconfig(cfg, kube.server, token, "nobody")
    r = subprocess.run(
        ["kubectl", "--kubeconfig", str(cfg), "get", "erasurerequests"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "forbidden" in r.stderr.lower()
