"""Warm retrains: Ray Train runs kept alive between erasures.

A cold Ray Train run pays several seconds before its first step (controller, placement
group, worker processes, ``import torch``); a shard's retrain often trains for less.
So each Ray cluster gets one retrain service: a detached, named actor
(``lethe-retrain-service`` in Ray namespace ``lethe``) that needs no CPU of its own and
keeps *lanes*. A lane is one long-lived ``TorchTrainer`` run, with the workers and
resources of one shard's run (``training.scaling_config``: multi-worker and GPU shards
as in a cold run), whose workers take shard tasks from the service one after another
and run them with ``training.train_shard``, the very function a cold run uses: same
seeds, same data, same bytes.

- **One submission per batch.** A driver hands the service all of a batch's tasks at
  once; the service starts lanes as needed (at most what the cluster's resources fit)
  and answers when every task has ended.
- **Idle resources go back.** A lane that got no task for the TTL
  (``LETHE_WARM_TTL_SECONDS``, default 600) ends its run, which frees its placement
  group; the service ends itself once it has had no lane for a TTL. A lane that idles
  is also retired at once when another kind of lane needs its resources.
- **The service may die.** A task whose lane (or the whole service) died is returned as
  *lost*; the trainer then runs it cold, and the cold run resumes from the last
  checkpoint the lane wrote (``training._already_trained``): no finished slice is
  trained twice and the checkpoints are the same.
- **No stray actors.** Lanes, like cold runs, use ``lethe.raytrain``'s trainer, whose
  placement-group cleaner exits once a dead run's placement group is removed.

Costs stay honest: a task's ``wall_seconds`` is measured by the service from its
submission to its end; what a lane holds while it idles is reported by ``status``
(``idle_lane_seconds``), not charged to any erasure.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lethe.core.config import ModelConfig, TrainerConfig
from lethe.errors import TransientError

if TYPE_CHECKING:
    from lethe.core.cost import ShardRun
    from lethe.core.manifest import Generation
    from lethe.store import Store
    from lethe.training import RayTrainer, ShardTask

log = logging.getLogger(__name__)

SERVICE_NAME = "lethe-retrain-service"
NAMESPACE = "lethe"
TTL_ENV = "LETHE_WARM_TTL_SECONDS"
DEFAULT_TTL_SECONDS = 600.0
ENABLE_ENV = "LETHE_WARM"  # "0": every retrain is a cold Ray Train run
WAIT_SECONDS = 30.0  # one long-poll of a driver waiting for its tasks
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LANE_HEALTH_CHECK_SECONDS = 2.0  # how often a lane's Ray Train controller polls (its default)

# workers, CPUs per worker, GPUs per worker, and whose code the lane may run ("" for
# the built-in models; a user model's import path and model name otherwise)
LaneKey = tuple[int, float, float, str]


class ServiceUnavailable(TransientError, RuntimeError):
    """The warm service could not be reached or created; use the cold path."""


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


def ttl_seconds() -> float:
    raw = os.environ.get(TTL_ENV, "")
    try:
        return max(1.0, float(raw)) if raw else DEFAULT_TTL_SECONDS
    except ValueError:
        raise ValueError(f"{TTL_ENV}: not a number of seconds: {raw!r}") from None


def lane_key(cfg: ModelConfig) -> LaneKey:
    """A lane runs tasks of one shape; a user model's code (``package.module:build``)
    stays imported in the lane's workers, so its lanes serve that model alone."""
    tc = cfg.trainer
    scope = f"{cfg.name}|{tc.model}" if ":" in tc.model else ""
    return (tc.workers_per_shard, float(tc.cpus_per_worker), float(tc.gpus_per_worker), scope)


# -- the service (a Ray actor) ---------------------------------------------------------
@dataclass
class _Lane:
    id: str
    key: LaneKey
    idle_since: float | None = None  # None: its workers are still starting
    item: str | None = None  # the task it holds
    seq: int = 0  # how many tasks it was handed
    current: dict[str, Any] | None = None  # the last task handed out (for ranks > 0)
    retire: bool = False


