"""What the model side (``control``) and the request side (``erasures``) share: the
API's names, conditions, fault injection, and a ShardedModel's S3 side (its store,
layout, configuration, signing keys and engine).

**What a model may use** (``model_context`` refuses anything else with ``ModelRefused``,
before a single request goes to the model's S3 endpoint or Ray):

- S3 credentials only from the Secret ``spec.storage.credentialsSecret`` in the model's
  own namespace, and only if the namespace's admin opted that Secret in: the label
  ``lethe.dev/s3-credentials: "true"`` and, optionally, the annotation
  ``lethe.dev/allowed-models`` (comma-separated model names, or ``*``; absent: every
  model in the namespace; present but empty: none). The operator's own environment
  (``AWS_*``) is never used for a model.
- a Ray Jobs API address (``spec.ray.address``) only if the operator's allow-list
  ``$LETHE_RAY_ADDRESSES`` (the chart's ``operator.rayAddresses``) holds it: same
  scheme, host, port and path (trailing slashes aside); requests go to the allow-list's
  own spelling of the URL. KubeRay models (``spec.ray.rayJob``) run in their namespace.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from kubernetes.client.rest import ApiException

from lethe.certs import Keys, KeysError
from lethe.core.config import ModelConfig
from lethe.errors import UserError
from lethe.faults import FAULTS
from lethe.layout import ModelLayout
from lethe.service import ModelService
from lethe.store import S3Settings, Store
from lethe_operator.kubeapi import core_v1, custom_objects
from lethe_operator.raylaunch import SECRET_ENV, Launcher, RayJobs
from lethe_operator.spec import ModelSpec, StorageSpec

GROUP, VERSION = "lethe.dev", "v1alpha1"
MODELS, REQUESTS = "shardedmodels", "erasurerequests"
KEYS_DIR_ENV = "LETHE_KEYS_DIR"  # the operator's own keys (models without a keysSecret)
RAY_ADDRESSES_ENV = "LETHE_RAY_ADDRESSES"  # Ray Jobs API URLs models may use (chart values)
CREDENTIALS_LABEL = "lethe.dev/s3-credentials"  # "true": the namespace admin's opt-in
ALLOWED_MODELS = "lethe.dev/allowed-models"  # "a,b" or "*"; absent: any model
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # the entries of credentialsSecret
log = logging.getLogger("lethe.operator")


class Events(Protocol):
    """Kubernetes Events (messages carry counts, never a subject or record id)."""

    def info(self, reason: str, message: str) -> None: ...

    def warning(self, reason: str, message: str) -> None: ...

    def about(self, body: dict[str, Any]) -> Events:
        """Events on another object (a model's tick reporting on a request)."""
        ...


def kill_point(name: str) -> None:
    """Die here as ``kill -9`` would make us, when the restart tests ask for it
    (``lethe.faults``): state must live in Kubernetes and S3, never in this process."""
    FAULTS.kill_point(name)


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


class SecretUnreadable(UserError):
    """A Secret a spec names is not there (``kind`` "NotFound") or the operator may not
    read it ("Forbidden"); each caller turns it into its own reason (``<prefix><kind>``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def read_secret(namespace: str, name: str, field: str) -> Any:
    """The Secret ``name`` that the spec's ``field`` names (the operator may only ``get``
    Secrets); raises SecretUnreadable. Any other API error (5xx) is raised as it is."""
    try:
        return core_v1().read_namespaced_secret(name, namespace)
    except ApiException as e:
        if e.status == 404:
            raise SecretUnreadable(
                "NotFound", f"Secret {name} ({field}) not found in {namespace}"
            ) from None
        if e.status == 403:
            raise SecretUnreadable(
                "Forbidden", f"the operator may not read Secret {name} in {namespace}"
            ) from None
        raise


def secret_entries(secret: Any) -> dict[str, bytes]:
    """A Secret's entries, decoded."""
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def get_model(namespace: str, name: str) -> dict[str, Any] | None:
    """The ShardedModel, or None if there is none of that name."""
    try:
        return custom_objects().get_namespaced_custom_object(
            GROUP, VERSION, namespace, MODELS, name
        )
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def patch_model_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Merge ``status`` into the ShardedModel's status (None removes a field)."""
    custom_objects().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, MODELS, name, {"status": status}
    )


