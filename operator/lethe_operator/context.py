"""What the model side (``control``) and the request side (``erasures``) share: the
API's names, conditions, fault injection, and a ShardedModel's S3 side (its store,
layout, configuration, signing keys and engine)."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from lethe.certs import Keys, KeysError
from lethe.core.config import Columns, ModelConfig, Prices, TrainerConfig
from lethe.erasure import Engine
from lethe.ingest import decode_dataset
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store
from lethe_operator.raylaunch import Launcher, RayJobs

GROUP, VERSION = "lethe.dev", "v1alpha1"
MODELS, REQUESTS = "shardedmodels", "erasurerequests"
KILL_ENV = "LETHE_OPERATOR_KILL_AT"  # fault injection for the restart tests
KEYS_DIR_ENV = "LETHE_KEYS_DIR"  # the operator's own keys (models without a keysSecret)
log = logging.getLogger("lethe.operator")


class Events(Protocol):
    """Kubernetes Events (messages carry counts, never a subject or record id)."""

    def info(self, reason: str, message: str) -> None: ...

    def warning(self, reason: str, message: str) -> None: ...

    def about(self, body: dict[str, Any]) -> Events:
        """Events on another object (a model's tick reporting on a request)."""
        ...


def kill_point(name: str) -> None:
    """Die here as ``kill -9`` would make us, when the restart tests ask for it: state
    must live in Kubernetes and S3, never in this process."""
    if os.environ.get(KILL_ENV) == name:
        log.warning("%s=%s: SIGKILL", KILL_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(ts: str) -> float:
    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str = "",
    observed: int | None = None,
) -> list[dict[str, Any]]:
    """Kubernetes API conventions: lastTransitionTime moves only when status changes."""
    value = "True" if status else "False"
    out = [c for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    cond = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"]
        if old and old.get("status") == value
        else now_iso(),
    }
    if observed is not None:
        cond["observedGeneration"] = observed
    return [*out, cond]


def secret_data(namespace: str, name: str) -> dict[str, bytes]:
    """A Secret's entries, decoded (the operator may only ``get`` Secrets)."""
    data = k8s.CoreV1Api().read_namespaced_secret(name, namespace).data or {}
    return {k: base64.b64decode(v) for k, v in data.items()}


def secret_values(namespace: str, name: str, *keys: str) -> list[str]:
    data = secret_data(namespace, name)
    missing = [k for k in keys if k not in data]
    if missing:
        raise KeyError(f"Secret {name} has no key(s) {missing}")
    return [data[k].decode() for k in keys]


def get_model(namespace: str, name: str) -> dict[str, Any] | None:
    """The ShardedModel, or None if there is none of that name."""
    try:
        return k8s.CustomObjectsApi().get_namespaced_custom_object(
            GROUP, VERSION, namespace, MODELS, name
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise


class KeysUnavailable(Exception):
    """The model's signing keys cannot be loaded; ``reason`` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_keys(namespace: str, spec: dict[str, Any]) -> Keys:
    """The keys that sign a model's certificates and key its id hashes: from the Secret
    ``spec.certificates.keysSecret`` or, without one, from the operator's
    ``$LETHE_KEYS_DIR``. Raises KeysUnavailable (never with key material)."""
    ref = ((spec.get("certificates") or {}).get("keysSecret") or {}).get("name")
    if ref:
        try:
            data = secret_data(namespace, ref)
        except ApiException as e:
            if e.status == 404:
                raise KeysUnavailable(
                    "KeysSecretNotFound",
                    f"Secret {ref} (spec.certificates.keysSecret) not found in {namespace}",
                ) from None
            if e.status == 403:
                raise KeysUnavailable(
                    "KeysSecretForbidden",
                    f"the operator may not read Secret {ref} in {namespace}",
                ) from None
            raise
        where = f"Secret {ref}"
        try:
            keys = Keys.from_secret(data)
        except (KeysError, ValueError) as e:
            raise KeysUnavailable("KeysSecretInvalid", f"{where}: {e}") from None
    else:
        directory = os.environ.get(KEYS_DIR_ENV)
        if not directory:
            raise KeysUnavailable(
                "NoSigningKeys",
                "no spec.certificates.keysSecret, and the operator has no "
                f"{KEYS_DIR_ENV} (create keys with `lethe keys init`)",
            )
        where = f"{KEYS_DIR_ENV}"
        try:
            keys = Keys.load(directory)
        except (KeysError, ValueError, OSError) as e:
            raise KeysUnavailable("KeysInvalid", f"{where}: {e}") from None
    if not keys.can_sign:
        raise KeysUnavailable(
            "KeysSecretInvalid" if ref else "KeysInvalid",
            f"{where} has no signing-key.pem: certificates cannot be signed",
        )
    return keys


# -- the model's S3 side -----------------------------------------------------------------
@dataclass
class ModelContext:
    namespace: str
    name: str
    uid: str
    spec: dict[str, Any]
    store: Store
    layout: ModelLayout
    _keys: Keys | None = field(default=None, repr=False)

    @property
    def model_id(self) -> str:
        return f"{self.namespace}.{self.name}"

    def config(self) -> ModelConfig:
        s, t = self.spec, self.spec.get("trainer", {})
        ds = s["dataset"]
        cols = ds.get("columns", {})
        uri = ds["uri"]
        return ModelConfig(
            name=self.model_id,
            shards=int(s["shards"]),
            slices=int(s["slices"]),
            trainer=TrainerConfig(
                model=t.get("model", "mlp"),
                epochs=float(t.get("epochs", 10)),
                batch_size=int(t.get("batchSize", 128)),
                learning_rate=float(t.get("learningRate", 1e-3)),
                hidden=int(t.get("hidden", 256)),
                seed=int(t.get("seed", 0)),
                workers_per_shard=int(t.get("workersPerShard", 1)),
                cpus_per_worker=float(t.get("cpusPerWorker", 1)),
                gpus_per_worker=float(t.get("gpusPerWorker", 0)),
                input_shape=tuple(t.get("inputShape", ())),
            ),
            prices=Prices(
                float(s.get("prices", {}).get("cpuHourUSD", 0.048)),
                float(s.get("prices", {}).get("gpuHourUSD", 2.5)),
            ),
            columns=Columns(
                cols.get("recordId", "record_id"),
                cols.get("subjectId", "subject_id"),
                cols.get("label", "label"),
                tuple(cols.get("features", ())),
            ),
            test_fraction=float(ds.get("testFraction", 0.2)),
            source_uri=uri,
            source_format=ds.get("format", "parquet"),
            # a builtin: dataset has no object to patch or delete (the CRD says so too)
            source_policy="external"
            if uri.startswith("builtin:")
            else ds.get("sourcePolicy", "external"),
        )

    def ray(self, owners: list[dict[str, Any]] | None = None) -> Launcher:
        """Where this model's Ray jobs run: an existing cluster's Jobs API, or KubeRay
        RayJobs (``owners``: the objects a RayJob belongs to, for garbage collection)."""
        # the model's extra variables first: they must not override the S3 settings
        env = {**self.spec["ray"].get("env", {}), **self.store.settings.env()}
        python = os.environ.get("LETHE_RAY_PYTHON", "python")
        ray = self.spec["ray"]
        if ray.get("address"):
            return RayJobs(ray["address"], env, python=python)
        from lethe_operator.kuberay import KubeRayJobs

        return KubeRayJobs(
            self.namespace,
            ray["rayJob"],
            env,
            python=python,
            owners=owners or [],
            model=self.name,
            credentials_secret=(self.spec["storage"].get("credentialsSecret") or {}).get("name"),
        )

    def keys(self) -> Keys:
        """The model's signing keys (read once per context); raises KeysUnavailable."""
        if self._keys is None:
            self._keys = load_keys(self.namespace, self.spec)
        return self._keys

    def plan_exists(self, batch: str) -> bool:
        """Whether the batch has its plan in S3 (needs no keys)."""
        return Engine(self.store, self.layout, trainer=None).plan_exists(batch)

    def engine(self) -> Engine:
        """The engine for this model's erasures, with the model's own keys (its id
        hashes and certificates are made with them, never with another key)."""
        storage = self.spec["storage"]
        return Engine(
            self.store,
            self.layout,
            trainer=None,
            keys=self.keys(),
            storage_backend=storage.get("backend") or None,
            storage_admin=storage.get("adminEndpoint") or None,
        )


def model_context(body: dict[str, Any]) -> ModelContext:
    meta, spec = body["metadata"], body["spec"]
    ns, name = meta["namespace"], meta["name"]
    storage = spec["storage"]
    access = secret = None
    if storage.get("credentialsSecret"):
        ref = storage["credentialsSecret"]["name"]
        access, secret = secret_values(ns, ref, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    env = S3Settings.from_env()
    settings = S3Settings(
        endpoint=storage.get("endpoint") or env.endpoint,
        bucket=storage["bucket"],
        access_key=access or env.access_key,
        secret_key=secret or env.secret_key,
        region=env.region,
    )
    return ModelContext(
        ns,
        name,
        meta.get("uid", ""),
        spec,
        Store(settings),
        ModelLayout.of(f"{ns}.{name}", storage.get("prefix", "")),
    )


def load_dataset(ctx: ModelContext) -> Any:
    """The model's source dataset as a table (``builtin:`` or one ``s3://`` object)."""
    cfg = ctx.config()
    uri = cfg.source_uri
    if uri.startswith("builtin:"):
        from lethe.datasets import builtin

        return builtin(uri.removeprefix("builtin:"))
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return decode_dataset(ctx.store.for_bucket(bucket).get(key), cfg.source_format, cfg)
