"""The retrain agent (``lethe.agent``) on the real Ray head: the operator's launcher
retrains a batch through it without a Ray job, once, with the same certificate; when the
retrain service is gone, the same launcher falls back to a Ray job, which brings the
service (and its agent) back."""

from __future__ import annotations

import pytest
import ray

from lethe import warm
from lethe.core.cost import ShardRun
from lethe.core.hashing import slice_of
from lethe.core.plan import ErasureRequest
from lethe.erasure import Engine, request_uid
from lethe.store import Store
from lethe.training import RayTrainer, connect_ray
from lethe.verify import verify
from lethe_dev.localstack import StackState
from lethe_operator import raylaunch
from lethe_operator.raylaunch import JobStatus, RayJobs
from tests.conftest import small_table, trained_small, training_subjects
from tests.harness import wait_for


@pytest.fixture(autouse=True)
def connected(store: Store) -> None:
    connect_ray(None, store.settings)


def retrain_args(prefix: str, batch: str) -> list[str]:
    return ["retrain", "--model-prefix", prefix, "--batch", batch]


def answers(agent: raylaunch.RetrainAgent) -> bool:
    try:
        agent.ids()
        return True
    except raylaunch.RayUnavailable:
        return False


def ended(launcher: RayJobs, job_id: str) -> JobStatus | None:
    st = launcher.status(job_id)
    return st if st is not None and st.done else None


def test_a_batch_retrains_on_the_agent_once_then_on_a_ray_job_without_it(
    stack: StackState, store: Store, trainer: RayTrainer
) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=2)
    first, second = training_subjects(table, cfg)[:2]
    engine = Engine(store, layout, trainer=None)
    launcher = RayJobs(stack.ray_dashboard, store.settings.public_env())
    assert stack.agent_port and launcher.agent_port == stack.agent_port
    raylaunch.forget_agent(launcher.address, launcher.agent_port)
    agent = launcher.agent()
    assert agent is not None  # training started the service, and with it the agent

    def erase(subject: str, job_id: str) -> tuple[JobStatus, dict]:
        plan = engine.prepare(
            [ErasureRequest(request_uid(layout.prefix, [subject], []), (subject,))], patch=False
        )
        engine.order_erasure(plan)  # as the operator does: the job patches and purges
        job_id = job_id.format(batch=plan.batch_id)
        started = launcher.ensure(job_id, retrain_args(layout.prefix, plan.batch_id))
        again = launcher.ensure(job_id, retrain_args(layout.prefix, plan.batch_id))
        assert again.via == started.via  # asked twice, started once
        done = wait_for("the retrain", lambda: ended(launcher, job_id), timeout=300)
        assert done.status == "SUCCEEDED", done.message
        return started, engine.finish(plan)

    started, result = erase(first, "lethe-{batch}-0")
    assert started.via == "agent"
    assert [i for i in launcher.submissions("lethe-") if i == started.submission_id] == [
        started.submission_id
    ]
    # not a Ray job: no driver started for it
    assert raylaunch._http("GET", f"{stack.ray_dashboard}/api/jobs/{started.submission_id}") is None
    assert verify(store, store.get_json(next(iter(result["certificates"].values())))).ok

    # The service (and its agent) gone: the launcher notices and submits a Ray job,
    # whose driver starts the service again.
    ray.kill(ray.get_actor(warm.SERVICE_NAME, namespace=warm.NAMESPACE), no_restart=True)
    wait_for("the agent to go", lambda: not answers(agent), timeout=30)
    started, result = erase(second, "lethe-{batch}-0")
    assert started.via == "jobs"
    assert verify(store, store.get_json(next(iter(result["certificates"].values())))).ok
    raylaunch.forget_agent(launcher.address, launcher.agent_port)
    assert launcher.agent() is not None  # back with the service


def test_the_service_killed_while_its_agent_retrains_ends_with_one_certificate(
    stack: StackState, store: Store, trainer: RayTrainer
) -> None:
    """The retrain dies with the service mid-way; the operator's next ensure of the same
    id finds no run (the agent is gone, the Jobs API never had it) and submits a Ray job
    under that id, which resumes after the slices the lane checkpointed."""
    table = small_table(subjects=200)  # slices that train for seconds: the kill lands inside
    layout, cfg, _ = trained_small(store, trainer, table=table, shards=1, slices=3, epochs=240)
    subject = next(s for s in training_subjects(table, cfg) if slice_of(s, cfg.slices) == 0)
    engine = Engine(store, layout, trainer=None)
    launcher = RayJobs(stack.ray_dashboard, store.settings.public_env())
    raylaunch.forget_agent(launcher.address, launcher.agent_port)
    plan = engine.prepare(
        [ErasureRequest(request_uid(layout.prefix, [subject], []), (subject,))], patch=False
    )
    engine.order_erasure(plan)
    job_id, args = f"lethe-{plan.batch_id}-0", retrain_args(layout.prefix, plan.batch_id)
    assert launcher.ensure(job_id, args).via == "agent"

    def lane_checkpointed() -> bool:
        runs = [
            ShardRun.from_json(store.get_json(k))
            for k in store.list_keys(f"{layout.prefix}/erasures/")
            if "/runs/" in k
        ]
        return any(r.slices_trained >= 1 and not r.finished for r in runs)

    wait_for("a slice retrained on the agent's lane", lane_checkpointed, timeout=180)
    ray.kill(ray.get_actor(warm.SERVICE_NAME, namespace=warm.NAMESPACE), no_restart=True)

    def ensured_until_done() -> JobStatus | None:  # what each operator step does
        st = launcher.ensure(job_id, args)
        return st if st.done else None

    done = wait_for("the retrain under the same id", ensured_until_done, timeout=300, every=1)
    assert (done.via, done.status) == ("jobs", "SUCCEEDED"), done.message
    result = engine.finish(plan)
    certs = [k for k in store.list_keys(f"{layout.prefix}/certificates/") if "/chain/" not in k]
    assert len(certs) == 1
    assert verify(store, store.get_json(certs[0])).ok
    runs = [ShardRun.from_json(r) for r in result["shard_runs"]]
    # nothing trained twice: the Ray job resumed after the lane's checkpoints
    assert sum(r.slices_trained for r in runs) == cfg.slices