class ModelRefused(UserError):
    """The model asks for something its namespace or the operator's admin did not grant
    (S3 credentials, a Ray address); ``reason`` is a condition reason. Raised before any
    request goes to the model's S3 endpoint or Ray; the message names no secret value."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


Address = tuple[str, str, int, str]  # scheme, host, port, path (no trailing slash)
_bad_entries: set[str] = set()  # malformed allow-list entries already logged


def canonical_address(url: str) -> Address | None:
    """``url`` as (scheme, host, port, path), or None when it is not a plain http(s)
    URL (user info, a query or a fragment have no place in a Jobs API base URL)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in ("http", "https")
        or not parts.hostname
        or "@" in parts.netloc
        or parts.query
        or parts.fragment
    ):
        return None
    default = 443 if scheme == "https" else 80
    return scheme, parts.hostname.lower(), port or default, parts.path.rstrip("/")


def allowed_ray_addresses() -> dict[Address, str]:
    """The operator's allow-list (``$LETHE_RAY_ADDRESSES``: URLs separated by commas or
    white space), canonical form -> the admin's URL. Malformed entries allow nothing."""
    out: dict[Address, str] = {}
    for entry in os.environ.get(RAY_ADDRESSES_ENV, "").replace(",", " ").split():
        key = canonical_address(entry)
        if key is None:
            if entry not in _bad_entries:  # once, not every tick
                _bad_entries.add(entry)
                log.warning("%s: ignoring %r (not an http(s) base URL)", RAY_ADDRESSES_ENV, entry)
        else:
            out.setdefault(key, entry.rstrip("/"))
    return out


def check_ray_address(address: str) -> str:
    """The allow-list's URL for ``address``; raises ModelRefused when it is not allowed."""
    allowed = allowed_ray_addresses()
    key = canonical_address(address)
    if key is None or key not in allowed:
        raise ModelRefused(
            "RayAddressNotAllowed",
            f"spec.ray.address {address!r} is not among the Ray addresses the operator's "
            f"admin allows ({RAY_ADDRESSES_ENV}, the chart's operator.rayAddresses: "
            f"{len(allowed)} address(es))",
        )
    return allowed[key]


def model_credentials(namespace: str, model: str, storage: StorageSpec) -> tuple[str, str]:
    """(access key, secret key) from the model's ``credentialsSecret``, if the namespace
    grants it to this model (see the module docstring); raises ModelRefused."""
    ref = storage.credentials_secret
    if not ref:
        raise ModelRefused(
            "NoCredentials",
            "spec.storage.credentialsSecret is required: a model uses only S3 credentials "
            f"its namespace grants (a Secret labelled {CREDENTIALS_LABEL}=true), never the "
            "operator's",
        )
    try:
        obj = read_secret(namespace, ref, "spec.storage.credentialsSecret")
    except SecretUnreadable as e:
        raise ModelRefused(f"CredentialsSecret{e.kind}", str(e)) from None
    meta = obj.metadata
    labels, annotations = meta.labels or {}, meta.annotations or {}
    if labels.get(CREDENTIALS_LABEL) != "true":
        raise ModelRefused(
            "CredentialsNotAllowed",
            f"Secret {ref} is not labelled {CREDENTIALS_LABEL}=true (the namespace's admin "
            "opts a Secret in for ShardedModels)",
        )
    if ALLOWED_MODELS in annotations:
        names = {n.strip() for n in annotations[ALLOWED_MODELS].split(",") if n.strip()}
        if "*" not in names and model not in names:
            raise ModelRefused(
                "CredentialsNotAllowed",
                f"Secret {ref}'s annotation {ALLOWED_MODELS} does not name ShardedModel {model}",
            )
    data = secret_entries(obj)
    missing = [k for k in S3_KEYS if not data.get(k)]
    if missing:
        raise ModelRefused(
            "CredentialsSecretInvalid", f"Secret {ref} has no (or an empty) {', '.join(missing)}"
        )
    return data[S3_KEYS[0]].decode(), data[S3_KEYS[1]].decode()


