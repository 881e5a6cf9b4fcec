"""The CRDs on a real kube-apiserver (with etcd): examples apply, malformed manifests
are rejected by the API server itself with a message naming the field, and the largest
manifests the schemas allow still fit what ``kubectl apply`` and etcd can store."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lethe_dev import kubestack

from .conftest import kubectl

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind(kube: kubestack.KubeState) -> Any:
    """The objects applied here are for the API server's validation alone. Left behind,
    an operator a later module starts (cluster-wide) would tick them: models pointing
    at endpoints that do not exist, holding its threads while its own tests wait."""
    yield
    r = kubectl(kube, "delete", "erasurerequests,shardedmodels", "--all", "--wait=false")
    assert r.returncode == 0, r.stderr


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
ONE_TARGET = ("spec: Invalid value", "exactly one of modelRef, modelSelector and allModels: true")
ONE_WHOM = ("spec: Invalid value", "exactly one of subjects, recordIds and secretRef")
ONE_RAY = "set exactly one of ray.address (an existing cluster) and ray.rayJob (KubeRay)"
BUCKET = "storage.bucket must be an S3 bucket name"
PREFIX_DOTS = "storage.prefix must not contain '..' nor '.' segments"
URI_KEY = "dataset.uri: s3:// needs a bucket and a key"
URI_BUCKET = "dataset.uri: the bucket of s3://bucket/key must be an S3 bucket name"
URI_SEGMENTS = "dataset.uri: the key of s3://bucket/key must have no empty, '.' or '..' segments"
ROLES = "dataset.columns: recordId, subjectId and label must be three different columns"
FEATURE_ROLE = "dataset.columns.features must not include the recordId, subjectId or label"
RAY_UNIT = "must be a multiple of 0.0001 (Ray's resource unit)"
DEADLINE = "erasurePolicy.deadlineSeconds must be longer than erasurePolicy.batchWindowSeconds"
SELECTOR = "ray.rayJob.clusterSelector must name the RayCluster"
ID_PATTERN = "in body should match '^[^\\p{Z}\\p{C}]+$'"  # no whitespace, control, format
RECORDS: dict[str, Any] = {"spec.subjects": DELETE}  # recordIds instead of subjects

MALFORMED: list[tuple[dict[str, Any], dict[str, Any], str | tuple[str, ...]]] = [
    # (base, {field path: bad value, ...}, the text(s) the API server's message must
    # contain: the field's path, and for a CEL rule its message, which names it too)
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
    (
        MODEL,
        {"spec.dataset.sourcePolicy": "patch"},
        ("spec.dataset.sourcePolicy", "sourcePolicy must be external"),
    ),
    (MODEL, {"spec.dataset.testFraction": 1.5}, "spec.dataset.testFraction"),
    (MODEL, {"spec.trainer.model": "resnet; rm -rf /"}, "spec.trainer.model"),
    (MODEL, {"spec.trainer.epochs": 0}, "spec.trainer.epochs"),
    (MODEL, {"spec.trainer.batchSize": 0}, "spec.trainer.batchSize"),
    (MODEL, {"spec.trainer.gpusPerWorker": -1}, "spec.trainer.gpusPerWorker"),
    (
        MODEL,
        {"spec.trainer.inputShape": []},
        ("spec.trainer.inputShape", "trainer.inputShape must be"),
    ),
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
    (
        REQUEST,
        {NO_REF: DELETE, "spec.modelSelector": {}},
        ("spec.modelSelector", "an empty selector"),
    ),
    (
        REQUEST,
        {
            NO_REF: DELETE,
            "spec.modelSelector": {"matchExpressions": [{"key": "t", "operator": "In"}]},
        },
        ("spec.modelSelector.matchExpressions[0]", "In and NotIn need values"),
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
    (REQUEST, {"spec.subjects": DELETE}, ONE_WHOM),
    (REQUEST, {"spec.recordIds": ["r1"]}, ONE_WHOM),
    (REQUEST, {"spec.secretRef": {"key": "x"}}, "spec.secretRef.name"),
    (REQUEST, {"spec.reason": "x" * 2000}, "spec.reason"),
    # names and paths: no '..', '.' segments, leading '/', empty segments
    (MODEL, {"metadata.name": "a..b"}, ("metadata.name", "RFC 1123 subdomain")),
    (MODEL, {"metadata.name": "digits."}, "metadata.name"),
    (REQUEST, {"spec.modelRef.name": "a..b"}, "spec.modelRef.name"),
    (REQUEST, {"spec.modelRef.name": "-digits"}, "spec.modelRef.name"),
    (MODEL, {"spec.storage.prefix": "a/../b"}, ("spec.storage.prefix", PREFIX_DOTS)),
    (MODEL, {"spec.storage.prefix": ".."}, ("spec.storage.prefix", PREFIX_DOTS)),
    (MODEL, {"spec.storage.prefix": "team..a"}, ("spec.storage.prefix", PREFIX_DOTS)),
    (MODEL, {"spec.storage.prefix": "a/./b"}, ("spec.storage.prefix", PREFIX_DOTS)),
    (MODEL, {"spec.storage.prefix": "/models"}, ("spec.storage.prefix", "no leading '/'")),
    (MODEL, {"spec.storage.prefix": "a//b"}, ("spec.storage.prefix", "no empty segments")),
    (MODEL, {"spec.storage.prefix": "a\nb"}, ("spec.storage.prefix", "control characters")),
    (MODEL, {"spec.storage.prefix": "p" * 513}, "spec.storage.prefix"),
    # S3 bucket names
    (MODEL, {"spec.storage.bucket": "a..b"}, ("spec.storage.bucket", BUCKET)),
    (MODEL, {"spec.storage.bucket": "my-.bucket"}, ("spec.storage.bucket", BUCKET)),
    (MODEL, {"spec.storage.bucket": "-bucket"}, ("spec.storage.bucket", BUCKET)),
    (MODEL, {"spec.storage.bucket": "bucket-"}, ("spec.storage.bucket", BUCKET)),
    (MODEL, {"spec.storage.bucket": "ab"}, "spec.storage.bucket"),
    (MODEL, {"spec.storage.bucket": "b" * 64}, "spec.storage.bucket"),
    (MODEL, {"spec.storage.bucket": "192.168.1.10"}, ("spec.storage.bucket", "IP address")),
    (MODEL, {"spec.storage.bucket": "xn--bucket"}, ("spec.storage.bucket", "reserved")),
    (MODEL, {"spec.storage.endpoint": "https://"}, ("spec.storage.endpoint", "with a host")),
    (
        MODEL,
        {"spec.storage.credentialsSecret.name": "S3 Keys"},
        "spec.storage.credentialsSecret.name",
    ),
    # dataset.uri: s3://bucket/key with both parts, or builtin:<name>
    (MODEL, {"spec.dataset.uri": "s3://"}, ("spec.dataset.uri", URI_KEY)),
    (MODEL, {"spec.dataset.uri": "builtin:"}, ("spec.dataset.uri", "builtin: needs a dataset")),
    (MODEL, {"spec.dataset.uri": "s3://bucket"}, ("spec.dataset.uri", URI_KEY)),
    (MODEL, {"spec.dataset.uri": "s3://bucket/"}, ("spec.dataset.uri", URI_KEY)),
    (MODEL, {"spec.dataset.uri": "s3:///key.csv"}, ("spec.dataset.uri", URI_KEY)),
    (MODEL, {"spec.dataset.uri": "s3://Bad_Bucket/k.csv"}, ("spec.dataset.uri", URI_BUCKET)),
    (MODEL, {"spec.dataset.uri": "s3://10.0.0.1/k.csv"}, ("spec.dataset.uri", URI_BUCKET)),
    (MODEL, {"spec.dataset.uri": "s3://bucket/a/../k.csv"}, ("spec.dataset.uri", URI_SEGMENTS)),
    (MODEL, {"spec.dataset.uri": "s3://bucket/a//k.csv"}, ("spec.dataset.uri", URI_SEGMENTS)),
    (MODEL, {"spec.dataset.uri": "builtin:../digits"}, ("spec.dataset.uri", "builtin:")),
    # one column, one role
    (MODEL, {"spec.dataset.columns": {"subjectId": "record_id"}}, ("spec.dataset.columns", ROLES)),
    (MODEL, {"spec.dataset.columns": {"label": "subject_id"}}, ("spec.dataset.columns", ROLES)),
    (MODEL, {"spec.dataset.columns": {"recordId": ""}}, "spec.dataset.columns.recordId"),
    (
        MODEL,
        {"spec.dataset.columns": {"features": ["x0", "x1", "x0"]}},
        ("spec.dataset.columns.features[2]", "Duplicate value"),
    ),
    (
        MODEL,
        {"spec.dataset.columns": {"features": ["x0", "label"]}},
        ("spec.dataset.columns.features", FEATURE_ROLE),
    ),
    (
        MODEL,
        {"spec.dataset.columns": {"features": [f"x{i}" for i in range(1001)]}},
        ("spec.dataset.columns.features", "Too many"),
    ),
    # Ray's resources
    (MODEL, {"spec.trainer.cpusPerWorker": 0.00015}, ("spec.trainer.cpusPerWorker", RAY_UNIT)),
    (MODEL, {"spec.trainer.cpusPerWorker": 0.00001}, ("spec.trainer.cpusPerWorker", RAY_UNIT)),
    (MODEL, {"spec.trainer.cpusPerWorker": 0}, "spec.trainer.cpusPerWorker"),
    (MODEL, {"spec.trainer.cpusPerWorker": -0.5}, "spec.trainer.cpusPerWorker"),
    (MODEL, {"spec.trainer.gpusPerWorker": 0.33333}, ("spec.trainer.gpusPerWorker", RAY_UNIT)),
    # the deadline against the batch window
    (
        MODEL,
        {"spec.erasurePolicy": {"batchWindowSeconds": 600, "deadlineSeconds": 300}},
        ("spec.erasurePolicy.deadlineSeconds", DEADLINE),
    ),
    (
        MODEL,
        {"spec.erasurePolicy": {"batchWindowSeconds": 3600, "deadlineSeconds": 3600}},
        ("spec.erasurePolicy.deadlineSeconds", DEADLINE),
    ),
    # the ray section: exactly one of address and a rayJob Lethe can run
    (MODEL, {"spec.ray": {"rayJob": {}}}, ("spec.ray.rayJob", "exactly one of ray.rayJob")),
    (
        MODEL,
        {"spec.ray": {"rayJob": {"clusterSelector": {}}}},
        ("spec.ray.rayJob.clusterSelector", SELECTOR),
    ),
    (
        MODEL,
        {"spec.ray": {"rayJob": {"clusterSelector": {"ray.io/cluster": ""}}}},
        ("spec.ray.rayJob.clusterSelector", SELECTOR),
    ),
    (
        MODEL,
        {"spec.ray": {"rayJob": {"clusterSelector": {"team": "ml"}}}},
        ("spec.ray.rayJob.clusterSelector", SELECTOR),
    ),
    (
        MODEL,
        {"spec.ray": {"rayJob": {"rayClusterSpec": {}}}},
        ("spec.ray.rayJob.rayClusterSpec.headGroupSpec", "Required value"),
    ),
    (MODEL, {"spec.ray": {"maxRetries": 2}}, ("spec.ray", ONE_RAY)),
    (MODEL, {"spec.ray": {"address": ""}}, ("spec.ray.address", "ray.address must be")),
    (MODEL, {"spec.ray.address": "http://"}, ("spec.ray.address", "with a host")),
    (MODEL, {"spec.ray.env": {"NOT-A-NAME": "x"}}, ("spec.ray.env", "ray.env keys")),
    (MODEL, {"spec.ray.env": {"LONG": "v" * 1025}}, ("spec.ray.env.LONG", "Too long")),
    # subject and record ids: no Unicode whitespace, control or format characters, not empty
    (REQUEST, {"spec.subjects": ["a\u0000b"]}, ("spec.subjects[0]", ID_PATTERN)),
    (REQUEST, {"spec.subjects": ["ok", "a\u00a0b"]}, ("spec.subjects[1]", ID_PATTERN)),
    (REQUEST, {"spec.subjects": ["a\u2003b"]}, ("spec.subjects[0]", ID_PATTERN)),
    (REQUEST, {"spec.subjects": ["a\u3000b"]}, ("spec.subjects[0]", ID_PATTERN)),
    (REQUEST, {"spec.subjects": ["a\tb"]}, ("spec.subjects[0]", ID_PATTERN)),
    (REQUEST, {"spec.subjects": ["person-1\n"]}, ("spec.subjects[0]", ID_PATTERN)),
    (REQUEST, {"spec.subjects": ["a\u200bb"]}, ("spec.subjects[0]", ID_PATTERN)),
    (REQUEST, {"spec.subjects": ["\ufeffperson-1"]}, ("spec.subjects[0]", ID_PATTERN)),
    (REQUEST, {"spec.subjects": [""]}, ("spec.subjects[0]", "at least 1 chars")),
    (REQUEST, {"spec.subjects": ["s" * 257]}, ("spec.subjects[0]", "Too long")),
    (REQUEST, {**RECORDS, "spec.recordIds": [""]}, ("spec.recordIds[0]", "at least 1 chars")),
    (REQUEST, {**RECORDS, "spec.recordIds": ["r\u0085"]}, ("spec.recordIds[0]", ID_PATTERN)),
    (REQUEST, {**RECORDS, "spec.recordIds": ["r\u2028"]}, ("spec.recordIds[0]", ID_PATTERN)),
    (REQUEST, {**RECORDS, "spec.recordIds": ["r1", "r1"]}, ("spec.recordIds[1]", "Duplicate")),
    (REQUEST, {**RECORDS, "spec.recordIds": ["r" * 129]}, ("spec.recordIds[0]", "Too long")),
    # list limits: what kubectl apply and etcd can store (more: secretRef)
    (
        REQUEST,
        {"spec.subjects": [f"p-{i}" for i in range(501)]},
        ("spec.subjects", "must have at most 500 items"),
    ),
    (
        REQUEST,
        {**RECORDS, "spec.recordIds": [f"r-{i}" for i in range(1001)]},
        ("spec.recordIds", "must have at most 1000 items"),
    ),
    (
        REQUEST,
        {
            NO_REF: DELETE,
            "spec.modelSelector": {
                "matchExpressions": [{"key": f"k{i}", "operator": "Exists"} for i in range(17)]
            },
        },
        ("spec.modelSelector.matchExpressions", "must have at most 16 items"),
    ),
    (
        REQUEST,
        {NO_REF: DELETE, "spec.modelSelector": {"matchLabels": {"k" * 318: "v"}}},
        ("spec.modelSelector.matchLabels", "modelSelector.matchLabels keys must be label keys"),
    ),
    (REQUEST, {**RECORDS, "spec.secretRef": {"name": "Ids List"}}, "spec.secretRef.name"),
    (
        REQUEST,
        {**RECORDS, "spec.secretRef": {"name": "ids", "key": "a/b"}},
        "spec.secretRef.key",
    ),
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
    for text in (needle,) if isinstance(needle, str) else needle:
        assert text in r.stderr, r.stderr
    assert kubectl(kube, "get", obj["kind"].lower(), obj["metadata"]["name"]).returncode != 0


def test_enough_malformed_manifests() -> None:
    """The issue asks for at least 60 refusals, each naming its field: every entry
    looks for the path of the field the API server reports (spec.x.y, or spec for a
    rule across fields, whose message then names them)."""
    assert len(MALFORMED) >= 60
    for _, _, needle in MALFORMED:
        texts = (needle,) if isinstance(needle, str) else needle
        assert any(t.startswith(("spec", "metadata.")) for t in texts), needle


ACCEPTED = [
    # (base, {field path: value, ...}): at the edges of the rules, still valid
    (MODEL, {"spec.storage.bucket": "my.bucket-1"}),
    (MODEL, {"spec.storage.bucket": "abc", "spec.storage.prefix": ""}),
    (MODEL, {"spec.storage.prefix": "team-a/models/"}),
    (MODEL, {"spec.storage.prefix": "a/.hidden/b.c"}),
    (MODEL, {"spec.dataset.uri": "s3://my.bucket-1/data/2026/x.parquet"}),
    (MODEL, {"spec.dataset.uri": "s3://bkt/x.parquet", "spec.dataset.sourcePolicy": "patch"}),
    (MODEL, {"spec.dataset.columns": {"recordId": "id", "subjectId": "who", "label": "y"}}),
    (MODEL, {"spec.dataset.columns": {"features": ["x0", "x1", "x2"]}}),
    (MODEL, {"spec.trainer.cpusPerWorker": 0.0001, "spec.trainer.gpusPerWorker": 0.25}),
    (MODEL, {"spec.trainer.cpusPerWorker": 0.3, "spec.trainer.gpusPerWorker": 0.0003}),
    (MODEL, {"spec.trainer.cpusPerWorker": 2, "spec.trainer.gpusPerWorker": 1}),
    (MODEL, {"spec.trainer.cpusPerWorker": 1023.9999}),
    (MODEL, {"spec.erasurePolicy": {"batchWindowSeconds": 0, "deadlineSeconds": 60}}),
    (MODEL, {"spec.erasurePolicy": {"batchWindowSeconds": 86400, "deadlineSeconds": 86401}}),
    (MODEL, {"spec.ray": {"rayJob": {"clusterSelector": {"ray.io/cluster": "training"}}}}),
    (MODEL, {"spec.ray": {"rayJob": {"rayClusterSpec": {"headGroupSpec": {"a": 1}}}}}),
    (MODEL, {"spec.ray": {"address": "https://ray.example.com:8265/"}}),
    (REQUEST, {"spec.subjects": ["jöhn.doe@example.com", "用户-0001", "ü+tag@x"]}),
    (REQUEST, {**RECORDS, "spec.recordIds": ["img-00017", "orders/2026/17"]}),
    (REQUEST, {"spec.modelRef.name": "digits.v2"}),
]


@pytest.mark.parametrize(("base", "changes"), ACCEPTED, ids=[str(a[1])[:60] for a in ACCEPTED])
def test_valid_edges_are_accepted(kube, base, changes) -> None:
    obj = _with(base, changes)
    obj["metadata"]["name"] = f"ok-{ACCEPTED.index((base, changes))}"
    r = apply(kube, obj)
    assert r.returncode == 0, r.stderr
    got = json.loads(
        kubectl(kube, "get", obj["kind"].lower(), obj["metadata"]["name"], "-o", "json").stdout
    )
    for path, value in changes.items():
        if value is DELETE:
            continue
        cur = got
        for k in path.split("."):
            cur = cur[k]
        if isinstance(value, dict):  # the API server fills in defaults around it
            assert value.items() <= cur.items(), (path, cur)
        else:
            assert cur == value, (path, cur)


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


# What a maximal spec may weigh: client-side ``kubectl apply`` copies the whole object
# into the last-applied-configuration annotation, and all of an object's annotations
# together may hold 256 KiB; etcd takes requests of up to 1.5 MiB. The schemas' limits
# keep the largest spec they allow under 200 KiB, which leaves room for metadata.
SPEC_BUDGET = 200 * 1024
ANNOTATIONS_LIMIT = 256 * 1024
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
DIFF_BASE = "lethe.dev/last-handled-configuration"  # the operator's (ErasureRequests only)


def _ids(n: int, length: int, tag: str) -> list[str]:
    return [f"{tag}{i:05d}-".ljust(length, "x") for i in range(n)]


def largest_request(name: str, ids: str, over: bool = False) -> dict[str, Any]:
    """The largest ErasureRequest the schema allows, with ``ids`` (subjects or recordIds)
    at their limit; ``over``: one id more than allowed."""
    count, length = {"subjects": (500, 256), "recordIds": (1000, 128)}[ids]
    selector = {
        "matchLabels": {f"{i:03d}".ljust(317, "k"): "v" * 63 for i in range(64)},
        "matchExpressions": [
            {
                "key": f"{i:03d}".ljust(317, "e"),
                "operator": "NotIn",
                "values": [f"{j:02d}".ljust(63, "w") for j in range(16)],
            }
            for i in range(16)
        ],
    }
    return {
        "apiVersion": "lethe.dev/v1alpha1",
        "kind": "ErasureRequest",
        "metadata": {"name": name},
        "spec": {
            "modelSelector": selector,
            ids: _ids(count + (1 if over else 0), length, ids[0]),
            "reason": "r" * 1024,
        },
    }


def largest_model(name: str, over: bool = False) -> dict[str, Any]:
    """The largest ShardedModel the schema allows (without a rayClusterSpec, which is
    the user's to keep small); ``over``: one feature column more than allowed."""
    return {
        "apiVersion": "lethe.dev/v1alpha1",
        "kind": "ShardedModel",
        "metadata": {"name": name},
        "spec": {
            "storage": {
                "bucket": "b" * 63,
                "prefix": "/".join(["p" * 63] * 8),  # 511 characters
                "endpoint": "https://" + "e" * 504,
                "credentialsSecret": {"name": "s" * 253},
                "backend": "seaweedfs",
                "adminEndpoint": "https://" + "a" * 504,
            },
            "dataset": {
                "uri": "s3://" + "b" * 63 + "/" + "k" * 1979,  # 2048 characters
                "format": "parquet",
                "sourcePolicy": "delete-after-ingest",
                "testFraction": 0.2,
                "columns": {
                    "recordId": "r" * 100,
                    "subjectId": "s" * 100,
                    "label": "l" * 100,
                    "features": _ids(1000 + (1 if over else 0), 100, "f"),
                },
            },
            "shards": 4096,
            "slices": 1024,
            "trainer": {
                "model": "m" * 120 + ":" + "b" * 135,
                "inputShape": [1000000, 1000000, 1000000],
                "cpusPerWorker": 1023.9999,
                "gpusPerWorker": 63.9999,
            },
            "ray": {
                "rayJob": {
                    "clusterSelector": {
                        "ray.io/cluster": "c" * 63,
                        **{f"{i:03d}".ljust(317, "k"): "v" * 63 for i in range(15)},
                    }
                },
                "env": {f"V{i:03d}".ljust(128, "_"): "v" * 1024 for i in range(64)},
            },
            "certificates": {"keysSecret": {"name": "k" * 253}},
        },
    }


def _size(obj: dict[str, Any]) -> int:
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


@pytest.mark.parametrize(
    "make",
    [
        lambda name: largest_request(name, "subjects"),
        lambda name: largest_request(name, "recordIds"),
        largest_model,
    ],
    ids=["request-subjects", "request-recordIds", "model"],
)
def test_largest_manifest_fits_kubectl_apply(kube: kubestack.KubeState, make) -> None:
    """The largest manifest each schema allows is stored by a client-side ``kubectl
    apply``: its spec stays under the budget and the annotation kubectl writes fits."""
    obj = make("largest")
    size = _size(obj["spec"])
    assert 150 * 1024 < size < SPEC_BUDGET, size  # near the budget, not far below it
    r = apply(kube, obj)
    assert r.returncode == 0, r.stderr[:2000]
    got = json.loads(kubectl(kube, "get", obj["kind"].lower(), "largest", "-o", "json").stdout)
    annotation = got["metadata"]["annotations"][LAST_APPLIED]
    assert json.loads(annotation)["spec"] == obj["spec"]  # stored whole
    assert len(annotation.encode()) < ANNOTATIONS_LIMIT
    if obj["kind"] == "ErasureRequest":
        # the operator's diff base (lethe.dev/last-handled-configuration: the spec with
        # its id lists replaced by a digest) must fit beside kubectl's annotation
        essence = {k: v for k, v in obj["spec"].items() if k not in ("subjects", "recordIds")}
        essence["subjects" if "subjects" in obj["spec"] else "recordIds"] = "sha256:" + "0" * 64
        base = json.dumps({"spec": essence}, separators=(",", ":"))
        r = kubectl(
            kube,
            "patch",
            "erasurerequest",
            "largest",
            "--type=merge",
            "-p",
            json.dumps({"metadata": {"annotations": {DIFF_BASE: base}}}),
        )
        assert r.returncode == 0, r.stderr[:2000]
    assert kubectl(kube, "delete", obj["kind"].lower(), "largest").returncode == 0


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda n: largest_request(n, "subjects", over=True), "spec.subjects: Too many: 501"),
        (lambda n: largest_request(n, "recordIds", over=True), "spec.recordIds: Too many: 1001"),
        (
            lambda n: largest_model(n, over=True),
            "spec.dataset.columns.features: Too many: 1001",
        ),
    ],
    ids=["request-subjects", "request-recordIds", "model"],
)
def test_just_over_the_limit_is_refused_by_the_schema(
    kube: kubestack.KubeState, make, needle: str
) -> None:
    """One item more than the largest allowed manifest: the schema refuses it, naming
    the field (not the annotation or etcd, with a message that names none)."""
    obj = make("over-the-limit")
    assert _size(obj["spec"]) < ANNOTATIONS_LIMIT  # kubectl could still have stored it
    r = apply(kube, obj)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr[:2000]
    assert "annotations" not in r.stderr, r.stderr[:2000]


