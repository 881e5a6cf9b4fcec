"""Credentials never leave the operator's control (issue 9, parts 1-3), on the real stack:
kube-apiserver + etcd, SeaweedFS, a Ray head and the operator as its own process.

- A model uses only S3 credentials its own namespace grants (a Secret it names,
  labelled ``lethe.dev/s3-credentials=true``, optionally annotated
  ``lethe.dev/allowed-models``), never the operator's own: the operator here runs with the
  stack's keys in its environment, and a model that names no Secret is still refused.
- A model's Ray address must be on the operator's allow-list (``LETHE_RAY_ADDRESSES``).
- A refused model reaches neither its S3 endpoint nor Ray: local listeners posing as
  both count every connection, and must count none (a model that is allowed, pointed at
  a listener of its own, shows that the listeners do see what arrives).
- No S3 key is in any Ray job's, actor's or task's metadata (read back through Ray's
  state API and the Jobs REST API); the workers read the keys from the Ray head's own
  environment. The operator's own erasure through the Jobs API is scanned the same way in
  ``test_operator.py`` (``assert_no_s3_keys_in_ray`` after its erasure).
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from lethe.generations import read_live
from lethe.store import Store
from lethe.training import RayTrainer
from lethe_dev import kubestack
from lethe_dev.localstack import (
    TENANT_ACCESS_KEY,
    TENANT_BUCKET,
    TENANT_SECRET_KEY,
    StackState,
    free_port,
)
from lethe_operator.context import (
    ModelContext,
)
from lethe_operator.raylaunch import RayJobs
from lethe_operator.spec import ModelSpec

from .conftest import ingest_small, small_table, trained_small, unique_model
from .harness import (
    Operator,
    apply,
    assert_no_s3_keys_in_ray,
    digits_model,
    erasure_request,
    get,
    remove_model,
    running,
    s3_secret,
    wait_for,
)
from .unit.test_spec import MINIMAL, spec_schema, with_defaults

# the local API server's self-signed certificate (insecure-skip-tls-verify)
pytestmark = pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
NS, OTHER = "sec-a", "sec-b"
REFUSALS = {
    "NoCredentials",
    "CredentialsNotAllowed",
    "CredentialsSecretNotFound",
    "CredentialsSecretForbidden",
    "CredentialsSecretInvalid",
    "RayAddressNotAllowed",
}


class Listener:
    """A TCP listener on a free loopback port that counts the connections it gets (and
    closes each at once, so that a client fails fast instead of waiting)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)
        self.sock.close()


# -- the Ray head: the keys are its own, the jobs' metadata holds none ----------------------
def test_ray_head_runs_with_the_keys_and_in_process_training_shows_none(
    stack: StackState, store: Store
) -> None:
    environ = Path(f"/proc/{stack.ray_pid}/environ").read_bytes().split(b"\0")
    env = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    assert {k: env.get(k) for k in keys} == {k: stack.env()[k] for k in keys}
    # a driver in this process (the CLI's and the engine's path) trains through the head:
    # its workers reach SeaweedFS with the head's keys, its runtime_env has none
    trainer = RayTrainer(store.settings)
    layout, _, _ = trained_small(store, trainer, shards=1, slices=1, epochs=1)
    assert read_live(store, layout).generation.shards[0].trained
    meta = assert_no_s3_keys_in_ray(stack)
    drivers = [
        j
        for j in meta["jobs"]
        if ((j.get("runtime_env") or {}).get("env_vars") or {}).get("LETHE_BUCKET") == store.bucket
    ]
    assert drivers, "no job with the public S3 settings: the scan read no runtime_env"
    assert meta["actors"], "no actor read back: the scan saw nothing"


