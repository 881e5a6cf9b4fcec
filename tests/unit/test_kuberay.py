"""The KubeRay launcher without a cluster: RayJob names, status mapping and the
manifest. tests/test_kuberay.py runs it end to end on the real stack (and uses
``DNS1035`` and ``UID`` from here)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from lethe_operator.kuberay import MAX_NAME, KubeRayJobs, job_status, owner_references, rayjob_name

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
UID = "0b5f3c7e-6d1a-4c9e-8f3a-0123456789ab"


def test_names_are_valid_deterministic_and_distinct() -> None:
    batch = "lethe-batch-0123456789abcdef-0"
    assert rayjob_name(batch) == batch  # short enough: the name is the submission id
    names = [rayjob_name(f"lethe-train-{UID}-{n}") for n in range(12)]
    assert len(set(names)) == 12  # attempts differ, though only the hash tells them apart
    for n in names:
        assert len(n) <= MAX_NAME == 47 and DNS1035.match(n) and n.startswith("lethe-train-")
    assert rayjob_name(f"lethe-train-{UID}-0") == names[0]  # a restart finds the same name
    for odd in ("9-Lethe_X", "x" * 80, "---", "A.B"):
        assert len(rayjob_name(odd)) <= MAX_NAME and DNS1035.match(rayjob_name(odd))


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, "PENDING"),  # KubeRay has not seen it yet
        ({"jobDeploymentStatus": "Initializing", "jobStatus": ""}, "PENDING"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, "PENDING"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "RUNNING"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "SUCCEEDED"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"}, "SUCCEEDED"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, "STOPPED"),
        (
            {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed"},
            "FAILED",
        ),
        (
            {"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed", "message": "boom"},
            "FAILED",
        ),
        (
            {"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING", "reason": "DeadlineExceeded"},
            "FAILED",
        ),
        (
            {"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed"},
            "FAILED",
        ),
        ({"jobDeploymentStatus": "Suspended", "jobStatus": ""}, "PENDING"),
    ],
)
def test_status_mapping(status: dict[str, Any] | None, expected: str) -> None:
    obj: dict[str, Any] = {"metadata": {"name": "x"}}
    if status is not None:
        obj["status"] = status
    got = job_status("lethe-x-0", obj)
    assert got.status == expected and got.submission_id == "lethe-x-0"
    if expected == "FAILED":
        assert status and status["reason"] in got.message  # KubeRay's reason reaches the request


def test_manifest_carries_no_secret_and_owns_to_every_owner() -> None:
    owners = [
        {
            "apiVersion": "lethe.dev/v1alpha1",
            "kind": "ErasureRequest",
            "metadata": {"name": f"r{i}", "uid": f"uid-{i}"},
        }
        for i in range(3)
    ]
    env = {"LETHE_BUCKET": "b", "AWS_ACCESS_KEY_ID": "AKIA-X", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    jobs = KubeRayJobs(
        "kuberay", {"clusterSelector": {"ray.io/cluster": "c"}}, env, owners=owners, model="m"
    )
    body = jobs.manifest("lethe-batch-0123456789abcdef-2", ["retrain", "--batch", "b"])
    assert "s3cr3t" not in json.dumps(body) and "AKIA-X" not in json.dumps(body)
    assert yaml.safe_load(body["spec"]["runtimeEnvYAML"]) == {"env_vars": {"LETHE_BUCKET": "b"}}
    assert [r["uid"] for r in body["metadata"]["ownerReferences"]] == ["uid-0", "uid-1", "uid-2"]
    assert "shutdownAfterJobFinishes" not in body["spec"]  # the cluster is not ours to stop
    with pytest.raises(ValueError):
        owner_references([{"metadata": {"name": "no-uid"}}])
