"""Running Lethe's Ray jobs as KubeRay ``RayJob`` objects (ray.io/v1).

Used when a ShardedModel sets ``spec.ray.rayJob`` (instead of ``spec.ray.address``)::

    ray:
      maxRetries: 3
      rayJob:
        clusterSelector: {ray.io/cluster: my-raycluster}   # an existing RayCluster, or
        # rayClusterSpec: {...}    # a RayClusterSpec: KubeRay starts a cluster per job

One RayJob per submission id (``lethe-<batch>-<attempt>``, ``lethe-train-<uid>-<attempt>``):

- **Deterministic and idempotent.** The RayJob's name derives from the submission id
  alone, and ``spec.jobId`` *is* the submission id, so the Ray-side job id is
  deterministic too. ``ensure`` creates the RayJob only if that name does not exist;
  a restarted operator finds the one it created (an AlreadyExists race reads it back).
  The submission id is kept whole in the annotation ``lethe.dev/submission-id``.
- **Names.** KubeRay (v1.4/v1.5) accepts RayJob names that are DNS-1035 labels of at
  most 47 characters (it appends 6 characters for the RayCluster it creates). A
  submission id that is such a label is the name as is (``lethe-batch-...-0``, 30
  characters); a longer one (``lethe-train-<36-character uid>-0``) becomes its first 36
  characters plus ``-`` and 10 hex characters of its SHA-256.
- **Retries** are the operator's (``ray.maxRetries``; each attempt is a new submission
  id, so a new RayJob): KubeRay's own ``backoffLimit`` is left unset.
- **Cleanup.** ownerReferences name every owner (the batch's ErasureRequests; the
  ShardedModel for its first training), none of them as controller and without
  blockOwnerDeletion (which would need ``update`` on the owners' finalizers). The
  Kubernetes garbage collector deletes the RayJob once *all* its owners are gone, i.e.
  when the last request of the batch is deleted after the model's TTL. With
  ``rayClusterSpec`` KubeRay also deletes the cluster it made:
  ``shutdownAfterJobFinishes: true`` and ``ttlSecondsAfterFinished`` (300 s, time to
  read the logs of a failed job).
- **Status.** ``status.jobStatus`` (PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED) is the Ray
  job's own state and wins when it is terminal; otherwise a failed deployment
  (``jobDeploymentStatus`` Failed or ValidationFailed: submission failed, deadline
  exceeded, invalid spec) is FAILED with KubeRay's reason and message. A RayJob
  without status yet (KubeRay has not seen it) is PENDING.

**Credentials: the S3 secret key is never written into a RayJob.** Only non-secret
settings (endpoint, bucket, region, the model's ``ray.env``) travel in
``spec.runtimeEnvYAML`` (``env_vars``), which anyone allowed to read RayJobs can read.

- ``rayClusterSpec``: the Ray container (the first container, as KubeRay assumes) of
  the head and of every worker group gets ``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY`` as ``env[].valueFrom.secretKeyRef`` to the model's
  ``spec.storage.credentialsSecret``; Ray's workers inherit the raylet's environment,
  so the job and its Ray Train workers see them. A container that already sets one of
  these variables keeps its own. (The operator refuses a model without a
  credentialsSecret its namespace grants it, so every such RayJob gets the reference.)
- ``clusterSelector``: the operator does not change an existing cluster, so the
  RayCluster's pods must already carry S3 credentials (env from a Secret, or an IAM
  role). This is what clusterSelector means: the cluster is the user's, and it is
  trusted with its keys like a Jobs API cluster (``raylaunch``).

Inside the job, ``lethe.training.connect_ray`` puts only the public settings in the
driver's runtime_env too: the workers inherit the keys from the raylet's environment.

The ``clusterSelector`` must hold ``ray.io/cluster: <RayCluster name>``, the one key
KubeRay reads; without it the submission fails at once with that message rather than
hang in a RayJob that KubeRay never starts. ``spec.metadata`` is not set (KubeRay
v1.4 reads ``rayClusterSpec.rayVersion`` for it, which clusterSelector jobs lack).

RBAC: the operator needs ``get``, ``list`` and ``create`` on ``rayjobs.ray.io`` in the
models' namespaces (no ``delete``: garbage collection does that).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from lethe_operator import kubeapi
from lethe_operator.raylaunch import SECRET_ENV, JobStatus, RayUnavailable, job_entrypoint

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayjobs", "RayJob"
MAX_NAME = 47  # KubeRay's MaxRayJobNameLength (MaxRayClusterNameLength 53 - 6)
CLUSTER_KEY = "ray.io/cluster"  # the only clusterSelector key KubeRay reads
SUBMISSION = "lethe.dev/submission-id"
MANAGED_BY = {"app.kubernetes.io/managed-by": "lethe"}
MODEL_LABEL = "lethe.dev/model"  # the ShardedModel a RayJob works for (its loop is woken)
WATCH_ENV = "LETHE_WATCH_RAYJOBS"  # "1": watch RayJobs, so their end wakes their model
# SECRET_ENV (raylaunch) never goes in runtimeEnvYAML: it comes from a Secret
# (rayClusterSpec) or the cluster
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # keys of credentialsSecret
TTL_AFTER_FINISHED = 300
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
log = logging.getLogger("lethe.operator.kuberay")


def rayjob_name(submission_id: str) -> str:
    """The RayJob's name: the submission id if KubeRay accepts it as a name, else a
    readable prefix and a hash of the whole id (deterministic: a restart finds it)."""
    if len(submission_id) <= MAX_NAME and _DNS1035.match(submission_id):
        return submission_id
    digest = hashlib.sha256(submission_id.encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9-]+", "-", submission_id.lower())
    stem = re.sub(r"^[^a-z]+", "", stem)[: MAX_NAME - len(digest) - 1].strip("-")
    return f"{stem}-{digest}" if stem else f"lethe-{digest}"


def label_value(value: str) -> str | None:
    """``value`` if it may be a label value (63 characters at most), else None."""
    return value if len(value) <= 63 and _LABEL_VALUE.match(value) else None


def job_status(submission_id: str, obj: Mapping[str, Any]) -> JobStatus:
    """A RayJob's state as the operator's JobStatus (see the module docstring)."""
    st = obj.get("status") or {}
    ray_state = str(st.get("jobStatus") or "")
    deployment = str(st.get("jobDeploymentStatus") or "")
    reason, message = str(st.get("reason") or ""), str(st.get("message") or "")
    text = f"{reason}: {message}" if reason and message else reason or message
    if ray_state in ("SUCCEEDED", "FAILED", "STOPPED"):
        return JobStatus(submission_id, ray_state, text)
    if deployment in ("Failed", "ValidationFailed"):
        return JobStatus(submission_id, "FAILED", text or f"RayJob deployment {deployment.lower()}")
    if ray_state == "RUNNING":
        return JobStatus(submission_id, "RUNNING", text)
    name = obj.get("metadata", {}).get("name", "")
    return JobStatus(submission_id, "PENDING", text or f"RayJob {name}: {deployment or 'new'}")


def watch_enabled() -> bool:
    """Whether the operator watches RayJobs (it needs RBAC ``watch`` on them; the chart
    sets ``LETHE_WATCH_RAYJOBS=1`` with ``rbac.rayJobs``)."""
    return os.environ.get(WATCH_ENV) == "1"


def owner_references(owners: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    refs: dict[str, dict[str, Any]] = {}
    for o in owners:
        meta = o.get("metadata") or {}
        if not (o.get("apiVersion") and o.get("kind") and meta.get("name") and meta.get("uid")):
            raise ValueError("an owner needs apiVersion, kind, metadata.name and metadata.uid")
        refs[meta["uid"]] = {
            "apiVersion": o["apiVersion"],
            "kind": o["kind"],
            "name": meta["name"],
            "uid": meta["uid"],
        }
    return list(refs.values())


def _with_secret_env(cluster: dict[str, Any], secret: str) -> dict[str, Any]:
    """A copy of a RayClusterSpec whose Ray containers read S3 credentials from
    ``secret`` (secretKeyRef: the values never enter the RayJob)."""
    out = copy.deepcopy(cluster)
    groups = [out.get("headGroupSpec") or {}, *(out.get("workerGroupSpecs") or [])]
    for group in groups:
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            continue  # invalid anyway: KubeRay reports it
        ray = containers[0]
        env = ray.setdefault("env", [])
        have = {e.get("name") for e in env}
        for key in SECRET_KEYS:
            if key not in have:
                env.append(
                    {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                )
    return out


class KubeRayJobs:
    """The ``Launcher`` for ``spec.ray.rayJob``: one RayJob per submission id."""

    def __init__(
        self,
        namespace: str,
        spec: Mapping[str, Any],
        env: Mapping[str, str],
        python: str = "python",
        owners: Iterable[Mapping[str, Any]] = (),
        model: str = "",
        credentials_secret: str | None = None,
        ttl_seconds_after_finished: int = TTL_AFTER_FINISHED,
        api_client: k8s.ApiClient | None = None,
    ) -> None:
        self.namespace = namespace
        self.spec = dict(spec)
        self.env = {k: v for k, v in env.items() if k not in SECRET_ENV}
        self.python = python
        self.owners = list(owners)
        self.model = model
        self.credentials_secret = credentials_secret
        self.ttl = ttl_seconds_after_finished
        self.api = k8s.CustomObjectsApi(api_client or kubeapi.api_client())

    # -- Kubernetes calls --------------------------------------------------------------
    def _get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise _unavailable("get", name, e) from None

    def _mine(self, submission_id: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Refuse a same-named RayJob made for something else (never report its state)."""
        found = (obj.get("metadata", {}).get("annotations") or {}).get(SUBMISSION)
        if found != submission_id:
            raise RayUnavailable(
                f"RayJob {obj['metadata']['name']} in {self.namespace} exists but is not "
                f"Lethe's job {submission_id}"
            )
        return obj

    # -- Launcher ----------------------------------------------------------------------
    def status(self, submission_id: str) -> JobStatus | None:
        obj = self._get(rayjob_name(submission_id))
        return None if obj is None else job_status(submission_id, self._mine(submission_id, obj))

    def ensure(self, submission_id: str, args: list[str]) -> JobStatus:
        """The RayJob of this submission id: created now if (and only if) it is absent."""
        existing = self.status(submission_id)
        if existing is not None:
            return existing
        problem = self.problem()
        if problem:  # KubeRay would never start it: fail now, with the reason
            return JobStatus(submission_id, "FAILED", problem)
        body = self.manifest(submission_id, args)
        try:
            self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
            log.info("created RayJob %s for %s", body["metadata"]["name"], submission_id)
        except ApiException as e:
            if e.status != 409:  # 409: created meanwhile (another tick): read it back
                raise _unavailable("create", body["metadata"]["name"], e) from None
        return self.status(submission_id) or JobStatus(submission_id, "PENDING", "")

    def submissions(self, prefix: str = "lethe-") -> list[str]:
        """The submission ids of Lethe's RayJobs in this namespace that start with prefix."""
        try:
            items = self.api.list_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                label_selector=",".join(f"{k}={v}" for k, v in MANAGED_BY.items()),
            )["items"]
        except ApiException as e:
            raise _unavailable("list", "", e) from None
        ids = ((o["metadata"].get("annotations") or {}).get(SUBMISSION, "") for o in items)
        return sorted(i for i in ids if i.startswith(prefix))

    # -- the object --------------------------------------------------------------------
    def problem(self) -> str:
        """Why KubeRay could not run a RayJob of this spec ("" when it can)."""
        selector = self.spec.get("clusterSelector")
        if selector and not selector.get(CLUSTER_KEY):
            return (
                f"ray.rayJob.clusterSelector must name the RayCluster under the key "
                f"{CLUSTER_KEY} (the only key KubeRay reads)"
            )
        if not selector and not self.spec.get("rayClusterSpec"):
            return "ray.rayJob needs clusterSelector or rayClusterSpec"
        return ""

    def manifest(self, submission_id: str, args: list[str]) -> dict[str, Any]:
        """The RayJob for one submission (no secret value in it: see the docstring)."""
        name = rayjob_name(submission_id)
        labels = dict(MANAGED_BY)
        for key, value in (
            (SUBMISSION, submission_id),
            (MODEL_LABEL, self.model),
            ("lethe.dev/job", args[0] if args else ""),
        ):
            if value and label_value(value):
                labels[key] = value
        spec: dict[str, Any] = {
            "entrypoint": job_entrypoint(self.python, args),
            "jobId": submission_id,
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": dict(sorted(self.env.items()))}),
        }
        if self.spec.get("clusterSelector"):
            spec["clusterSelector"] = dict(self.spec["clusterSelector"])
        else:
            cluster = dict(self.spec["rayClusterSpec"])
            if self.credentials_secret:
                cluster = _with_secret_env(cluster, self.credentials_secret)
            spec["rayClusterSpec"] = cluster
            spec["shutdownAfterJobFinishes"] = True
            spec["ttlSecondsAfterFinished"] = self.ttl
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": {SUBMISSION: submission_id},
                "ownerReferences": owner_references(self.owners),
            },
            "spec": spec,
        }


def _unavailable(verb: str, name: str, e: ApiException) -> RayUnavailable:
    what = f"RayJob {name}" if name else "RayJobs"
    if e.status == 404 and verb == "create":
        return RayUnavailable(
            f"cannot create {what}: KubeRay's RayJob CRD (rayjobs.ray.io) is not installed"
        )
    if e.status == 403:
        return RayUnavailable(
            f"cannot {verb} {what}: the operator lacks RBAC {verb} on rayjobs.ray.io"
        )
    return RayUnavailable(f"cannot {verb} {what}: HTTP {e.status} {e.reason}")
