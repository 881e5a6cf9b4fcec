"""The KubeRay launcher (``spec.ray.rayJob``) end to end on the real stack: kube-apiserver
+ etcd with KubeRay's own RayJob and RayCluster CRDs (v1.4.2, from its Go module, see
``tools/get-kuberay-crds.sh``), SeaweedFS, a real Ray head, the operator as its own
process (killed with SIGKILL once). Names, status mapping and the manifest, which need no
cluster, are tested in tests/unit/test_kuberay.py.

**A stand-in replaces KubeRay's controller, because pods cannot run here** (no kubelet,
no container runtime). ``KubeRayStandIn`` below does, for RayJobs in clusterSelector
mode, what KubeRay's RayJob controller does with them: it validates the RayJob as
KubeRay does (name, clusterSelector key, runtimeEnvYAML), fills ``status`` the way
KubeRay does (jobId from ``spec.jobId``, jobStatus, jobDeploymentStatus, reason,
message, startTime, endTime), resolves ``ray.io/cluster`` to a RayCluster object and
submits ``spec.entrypoint`` with ``spec.runtimeEnvYAML`` as submission ``spec.jobId`` to
that cluster's Jobs API (KubeRay's HTTPMode; the default K8sJobMode runs the same
submission from a Job's pod). The RayCluster object stands for the local Ray head; its
head container takes S3 credentials from the ``lethe-s3`` Secret (secretKeyRef). The
stand-in, playing the kubelet, resolves them and checks that they are the keys the local
head really runs with (``localstack.start_ray`` puts them in its environment, as the
kubelet would in the head pod's), and submits the job without them: the keys reach the
job's workers from the raylet's environment, never through its runtime_env (job
metadata). rayClusterSpec RayJobs (which need KubeRay to start pods) are left alone: their
object is checked as built, against the real CRD.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from lethe.store import Store
from lethe.verify import verify
from lethe_dev import kubestack
from lethe_dev.localstack import StackState, free_port
from lethe_operator.kuberay import (
    MAX_NAME,
    SUBMISSION,
    WATCH_ENV,
    KubeRayJobs,
    rayjob_name,
)
from lethe_operator.raylaunch import RayJobs

from .conftest import kubectl
from .harness import (
    Operator,
    apply,
    assert_no_s3_keys_in_ray,
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
from .unit.test_kuberay import DNS1035, UID

# the local API server's self-signed certificate (insecure-skip-tls-verify)
pytestmark = pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
NS = "kuberay"
MODEL = "digits-kuberay"
CLUSTER = "local-head"  # the RayCluster object that stands for the local Ray head
RAY = ("ray.io", "v1")


# -- the real stack -----------------------------------------------------------------------
def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_ms(ms: int | None) -> str | None:
    return (
        dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ms else None
    )


class KubeRayStandIn(threading.Thread):
    """KubeRay's RayJob controller for clusterSelector RayJobs (see the module docstring):
    list the namespace's RayJobs every half second and move each one step on."""

    def __init__(
        self,
        api: k8s.ApiClient,
        namespace: str,
        dashboards: dict[str, str],
        head_env: dict[str, str],
    ) -> None:
        super().__init__(daemon=True, name="kuberay-stand-in")
        self.crd = k8s.CustomObjectsApi(api)
        self.core = k8s.CoreV1Api(api)
        self.namespace, self.dashboards = namespace, dashboards  # RayCluster -> Jobs API
        self.head_env = head_env  # what the local head process really has (its "pod")
        self.invalid: list[str] = []  # RayJobs KubeRay would refuse (must stay empty)
        self.submitted: list[str] = []  # Ray submission ids sent to a Jobs API
        self.hiccups: list[str] = []  # transient errors, retried like a requeue
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        while not self._halt.wait(0.5):
            try:
                items = self.crd.list_namespaced_custom_object(*RAY, self.namespace, "rayjobs")
                for rj in items["items"]:
                    self.reconcile(rj)
            except Exception as e:  # a requeue, as controller-runtime does
                self.hiccups.append(repr(e)[:300])

    def _status(self, name: str, status: dict[str, Any]) -> None:
        self.crd.patch_namespaced_custom_object_status(
            *RAY, self.namespace, "rayjobs", name, {"status": status}
        )

    def validate(self, rj: dict[str, Any]) -> list[str]:
        """KubeRay's ValidateRayJobMetadata/Spec, the parts that apply here."""
        name, spec = rj["metadata"]["name"], rj["spec"]
        out = []
        if len(name) > MAX_NAME or not DNS1035.match(name):
            out.append(f"name {name!r}: not a DNS-1035 label of at most {MAX_NAME} characters")
        if bool(spec.get("clusterSelector")) == bool(spec.get("rayClusterSpec")):
            out.append("exactly one of clusterSelector and rayClusterSpec")
        if spec.get("clusterSelector") and "ray.io/cluster" not in spec["clusterSelector"]:
            out.append("clusterSelector without ray.io/cluster")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished"):
            out.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
        if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), dict):
            out.append("runtimeEnvYAML is not a mapping")
        if not spec.get("entrypoint", "").strip():
            out.append("no entrypoint")
        return out

    def pod_env(self, cluster: dict[str, Any]) -> dict[str, str]:
        """The head pod's environment, as the kubelet would resolve it."""
        container = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {}
        for e in container.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                data = self.core.read_namespaced_secret(ref["name"], self.namespace).data
                env[e["name"]] = base64.b64decode(data[ref["key"]]).decode()
            else:
                env[e["name"]] = e.get("value", "")
        return env

    def reconcile(self, rj: dict[str, Any]) -> None:
        name, spec, st = rj["metadata"]["name"], rj["spec"], rj.get("status") or {}
        deployment = st.get("jobDeploymentStatus", "")
        if deployment in ("Complete", "Failed", "ValidationFailed") or not spec.get(
            "clusterSelector"
        ):
            return
        if not deployment:  # New -> Initializing (status.jobId first: no double submission)
            problems = self.validate(rj)
            if problems:
                self.invalid.append(f"{name}: {problems}")
                self._status(
                    name,
                    {
                        "jobDeploymentStatus": "ValidationFailed",
                        "reason": "ValidationFailed",
                        "message": "; ".join(problems),
                    },
                )
                return
            self._status(
                name,
                {
                    "jobId": spec.get("jobId") or f"{name}-standin",
                    "rayClusterName": spec["clusterSelector"]["ray.io/cluster"],
                    "jobStatus": "",
                    "jobDeploymentStatus": "Initializing",
                    "startTime": now(),
                },
            )
            return
        cluster = self.crd.get_namespaced_custom_object(
            *RAY, self.namespace, "rayclusters", st["rayClusterName"]
        )
        url = self.dashboards[cluster["metadata"]["name"]]
        ray = RayJobs(url, {})
        info = ray._call("GET", f"/api/jobs/{st['jobId']}")
        if info is None:  # not submitted yet: submit it, as KubeRay's HTTPMode does
            pod = self.pod_env(cluster)  # the kubelet's part: the pod's environment
            if any(pod.get(k) != v for k, v in self.head_env.items()):
                self.invalid.append(f"{name}: the head pod's env is not the local head's")
            runtime = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
            ray._call(
                "POST",
                "/api/jobs/",
                {
                    "entrypoint": spec["entrypoint"],
                    "submission_id": st["jobId"],
                    "runtime_env": runtime,
                },
            )
            self.submitted.append(st["jobId"])
            self._status(name, {"jobDeploymentStatus": "Running", "dashboardURL": url})
            return
        state = str(info["status"])
        terminal = state in ("SUCCEEDED", "FAILED", "STOPPED")
        change: dict[str, Any] = {
            "jobStatus": state,
            "jobDeploymentStatus": ("Failed" if state == "FAILED" else "Complete")
            if terminal
            else "Running",
            "reason": "AppFailed" if state == "FAILED" else "",
            "message": str(info.get("message") or ""),
            "rayJobInfo": {
                k: v
                for k, v in (
                    ("startTime", from_ms(info.get("start_time"))),
                    ("endTime", from_ms(info.get("end_time"))),
                )
                if v
            },
        }
        if terminal:
            change["endTime"] = now()
        if any(st.get(k) != v for k, v in change.items()):
            self._status(name, change)


