"""The retrain agent (``lethe.agent``) on the real Ray head: the operator's launcher
retrains a batch through it without a Ray job, once, with the same certificate; when the
retrain service is gone, the same launcher falls back to a Ray job, which brings the
service (and its agent) back."""

from __future__ import annotations

import pytest
import ray

from lethe import warm
from lethe.core.plan import ErasureRequest
from lethe.erasure import Engine, request_uid
from lethe.localstack import StackState
from lethe.store import Store
from lethe.training import RayTrainer, connect_ray
from lethe.verify import verify
from lethe_operator import raylaunch
from lethe_operator.raylaunch import JobStatus, RayJobs
from tests.conftest import trained_small, training_subjects
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
            [ErasureRequest(request_uid(layout.prefix, [subject], []), (subject,))], purge=False
        )
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
