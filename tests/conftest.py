"""Shared fixtures: one real local stack (SeaweedFS + Ray head) for the whole session.

Nothing is mocked: S3 is SeaweedFS with bucket versioning on, training is Ray Train
on a local Ray head. Each test works on its own model prefix.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from lethe.certs import Keys
from lethe.core.config import ModelConfig, TrainerConfig
from lethe.core.hashing import is_test_subject, shard_of, slice_of
from lethe.ingest import ingest_table
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store
from lethe.training import RayTrainer, train_model
from lethe_dev import kubestack, localstack

_names = itertools.count()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> localstack.StackState:
    state = tmp_path_factory.mktemp("stack")
    # also the models' signing and HMAC keys: subprocesses (the CLI, the operator, Ray
    # jobs started from here) inherit LETHE_KEYS_DIR with the rest of the stack's env
    st = localstack.up(state, bucket="lethe-test", num_cpus=2)
    yield st
    localstack.down(state)


@pytest.fixture(scope="session")
def keys(stack: localstack.StackState) -> Keys:
    return Keys.load(os.environ["LETHE_KEYS_DIR"])


@pytest.fixture(scope="session")
def store(stack: localstack.StackState) -> Store:
    s = Store(S3Settings.from_env())
    s.ensure_bucket(versioning=True)
    return s


@pytest.fixture(scope="session")
def trainer(store: Store) -> RayTrainer:
    return RayTrainer(store.settings)


def unique_model(prefix: str = "m") -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


def small_table(
    subjects: int = 60, per_subject: int = 6, features: int = 6, classes: int = 3, seed: int = 0
) -> pa.Table:
    """Gaussian blobs, one class centre per label; every subject owns ``per_subject`` rows."""
    rng = np.random.default_rng(seed)
    n = subjects * per_subject
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 3, (classes, features))
    x = centres[y] + rng.normal(0, 1, (n, features))
    cols: dict[str, Any] = {
        "record_id": [f"rec-{i:05d}" for i in range(n)],
        "subject_id": [f"subj-{i // per_subject:04d}" for i in range(n)],
        "label": [f"class-{c}" for c in y],
    }
    for j in range(features):
        cols[f"x{j}"] = x[:, j].astype(np.float32)
    return pa.table(cols)


def small_config(name: str, shards: int = 2, slices: int = 3, **trainer: Any) -> ModelConfig:
    t = {
        "model": "mlp",
        "epochs": 4,
        "batch_size": 16,
        "hidden": 16,
        "seed": 1,
        "learning_rate": 5e-3,
        **trainer,
    }
    return ModelConfig(name=name, shards=shards, slices=slices, trainer=TrainerConfig(**t))


def training_subjects(table: pa.Table, cfg: ModelConfig) -> list[str]:
    """Subjects in the training split, sorted by (shard, slice, id)."""
    subs = sorted(
        {
            s
            for s in table.column("subject_id").to_pylist()
            if not is_test_subject(s, cfg.test_fraction)
        }
    )
    return sorted(subs, key=lambda s: (shard_of(s, cfg.shards), slice_of(s, cfg.slices), s))


def ingest_small(
    store: Store, name: str | None = None, table: pa.Table | None = None, **cfg: Any
) -> tuple[ModelLayout, ModelConfig, pa.Table]:
    name = name or unique_model()
    table = table if table is not None else small_table()
    config = small_config(name, **cfg)
    layout = ModelLayout.of(name)
    ingest_table(store, layout, table, config)
    return layout, config, table


def trained_small(
    store: Store, trainer: RayTrainer, **cfg: Any
) -> tuple[ModelLayout, ModelConfig, pa.Table]:
    layout, config, table = ingest_small(store, **cfg)
    train_model(store, layout, trainer)
    return layout, config, table


def lethe_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a fresh process (the stack's env is inherited)."""
    return subprocess.run(
        [sys.executable, "-m", "lethe.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).parent.parent,
    )


def all_versions(store: Store, prefix: str) -> list[tuple[str, str, bool]]:
    return list(store.list_versions(prefix))


# -- no subject or record id anywhere in Kubernetes ----------------------------------------
# Every id an ErasureRequest ever named on the test apiserver (its spec, or the Secret its
# secretRef names, every version of it) is collected while the session runs, by watches
# that see each object however briefly it lived; tests add ids they use otherwise with
# ``remember_ids``. When the session ends, every ErasureRequest and ShardedModel (their
# metadata, annotations, labels, status), every Event in every namespace and every
# operator log the tests wrote are searched for each of them: one hit fails the run.
PRIVATE_IDS: set[str] = set()
ID_WATCH: list[IdWatch] = []  # the session's watch, once the kube stack is up
# ids shorter than this are not searched for: "a" or "r1" would match ordinary words
MIN_SCANNED_ID = 6
# where a request's ids legitimately are: its spec, and kubectl's client-side copy of
# the spec that ``kubectl apply`` writes (the operator neither writes nor reads it)
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def remember_ids(*ids: str) -> None:
    """Ids a test put in a request some other way than its spec (a Secret, say)."""
    PRIVATE_IDS.update(ids)


def id_lines(text: str) -> list[str]:
    """The ids of a subjects list (one a line; blank lines and '#' comments skipped)."""
    return [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]


class IdWatch:
    """Watches ErasureRequests and Secrets on an apiserver and keeps every id any
    request named, whatever became of the request or the Secret later."""

    def __init__(self, kubeconfig: str) -> None:
        import threading
        import warnings

        from kubernetes import config

        # the local apiserver's self-signed certificate (insecure-skip-tls-verify)
        warnings.filterwarnings("ignore", message="Unverified HTTPS request")

        self.api = config.new_client_from_config(config_file=kubeconfig)
        self.ids: set[str] = set()
        self.refs: set[tuple[str, str, str]] = set()  # (namespace, Secret, key) of requests
        self.secrets: dict[tuple[str, str], list[dict[str, str]]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(kind,), daemon=True, name=f"ids-{kind}")
            for kind in ("requests", "secrets")
        ]
        for t in self.threads:
            t.start()

    def _list(self, kind: str, **kw: Any) -> Any:
        """The list call a watch runs (``kw``: watch=True and the rest from ``Watch``);
        objects come back as plain dicts either way."""
        from kubernetes import client

        if kind == "requests":
            return client.CustomObjectsApi(self.api).list_cluster_custom_object(
                "lethe.dev", "v1alpha1", "erasurerequests", **kw
            )
        return client.CoreV1Api(self.api).list_secret_for_all_namespaces(**kw)

    def _listed(self, kind: str) -> dict[str, Any]:
        if kind == "requests":
            return dict(self._list(kind))
        return dict(json.loads(self._list(kind, _preload_content=False).data))

    def _seen(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace", "")
        if kind == "requests":
            spec = obj.get("spec") or {}
            with self.lock:
                self.ids.update(str(i) for i in spec.get("subjects") or [])
                self.ids.update(str(i) for i in spec.get("recordIds") or [])
                ref = spec.get("secretRef") or {}
                if ref.get("name"):
                    self.refs.add((ns, ref["name"], ref.get("key") or "subjects"))
            return
        import base64

        data = obj.get("data") or {}
        decoded = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        with self.lock:
            self.secrets.setdefault((ns, meta.get("name", "")), []).append(decoded)

    def _run(self, kind: str) -> None:
        from kubernetes import watch

        version = None
        while not self.stopping.is_set():
            try:
                if version is None:
                    listed = self._listed(kind)
                    for obj in listed["items"]:
                        self._seen(kind, obj)
                    version = listed["metadata"]["resourceVersion"]
                # a function without a docstring: Watch hands back plain dicts
                for ev in watch.Watch().stream(
                    lambda **kw: self._list(kind, **kw),
                    resource_version=version,
                    timeout_seconds=5,
                ):
                    if ev["type"] == "ERROR":
                        version = None  # too old (410 Gone): list again
                        break
                    obj = ev["raw_object"]
                    self._seen(kind, obj)
                    version = obj["metadata"]["resourceVersion"]
                    if self.stopping.is_set():
                        break
            except Exception as e:  # not installed yet (404), a dropped connection
                if getattr(e, "status", None) == 410:
                    version = None
                self.stopping.wait(1)

    def collected(self) -> set[str]:
        """Every id seen, plus those of the requests on the apiserver now."""
        try:
            for obj in self._listed("requests")["items"]:
                self._seen("requests", obj)
        except Exception:  # the CRDs were never installed
            pass
        with self.lock:
            ids = set(self.ids)
            for ns, name, key in self.refs:
                for data in self.secrets.get((ns, name), []):
                    ids.update(id_lines(data.get(key, "")))
        return ids

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=15)