def head_cluster() -> dict[str, Any]:
    """A RayCluster whose head pod carries S3 credentials from a Secret (clusterSelector:
    the cluster is the user's, and so are its credentials)."""
    secret_env = [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": "lethe-s3", "key": k}}}
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": CLUSTER, "namespace": NS},
        "spec": {
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "ray-head",
                                "image": "rayproject/ray:2.60.0",
                                "env": secret_env,
                            }
                        ]
                    }
                },
            }
        },
    }


def install_kuberay_crds(kube: kubestack.KubeState) -> None:
    crds = Path(kubestack.cached_tool("get-kuberay-crds.sh"))
    for f in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        # server-side: the RayJob CRD (1.3 MB) is too big for last-applied-configuration
        r = kubectl(kube, "apply", "--server-side", "--force-conflicts", "-f", str(crds / f))
        assert r.returncode == 0, r.stderr
    for crd in ("rayjobs.ray.io", "rayclusters.ray.io"):
        wait_for(  # `kubectl wait` fails outright while the CRD has no conditions yet
            f"{crd} established",
            lambda crd=crd: (
                kubectl(
                    kube,
                    "get",
                    "crd",
                    crd,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                ).stdout
                == "True"
            ),
            timeout=60,
            every=0.5,
        )
    wait_for(
        "discovery of ray.io/v1",
        lambda: kubectl(kube, "get", "rayjobs", "-n", NS).returncode == 0,
        timeout=30,
        every=0.5,
    )


