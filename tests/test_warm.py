"""Warm retrains (``lethe.warm``) on the real Ray head: the same bytes as a cold run, a
service killed mid-retrain still certifies the batch once, idle lanes give their
resources back, and no Ray Train actor outlives a driver that was SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.util.state import list_actors

from lethe import warm
from lethe.core.cost import ShardRun
from lethe.core.hashing import slice_of
from lethe.core.plan import ErasureRequest
from lethe.erasure import Engine, request_uid
from lethe.generations import read_live
from lethe.layout import ModelLayout
from lethe.store import Store
from lethe.training import RayTrainer, connect_ray, train_model
from lethe.verify import verify
from lethe_dev.localstack import StackState
from tests.conftest import ingest_small, small_table, training_subjects, unique_model
from tests.harness import wait_for

TRAINING_ACTORS = (
    "TrainController",
    "RayTrainWorker",
    "PlacementGroupCleaner",
    "ExitingPlacementGroupCleaner",
)


@pytest.fixture(autouse=True)
def connected(store: Store) -> None:
    """This process is a Ray driver of the stack's head (for the state API)."""
    connect_ray(None, store.settings)


def checkpoints(store: Store, layout: ModelLayout) -> list[bytes]:
    gen = read_live(store, layout).generation
    return [store.get(s.checkpoint or "") for shard in gen.shards for s in shard.slices]


def erase_one(store: Store, layout: ModelLayout, trainer: RayTrainer, subject: str) -> dict:
    engine = Engine(store, layout, trainer, evaluate=lambda g: trainer.evaluate(store, g))
    return engine.erase([ErasureRequest(request_uid(layout.prefix, [subject], []), (subject,))])


def alive(class_names: tuple[str, ...]) -> list:
    return [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
        if a.class_name in class_names
    ]


def test_warm_and_cold_paths_write_identical_checkpoints(store: Store) -> None:
    table = small_table(subjects=80)
    warm_trainer, cold_trainer = RayTrainer(store.settings), RayTrainer(store.settings, warm=False)
    assert warm_trainer.warm and not cold_trainer.warm
    models = {}
    for trainer in (warm_trainer, cold_trainer):
        layout, cfg, _ = ingest_small(store, table=table, shards=2, slices=2)
        train_model(store, layout, trainer)
        models[trainer.warm] = (layout, cfg, trainer)
    (wl, cfg, wt), (cl, _, ct) = models[True], models[False]
    assert checkpoints(store, wl) == checkpoints(store, cl)
    subject = training_subjects(table, cfg)[0]  # shard 0, slice 0: every slice retrained
    results = [erase_one(store, layout, t, subject) for layout, t in ((wl, wt), (cl, ct))]
    assert [r["shards_retrained"] for r in results] == [1, 1]
    assert checkpoints(store, wl) == checkpoints(store, cl)
    assert read_live(store, wl).generation.accuracy == read_live(store, cl).generation.accuracy


def test_service_killed_mid_retrain_certifies_the_batch_once(store: Store) -> None:
    # slices that train for a few seconds each, so the kill lands inside the retrain
    table = small_table(subjects=200)
    layout, cfg, _ = ingest_small(store, table=table, shards=1, slices=3, epochs=240)
    trainer = RayTrainer(store.settings)
    train_model(store, layout, trainer)
    subject = next(s for s in training_subjects(table, cfg) if slice_of(s, cfg.slices) == 0)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = erase_one(store, layout, trainer, subject)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def warm_reports() -> list[ShardRun]:
        runs = [
            ShardRun.from_json(store.get_json(k))
            for k in store.list_keys(f"{layout.prefix}/erasures/")
            if "/runs/" in k
        ]
        return [r for r in runs if r.slices_trained >= 1 and not r.finished]

    # one slice retrained and checkpointed on the warm lane, the rest still to go
    wait_for("a slice retrained on the warm lane", lambda: bool(warm_reports()), timeout=180)
    ray.kill(ray.get_actor(warm.SERVICE_NAME, namespace=warm.NAMESPACE), no_restart=True)
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    certs = [k for k in store.list_keys(f"{layout.prefix}/certificates/") if "/chain/" not in k]
    assert len(certs) == 1
    assert verify(store, store.get_json(certs[0])).ok
    runs = [ShardRun.from_json(r) for r in result["shard_runs"]]
    cold = [r for r in runs if r.finished]
    assert len(cold) == 1 and len(runs) == 2  # the lost warm attempt, then one cold run
    # nothing trained twice: the cold run resumed after the warm lane's checkpoints
    assert sum(r.slices_trained for r in runs) == cfg.slices
    assert 1 <= cold[0].slices_trained < cfg.slices
    # the dead lane's Ray Train actors went with it (its cleaner included)
    wait_for("no stray Ray Train actor", lambda: not alive(TRAINING_ACTORS), timeout=60)


def test_idle_lanes_and_service_give_resources_back(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(warm.TTL_ENV, "3")
    layout, _, _ = ingest_small(store, shards=2, slices=1)
    train_model(store, layout, RayTrainer(store.settings))
    total = ray.cluster_resources()["CPU"]
    wait_for(
        "idle lanes to end and the service to go",
        lambda: warm.status() is None and ray.available_resources().get("CPU", 0) == total,
        timeout=60,
        state=lambda: (warm.status(), ray.available_resources(), alive(TRAINING_ACTORS)),
    )
    assert not alive(("RetrainService", *TRAINING_ACTORS))


def test_a_sigkilled_driver_leaves_no_ray_train_actor(stack: StackState, store: Store) -> None:
    """Ray Train's own placement-group cleaner stays alive for good after its driver is
    killed (it cannot exit from its thread); Lethe's runs use one that exits."""
    name = unique_model()
    layout, _, _ = ingest_small(store, name=name, shards=1, slices=1, epochs=4000)
    driver = textwrap.dedent(
        f"""
        from lethe.layout import ModelLayout
        from lethe.store import S3Settings, Store
        from lethe.training import RayTrainer, connect_ray, train_model
        store = Store(S3Settings.from_env())
        train_model(store, ModelLayout.of({name!r}), RayTrainer(store.settings, warm=False))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", driver],
        env={**os.environ, "RAY_ADDRESS": stack.ray_address},
        cwd=Path(__file__).parent.parent,
    )
    try:
        wait_for("the run's workers", lambda: bool(alive(("RayTrainWorker",))), timeout=120)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_for("no Ray Train actor left", lambda: not alive(TRAINING_ACTORS), timeout=90)
    assert layout.prefix.endswith(name)