@dataclass
class _Item:
    id: str
    key: LaneKey
    body: dict[str, Any]  # model config, task, public S3 settings
    received_at: float
    result: dict[str, Any] | None = None


@dataclass
class _State:
    ttl: float
    lanes: dict[str, _Lane] = field(default_factory=dict)
    queues: dict[LaneKey, deque[str]] = field(default_factory=dict)
    items: dict[str, _Item] = field(default_factory=dict)
    idle_lane_seconds: float = 0.0
    last_activity: float = field(default_factory=time.time)


class RetrainService:
    """The per-cluster service (see the module docstring). Every method runs in its own
    thread of this actor (``max_concurrency``); one condition guards the state."""

    def __init__(self, ttl: float, storage: str) -> None:
        import ray

        from lethe import agent

        self.state = _State(ttl)
        self.storage = storage
        self.cond = threading.Condition()
        # the operator's way in without a Ray job per batch (``lethe.agent``)
        self.agent = agent.start(ray.get_runtime_context().get_session_name())
        threading.Thread(target=self._watchdog, daemon=True).start()

    # drivers ------------------------------------------------------------------------
    def submit(self, key: LaneKey, bodies: list[dict[str, Any]], ttl: float) -> list[str]:
        key = _key(key)
        with self.cond:
            st = self.state
            st.ttl, st.last_activity = ttl, time.time()
            ids = []
            for body in bodies:
                item = _Item(uuid.uuid4().hex, key, body, time.time())
                st.items[item.id] = item
                st.queues.setdefault(key, deque()).append(item.id)
                ids.append(item.id)
            self._ensure_lanes(key, len(st.queues[key]))
            self.cond.notify_all()
        return ids

    def prewarm(self, key: LaneKey, lanes: int, ttl: float) -> int:
        key = _key(key)
        with self.cond:
            self.state.ttl, self.state.last_activity = ttl, time.time()
            return self._ensure_lanes(key, lanes)

    def wait(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """The results of those of ``ids`` that ended within ``timeout``; all of them
        once they all ended. A result is {"ok", "metrics" | "error", "lost", "wall"}."""
        deadline = time.time() + timeout
        with self.cond:
            while True:
                done = {i: r for i in ids if (r := self._result(i)) is not None}
                if len(done) == len(ids) or time.time() >= deadline:
                    for i in done:
                        self.state.items.pop(i, None)
                    return done
                self.cond.wait(min(1.0, max(0.0, deadline - time.time())))

    def evaluate(self, s3: dict[str, str], generation: dict[str, Any]) -> float | None:
        """Test accuracy of a generation's ensemble (torch is loaded here already)."""
        from lethe.core.manifest import Generation
        from lethe.predict import ensemble_accuracy

        return ensemble_accuracy(store_for(s3), Generation.from_json(generation))

    def release_idle(self) -> int:
        """Retire every idle lane now (a cold run needs the resources they hold)."""
        with self.cond:
            idle = [la for la in self.state.lanes.values() if la.item is None and not la.retire]
            for lane in idle:
                lane.retire = True
            self.cond.notify_all()
            return len(idle)

    def status(self) -> dict[str, Any]:
        with self.cond:
            st = self.state
            return {
                "ttl_seconds": st.ttl,
                "lanes": [
                    {"key": list(la.key), "busy": la.item is not None, "tasks": la.seq}
                    for la in st.lanes.values()
                ],
                "queued": sum(len(q) for q in st.queues.values()),
                "idle_lane_seconds": st.idle_lane_seconds,
            }

    # lane workers ---------------------------------------------------------------------
    def next_task(self, lane_id: str, rank: int, seen: int) -> dict[str, Any] | None:
        """The next task of a lane (None: the lane ends). Rank 0 takes it from the queue;
        the other ranks of a multi-worker lane get the same task."""
        with self.cond:
            lane = self.state.lanes.get(lane_id)
            while lane is not None:
                if rank > 0:
                    if lane.current is not None and lane.seq > seen:
                        return {**lane.current, "seq": lane.seq}
                    if lane.retire:
                        return None
                else:
                    queue = self.state.queues.get(lane.key)
                    if queue and not lane.retire:
                        item = self.state.items[queue.popleft()]
                        now = time.time()
                        self.state.idle_lane_seconds += max(0.0, now - (lane.idle_since or now))
                        lane.item, lane.seq = item.id, lane.seq + 1
                        lane.current = item.body
                        return {**item.body, "seq": lane.seq}
                    if lane.idle_since is None:  # its workers just started: idle from now
                        lane.idle_since = time.time()
                    if lane.retire or time.time() - lane.idle_since >= self.state.ttl:
                        lane.retire = True
                        self.cond.notify_all()
                        return None
                self.cond.wait(1.0)
            return None

    def task_done(self, lane_id: str, result: dict[str, Any]) -> None:
        with self.cond:
            lane = self.state.lanes.get(lane_id)
            if lane is None or lane.item is None:
                return
            item = self.state.items.get(lane.item)
            if item is not None:
                item.result = {**result, "lost": False, "wall": time.time() - item.received_at}
            lane.item, lane.idle_since = None, time.time()
            self.state.last_activity = time.time()
            self.cond.notify_all()

    # internals ------------------------------------------------------------------------
    def _result(self, item_id: str) -> dict[str, Any] | None:
        item = self.state.items.get(item_id)
        if item is None:
            return {"ok": False, "lost": True, "error": "unknown task (the service restarted)"}
        return item.result

    def _ensure_lanes(self, key: LaneKey, wanted: int) -> int:
        """Start lanes of ``key`` until ``wanted`` are free or the cluster is full."""
        lanes = [la for la in self.state.lanes.values() if la.key == key and not la.retire]
        free = sum(1 for la in lanes if la.item is None)
        started = 0
        room = _lanes_fitting(key) - len(lanes)
        for _ in range(min(wanted - free, room)):
            self._retire_idle_other_lanes(key)
            lane = _Lane(uuid.uuid4().hex[:10], key)
            self.state.lanes[lane.id] = lane
            threading.Thread(target=self._run_lane, args=(lane,), daemon=True).start()
            started += 1
        return started

    def _retire_idle_other_lanes(self, key: LaneKey) -> None:
        """Idle lanes of another shape give their resources to a lane that needs them."""
        workers, cpus, gpus, _ = key
        need_cpu, need_gpu = workers * cpus, workers * gpus
        import ray

        free = ray.available_resources()
        if free.get("CPU", 0.0) >= need_cpu and free.get("GPU", 0.0) >= need_gpu:
            return
        for lane in self.state.lanes.values():
            if lane.key != key and lane.item is None and not lane.retire:
                lane.retire = True
        self.cond.notify_all()

    def _run_lane(self, lane: _Lane) -> None:
        from ray.train import FailureConfig, RunConfig

        from lethe.raytrain import LetheTorchTrainer
        from lethe.training import scaling_config

        workers, cpus, gpus, _ = lane.key
        # a model config that carries only the lane's Ray Train shape
        trainer = TrainerConfig(
            workers_per_shard=workers, cpus_per_worker=cpus, gpus_per_worker=gpus
        )
        cfg = ModelConfig("lane", 1, 1, trainer=trainer)
        # Tasks and their results go through this service, not through Ray Train, so a
        # lane's controller need not poll its workers every 0.2 s as a cold run's does
        # (``training.connect_ray``): those polls take CPU from the training beside them
        # (the CPUs are all lanes'). Only a lane's end is noticed up to that much later.
        # Ray Train hands this process's setting to the controller it starts.
        os.environ[HEALTH_CHECK_ENV] = str(LANE_HEALTH_CHECK_SECONDS)
        error = "the lane's Ray Train run ended"
        try:
            LetheTorchTrainer(
                lane_loop,
                train_loop_config={"lane": lane.id},
                scaling_config=scaling_config(cfg),
                run_config=RunConfig(
                    name=f"lethe-lane-{lane.id}",
                    storage_path=self.storage,
                    failure_config=FailureConfig(max_failures=0),
                ),
            ).fit()
        except Exception as e:  # noqa: BLE001 - the lane's task (if any) is reported lost
            error = f"the lane's Ray Train run failed: {type(e).__name__}: {e}"
        finally:
            with self.cond:
                self.state.lanes.pop(lane.id, None)
                item = self.state.items.get(lane.item or "")
                if item is not None and item.result is None:
                    item.result = {"ok": False, "lost": True, "error": error}
                self.state.last_activity = time.time()
                # tasks queued for this shape still need a lane
                queued = len(self.state.queues.get(lane.key, ()))
                if queued:
                    self._ensure_lanes(lane.key, queued)
                self.cond.notify_all()

    def _watchdog(self) -> None:
        """End the service after a TTL without lanes."""
        import ray

        while True:
            time.sleep(1.0)
            with self.cond:
                st = self.state
                quiet = not st.lanes and not any(st.queues.values())
                quiet = quiet and not (self.agent and self.agent.busy())
                if quiet and time.time() - st.last_activity >= st.ttl:
                    break
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def _key(key: Any) -> LaneKey:
    return (int(key[0]), float(key[1]), float(key[2]), str(key[3]))


def _lanes_fitting(key: LaneKey) -> int:
    """How many lanes of this shape the cluster's resources hold at once (at least one:
    a lane that does not fit yet waits for resources like a cold run)."""
    import ray

    workers, cpus, gpus, _ = key
    total = ray.cluster_resources()
    fit = math.floor(total.get("CPU", 0.0) / (workers * cpus)) if cpus else 64
    if gpus:
        fit = min(fit, math.floor(total.get("GPU", 0.0) / (workers * gpus)))
    return max(1, fit)


_stores: dict[tuple[tuple[str, str], ...], Store] = {}


def store_for(s3: dict[str, str]) -> Store:
    """A Store for a task's public S3 settings with this node's keys (one per bucket:
    a boto3 client costs ~0.1 s to make)."""
    from lethe.store import S3Settings, Store

    cache_key = tuple(sorted(s3.items()))
    if cache_key not in _stores:
        base = S3Settings.from_env()
        _stores[cache_key] = Store(
            S3Settings(
                endpoint=s3.get("LETHE_S3_ENDPOINT") or None,
                bucket=s3["LETHE_BUCKET"],
                access_key=base.access_key,
                secret_key=base.secret_key,
                region=s3.get("AWS_DEFAULT_REGION", base.region),
            )
        )
    return _stores[cache_key]


def lane_loop(config: dict[str, Any]) -> None:
    """The worker function of a lane: run tasks until the service says the lane ends."""
    import ray
    import ray.train

    from lethe.faults import FAULTS
    from lethe.training import ShardTask, train_shard

    service = ray.get_actor(SERVICE_NAME, namespace=NAMESPACE)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seen = 0
    while True:
        body = ray.get(service.next_task.remote(config["lane"], rank, seen))
        if body is None:
            return
        seen = body["seq"]
        try:
            task = ShardTask(**body["task"])
            FAULTS.check_training(task.inject_failure)
            cfg = ModelConfig.from_json(body["model"])
            store = store_for(body["s3"])
            metrics = train_shard(cfg, task, store, rank, world, lambda m, last: None)
            result: dict[str, Any] = {"ok": True, "metrics": metrics}
        except Exception as e:  # noqa: BLE001 - reported to the driver as the run's failure
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            if world > 1:
                # a multi-worker lane's ranks may be out of step now: end it (its task
                # is reported failed first, and the next task gets a fresh lane)
                if rank == 0:
                    ray.get(service.task_done.remote(config["lane"], result))
                raise
        if rank == 0:
            ray.get(service.task_done.remote(config["lane"], result))


# -- the driver's side -----------------------------------------------------------------
def service(ttl: float | None = None) -> Any:
    """The cluster's retrain service, created if it does not exist (or died)."""
    import ray

    remote = ray.remote(RetrainService).options(
        name=SERVICE_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=1000,
        # on the head node: the agent's address is the head's (``lethe.agent``)
        resources={"node:__internal_head__": 0.001},
        scheduling_strategy="DEFAULT",  # never inside a caller's placement group
    )
    storage = os.environ.get("LETHE_RAY_STORAGE") or os.path.join(
        tempfile.gettempdir(), "lethe-ray-train"
    )
    try:
        return remote.remote(ttl or ttl_seconds(), storage)
    except Exception as e:  # noqa: BLE001 - any Ray error here means: go cold
        raise ServiceUnavailable(f"{type(e).__name__}: {e}") from e


def prewarm(cfg: ModelConfig, lanes: int) -> None:
    """Ask for ``lanes`` lanes of this model's shape, without waiting."""
    with contextlib.suppress(ServiceUnavailable):
        ttl = ttl_seconds()
        service(ttl).prewarm.remote(lane_key(cfg), max(1, lanes), ttl)


def train_warm(
    trainer: RayTrainer, cfg: ModelConfig, tasks: list[ShardTask]
) -> tuple[list[ShardRun], list[ShardTask]]:
    """Run ``tasks`` on warm lanes, one submission for all of them. Returns the runs and
    the tasks that were lost with their lane or the service (to run cold); raises like
    the cold path when a task failed."""
    import ray
    from ray.exceptions import RayError

    from lethe.training import raise_collected, run_error

    try:
        ttl = ttl_seconds()
        svc = service(ttl)
    except ServiceUnavailable:
        return [], list(tasks)
    attempts = [trainer.new_attempt(cfg, t) for t in tasks]
    bodies = [
        {"model": cfg.to_json(), "task": asdict(a), "s3": trainer.settings.public_env()}
        for a in attempts
    ]
    results: dict[str, dict[str, Any]] = {}
    ids: list[str] = []
    # Longest first: lanes take tasks in submission order, and the batch ends with its
    # last task, so the biggest retrains go first and the small ones fill in beside them.
    order = sorted(range(len(tasks)), key=lambda i: -task_work(tasks[i]))
    try:
        submitted = ray.get(svc.submit.remote(lane_key(cfg), [bodies[i] for i in order], ttl))
        ids = [""] * len(tasks)
        for i, item in zip(order, submitted, strict=True):
            ids[i] = item
        while len(results) < len(ids):
            pending = [i for i in ids if i not in results]
            results.update(ray.get(svc.wait.remote(pending, WAIT_SECONDS)))
    except RayError as e:
        log.warning("warm retrain service lost (%s); running the rest cold", type(e).__name__)
    runs: list[ShardRun] = []
    lost: list[ShardTask] = []
    errors: list[BaseException] = []
    for i, (task, attempt) in enumerate(zip(tasks, attempts, strict=True)):
        result = results.get(ids[i]) if i < len(ids) else None
        if result is None or result.get("lost"):
            lost.append(task)
        elif result["ok"]:
            runs.append(trainer.finished_run(cfg, attempt, result["metrics"], result["wall"]))
        else:
            errors.append(run_error(attempt, str(result["error"])))
    raise_collected(errors)
    return runs, lost


def task_work(task: ShardTask) -> int:
    """Rows a shard task trains on, summed over its slices (slice r trains on the rows of
    slices 0..r for the same number of epochs): its share of the training work."""
    rows = [int(d.get("rows", 0)) for d in task.data]
    return sum(sum(rows[: r + 1]) for r in range(task.first_slice, len(rows)))


def evaluate_warm(store: Store, gen: Generation) -> float | None:
    """The ensemble's test accuracy, computed by the service."""
    import ray
    from ray.exceptions import RayError

    try:
        return ray.get(service().evaluate.remote(store.settings.public_env(), gen.to_json()))
    except RayError as e:
        raise ServiceUnavailable(str(e)) from e


def release_idle() -> int:
    """Have a running service give back what its idle lanes hold; how many it retired."""
    import ray

    try:
        svc = ray.get_actor(SERVICE_NAME, namespace=NAMESPACE)
        return int(ray.get(svc.release_idle.remote(), timeout=10))
    except Exception:  # noqa: BLE001 - no service: nothing held
        return 0


def status() -> dict[str, Any] | None:
    """The service's lanes and queue, or None when it is not running."""
    import ray

    try:
        svc = ray.get_actor(SERVICE_NAME, namespace=NAMESPACE)
        return ray.get(svc.status.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - not running (or dying): nothing to report
        return None
