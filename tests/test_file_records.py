"""File-backed records end to end on the real stack (kube-apiserver + etcd, SeaweedFS,
a Ray head, the operator as its own process): scikit-learn's digits as PNG objects in
a versioned bucket, referenced from a Parquet prefix of several files with hive
partitions. The operator has the dataset ingested by a Ray job (Ray Data reads it);
erasing a person deletes their images, every version, and the certificate says so
in a way ``verify`` checks against the bucket."""

from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lethe.datasets import digits_table
from lethe.generations import read_live
from lethe.layout import ModelLayout
from lethe.store import Store
from lethe.verify import verify
from lethe_dev import kubestack
from lethe_dev.localstack import StackState, free_port
from lethe_operator.raylaunch import RayJobs

from .harness import (
    Operator,
    apply,
    digits_model,
    erasure_request,
    get,
    phase,
    remove_model,
    s3_secret,
    serving,
    train_subjects,
    wait_for,
)

MODEL = "digits-files"
BUCKET = "lethe-images"
PEOPLE_WITH_TWO_VERSIONS = 1  # their images are uploaded twice: two versions each


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((pixels.reshape(8, 8) * 255).round().astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(store: Store) -> tuple[Store, pa.Table]:
    """The digits as one PNG per record and a table of (ids, label, image URI) in three
    Parquet files under label-group partitions."""
    table, _ = digits_table()
    src = store.for_bucket(BUCKET)
    src.ensure_bucket()
    pixels = np.column_stack([table.column(f"px{j:02d}").to_numpy() for j in range(64)]).astype(
        np.float32
    )
    uris = []
    for rid, sid, px in zip(
        table.column("record_id").to_pylist(),
        table.column("subject_id").to_pylist(),
        pixels,
        strict=True,
    ):
        key = f"people/{sid}/{rid}.png"
        src.put(key, _png(px), "image/png")
        uris.append(f"s3://{BUCKET}/{key}")
    refs = pa.table(
        {
            "record_id": table.column("record_id"),
            "subject_id": table.column("subject_id"),
            "label": table.column("label"),
            "image": pa.array(uris, pa.string()),
        }
    )
    group = refs.column("label").to_numpy() % 3
    for g in range(3):
        buf = io.BytesIO()
        pq.write_table(refs.filter(pa.array(group == g)), buf)
        src.put(f"refs/group={g}/part-0.parquet", buf.getvalue())
    return src, refs


@pytest.fixture(scope="module")
def operator(
    kube: kubestack.KubeState, stack: StackState, store: Store, images, tmp_path_factory
) -> Iterator[Operator]:
    log = tmp_path_factory.mktemp("operator-files") / "operator.log"
    op = Operator(kube.kubeconfig, free_port(), log)
    model = digits_model(MODEL, stack, store)
    model["spec"]["dataset"] = {
        "uri": f"s3://{BUCKET}/refs/",
        "format": "parquet",
        "columns": {"file": "image"},
    }
    model["spec"]["trainer"]["inputShape"] = [1, 8, 8]
    apply(kube, s3_secret(stack), model)
    with serving(kube, op, MODEL):
        yield op


def test_an_erased_persons_images_are_gone_every_version(
    kube, operator: Operator, stack: StackState, store: Store, images
) -> None:
    src, refs = images
    (person,) = train_subjects(1, offset=20)
    theirs = [
        u.split("/", 3)[3]
        for u, s in zip(
            refs.column("image").to_pylist(), refs.column("subject_id").to_pylist(), strict=True
        )
        if s == person
    ]
    assert theirs
    src.put(theirs[0], src.get(theirs[0]), "image/png")  # a second version of one image
    assert len(src.versions_of(theirs[0])) == 2

    # ingested by a Ray job that read the prefix with Ray Data; every record's features
    # are its image's pixels
    model = get(kube, "shardedmodel", MODEL)
    layout = ModelLayout.of(f"default.{MODEL}", model["spec"]["storage"]["prefix"])
    gen = read_live(store, layout).generation
    assert gen.config.num_features == 64 and gen.config.columns.file == "image"
    assert sum(s.rows for s in gen.shards) + gen.test.rows == refs.num_rows
    job = model["status"]["ingest"]["job"]
    ray_jobs = RayJobs(stack.ray_dashboard, {})
    assert ray_jobs.status(job).status == "SUCCEEDED"
    with urllib.request.urlopen(f"{stack.ray_dashboard}/api/jobs/{job}/logs") as r:
        logs = json.loads(r.read())["logs"]
    # the job's result is its last JSON line (Ray may print warnings after it)
    result = [ln for ln in logs.splitlines() if ln.startswith("{")][-1]
    assert json.loads(result)["reader"] == "ray-data"

    apply(kube, erasure_request("forget-images", [person], MODEL))
    wait_for("success", lambda: phase(kube, "forget-images") == "Succeeded", timeout=300)
    st = get(kube, "erasurerequest", "forget-images")["status"]
    for key in theirs:
        assert src.versions_of(key) == [], key  # every version, delete markers too
    others = [u.split("/", 3)[3] for u in refs.column("image").to_pylist()[:50]]
    assert sum(1 for k in others if src.versions_of(k)) == sum(1 for k in others if k not in theirs)
    cert = store.get_json(st["certificate"].split("/", 3)[3])
    assert cert["files"]["objects"] == len(theirs)
    assert cert["files"]["versions_deleted"] == len(theirs) + 1
    assert cert["files"]["buckets"] == [BUCKET]
    assert person not in json.dumps(cert)  # hashes, never a URI
    v = verify(store, cert)
    assert v.ok, v.failures
    assert v.checks["file object versions checked"] > 0

    # one of the images uploaded again behind Lethe's back: verify says so
    src.put(theirs[-1], b"\x89PNG again", "image/png")
    v = verify(store, cert)
    assert not v.ok and any(f.startswith(f"files/{BUCKET}") for f in v.failures)
    src.purge(theirs[-1])
    assert verify(store, cert).ok


def test_a_refused_dataset_fails_with_its_reason_until_the_spec_is_fixed(
    kube, operator: Operator, stack: StackState, store: Store, images
) -> None:
    """The ingest job refuses a dataset (a column that is not there): the model says
    why, with the field, and nothing is ingested; fixing the spec ingests it."""
    name = "digits-files-bad"
    src, refs = images
    # its own copy of the references, without the person another test erased (a
    # reference to an erased image is refused: "a record's file does not exist")
    erased = set(train_subjects(1, offset=20))
    keep = refs.filter(pa.array([s not in erased for s in refs.column("subject_id").to_pylist()]))
    buf = io.BytesIO()
    pq.write_table(keep, buf)
    src.put("refs-bad/part-0.parquet", buf.getvalue())
    model = digits_model(name, stack, store)
    model["spec"]["storage"]["prefix"] += "-bad"
    model["spec"]["dataset"] = {
        "uri": f"s3://{BUCKET}/refs-bad/",
        "columns": {"file": "image", "label": "digit"},
    }
    model["spec"]["trainer"]["inputShape"] = [1, 8, 8]
    apply(kube, model)
    try:

        def reason() -> str:
            for c in (get(kube, "shardedmodel", name).get("status") or {}).get("conditions", []):
                if c["type"] == "Ready":
                    return f"{c['reason']}: {c['message']}"
            return ""

        wait_for(
            "IngestFailed",
            lambda: reason().startswith("IngestFailed"),
            timeout=120,
            state=lambda: get(kube, "shardedmodel", name).get("status"),
        )
        assert "unknown label column 'digit'" in reason()
        layout = ModelLayout.of(f"default.{name}", model["spec"]["storage"]["prefix"])
        assert not store.exists(layout.current)
        first = get(kube, "shardedmodel", name)["status"]["ingest"]
        model["spec"]["dataset"]["columns"]["label"] = "label"
        apply(kube, model)
        wait_for(
            "Ready",
            lambda: reason().startswith("Serving"),
            timeout=300,
            state=lambda: get(kube, "shardedmodel", name).get("status"),
        )
        assert (
            get(kube, "shardedmodel", name)["status"]["ingest"]["attempt"] == first["attempt"] + 1
        )
        assert read_live(store, layout).generation.number >= 1
    finally:
        remove_model(kube, name)
