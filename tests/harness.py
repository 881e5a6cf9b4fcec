"""Helpers for tests that run the operator as its own process against the real stack
(kube-apiserver + etcd, SeaweedFS, a Ray head)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lethe.core.hashing import is_test_subject
from lethe.datasets import TEST_FRACTION, digits_table
from lethe.store import Store
from lethe_dev import kubestack
from lethe_dev.localstack import StackState

from .conftest import kubectl


class Operator:
    """``python -m lethe_operator`` in a subprocess, logging to ``log``."""

    def __init__(
        self,
        kubeconfig: str,
        port: int,
        log: Path,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig, self.port, self.log = kubeconfig, port, log
        self.args, self.env = args, dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> None:
        self.proc = kubestack.spawn_operator(
            self.kubeconfig, self.port, self.log, self.args, {**self.env, **extra_env}
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def tail(self, chars: int = 5000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def get(kube: kubestack.KubeState, kind: str, name: str, namespace: str = "default") -> dict:
    r = kubectl(kube, "-n", namespace, "get", kind, name, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 240,
    every: float = 1.0,
    state: Callable[[], Any] | None = None,
) -> Any:
    """Poll ``check`` until it returns something true; ``state`` describes the failure."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f": {state()}" if state else ""))


def phase(kube: kubestack.KubeState, name: str, namespace: str = "default") -> str:
    return (get(kube, "erasurerequest", name, namespace).get("status") or {}).get("phase", "")


def apply(kube: kubestack.KubeState, *objs: dict[str, Any]) -> None:
    """``kubectl apply`` of one or more objects in one call."""
    doc = {"apiVersion": "v1", "kind": "List", "items": list(objs)}
    r = kubectl(kube, "apply", "-f", "-", stdin=json.dumps(doc))
    assert r.returncode == 0, r.stderr


def erasure_request(
    name: str,
    subjects: list[str],
    model: str | None = None,
    namespace: str = "default",
    targets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A request for ``subjects`` in ``model``, or in ``targets`` (``{"allModels": True}``,
    ``{"modelSelector": {...}}``) instead."""
    return {
        "apiVersion": "lethe.dev/v1alpha1",
        "kind": "ErasureRequest",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            **(targets or {"modelRef": {"name": model}}),
            "subjects": subjects,
            "reason": "test",
        },
    }


def s3_secret(
    stack: StackState,
    name: str = "lethe-s3",
    namespace: str = "default",
    labelled: bool = True,
    allowed_models: str | None = None,
) -> dict:
    """The stack's S3 keys as a Secret a model may name in ``credentialsSecret``: opted in
    by the namespace's admin (label ``lethe.dev/s3-credentials=true``; ``labelled=False``
    leaves it out), for the models in ``allowed_models`` (the annotation; None: any)."""
    env = stack.env()
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labelled:
        meta["labels"] = {"lethe.dev/s3-credentials": "true"}
    if allowed_models is not None:
        meta["annotations"] = {"lethe.dev/allowed-models": allowed_models}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "stringData": {
            "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        },
    }


def digits_model(
    name: str,
    stack: StackState,
    store: Store,
    namespace: str = "default",
    ray: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    shards: int = 3,
    slices: int = 2,
    **spec: Any,
) -> dict[str, Any]:
    """A small ShardedModel on the built-in digits data (trains in well under a minute);
    ``spec`` adds or replaces top-level spec fields (``certificates=...``)."""
    return {
        "apiVersion": "lethe.dev/v1alpha1",
        "kind": "ShardedModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "storage": {
                "bucket": store.bucket,
                "prefix": f"op-{os.getpid()}-{namespace}",
                "endpoint": stack.s3_endpoint,
                "credentialsSecret": {"name": "lethe-s3"},
            },
            "dataset": {"uri": "builtin:digits"},
            "shards": shards,
            "slices": slices,
            "trainer": {
                "model": "mlp",
                "epochs": 6,
                "hidden": 64,
                "batchSize": 64,
                "learningRate": 0.003,
            },
            "ray": ray or {"address": stack.ray_dashboard, "maxRetries": 1},
            "erasurePolicy": policy
            or {"batchWindowSeconds": 4, "maxBatchSize": 10, "ttlSecondsAfterFinished": 3600},
            **spec,
        },
    }


def condition(obj: dict[str, Any], type_: str) -> str:
    for c in (obj.get("status") or {}).get("conditions", []):
        if c["type"] == type_:
            return str(c["status"])
    return ""


def wait_ready(kube: kubestack.KubeState, model: str, namespace: str = "default") -> None:
    wait_for(
        f"ShardedModel {model} to be Ready",
        lambda: condition(get(kube, "shardedmodel", model, namespace), "Ready") == "True",
        timeout=300,
    )


def remove_model(kube: kubestack.KubeState, model: str, namespace: str = "default") -> None:
    """Delete a ShardedModel without an operator running (drop kopf's finalizer first)."""
    kubectl(
        kube,
        "-n",
        namespace,
        "patch",
        "shardedmodel",
        model,
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":null}}',
    )
    kubectl(kube, "-n", namespace, "delete", "shardedmodel", model, "--wait=false")


@contextmanager
def running(op: Operator) -> Iterator[Operator]:
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(op.tail())


@contextmanager
def serving(
    kube: kubestack.KubeState, op: Operator, model: str, namespace: str = "default"
) -> Iterator[Operator]:
    """The operator running with ``model`` Ready; afterwards the operator is stopped (its
    log tail printed) and the model removed."""
    try:
        with running(op):
            wait_ready(kube, model, namespace)
            yield op
    finally:
        remove_model(kube, model, namespace)


def train_subjects(n: int, offset: int = 0) -> list[str]:
    """``n`` subjects of the digits training split (not the test split), stable order."""
    table, _ = digits_table()
    subs = sorted(
        {s for s in table.column("subject_id").to_pylist() if not is_test_subject(s, TEST_FRACTION)}
    )
    assert offset + n <= len(subs)
    return subs[offset : offset + n]


def records_of(subjects: list[str]) -> list[str]:
    """The digits record ids these subjects own."""
    table, _ = digits_table()
    wanted = set(subjects)
    ids, owners = table.column("record_id").to_pylist(), table.column("subject_id").to_pylist()
    return [r for r, s in zip(ids, owners, strict=True) if s in wanted]


def versions_holding(store: Store, prefix: str, ids: set[str]) -> list[str]:
    """Every object version under ``prefix`` that still holds one of ``ids``: Parquet
    files decoded (every column of strings), everything else but checkpoints as bytes."""
    from lethe import dataio

    found = []
    for key, version, is_marker in store.list_versions(prefix):
        if is_marker or key.endswith(".pt"):
            continue
        body = store.get_version(key, version)
        if key.endswith(".parquet"):
            table = dataio.decode(body)
            values = {
                v
                for name in table.column_names
                if str(table.schema.field(name).type) in ("string", "large_string")
                for v in table.column(name).to_pylist()
            }
            hit = bool(values & ids)
        else:
            hit = any(i.encode() in body for i in ids)
        if hit:
            found.append(f"{key}@{version}")
    return found


def events_of(kube: kubestack.KubeState, name: str, namespace: str = "default") -> list[dict]:
    r = kubectl(
        kube,
        "-n",
        namespace,
        "get",
        "events",
        "--field-selector",
        f"involvedObject.name={name}",
        "-o",
        "json",
    )
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout)["items"])


