"""`helm install` of charts/lethe into a real kube-apiserver, then the operator run
here with the chart's ServiceAccount token (not an admin kubeconfig) completes an
ErasureRequest end to end; the same token is refused what the operator does not need;
`helm uninstall` leaves the CRDs.

The apiserver is this module's own (etcd + kube-apiserver, like the session's `kube`):
the chart must create the CRDs and `helm uninstall` must leave them, which the shared
apiserver, where other modules keep CRs, cannot show. S3 and Ray are the session's.
There is no kubelet: the Deployment never runs a pod; the operator runs here instead,
with the Deployment's own arguments."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lethe.store import Store
from lethe.verify import verify
from lethe_dev import kubestack
from lethe_dev.localstack import StackState, free_port

from .conftest import kubectl
from .harness import (
    Operator,
    apply,
    digits_model,
    get,
    phase,
    remove_model,
    running,
    s3_secret,
    train_subjects,
    wait_for,
    wait_ready,
)
from .test_chart import CHART, run_helm

RELEASE, SYSTEM, TEAM, OTHER = "lethe", "lethe-system", "team-a", "team-b"
MODEL = "digits-helm"
CRDS = ("shardedmodels.lethe.dev", "erasurerequests.lethe.dev")


@dataclass
class Installed:
    kube: kubestack.KubeState
    home: Path  # helm's config/cache/data
    sa_kubeconfig: str  # the chart's ServiceAccount token, nothing else


def helm(inst: Installed, *args: str) -> str:
    r = run_helm(*args, "--kubeconfig", inst.kube.kubeconfig, home=inst.home)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def installed(
    stack: StackState, store: Store, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    state = tmp_path_factory.mktemp("helm-kube")
    kube = kubestack.start(state)
    try:
        # start from a cluster without Lethe: the release must bring the CRDs
        r = kubectl(kube, "delete", "crd", *CRDS, "--wait=true")
        assert r.returncode == 0, r.stderr
        for ns in (SYSTEM, TEAM, OTHER):
            assert kubectl(kube, "create", "namespace", ns).returncode == 0
        values = {
            "watchNamespaces": [TEAM],
            # the one Ray Jobs API the model may use (a trailing slash does not matter)
            "operator": {"rayAddresses": [stack.ray_dashboard + "/"]},
            "exampleModel": {
                "enabled": True,
                "name": MODEL,
                "namespace": TEAM,
                "spec": digits_model(
                    MODEL,
                    stack,
                    store,
                    TEAM,
                    # a short TTL, so the operator's delete of finished requests runs too
                    policy={
                        "batchWindowSeconds": 2,
                        "maxBatchSize": 10,
                        "ttlSecondsAfterFinished": 5,
                    },
                )["spec"],
            },
        }
        vals = state / "values.json"
        vals.write_text(json.dumps(values))
        home = state / "helm"
        # the model's S3 credentials must be there before the model
        r = kubectl(kube, "apply", "-f", "-", stdin=json.dumps(s3_secret(stack, "lethe-s3", TEAM)))
        assert r.returncode == 0, r.stderr
        inst = Installed(kube, home, str(state / "sa-kubeconfig"))
        helm(inst, "install", RELEASE, str(CHART), "-n", SYSTEM, "-f", str(vals))
        token = kubectl(kube, "-n", SYSTEM, "create", "token", "lethe", "--duration=2h")
        assert token.returncode == 0, token.stderr
        kubestack.write_kubeconfig(
            Path(inst.sa_kubeconfig), kube.server, token.stdout.strip(), user="lethe-operator"
        )
        yield inst
    finally:
        remove_model(kube, MODEL, TEAM)
        kubestack.stop(state)


def test_install_creates_everything(installed: Installed) -> None:
    kube = installed.kube
    for crd in CRDS:
        r = kubectl(kube, "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        assert r.returncode == 0, r.stderr
    dep = get(kube, "deployment", "lethe", SYSTEM)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    for kind, name, ns in [
        ("serviceaccount", "lethe", SYSTEM),
        ("service", "lethe-metrics", SYSTEM),
        ("clusterrole", "lethe", ""),
        ("clusterrolebinding", "lethe", ""),
        ("role", "lethe", TEAM),
        ("rolebinding", "lethe", TEAM),
        ("shardedmodel", MODEL, TEAM),
    ]:
        args = ["get", kind, name] + (["-n", ns] if ns else [])
        r = kubectl(kube, *args)
        assert r.returncode == 0, f"{kind}/{name}: {r.stderr}"
    r = kubectl(kube, "-n", SYSTEM, "get", "configmap", "-l", "grafana_dashboard=1", "-o", "json")
    cms = json.loads(r.stdout)["items"]
    assert len(cms) == len(list((CHART / "dashboards").glob("*.json")))
    assert (
        json.loads(helm(installed, "status", RELEASE, "-n", SYSTEM, "-o", "json"))["info"]["status"]
        == "deployed"
    )


def _sa(installed: Installed, *args: str) -> tuple[int, str]:
    """kubectl as the operator's ServiceAccount."""
    r = subprocess.run(
        ["kubectl", "--kubeconfig", installed.sa_kubeconfig, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.returncode, r.stdout + r.stderr


def test_operator_with_the_service_account_completes_an_erasure(
    installed: Installed, stack: StackState, store: Store, tmp_path: Path
) -> None:
    kube = installed.kube
    # the Deployment's own arguments (its namespaces); metrics stay on a free local port
    container = get(kube, "deployment", "lethe", SYSTEM)["spec"]["template"]["spec"]["containers"][
        0
    ]
    args = tuple(a for a in container["args"] if a.startswith("--namespace"))
    assert args == (f"--namespace={TEAM}",)
    # and its Ray allow-list, from the chart's values (no S3 keys of its own in its env)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LETHE_RAY_ADDRESSES"] == stack.ray_dashboard + "/"
    assert not [k for k in env if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    assert _sa(installed, "auth", "whoami")[1].count(f"system:serviceaccount:{SYSTEM}:lethe")
    log = tmp_path / "operator.log"
    subjects = train_subjects(2, offset=60)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "erase-list", "namespace": TEAM},
        "stringData": {"subjects": "\n".join(subjects) + "\n"},
    }
    request = {
        "apiVersion": "lethe.dev/v1alpha1",
        "kind": "ErasureRequest",
        "metadata": {"name": "erase-helm", "namespace": TEAM},
        "spec": {"modelRef": {"name": MODEL}, "secretRef": {"name": "erase-list"}},
    }
    ray_env = {"LETHE_RAY_ADDRESSES": env["LETHE_RAY_ADDRESSES"]}
    with running(Operator(installed.sa_kubeconfig, free_port(), log, args=args, env=ray_env)) as op:
        wait_ready(kube, MODEL, TEAM)
        apply(kube, secret, request)
        wait_for(
            "Succeeded",
            lambda: phase(kube, "erase-helm", TEAM) in ("Succeeded", "Failed"),
            timeout=300,
        )
        st = get(kube, "erasurerequest", "erase-helm", TEAM)["status"]
        assert st["phase"] == "Succeeded", st
        assert st["affectedRecords"] > 0
        assert verify(store, store.get_json(st["certificate"].split("/", 3)[3])).ok
        # Events were posted (RBAC: events create in the watched namespace)
        events = kubectl(kube, "-n", TEAM, "get", "events", "-o", "json")
        reasons = {e["reason"] for e in json.loads(events.stdout)["items"]}
        assert {"Quarantined", "BatchSucceeded"} <= reasons, reasons
        # and the finished request is deleted after the model's TTL (RBAC: delete)
        wait_for(
            "the request deleted after its TTL",
            lambda: kubectl(kube, "-n", TEAM, "get", "erasurerequest", "erase-helm").returncode,
            timeout=90,
        )
        assert f'namespace="{TEAM}",result="succeeded"' in op.metrics()
    text = log.read_text(errors="replace")
    for refusal in ("forbidden", "not enough permissions"):
        assert refusal not in text.lower(), op.tail()


def test_the_token_is_refused_what_the_operator_does_not_need(installed: Installed) -> None:
    kube = installed.kube
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "not-yours", "namespace": OTHER},
        "stringData": {"password": "x"},
    }
    assert kubectl(kube, "apply", "-f", "-", stdin=json.dumps(secret)).returncode == 0
    # what it needs
    assert _sa(installed, "-n", TEAM, "get", "secret", "lethe-s3")[0] == 0
    assert _sa(installed, "-n", TEAM, "get", "shardedmodels")[0] == 0
    # what it does not
    refused = [
        ("-n", OTHER, "get", "secret", "not-yours"),  # Secrets of another namespace
        ("-n", SYSTEM, "get", "secret", "anything"),  # not even its own namespace's
        ("-n", TEAM, "get", "secrets"),  # list Secrets where it may get one
        ("get", "secrets", "-A"),
        ("-n", OTHER, "get", "shardedmodels"),  # models outside watchNamespaces
        ("-n", TEAM, "get", "pods"),
        ("-n", TEAM, "get", "configmaps"),
    ]
    for args in refused:
        rc, out = _sa(installed, *args)
        assert rc != 0 and "forbidden" in out.lower(), (args, out)
    for verb, what, ns in [
        ("delete", "shardedmodels", TEAM),
        ("create", "shardedmodels", TEAM),
        ("update", "erasurerequests", TEAM),
        ("create", "pods", TEAM),
        ("create", "rayjobs.ray.io", OTHER),
        ("delete", "events", TEAM),
        ("create", "secrets", TEAM),
        ("patch", "customresourcedefinitions", ""),
        ("get", "nodes", ""),
    ]:
        args = ["auth", "can-i", verb, what] + (["-n", ns] if ns else [])
        rc, out = _sa(installed, *args)
        assert out.strip().startswith("no"), (verb, what, ns, out)


def test_uninstall_leaves_the_crds(installed: Installed) -> None:
    kube = installed.kube
    helm(installed, "uninstall", RELEASE, "-n", SYSTEM)
    remove_model(kube, MODEL, TEAM)  # the operator's finalizer stays: no operator now
    for kind, name, ns in [
        ("deployment", "lethe", SYSTEM),
        ("serviceaccount", "lethe", SYSTEM),
        ("clusterrole", "lethe", ""),
        ("role", "lethe", TEAM),
    ]:
        args = ["get", kind, name] + (["-n", ns] if ns else [])
        assert kubectl(kube, *args).returncode != 0, f"{kind}/{name} left behind"
    for crd in CRDS:
        assert kubectl(kube, "get", "crd", crd).returncode == 0, f"{crd} removed"
    wait_for(
        "the example model gone with the release",
        lambda: kubectl(kube, "-n", TEAM, "get", "shardedmodel", MODEL).returncode,
        timeout=30,
        every=0.5,
    )