def rayjobs(api: k8s.ApiClient, selector: str = "") -> list[dict[str, Any]]:
    return k8s.CustomObjectsApi(api).list_namespaced_custom_object(
        *RAY, NS, "rayjobs", label_selector=selector
    )["items"]


def finished(api: k8s.ApiClient, name: str) -> dict[str, Any] | None:
    """The RayJob once its deployment is Complete or Failed (None before)."""
    obj = k8s.CustomObjectsApi(api).get_namespaced_custom_object(*RAY, NS, "rayjobs", name)
    done = (obj.get("status") or {}).get("jobDeploymentStatus") in ("Complete", "Failed")
    return obj if done else None


class Env:
    def __init__(self, api: k8s.ApiClient, op: Operator, standin: KubeRayStandIn) -> None:
        self.api, self.op, self.standin = api, op, standin


@pytest.fixture(scope="module")
def env(
    kube: kubestack.KubeState, stack: StackState, store: Store, tmp_path_factory
) -> Iterator[Env]:
    api = k8s_config.new_client_from_config(config_file=kube.kubeconfig)
    apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    install_kuberay_crds(kube)
    apply(kube, s3_secret(stack, namespace=NS), head_cluster())
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    standin = KubeRayStandIn(
        api, NS, {CLUSTER: stack.ray_dashboard}, {k: stack.env()[k] for k in keys}
    )
    standin.start()
    log = tmp_path_factory.mktemp("operator-kuberay") / "operator.log"
    op = Operator(kube.kubeconfig, free_port(), log, args=("--namespace", NS), env={WATCH_ENV: "1"})
    model = digits_model(
        MODEL,
        stack,
        store,
        namespace=NS,
        ray={"rayJob": {"clusterSelector": {"ray.io/cluster": CLUSTER}}, "maxRetries": 1},
    )
    apply(kube, model)
    op.start()
    try:
        wait_ready(kube, MODEL, NS)
        yield Env(api, op, standin)
    finally:
        op.stop()
        standin.stop()
        print(op.tail())
        print("stand-in hiccups:", standin.hiccups[-5:])
        remove_model(kube, MODEL, NS)
        for kind in ("erasurerequests", "rayjobs", "rayclusters"):
            names = kubectl(kube, "-n", NS, "get", kind, "-o", "name").stdout.split()
            for n in names:  # no finalizer may keep them (no controllers run here)
                kubectl(
                    kube,
                    "-n",
                    NS,
                    "patch",
                    n,
                    "--type=merge",
                    "-p",
                    '{"metadata":{"finalizers":null}}',
                )
            if names:
                kubectl(kube, "-n", NS, "delete", *names, "--wait=false")