def _without_spec_copies(obj: dict[str, Any]) -> dict[str, Any]:
    """An ErasureRequest without where its ids belong: its spec, kubectl's copy of it
    and the apiserver's field ownership of it (a set list's values are listed there)."""
    obj = json.loads(json.dumps(obj))
    obj.pop("spec", None)
    meta = obj.get("metadata") or {}
    (meta.get("annotations") or {}).pop(LAST_APPLIED, None)
    for entry in meta.get("managedFields") or []:
        fields = entry.get("fieldsV1") or {}
        fields.pop("f:spec", None)
        (fields.get("f:metadata", {}).get("f:annotations") or {}).pop(f"f:{LAST_APPLIED}", None)
    return obj


def id_pattern(ids: set[str]) -> re.Pattern[str] | None:
    """A regex for any of ``ids`` as a whole token (not inside a longer name such as
    ``erase-person-0001`` or ``img-000171``); ids under MIN_SCANNED_ID are left out."""
    wanted = sorted((i for i in ids if len(i) >= MIN_SCANNED_ID), key=len, reverse=True)
    if not wanted:
        return None
    alternatives = "|".join(re.escape(i) for i in wanted)
    return re.compile(rf"(?<![A-Za-z0-9_-])(?:{alternatives})(?![A-Za-z0-9_-])")


