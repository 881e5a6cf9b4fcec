"""Shared fixtures: one real local stack (SeaweedFS + Ray head) for the whole session.

Nothing is mocked: S3 is SeaweedFS with bucket versioning on, training is Ray Train
on a local Ray head. Each test works on its own model prefix.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from lethe import kubestack, localstack
from lethe.certs import Keys
from lethe.core.config import ModelConfig, TrainerConfig
from lethe.core.hashing import is_test_subject, shard_of, slice_of
from lethe.ingest import ingest_table
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store
from lethe.training import RayTrainer, train_model

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


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> kubestack.KubeState:
    state = tmp_path_factory.mktemp("kube")
    st = kubestack.start(state)
    yield st
    kubestack.stop(state)


def kubectl(
    kube: kubestack.KubeState, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return kubestack.kubectl(kube.kubeconfig, *args, stdin=stdin)
