"""SISA training on Ray Train, shards concurrently: on the warm lanes of the cluster's
retrain service (``lethe.warm``), or one cold TorchTrainer run per shard.

A shard task trains slices first..R-1 of one shard, starting from the checkpoint after
slice first-1 (or from scratch), and stores a checkpoint after every slice under
its lineage hash, with a small JSON record of the data it was trained on beside
it. Workers read and write S3 themselves; Ray only carries metrics back.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lethe.core.config import ModelConfig
from lethe.core.cost import ShardRun
from lethe.core.manifest import Generation
from lethe.errors import LetheError, TransientError
from lethe.faults import FAULTS
from lethe.layout import ModelLayout
from lethe.store import NotFound, S3Settings, Store


class RetrainFailed(LetheError, RuntimeError):
    """A Ray Train run failed; the message carries Ray's."""


class StaleLineage(TransientError, RuntimeError):
    """The run trained on a file that an erasure purged meanwhile; its checkpoints were
    deleted again. Not a failure of the retrain: train the live data instead."""


STALE_MARK = "stale lineage:"  # how a worker's StaleLineage reads through Ray's wrapping


@dataclass
class ShardTask:
    shard: int
    first_slice: int
    data: list[dict[str, Any]]  # FileRef json of every slice of the shard
    lineages: list[str]
    checkpoints: list[str]  # key per slice (derived from the lineage)
    run_id: str
    tombstones_prefix: str = ""  # the model's tombstones (purged files), checked after a write
    report_prefix: str = ""  # where each attempt's resource report goes ("" = nowhere)
    attempt: str = ""  # set per Ray Train run by the trainer
    submitted_at: float = 0.0  # when that run was submitted (its start-up counts as cost)
    inject_failure: bool = False  # fault injection (``lethe.faults`` of the submitting driver)