def test_model_trains_through_a_rayjob(kube, env: Env, stack: StackState) -> None:
    model = get(kube, "shardedmodel", MODEL, NS)
    sub = f"lethe-train-{model['metadata']['uid']}-0"
    # Ready comes when the checkpoints are in S3, maybe before the job's end is reported
    obj = wait_for("the train RayJob to complete", lambda: finished(env.api, rayjob_name(sub)))
    name = obj["metadata"]["name"]
    assert len(sub) > MAX_NAME and len(name) <= MAX_NAME and DNS1035.match(name)
    assert obj["spec"]["jobId"] == sub and obj["metadata"]["annotations"][SUBMISSION] == sub
    assert obj["spec"]["clusterSelector"] == {"ray.io/cluster": CLUSTER}
    labels = obj["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "lethe"
    assert labels["lethe.dev/model"] == MODEL and labels[SUBMISSION] == sub
    assert labels["lethe.dev/job"] == "train"
    (owner,) = obj["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "ShardedModel",
        MODEL,
        model["metadata"]["uid"],
    )
    # the S3 settings travel in runtimeEnvYAML; the credentials do not
    env_vars = yaml.safe_load(obj["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env_vars["LETHE_S3_ENDPOINT"] == stack.s3_endpoint
    assert not any(k.startswith("AWS_ACCESS") or k.startswith("AWS_SECRET") for k in env_vars)
    assert stack.env()["AWS_SECRET_ACCESS_KEY"] not in json.dumps(obj)
    st = obj["status"]
    assert (st["jobStatus"], st["jobDeploymentStatus"], st["jobId"]) == (
        "SUCCEEDED",
        "Complete",
        sub,
    )
    assert st["startTime"] and st["endTime"]
    assert sub in RayJobs(stack.ray_dashboard, {}).submissions(sub)  # the Ray-side id
    assert env.standin.invalid == []


def test_erasure_through_rayjobs_survives_a_killed_operator(
    kube, env: Env, stack: StackState, store: Store
) -> None:
    subjects = train_subjects(2, offset=20)
    names = ["kr-erase-0", "kr-erase-1"]
    apply(kube, *(erasure_request(n, [s], MODEL, NS) for n, s in zip(names, subjects, strict=True)))
    retrain = "lethe.dev/job=retrain"
    wait_for("the retrain RayJob", lambda: rayjobs(env.api, retrain), timeout=120, every=0.2)
    env.op.kill()  # right after the RayJob was created: the restart must find it
    env.op.start()
    wait_for(
        "success after the restart",
        lambda: all(phase(kube, n, NS) == "Succeeded" for n in names),
        timeout=300,
    )
    statuses = [get(kube, "erasurerequest", n, NS) for n in names]
    (batch,) = {s["status"]["batchId"] for s in statuses}  # one batch, one retrain
    sub = f"lethe-{batch}-0"
    (obj,) = rayjobs(env.api, retrain)  # exactly one RayJob for (batch, attempt 0)
    obj = wait_for("the retrain RayJob to complete", lambda: finished(env.api, sub))
    assert obj["metadata"]["name"] == sub == obj["spec"]["jobId"]  # short enough to keep
    assert {r["uid"] for r in obj["metadata"]["ownerReferences"]} == {
        s["metadata"]["uid"] for s in statuses
    }
    assert all(r["kind"] == "ErasureRequest" for r in obj["metadata"]["ownerReferences"])
    assert obj["status"]["jobStatus"] == "SUCCEEDED"
    # its end was seen on the watch, which woke the model (not its fallback timer)
    wait_for("the watch", lambda: f"RayJob {sub} ended: waking model {MODEL}" in env.op.tail(10**6))
    assert env.standin.submitted.count(sub) == 1
    assert RayJobs(stack.ray_dashboard, {}).submissions(f"lethe-{batch}") == [sub]
    for s in statuses:
        st = s["status"]
        assert verify(store, store.get_json(st["certificate"].split("/", 3)[3])).ok
        assert not any(x in json.dumps(st) for x in subjects)
    assert not any(x in json.dumps(obj) for x in subjects)
    assert env.standin.invalid == []
    # the jobs KubeRay submitted hold no S3 key either (the head's env provides them)
    meta = assert_no_s3_keys_in_ray(stack)
    assert [j for j in meta["jobs"] if j.get("submission_id") == sub]


def test_rayclusterspec_rayjob_reads_credentials_from_the_secret(
    kube, env: Env, stack: StackState
) -> None:
    model = get(kube, "shardedmodel", MODEL, NS)
    cluster = {
        "rayVersion": "2.60.0",
        "headGroupSpec": {
            "rayStartParams": {},
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "ray-head",
                            "image": "lethe:dev",
                            "env": [{"name": "A", "value": "1"}],
                        },
                        {"name": "sidecar", "image": "busybox"},
                    ]
                }
            },
        },
        "workerGroupSpecs": [
            {
                "groupName": "cpu",
                "replicas": 1,
                "minReplicas": 0,
                "maxReplicas": 2,
                "rayStartParams": {},
                "template": {
                    "spec": {"containers": [{"name": "ray-worker", "image": "lethe:dev"}]}
                },
            }
        ],
    }
    s3 = stack.env()
    jobs = KubeRayJobs(
        NS,
        {"rayClusterSpec": cluster},
        {
            k: s3[k]
            for k in (
                "LETHE_S3_ENDPOINT",
                "LETHE_BUCKET",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
            )
        },
        owners=[model],
        model=MODEL,
        credentials_secret="lethe-s3",
        api_client=env.api,
    )
    sub = f"lethe-train-{UID}-7"
    args = ["train", "--model-prefix", "nowhere"]
    first = jobs.ensure(sub, args)  # created through the real API server and CRD schema
    assert first.status == "PENDING"  # nothing runs rayClusterSpec jobs here: no status yet
    assert jobs.ensure(sub, args).status == "PENDING"
    assert jobs.submissions(f"lethe-train-{UID}") == [sub]  # ensured twice, created once
    obj = k8s.CustomObjectsApi(env.api).get_namespaced_custom_object(
        *RAY, NS, "rayjobs", rayjob_name(sub)
    )
    spec = obj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["jobId"] == sub and "clusterSelector" not in spec
    text = json.dumps(obj)
    assert s3["AWS_SECRET_ACCESS_KEY"] not in text
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env_vars == {
        "LETHE_S3_ENDPOINT": s3["LETHE_S3_ENDPOINT"],
        "LETHE_BUCKET": s3["LETHE_BUCKET"],
    }
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    for container in (*head, *worker):  # no value in clear anywhere (the key id is "lethe")
        keys = (s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"])
        assert not any(e.get("value") in keys for e in container.get("env", []))
    for container in (head[0], worker[0]):  # the Ray containers
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
        }
        assert refs == {
            k: {"name": "lethe-s3", "key": k}
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        }
    assert {"name": "A", "value": "1"} in head[0]["env"]  # the user's own env stays
    assert "env" not in head[1]  # a sidecar gets no credentials
    assert [r["uid"] for r in obj["metadata"]["ownerReferences"]] == [model["metadata"]["uid"]]
    k8s.CustomObjectsApi(env.api).delete_namespaced_custom_object(
        *RAY, NS, "rayjobs", rayjob_name(sub)
    )
    # a clusterSelector without KubeRay's key fails at once instead of hanging
    bad = KubeRayJobs(NS, {"clusterSelector": {"app": "x"}}, {}, api_client=env.api)
    got = bad.ensure(f"lethe-train-{UID}-8", args)
    assert got.status == "FAILED" and "ray.io/cluster" in got.message
    assert bad.status(f"lethe-train-{UID}-8") is None  # and nothing was created
    with pytest.raises(ApiException):  # the real RayJob CRD validates the object's types
        k8s.CustomObjectsApi(env.api).create_namespaced_custom_object(
            *RAY,
            NS,
            "rayjobs",
            {**jobs.manifest(sub, args), "spec": {"entrypoint": 3, "jobId": []}},
        )
