"""The ShardedModel spec, parsed once (``lethe_operator.spec``), with defaults from the
CRD alone: the operator restates none. Here the CRD's defaults are applied as the API
server applies them (structural defaulting: a missing field with a ``default`` gets
it, then its own properties are defaulted in turn); tests/test_crds.py checks against
a real kube-apiserver that it does."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from lethe.core.config import ModelConfig, TrainerConfig
from lethe_operator.spec import ErasurePolicy, ModelSpec

CRD = Path(__file__).resolve().parents[2] / "crds" / "lethe.dev_shardedmodels.yaml"


def spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def with_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """``obj`` with the defaults of ``schema`` filled in, as the API server does."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        out = dict(obj)
        for name, sub in (schema.get("properties") or {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = with_defaults(out[name], sub)
        return out
    if isinstance(obj, list) and "items" in schema:
        return [with_defaults(i, schema["items"]) for i in obj]
    return obj


MINIMAL = {
    "storage": {"bucket": "lethe", "credentialsSecret": {"name": "s3"}},
    "dataset": {"uri": "s3://data/people.parquet"},
    "shards": 8,
    "slices": 4,
    "ray": {"address": "http://ray:8265"},
}


def test_a_minimal_spec_parses_with_the_crds_defaults_alone() -> None:
    spec = ModelSpec.parse(with_defaults(MINIMAL, spec_schema()))
    assert spec.storage.bucket == "lethe" and spec.storage.prefix == ""
    assert spec.storage.credentials_secret == "s3" and spec.storage.endpoint is None
    assert spec.ray.address == "http://ray:8265" and spec.ray.max_retries == 3
    assert spec.policy == ErasurePolicy(30, 100, 86400, 600, 2592000)
    assert spec.keys_secret is None
    cfg = spec.config("ns.m")
    assert (cfg.name, cfg.shards, cfg.slices) == ("ns.m", 8, 4)
    assert (cfg.source_format, cfg.source_policy, cfg.test_fraction) == ("parquet", "external", 0.2)
    assert cfg.columns.record_id == "record_id" and cfg.columns.file == ""


def test_without_the_crds_defaults_the_spec_does_not_parse() -> None:
    """The operator restates no default: a spec the API server did not default (a field
    with a default left out) is a KeyError naming the field, not a silent guess."""
    with pytest.raises(KeyError, match="prefix"):
        ModelSpec.parse(MINIMAL)


def test_the_crds_trainer_defaults_are_the_engines() -> None:
    """The CLI (``lethe ingest`` without flags) and a ShardedModel without a trainer
    section train the same model: the CRD's defaults and ``TrainerConfig``'s agree."""
    crd = ModelSpec.parse(with_defaults(MINIMAL, spec_schema())).config("m").trainer
    engine = TrainerConfig()
    assert crd == engine
    assert ModelSpec.parse(with_defaults(MINIMAL, spec_schema())).config("m").prices == (
        ModelConfig(name="m", shards=1, slices=1).prices
    )


def test_every_field_the_crd_gives_is_read() -> None:
    """Values that differ from every default, all of them read through."""
    full = with_defaults(
        {
            **MINIMAL,
            "storage": {
                "bucket": "b",
                "prefix": "p/q",
                "endpoint": "http://s3:8333",
                "credentialsSecret": {"name": "keys"},
                "backend": "seaweedfs",
                "adminEndpoint": "http://master:9333",
            },
            "ray": {"address": "http://r:8265", "env": {"A": "1"}, "maxRetries": 0},
            "erasurePolicy": {
                "batchWindowSeconds": 1,
                "maxBatchSize": 2,
                "ttlSecondsAfterFinished": 3,
                "retryFailedAfterSeconds": 4,
                "deadlineSeconds": 5,
            },
            "certificates": {"keysSecret": {"name": "k"}},
            "trainer": {"epochs": 3, "batchSize": 7, "hidden": 9, "inputShape": [1, 2, 2]},
            "prices": {"cpuHourUSD": 1.5},
        },
        spec_schema(),
    )
    spec = ModelSpec.parse(full)
    assert spec.storage.backend == "seaweedfs" and spec.storage.admin_endpoint.endswith("9333")
    assert spec.ray.env == {"A": "1"} and spec.ray.max_retries == 0
    assert spec.policy == ErasurePolicy(1, 2, 3, 4, 5)
    assert spec.keys_secret == "k"
    t = spec.config("m").trainer
    assert (t.epochs, t.batch_size, t.hidden, t.input_shape) == (3.0, 7, 9, (1, 2, 2))
    assert spec.config("m").prices.cpu_hour_usd == 1.5