def find_ids(api: Any, ids: set[str], logs: list[Path]) -> list[str]:
    """Where any of ``ids`` appears: every ErasureRequest (all but its spec) and
    ShardedModel, every Event of every namespace, and the ``logs``. Each finding names
    the place and the id."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    pattern = id_pattern(ids)
    if pattern is None:
        return []
    found: list[str] = []

    def look(where: str, text: str) -> None:
        found.extend(f"{where}: {m}" for m in sorted(set(pattern.findall(text))))

    custom = client.CustomObjectsApi(api)
    for plural in ("erasurerequests", "shardedmodels"):
        try:
            items = custom.list_cluster_custom_object("lethe.dev", "v1alpha1", plural)["items"]
        except ApiException as e:
            if e.status == 404:
                continue  # the CRDs were never installed
            raise
        for obj in items:
            meta = obj["metadata"]
            body = _without_spec_copies(obj) if plural == "erasurerequests" else obj
            look(f"{plural} {meta.get('namespace')}/{meta['name']}", json.dumps(body))
    raw = client.CoreV1Api(api).list_event_for_all_namespaces(_preload_content=False)
    for ev in json.loads(raw.data)["items"]:
        involved = ev.get("involvedObject") or {}
        look(
            f"Event {ev['metadata'].get('namespace')}/{ev['metadata']['name']} "
            f"about {involved.get('kind')} {involved.get('name')}",
            json.dumps(ev),
        )
    for log in logs:
        if log.is_file():
            for n, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
                look(f"{log}:{n}", line)
    return found


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> kubestack.KubeState:
    state = tmp_path_factory.mktemp("kube")
    st = kubestack.start(state)
    ids = IdWatch(st.kubeconfig)
    ID_WATCH.append(ids)
    try:
        yield st
        ids.stop()
        logs = sorted(tmp_path_factory.getbasetemp().rglob("operator*.log"))
        found = find_ids(ids.api, ids.collected() | PRIVATE_IDS, logs)
    finally:
        ids.stop()
        kubestack.stop(state)
    if found:
        shown = "\n  ".join(found[:50])
        pytest.fail(
            f"{len(found)} subject or record id(s) found outside ErasureRequest specs:\n  {shown}",
            pytrace=False,
        )


def kubectl(
    kube: kubestack.KubeState, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return kubestack.kubectl(kube.kubeconfig, *args, stdin=stdin)
