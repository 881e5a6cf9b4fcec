"""A ShardedModel's spec, parsed once per reconcile into typed parts (``ModelSpec.parse``).

Defaults come from the CRD alone (``crds/lethe.dev_shardedmodels.yaml``): the API
server fills them into every object it returns (structural defaulting, on create and
on every read, so an object stored before a default was added gets it too). This
module therefore reads a field that has a default directly and never restates its
value; a field without a default is optional here (None or empty). The engine's side
of the spec is ``ModelSpec.config``: the one mapping from the CRD's names to
``ModelConfig``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lethe.core.config import Columns, ModelConfig, Prices, TrainerConfig


@dataclass(frozen=True)
class StorageSpec:
    """``spec.storage``."""

    bucket: str
    prefix: str
    endpoint: str | None  # None: the operator's default endpoint
    credentials_secret: str | None  # the Secret of S3 keys (required to run; see context)
    backend: str | None  # the S3 implementation, for reclaiming purged bytes
    admin_endpoint: str | None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> StorageSpec:
        return cls(
            bucket=d["bucket"],
            prefix=d["prefix"],
            endpoint=d.get("endpoint") or None,
            credentials_secret=(d.get("credentialsSecret") or {}).get("name"),
            backend=d.get("backend") or None,
            admin_endpoint=d.get("adminEndpoint") or None,
        )


@dataclass(frozen=True)
class RaySpec:
    """``spec.ray``: exactly one of ``address`` (a Jobs API) and ``ray_job`` (KubeRay)."""

    address: str | None
    ray_job: dict[str, Any] | None
    env: dict[str, str]
    max_retries: int

    @classmethod
    def parse(cls, d: dict[str, Any]) -> RaySpec:
        return cls(
            address=d.get("address") or None,
            ray_job=d.get("rayJob"),
            env=dict(d.get("env") or {}),
            max_retries=int(d["maxRetries"]),
        )


@dataclass(frozen=True)
class ErasurePolicy:
    """``spec.erasurePolicy``."""

    batch_window_seconds: int
    max_batch_size: int
    ttl_seconds_after_finished: int
    retry_failed_after_seconds: int
    deadline_seconds: int

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ErasurePolicy:
        return cls(
            batch_window_seconds=int(d["batchWindowSeconds"]),
            max_batch_size=int(d["maxBatchSize"]),
            ttl_seconds_after_finished=int(d["ttlSecondsAfterFinished"]),
            retry_failed_after_seconds=int(d["retryFailedAfterSeconds"]),
            deadline_seconds=int(d["deadlineSeconds"]),
        )


@dataclass(frozen=True)
class ModelSpec:
    """A ShardedModel's ``spec``, as the API server returns it (defaults filled in)."""

    storage: StorageSpec
    ray: RaySpec
    policy: ErasurePolicy
    keys_secret: str | None  # spec.certificates.keysSecret.name; None: the operator's keys
    raw: dict[str, Any]  # the dataset, trainer and prices parts, for ``config``

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> ModelSpec:
        return cls(
            storage=StorageSpec.parse(spec["storage"]),
            ray=RaySpec.parse(spec["ray"]),
            policy=ErasurePolicy.parse(spec["erasurePolicy"]),
            keys_secret=((spec.get("certificates") or {}).get("keysSecret") or {}).get("name"),
            raw=spec,
        )

    def config(self, model_id: str) -> ModelConfig:
        """The engine's configuration of the model ``model_id`` (namespace.name)."""
        s = self.raw
        ds, t, prices = s["dataset"], s["trainer"], s["prices"]
        cols = ds["columns"]
        uri = ds["uri"]
        return ModelConfig(
            name=model_id,
            shards=int(s["shards"]),
            slices=int(s["slices"]),
            trainer=TrainerConfig(
                model=t["model"],
                epochs=float(t["epochs"]),
                batch_size=int(t["batchSize"]),
                learning_rate=float(t["learningRate"]),
                hidden=int(t["hidden"]),
                seed=int(t["seed"]),
                workers_per_shard=int(t["workersPerShard"]),
                cpus_per_worker=float(t["cpusPerWorker"]),
                gpus_per_worker=float(t["gpusPerWorker"]),
                input_shape=tuple(t["inputShape"]),
            ),
            prices=Prices(float(prices["cpuHourUSD"]), float(prices["gpuHourUSD"])),
            columns=Columns(
                cols["recordId"],
                cols["subjectId"],
                cols["label"],
                tuple(cols.get("features") or ()),
                cols.get("file") or "",
                cols["decode"],
            ),
            test_fraction=float(ds["testFraction"]),
            source_uri=uri,
            source_format=ds["format"],
            # a builtin: dataset has no object to patch or delete (the CRD says so too)
            source_policy="external" if uri.startswith("builtin:") else ds["sourcePolicy"],
        )