class SliceSpool:
    """A shard's training rows on the worker's local disk, slice after slice: each slice
    file is downloaded streamed and appended a row group at a time (features as float32,
    labels as int64; a file-backed record's file fetched and decoded, ``lethe.files``),
    and the rows are read back by index through ``np.memmap``. A
    worker holds a batch and a row group, never its shard (the page cache holds what it
    can). Indexing gives the values the in-memory arrays gave, so checkpoints are the
    same bytes."""

    def __init__(self, directory: str, cfg: ModelConfig) -> None:
        self.directory = directory
        self.cfg = cfg
        self.features = cfg.num_features
        self.rows = 0
        self._x = open(os.path.join(directory, "x.f32"), "wb")  # closed by close()
        self._y = open(os.path.join(directory, "y.i64"), "wb")
        self._files: Any = None  # a file-backed model's FileDecoder, made on first use

    def add(self, store: Store, key: str) -> None:
        import pyarrow.parquet as pq

        from lethe.files import FileDecoder, feature_columns, features_and_labels

        columns = feature_columns(self.cfg)
        if self.cfg.columns.file and self._files is None:  # one for every slice's groups
            self._files = FileDecoder(store, self.cfg)
        with tempfile.TemporaryFile(dir=self.directory) as f:
            store.download(key, f)
            f.seek(0)
            pf = pq.ParquetFile(f)
            for group in range(pf.num_row_groups):
                rows = pf.read_row_group(group, columns)
                x, y = features_and_labels(store, self.cfg, rows, self._files)
                if len(y):
                    self._x.write(np.ascontiguousarray(x.reshape(-1, self.features)).tobytes())
                    self._y.write(y.tobytes())
                    self.rows += len(y)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row added so far: (features (rows, features), labels (rows,))."""
        self._x.flush()
        self._y.flush()
        if not self.rows:
            return np.zeros((0, self.features), np.float32), np.zeros(0, np.int64)
        x = np.memmap(self._x.name, np.float32, "r", shape=(self.rows, self.features))
        y = np.memmap(self._y.name, np.int64, "r", shape=(self.rows,))
        return x, y

    def close(self) -> None:
        self._x.close()
        self._y.close()

    def __enter__(self) -> SliceSpool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _write_report(store: Store, task: ShardTask, cfg: ModelConfig, **fields: Any) -> None:
    """One attempt's resources so far: a certificate's cost and runs are derived from
    these reports, so an attempt killed half-way is still accounted for."""
    if not task.report_prefix:
        return
    tc = cfg.trainer
    wall = max(0.0, float(fields.pop("updated_at")) - task.submitted_at)
    run = ShardRun(
        shard=task.shard,
        run_id=task.run_id,
        first_slice=task.first_slice,
        wall_seconds=wall,
        cpu_seconds=wall * tc.workers_per_shard * tc.cpus_per_worker,
        gpu_seconds=wall * tc.workers_per_shard * tc.gpus_per_worker,
        attempt=task.attempt,
        submitted_at=task.submitted_at,
        **fields,
    )
    store.put_json(f"{task.report_prefix}{task.attempt}.json", run.to_json())


def _already_trained(store: Store, task: ShardTask, cfg: ModelConfig, r: int) -> bool:
    from lethe.checkpoints import lineage_record_ok

    key = task.checkpoints[r]
    shas = [d["sha256"] for d in task.data[: r + 1]]
    return store.exists(key) and lineage_record_ok(
        store, key, shas, cfg.trainer_fingerprint(), set()
    )


def _purged_meanwhile(store: Store, task: ShardTask, upto: int) -> bool:
    """Whether any input of slices 0..upto has a tombstone (one HEAD per input file,
    however many tombstones the model has)."""
    if not task.tombstones_prefix:
        return False
    shas = {d["sha256"] for d in task.data[: upto + 1]}
    return any(store.exists(f"{task.tombstones_prefix}{sha}.json") for sha in sorted(shas))


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program (Linux
    VmHWM; ``getrusage``'s maxrss also counts what a forking parent held); 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def train_shard(
    cfg: ModelConfig,
    task: ShardTask,
    store: Store,
    rank: int,
    world: int,
    report: Callable[[dict[str, Any], bool], None],
) -> dict[str, Any]:
    """Train slices ``task.first_slice``.. of one shard on this Ray Train worker, one
    checkpoint per slice; returns the run's metrics. The same function serves a cold run
    (``train_shard_loop``) and a warm lane (``lethe.warm``), so both write the same bytes.
    ``report(metrics, last)`` hands per-slice metrics to whoever runs it."""
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from lethe.models import build_model, load_checkpoint, save_checkpoint

    tc = cfg.trainer
    torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")

    torch.manual_seed(tc.seed * 1_000_003 + task.shard * 1009)  # initial weights too
    model = build_model(tc, cfg.num_features, len(cfg.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.learning_rate)
    if task.first_slice > 0:
        state = load_checkpoint(store.get(task.checkpoints[task.first_slice - 1]))
        model.load_state_dict(state["model"])
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
    model.to(device)
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)

    loss_fn = nn.CrossEntropyLoss()
    eps = tc.epochs_per_slice(cfg.slices)
    with (
        tempfile.TemporaryDirectory(prefix="lethe-shard-") as tmp,
        SliceSpool(tmp, cfg) as spool,
    ):
        train_seconds = 0.0
        train_cpu = 0.0  # CPU seconds of this thread in those loops (below wall: starved)
        trained = 0  # slices trained by this run (not loaded from another writer's checkpoint)
        metrics: dict[str, Any] = {"train_seconds": 0.0, "slices_trained": 0, "peak_rss": 0}
        for r in range(cfg.slices):
            try:
                spool.add(store, task.data[r]["key"])
            except NotFound:
                if _purged_meanwhile(store, task, r):  # an erasure purged it under us
                    raise StaleLineage(f"{STALE_MARK} shard {task.shard} slice {r}") from None
                raise
            if r < task.first_slice:
                continue
            if _already_trained(store, task, cfg, r):
                # Another writer trained this exact lineage meanwhile (training is
                # deterministic, so its checkpoint is what we would write): resume from it
                # rather than train and write it a second time.
                state = load_checkpoint(store.get(task.checkpoints[r]))
                inner = model.module if hasattr(model, "module") else model
                inner.load_state_dict(state["model"])
                if state.get("optimizer"):
                    optimizer.load_state_dict(state["optimizer"])
                report({"slice": r, "train_seconds": train_seconds, "skipped": 1}, False)
                continue
            trained += 1
            t0, c0 = time.perf_counter(), time.thread_time()
            X, Y = spool.arrays()
            n = len(Y)
            # Seeds depend on (seed, shard, slice) only: retraining a slice on the same data
            # from the same checkpoint gives the same model.
            seed = tc.seed * 1_000_003 + task.shard * 1009 + r
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            model.train()
            if n:
                steps = max(1, math.ceil(eps * n / tc.batch_size))
                order = np.concatenate(
                    [rng.permutation(n) for _ in range(math.ceil(steps * tc.batch_size / n) + 1)]
                )
                for step in range(steps):
                    idx = order[step * tc.batch_size : (step + 1) * tc.batch_size]
                    idx = idx[rank::world]
                    if len(idx) == 0:
                        continue
                    xb = torch.from_numpy(np.asarray(X[idx])).to(device)
                    yb = torch.from_numpy(np.asarray(Y[idx])).to(device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(xb), yb)
                    loss.backward()
                    optimizer.step()
            train_seconds += time.perf_counter() - t0
            train_cpu += time.thread_time() - c0
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                meta = {"shard": task.shard, "slice": r, "lineage": task.lineages[r]}
                key = task.checkpoints[r]
                record = ModelLayout.checkpoint_lineage_record(key)
                # The record first: a checkpoint must never exist without it (a crash in
                # between leaves a record alone, which is harmless and rewritten alike).
                store.put_json(
                    record,
                    {
                        **meta,
                        "trainer": cfg.trainer_fingerprint(),
                        "data": [d["sha256"] for d in task.data[: r + 1]],
                        "run_id": task.run_id,
                        "attempt": task.attempt,
                    },
                )
                store.put(key, save_checkpoint(inner, optimizer, meta))
                # After the write, look for tombstones: an erasure that purged our data
                # wrote its tombstone before sweeping checkpoints, so either its sweep
                # sees this checkpoint or we see its tombstone (never neither).
                if _purged_meanwhile(store, task, r):
                    store.purge(key)
                    store.purge(record)
                    raise StaleLineage(f"{STALE_MARK} shard {task.shard} slice {r}")
                _write_report(
                    store,
                    task,
                    cfg,
                    updated_at=time.time(),
                    slices_trained=trained,
                    train_seconds=train_seconds,
                    peak_rss_bytes=peak_rss_bytes(),
                    finished=False,
                )
            metrics = {
                "slice": r,
                "train_seconds": train_seconds,
                "train_cpu_seconds": train_cpu,
                "peak_rss": peak_rss_bytes(),
                "slices_trained": trained,
            }
            report(metrics, r == cfg.slices - 1)
        return metrics


def train_shard_loop(config: dict[str, Any]) -> None:
    """The worker function of a cold Ray Train run (one run per shard task)."""
    import ray.train

    FAULTS.check_training(bool(config["task"].get("inject_failure")))
    cfg = ModelConfig.from_json(config["model"])
    task = ShardTask(**config["task"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def report(metrics: dict[str, Any], last: bool) -> None:
        if rank == 0 and last:
            # Ray Train v2 hands back only metrics that come with a checkpoint; this one
            # is a few bytes in the local run directory (the model went to S3 above).
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "metrics.json"), "w") as f:
                    json.dump(metrics, f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    train_shard(cfg, task, Store(S3Settings.from_env()), rank, world, report)


def disconnect_ray() -> None:
    """End this process's Ray driver connection, if it has one. Do it before the head
    goes away: ``ray.shutdown()`` after that hangs."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def connect_ray(address: str | None, settings: S3Settings) -> None:
    """Connect this process to Ray. The workers get where the data is (endpoint, bucket,
    region) through the driver's runtime_env, never the S3 keys: a runtime_env is job
    and actor metadata, readable through the dashboard and Ray's state API by anyone who
    can reach the cluster. The keys come from the Ray nodes' own environment, which
    every worker inherits from its raylet (trusted-cluster only: ``lethe dev`` starts its
    Ray head with the stack's keys; on KubeRay they are ``secretKeyRef`` env of the pods).
    A cluster that ``ray.init`` starts here (``address="local"``) inherits this process's
    environment, so the keys are put there first."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray Train v2's controller polls its workers every 2 s by default; that idle wait
    # sits on every erasure's critical path, so poll faster.
    env = {
        **settings.public_env(),
        "RAY_AUTH_MODE": "disabled",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"
        ),
    }
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # Inside a Ray job (the operator's): the job's runtime env carries the public S3
        # settings too; let ray.init combine the two instead of refusing.
        os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    env.update(FAULTS.env())
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    if target not in ("auto", "local"):
        # Ray's own actors (Train's placement-group cleaner) find the cluster's state
        # API through it; without it they fail where two Ray instances share a machine.
        env["RAY_ADDRESS"] = target
    if target == "local":
        # the raylet started below is this process's child: it (and so every worker)
        # inherits this environment, the only way keys reach workers
        for key, value in settings.env().items():
            if key.startswith("AWS_"):
                os.environ[key] = value
    ray.init(
        address=target,
        runtime_env={"env_vars": env},
        log_to_driver=False,
        logging_level="ERROR",
        configure_logging=True,
    )


def shard_tasks(
    layout: ModelLayout,
    gen: Generation,
    first_slices: dict[int, int],
    run_prefix: str,
    batch: str | None = None,
) -> list[ShardTask]:
    """One task per shard; with ``batch``, each run reports its resources under the
    batch (the certificate's cost and runs come from those reports)."""
    tasks = []
    for k, first in sorted(first_slices.items()):
        shard = gen.shards[k]
        tasks.append(
            ShardTask(
                shard=k,
                first_slice=first,
                data=[s.data.to_json() for s in shard.slices],
                lineages=[s.lineage for s in shard.slices],
                checkpoints=[
                    layout.checkpoint(k, r, s.lineage) for r, s in enumerate(shard.slices)
                ],
                run_id=f"{run_prefix}-shard{k}",
                tombstones_prefix=layout.tombstones_prefix,
                report_prefix=layout.shard_runs_prefix(batch, k) if batch else "",
            )
        )
    return tasks


class RayTrainer:
    """Runs shard tasks on a connected Ray cluster: on the cluster's warm retrain
    service (``lethe.warm``) when it can, as concurrent cold Ray Train runs otherwise
    (``warm=False``, ``LETHE_WARM=0``, or the service died under the tasks)."""

    def __init__(
        self, settings: S3Settings, ray_address: str | None = None, warm: bool | None = None
    ) -> None:
        from lethe import warm as warm_service

        self.settings = settings
        self.ray_address = ray_address
        self.warm = warm_service.enabled() if warm is None else warm
        self.storage = os.environ.get("LETHE_RAY_STORAGE") or os.path.join(
            tempfile.gettempdir(), "lethe-ray-train"
        )

    @functools.cached_property
    def store(self) -> Store:
        """One S3 client for every attempt's reports (a boto3 client takes ~0.1 s to make;
        it is safe to share between the threads of concurrent runs)."""
        return Store(self.settings)

    def new_attempt(self, cfg: ModelConfig, task: ShardTask) -> ShardTask:
        """The task as one Ray Train attempt: its own id, submitted now, reported at once
        (a certificate then accounts for it even if it is killed before a slice ends)."""
        import uuid

        task = ShardTask(
            **{
                **asdict(task),
                "attempt": uuid.uuid4().hex[:12],
                "inject_failure": task.inject_failure or FAULTS.fail_training,
            }
        )
        task.submitted_at = time.time()
        _write_report(self.store, task, cfg, updated_at=task.submitted_at, finished=False)
        return task

    def finished_run(
        self, cfg: ModelConfig, task: ShardTask, metrics: dict[str, Any], wall: float
    ) -> ShardRun:
        """The ShardRun of an attempt that ended, written where the certificate reads it."""
        tc = cfg.trainer
        run = ShardRun(
            shard=task.shard,
            run_id=task.run_id,
            first_slice=task.first_slice,
            slices_trained=int(metrics.get("slices_trained", cfg.slices - task.first_slice)),
            wall_seconds=wall,
            train_seconds=float(metrics.get("train_seconds", 0.0)),
            cpu_seconds=wall * tc.workers_per_shard * tc.cpus_per_worker,
            gpu_seconds=wall * tc.workers_per_shard * tc.gpus_per_worker,
            peak_rss_bytes=int(metrics.get("peak_rss", 0)),
            attempt=task.attempt,
            submitted_at=task.submitted_at,
            finished=True,
        )
        if task.report_prefix:
            self.store.put_json(f"{task.report_prefix}{task.attempt}.json", run.to_json())
        return run

    def _fit(self, cfg: ModelConfig, task: ShardTask) -> ShardRun:
        """One cold Ray Train run for one task."""
        from ray.train import FailureConfig, RunConfig

        from lethe.raytrain import LetheTorchTrainer

        task = self.new_attempt(cfg, task)
        trainer = LetheTorchTrainer(
            train_shard_loop,
            train_loop_config={"model": cfg.to_json(), "task": asdict(task)},
            scaling_config=scaling_config(cfg),
            run_config=RunConfig(
                name=f"{task.run_id}-{time.time_ns()}",
                storage_path=self.storage,
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps worker errors in its own types
            raise run_error(task, str(e), type(e).__name__) from e
        return self.finished_run(cfg, task, result.metrics or {}, time.perf_counter() - t0)

    def _cold(self, cfg: ModelConfig, tasks: list[ShardTask]) -> list[ShardRun]:
        """Every task as its own cold Ray Train run, all at once; raises after all ended.
        Idle warm lanes give their resources back first (they would starve these runs)."""
        from lethe.warm import release_idle

        release_idle()
        runs: dict[int, ShardRun] = {}
        errors: list[BaseException] = []

        def one(task: ShardTask) -> None:
            try:
                runs[task.shard] = self._fit(cfg, task)
            except BaseException as e:  # noqa: BLE001 - collected and re-raised below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(t,), daemon=True) for t in tasks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        raise_collected(errors)
        return [runs[t.shard] for t in tasks]

    def train(self, cfg: ModelConfig, tasks: list[ShardTask]) -> list[ShardRun]:
        """Train all tasks concurrently; raises RetrainFailed if any run failed
        (the others still finish and their checkpoints stay usable)."""
        if not tasks:
            return []
        connect_ray(self.ray_address, self.settings)
        if not self.warm:
            return self._cold(cfg, tasks)
        from lethe.warm import train_warm

        runs, lost = train_warm(self, cfg, tasks)
        # Tasks whose warm lane (or the service) died: the cold path, which resumes from
        # the last checkpoint the lane wrote, so no finished slice is trained twice.
        return runs + (self._cold(cfg, lost) if lost else [])

    def prewarm(self, cfg: ModelConfig, shards: int) -> None:
        """Start warm lanes for ``shards`` concurrent retrains without waiting for them
        (an erasure calls this first, so lanes start while it plans and patches)."""
        if not self.warm:
            return
        from lethe.warm import prewarm

        connect_ray(self.ray_address, self.settings)
        prewarm(cfg, shards)

    def evaluate(self, store: Store, gen: Generation) -> float | None:
        """Test accuracy of ``gen``'s ensemble, computed where torch is already loaded
        (the warm service) so that a driver need not import it; here otherwise."""
        if self.warm:
            from lethe.warm import ServiceUnavailable, evaluate_warm

            connect_ray(self.ray_address, self.settings)
            try:
                return evaluate_warm(store, gen)
            except ServiceUnavailable:
                pass
        from lethe.predict import ensemble_accuracy

        return ensemble_accuracy(store, gen)


def scaling_config(cfg: ModelConfig) -> Any:
    """Ray Train's ScalingConfig of one shard's run (cold or warm: the same)."""
    from ray.train import ScalingConfig

    tc = cfg.trainer
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = tc.gpus_per_worker
    return ScalingConfig(
        num_workers=tc.workers_per_shard, use_gpu=tc.use_gpu, resources_per_worker=resources
    )


def run_error(task: ShardTask, message: str, kind: str = "") -> RuntimeError:
    """The error a failed run of ``task`` raises: StaleLineage when it trained on data
    purged meanwhile (Ray wraps the worker's error in its own types), else RetrainFailed."""
    if STALE_MARK in message:
        return StaleLineage(f"shard {task.shard}: trained on data purged meanwhile")
    return RetrainFailed(
        f"shard {task.shard}: Ray Train run {task.run_id} failed: {kind + ': ' if kind else ''}"
        f"{message}"
    )


def raise_collected(errors: list[BaseException]) -> None:
    if not errors:
        return
    if all(isinstance(e, StaleLineage) for e in errors):
        raise StaleLineage("; ".join(str(e) for e in errors))
    raise RetrainFailed("; ".join(str(e) for e in errors))


def train_model(
    store: Store, layout: ModelLayout, trainer: RayTrainer, evaluate: bool = True
) -> tuple[Generation, list[ShardRun]]:
    """Train every shard that lacks checkpoints, then commit them and the accuracy.
    Safe to repeat: slices already trained (their lineage keys exist) are skipped."""
    from lethe.checkpoints import adopt_checkpoints, pending_slices
    from lethe.generations import read_live, update

    gen = read_live(store, layout).generation
    adopt_checkpoints(store, layout, gen, range(len(gen.shards)))
    todo = pending_slices(gen)
    runs = trainer.train(gen.config, shard_tasks(layout, gen, todo, f"{gen.config.name}-train"))
    seconds = {
        r.shard: (r.train_seconds, max(0.0, r.wall_seconds - r.train_seconds))
        for r in runs
        if r.first_slice == 0
    }

    def change(g: Generation) -> Generation | None:
        nxt = g.successor("train")
        changed = adopt_checkpoints(store, layout, nxt, range(len(nxt.shards)))
        for k, (train, overhead) in seconds.items():
            shard = nxt.shards[k]
            if (shard.train_seconds, shard.overhead_seconds) != (train, overhead):
                shard.train_seconds, shard.overhead_seconds = train, overhead
                changed = True
        if evaluate and (changed or g.accuracy is None):
            nxt.accuracy = trainer.evaluate(store, nxt)
            changed = changed or nxt.accuracy is not None
        return nxt if changed else None

    return update(store, layout, change).generation, runs