class KeysUnavailable(UserError):
    """The model's signing keys cannot be loaded; ``reason`` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_keys(namespace: str, ref: str | None) -> Keys:
    """The keys that sign a model's certificates and key its id hashes: from the Secret
    ``ref`` (``spec.certificates.keysSecret``) or, without one, from the operator's
    ``$LETHE_KEYS_DIR``. Raises KeysUnavailable (never with key material)."""
    if ref:
        try:
            data = secret_entries(read_secret(namespace, ref, "spec.certificates.keysSecret"))
        except SecretUnreadable as e:
            raise KeysUnavailable(f"KeysSecret{e.kind}", str(e)) from None
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
    spec: ModelSpec
    store: Store
    layout: ModelLayout
    _keys: Keys | None = field(default=None, repr=False)
    _service: ModelService | None = field(default=None, repr=False)

    @property
    def model_id(self) -> str:
        return f"{self.namespace}.{self.name}"

    def config(self) -> ModelConfig:
        return self.spec.config(self.model_id)

    def ray(self, owners: list[dict[str, Any]] | None = None) -> Launcher:
        """Where this model's Ray jobs run: an existing cluster's Jobs API, or KubeRay
        RayJobs (``owners``: the objects a RayJob belongs to, for garbage collection)."""
        # Where the data is, never the keys: a job's runtime_env is metadata that anyone
        # who can reach the cluster reads. The keys come from the cluster itself (Jobs
        # API: its own environment, trusted-cluster only) or a secretKeyRef (KubeRay).
        # The model's extra variables first: they must not override the S3 settings.
        ray = self.spec.ray
        extra = {k: v for k, v in ray.env.items() if k not in SECRET_ENV}
        env = {**extra, **self.store.settings.public_env()}
        python = os.environ.get("LETHE_RAY_PYTHON", "python")
        if ray.address:
            return RayJobs(check_ray_address(ray.address), env, python=python)
        from lethe_operator.kuberay import KubeRayJobs

        assert ray.ray_job is not None  # the CRD: exactly one of address and rayJob
        return KubeRayJobs(
            self.namespace,
            ray.ray_job,
            env,
            python=python,
            owners=owners or [],
            model=self.name,
            credentials_secret=self.spec.storage.credentials_secret,
        )

    def keys(self) -> Keys:
        """The model's signing keys (read once per context); raises KeysUnavailable."""
        if self._keys is None:
            self._keys = load_keys(self.namespace, self.spec.keys_secret)
        return self._keys

    def service(self) -> ModelService:
        """The model's one entry into the engine, with the model's own credentials and
        keys (its id hashes and certificates are made with them, never another key's;
        loaded when a step needs them). One per context: a reconcile's steps share it."""
        if self._service is None:
            self._service = ModelService(
                self.store,
                self.layout,
                keys=self.keys,
                storage_backend=self.spec.storage.backend,
                storage_admin=self.spec.storage.admin_endpoint,
            )
        return self._service


def model_context(body: dict[str, Any]) -> ModelContext:
    """The model's S3 side, with the credentials its namespace grants it; raises
    ModelRefused (before anything reaches its S3 endpoint or Ray) when the model asks
    for a Ray address or credentials it may not use."""
    meta, spec = body["metadata"], ModelSpec.parse(body["spec"])
    ns, name = meta["namespace"], meta["name"]
    if spec.ray.address:
        check_ray_address(spec.ray.address)
    access, secret = model_credentials(ns, name, spec.storage)
    env = S3Settings.from_env()  # the default endpoint and the region; never its keys
    settings = S3Settings(
        endpoint=spec.storage.endpoint or env.endpoint,
        bucket=spec.storage.bucket,
        access_key=access,
        secret_key=secret,
        region=env.region,
    )
    return ModelContext(
        ns,
        name,
        meta.get("uid", ""),
        spec,
        Store(settings),
        ModelLayout.of(f"{ns}.{name}", spec.storage.prefix),
    )