def exists(kube: kubestack.KubeState, kind: str, name: str, namespace: str = "default") -> bool:
    return kubectl(kube, "-n", namespace, "get", kind, name).returncode == 0


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a /metrics page (None if it is not there)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _plain(obj: Any) -> Any:
    """A state API record as JSON-able data (dataclasses and pydantic models alike)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    for method in ("model_dump", "dict"):
        if hasattr(obj, method):
            return getattr(obj, method)()
    return obj


def ray_metadata(stack: StackState) -> dict[str, list[Any]]:
    """Everything Ray shows about its jobs, actors and tasks, read back as anyone who can
    reach the dashboard would: the state API (detail, runtime_env included) and the Jobs
    REST API."""
    from ray.util import state

    address = stack.ray_dashboard
    limit = {"address": address, "detail": True, "limit": 10_000, "timeout": 60}
    with urllib.request.urlopen(f"{address}/api/jobs/", timeout=30) as r:
        rest = json.loads(r.read())
    return {
        "jobs": [_plain(j) for j in state.list_jobs(**limit, raise_on_missing_output=False)],
        "actors": [_plain(a) for a in state.list_actors(**limit, raise_on_missing_output=False)],
        "tasks": [_plain(t) for t in state.list_tasks(**limit, raise_on_missing_output=False)],
        "rest_jobs": list(rest),
    }


def assert_no_s3_keys_in_ray(stack: StackState) -> dict[str, list[Any]]:
    """Neither S3 key (nor a variable named for one) in any job's, actor's or task's
    metadata on the stack's Ray head; returns what was read, for further checks."""
    meta = ray_metadata(stack)
    env = stack.env()
    for what, records in meta.items():
        text = json.dumps(records, default=str)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name] not in text, f"the S3 key {name} is in Ray's {what} metadata"
            assert name not in text, f"a variable {name} is in Ray's {what} metadata"
    return meta