# -- the operator refuses, and nothing leaves it ----------------------------------------------
@pytest.fixture(scope="module")
def operator(
    kube: kubestack.KubeState, stack: StackState, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    for ns in (NS, OTHER):
        apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    log = tmp_path_factory.mktemp("operator-security") / "operator.log"
    # the operator's own environment holds the stack's S3 keys (inherited, as AWS_*):
    # no model may ever use them
    op = Operator(kube.kubeconfig, free_port(), log, args=("--namespace", NS, "--namespace", OTHER))
    with running(op):
        yield op


def ready(kube: kubestack.KubeState, name: str) -> dict[str, Any]:
    conds = (get(kube, "shardedmodel", name, NS).get("status") or {}).get("conditions", [])
    return next((c for c in conds if c["type"] == "Ready"), {})


def test_models_that_ask_for_what_they_were_not_granted_are_refused(
    kube: kubestack.KubeState, operator: Operator, stack: StackState, store: Store
) -> None:
    secrets = [
        s3_secret(stack, "unlabelled", NS, labelled=False),
        s3_secret(stack, "for-others", NS, allowed_models="someone-else, another"),
        s3_secret(stack, "for-b-only", OTHER),  # labelled, but in another namespace
        s3_secret(stack, "granted", NS, allowed_models="control-named, ray-elsewhere"),
        s3_secret(stack, "granted-all", NS, allowed_models="*"),
        s3_secret(stack, "no-keys", NS) | {"stringData": {"AWS_ACCESS_KEY_ID": "x"}},
    ]
    # model -> (its credentialsSecret, the reason it must get; None: allowed)
    cases: dict[str, tuple[str | None, str | None]] = {
        "no-secret": (None, "NoCredentials"),
        "unlabelled": ("unlabelled", "CredentialsNotAllowed"),
        "not-named": ("for-others", "CredentialsNotAllowed"),
        "other-namespace": ("for-b-only", "CredentialsSecretNotFound"),
        "missing": ("does-not-exist", "CredentialsSecretNotFound"),
        "no-keys": ("no-keys", "CredentialsSecretInvalid"),
        "ray-elsewhere": ("granted", "RayAddressNotAllowed"),
        "control-named": ("granted", None),
        "control-all": ("granted-all", None),
    }
    s3 = {name: Listener() for name in cases}  # each model's own "S3 endpoint"
    ray_listener = Listener()  # the Ray address outside the allow-list
    models = []
    try:
        for name, (secret, _) in cases.items():
            model = digits_model(name, stack, store, namespace=NS)
            storage = model["spec"]["storage"]
            storage["endpoint"] = s3[name].url
            if secret:
                storage["credentialsSecret"] = {"name": secret}
            else:
                del storage["credentialsSecret"]
            if name == "ray-elsewhere":
                model["spec"]["ray"] = {"address": ray_listener.url, "maxRetries": 0}
            models.append(model)
        apply(kube, *secrets, *models)
        refused = {n: r for n, (_, r) in cases.items() if r}
        wait_for(
            "every refusal",
            lambda: all(ready(kube, n).get("reason") == r for n, r in refused.items()),
            timeout=90,
            state=lambda: {n: ready(kube, n).get("reason") for n in cases},
        )
        # the controls, allowed, went to their endpoints: the listeners see what arrives
        wait_for(
            "the allowed models to reach their S3 endpoints",
            lambda: all(s3[n].connections for n, (_, r) in cases.items() if r is None),
            timeout=90,
        )
        for name, (_, reason) in cases.items():
            cond = ready(kube, name)
            if reason is None:
                assert cond.get("reason") not in REFUSALS, (name, cond)
                continue
            assert cond["status"] == "False" and cond["reason"] == reason, (name, cond)
            text = json.dumps(get(kube, "shardedmodel", name, NS).get("status"))
            assert stack.env()["AWS_SECRET_ACCESS_KEY"] not in text
            assert s3[name].connections == 0, f"{name} reached its S3 endpoint"
        assert "not labelled lethe.dev/s3-credentials=true" in ready(kube, "unlabelled")["message"]
        assert "does not name ShardedModel not-named" in ready(kube, "not-named")["message"]
        assert ray_listener.connections == 0, "a refused Ray address got a connection"
        # and no Ray job was submitted for any refused model (to the allowed head either)
        submitted = RayJobs(stack.ray_dashboard, {}).submissions("lethe-train-")
        for name in refused:
            uid = get(kube, "shardedmodel", name, NS)["metadata"]["uid"]
            assert not [s for s in submitted if uid in s], name
        # granting the Secret later lifts the refusal (no restart, no cached verdict)
        apply(kube, s3_secret(stack, "unlabelled", NS))
        wait_for("the refusal to lift", lambda: s3["unlabelled"].connections > 0, timeout=60)
    finally:
        for name in cases:
            remove_model(kube, name, NS)
        for listener in (*s3.values(), ray_listener):
            listener.close()


def test_a_dataset_the_models_keys_cannot_read_is_never_ingested(
    kube: kubestack.KubeState, operator: Operator, stack: StackState, store: Store
) -> None:
    """The ingest job reads with the Ray cluster's keys, which reach every bucket here; a
    model whose own (granted) keys reach only ``lethe-tenant`` names a dataset in the
    stack's bucket: refused naming ``dataset.uri``, no job submitted, nothing written
    for it. The control, the same model with its dataset in its own bucket, is ingested."""
    own = store.for_bucket(TENANT_BUCKET)
    own.ensure_bucket(versioning=True)
    root = unique_model("foreign")
    buf = io.BytesIO()
    pq.write_table(small_table(subjects=30, per_subject=4), buf)
    store.put(f"{root}/data.parquet", buf.getvalue())  # the stack's bucket: not the tenant's
    own.put(f"{root}/data.parquet", buf.getvalue())
    secret = s3_secret(stack, "tenant-keys", NS)
    secret["stringData"] = {
        "AWS_ACCESS_KEY_ID": TENANT_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TENANT_SECRET_KEY,
    }
    sources = {
        "foreign-data": f"s3://{store.bucket}/{root}/data.parquet",
        "own-data": f"s3://{TENANT_BUCKET}/{root}/data.parquet",
    }
    models = []
    for name, uri in sources.items():
        model = digits_model(name, stack, store, namespace=NS)
        model["spec"]["storage"] |= {
            "bucket": TENANT_BUCKET,
            "credentialsSecret": {"name": "tenant-keys"},
        }
        model["spec"]["dataset"] = {"uri": uri}
        models.append(model)
    try:
        apply(kube, secret, *models)
        wait_for(
            "the foreign dataset refused and the own one ingested",
            lambda: (
                ready(kube, "foreign-data").get("reason") == "IngestFailed"
                and (get(kube, "shardedmodel", "own-data", NS).get("status") or {})
                .get("ingest", {})
                .get("job")
            ),
            timeout=90,
            state=lambda: {n: ready(kube, n) for n in sources},
        )
        message = ready(kube, "foreign-data")["message"]
        assert message.startswith(
            "SourceError: dataset.uri: the model's S3 credentials may not read"
        )
        uid = get(kube, "shardedmodel", "foreign-data", NS)["metadata"]["uid"]
        submitted = RayJobs(stack.ray_dashboard, {}).submissions("lethe-ingest-")
        assert not [s for s in submitted if uid in s]
        prefix = models[0]["spec"]["storage"]["prefix"]
        written = [k for k in own.list_keys(f"{prefix}/") if "foreign-data" in k]
        assert not [k for k in written if "ingest" in k]  # not even a request
        assert len(store.versions_of(f"{root}/data.parquet")) == 1  # the data untouched
    finally:
        for name in sources:
            remove_model(kube, name, NS)


def test_holds_of_requests_that_are_gone_are_released_and_no_others(
    kube: kubestack.KubeState, store: Store
) -> None:
    """A request deleted while its model was refused (its finalizer could not reach S3)
    leaves its quarantine hold behind; the model's tick releases it once the model is
    allowed again. A hold whose request exists stays, even when the request appeared
    after the tick's first listing (the second listing, after the read, finds it)."""
    from kubernetes import config

    from lethe.erasure import hold_shards
    from lethe_operator.control import release_orphaned_holds
    from lethe_operator.erasures import holder

    config.load_kube_config(config_file=kube.kubeconfig)
    ns = "sec-orphans"  # no operator watches it: the objects stay as written
    apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    apply(kube, erasure_request("still-here", ["orphan-test-subject"], "m", namespace=ns))
    uid = get(kube, "erasurerequest", "still-here", ns)["metadata"]["uid"]
    layout, _cfg, _table = ingest_small(store)
    hold_shards(store, layout, holder(uid), [0])
    hold_shards(store, layout, holder("a-request-deleted-long-ago"), [0, 1])
    spec = ModelSpec.parse(with_defaults(MINIMAL, spec_schema()))
    ctx = ModelContext(ns, "m", "uid-m", spec, store, layout)
    live = read_live(store, layout).generation
    assert release_orphaned_holds(ctx, live, requests=[])  # first listing: empty
    after = read_live(store, layout).generation
    assert after.quarantine.get(0) == [holder(uid)] and not after.quarantine.get(1)
    assert not release_orphaned_holds(ctx, after, requests=[])  # nothing left to release
