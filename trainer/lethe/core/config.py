"""The configuration of one ShardedModel: data columns, SISA shape, trainer, prices.

It is written into every generation manifest, and the trainer part feeds every
lineage hash: change the trainer and every checkpoint becomes stale, as it should.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lethe.errors import UserError

BUILTIN_MODELS = ("mlp", "cnn")
BUILTIN_DECODERS = ("image",)  # file-backed records' decode functions (lethe.files)
IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
SOURCE_POLICIES = ("patch", "delete-after-ingest", "external")


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the field."""


@dataclass(frozen=True)
class TrainerConfig:
    model: str = "mlp"  # "mlp", "cnn", or a user model "package.module:build"
    epochs: float = 10.0  # total epochs e; slice r trains 2e/(R+1) epochs (SISA schedule)
    batch_size: int = 128
    learning_rate: float = 1e-3
    hidden: int = 256  # width of the built-in MLP; channels of the built-in CNN
    seed: int = 0
    workers_per_shard: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    input_shape: tuple[int, ...] = ()  # e.g. (1, 8, 8) for the CNN; () means flat

    def validate(self) -> None:
        if self.model not in BUILTIN_MODELS and ":" not in self.model:
            raise ConfigError(
                f"trainer.model: {self.model!r} is neither a built-in model "
                f"({', '.join(BUILTIN_MODELS)}) nor an import path 'package.module:build'"
            )
        if self.model == "cnn" and len(self.input_shape) != 3:
            raise ConfigError("trainer.input_shape: the cnn model needs (channels, height, width)")
        for name in ("epochs", "batch_size", "learning_rate", "workers_per_shard"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"trainer.{name}: must be positive")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("trainer.cpus_per_worker/gpus_per_worker: out of range")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def epochs_per_slice(self, slices: int) -> float:
        """Slice r trains on slices 0..r for 2e/(R+1) epochs, so the whole run does
        about e epochs' worth of work however finely the shard is sliced."""
        return 2.0 * self.epochs / (slices + 1)


@dataclass(frozen=True)
class Prices:
    """On-demand prices used to turn resource-seconds into USD."""

    cpu_hour_usd: float = 0.048
    gpu_hour_usd: float = 2.50

    def usd(self, cpu_seconds: float, gpu_seconds: float) -> float:
        return cpu_seconds / 3600.0 * self.cpu_hour_usd + gpu_seconds / 3600.0 * self.gpu_hour_usd


@dataclass(frozen=True)
class Columns:
    record_id: str = "record_id"
    subject_id: str = "subject_id"
    label: str = "label"
    features: tuple[str, ...] = ()  # empty: every other column
    # File-backed records: a column of s3:// URIs (images) whose objects belong to the
    # record. Their decoded pixels are the features; an erasure deletes the objects.
    file: str = ""
    # How a file becomes features: "image" (built in) or an import path
    # "package.module:fn", fn(body: bytes, input_shape: tuple) -> a float array
    decode: str = "image"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    shards: int
    slices: int
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    prices: Prices = field(default_factory=Prices)
    columns: Columns = field(default_factory=Columns)
    test_fraction: float = 0.2
    num_features: int = 0  # filled in by ingestion
    classes: tuple[str, ...] = ()  # label values, index = class id; filled in by ingestion
    # Where the data came from and what an erasure does to it there: "patch" rewrites
    # the source object without the erased rows (and deletes its older versions),
    # "delete-after-ingest" deletes it once ingested, "external" leaves it to its owner
    # (and every certificate says so).
    source_uri: str = ""
    source_format: str = "parquet"
    source_policy: str = "external"

    def validate(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"name: {self.name!r} must be letters, digits, '-', '_' or '.'")
        if self.shards < 1:
            raise ConfigError("shards: must be at least 1")
        if self.slices < 1:
            raise ConfigError("slices: must be at least 1")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError("test_fraction: must be in [0, 1)")
        if self.source_policy not in SOURCE_POLICIES:
            raise ConfigError(
                f"source_policy: {self.source_policy!r} is not one of {', '.join(SOURCE_POLICIES)}"
            )
        if self.source_policy != "external" and not self.source_uri.startswith("s3://"):
            raise ConfigError(
                f"source_policy: {self.source_policy!r} needs an s3:// source (Lethe can only "
                "patch or delete objects it can reach); use 'external'"
            )
        if self.columns.decode not in BUILTIN_DECODERS and not IMPORT_PATH.match(
            self.columns.decode
        ):
            raise ConfigError(
                f"columns.decode: {self.columns.decode!r} is neither a built-in decoder "
                f"({', '.join(BUILTIN_DECODERS)}) nor an import path 'package.module:fn'"
            )
        self.trainer.validate()

    def trainer_fingerprint(self) -> str:
        """Everything that changes what a checkpoint holds, other than the data."""
        payload = {
            "trainer": asdict(self.trainer),
            "slices": self.slices,
            "num_features": self.num_features,
            "classes": list(self.classes),
        }
        if self.columns.file and self.columns.decode not in BUILTIN_DECODERS:
            payload["decode"] = self.columns.decode  # (the built-in one: as it always was)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        t = dict(d.get("trainer", {}))
        t["input_shape"] = tuple(t.get("input_shape", ()))
        c = dict(d.get("columns", {}))
        c["features"] = tuple(c.get("features", ()))
        return cls(
            name=d["name"],
            shards=int(d["shards"]),
            slices=int(d["slices"]),
            trainer=TrainerConfig(**t),
            prices=Prices(**d.get("prices", {})),
            columns=Columns(**c),
            test_fraction=float(d.get("test_fraction", 0.2)),
            num_features=int(d.get("num_features", 0)),
            classes=tuple(d.get("classes", ())),
            source_uri=str(d.get("source_uri", "")),
            source_format=str(d.get("source_format", "parquet")),
            source_policy=str(d.get("source_policy", "external")),
        )