def test_old_limits_did_not_fit(kube: kubestack.KubeState) -> None:
    """Why the limits are what they are: a list the schema used to allow (1,000 subjects
    of 256 characters) is more than ``kubectl apply``'s annotation can hold; it is now
    refused by the schema, naming the list, instead of failing on the annotation."""
    obj = largest_request("too-big-for-kubectl", "subjects")
    obj["spec"]["subjects"] = _ids(1000, 256, "s")
    assert _size(obj["spec"]) > ANNOTATIONS_LIMIT
    r = apply(kube, obj)
    assert r.returncode != 0
    assert "spec.subjects" in r.stderr  # refused by the schema now, naming the list


def test_the_api_server_fills_in_the_defaults_the_operator_relies_on(
    kube: kubestack.KubeState,
) -> None:
    """The operator restates no default (``lethe_operator.spec``): a minimal ShardedModel
    read back from the API server carries every default the unit tier applies from the
    CRD (``tests/unit/test_spec.with_defaults``), and parses."""
    from lethe_operator.spec import ModelSpec

    from .unit.test_spec import MINIMAL, spec_schema, with_defaults

    model = {
        "apiVersion": "lethe.dev/v1alpha1",
        "kind": "ShardedModel",
        "metadata": {"name": "minimal-defaults"},
        "spec": MINIMAL,
    }
    r = apply(kube, model)
    assert r.returncode == 0, r.stderr
    got = json.loads(kubectl(kube, "get", "shardedmodel", "minimal-defaults", "-o", "json").stdout)
    assert got["spec"] == with_defaults(MINIMAL, spec_schema())
    assert ModelSpec.parse(got["spec"]).policy.max_batch_size == 100
