"""Waking a ShardedModel's control loop the moment there is something to do.

Each model's batch state machine runs in one kopf daemon (``handlers.model_loop``),
which sleeps until it is woken or ``FALLBACK_SECONDS`` pass (the fallback catches what
nothing reports: a deadline coming due, a Secret edited). It is woken by:

- an ErasureRequest in its namespace whose quarantine has been written, or that is
  deleted (kopf's watch);
- its own step that formed or closed a batch (``handlers.model_loop`` runs again);
- the end of a retrain or train it started on a cluster's Jobs API
  (``raylaunch.RayJobs.until_done``: the retrain agent's long-poll, or a Ray job's log
  stream, a websocket that Ray closes when the job ends), or of a KubeRay RayJob
  (``handlers.rayjob_ended``: a kopf watch on Lethe's RayJobs, with
  ``LETHE_WATCH_RAYJOBS=1``, which the chart sets with ``rbac.rayJobs``).

Handlers run in threads and the daemons in kopf's event loop; ``wake`` may be called
from either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lethe_operator.raylaunch import JobStatus

log = logging.getLogger(__name__)

FALLBACK_SECONDS = 2.0  # the longest a model's loop sleeps without being woken

_lock = threading.Lock()
_events: dict[tuple[str, str], tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
_watched: set[str] = set()  # Ray job submission ids whose end is being watched


def register(namespace: str, name: str) -> asyncio.Event:
    """The wake-up event of a model's loop (called by the loop, in the event loop)."""
    event = asyncio.Event()
    with _lock:
        _events[(namespace, name)] = (asyncio.get_running_loop(), event)
    return event


def unregister(namespace: str, name: str) -> None:
    with _lock:
        _events.pop((namespace, name), None)


def wake(namespace: str, name: str | None = None) -> None:
    """Wake one model's loop, or (``name=None``) every model's loop in a namespace."""
    with _lock:
        targets = [v for (ns, n), v in _events.items() if ns == namespace and name in (None, n)]
    for loop, event in targets:
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(event.set)


async def sleep(event: asyncio.Event, seconds: float = FALLBACK_SECONDS) -> None:
    """Until woken or ``seconds`` passed; a wake-up that came meanwhile counts."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=seconds)
    event.clear()


class Watchable(Protocol):
    async def until_done(self, job: JobStatus) -> None: ...


def watch_job(launcher: Watchable, job: JobStatus, namespace: str, name: str) -> None:
    """Wake the model when this job ends (once per job; best effort: the fallback
    wakes the loop anyway)."""
    with _lock:
        if job.submission_id in _watched:
            return
        _watched.add(job.submission_id)
        loops = [loop for loop, _ in _events.values()]
    if not loops:
        _forget(job.submission_id)
        return
    asyncio.run_coroutine_threadsafe(_until_done(launcher, job, namespace, name), loops[0])


def _forget(submission_id: str) -> None:
    with _lock:
        _watched.discard(submission_id)


async def _until_done(launcher: Watchable, job: JobStatus, namespace: str, name: str) -> None:
    try:
        await launcher.until_done(job)
    except Exception as e:  # noqa: BLE001 - the fallback wake covers a lost stream
        log.debug("watching a job ended with %s", type(e).__name__)
    finally:
        _forget(job.submission_id)
        wake(namespace, name)
