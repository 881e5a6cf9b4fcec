"""Thin kopf handlers: translate between the API and ``control`` / ``erasures``.

kopf is configured for privacy and quiet (``configure``):
- its diff base (the ``lethe.dev/last-handled-configuration`` annotation) holds a
  digest of a request's ``spec.subjects`` / ``spec.recordIds``, never the ids (which
  also keeps a large request far below the 256 KiB annotation limit);
- its progress annotations never hold an exception's message;
- only WARNING and above of kopf's own log becomes Events, without tracebacks; phase
  and condition transitions are posted as Events by the handlers themselves, once per
  transition.

Each ShardedModel's state machine runs in one daemon (``model_loop``), woken at once
by what concerns it (``wakeup``) and at least every ``wakeup.FALLBACK_SECONDS``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import kopf

from lethe_operator import control, erasures, kuberay, wakeup
from lethe_operator.context import (
    GROUP,
    MODELS,
    REQUESTS,
    VERSION,
    get_model,
    log,
    patch_model_status,
)

WAIT_FOR_PLAN = 2.0  # seconds a deleted request waits before looking for its batch's plan
ID_FIELDS = ("subjects", "recordIds")  # spec fields that hold subject or record ids
DIGEST_DOMAIN = "lethe.dev/diffbase/v1"  # the digest of an id list in the diff base


class _Events:
    """Kubernetes Events on one object (messages carry counts, never subject ids).

    ``info`` posts with ``kopf.event``: ``kopf.info`` is dropped below
    ``settings.posting.level`` (WARNING), and these are the transitions users watch."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def info(self, reason: str, message: str) -> None:
        kopf.event(self.body, type="Normal", reason=reason, message=message)

    def warning(self, reason: str, message: str) -> None:
        kopf.event(self.body, type="Warning", reason=reason, message=message)

    def about(self, body: dict[str, Any]) -> _Events:
        return _Events(body)


class PrivateDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff base, with the id lists of a spec replaced by a digest.

    kopf compares the essence it builds from the object with the one it stored, so
    both sides are digests and a change of the ids is still a change."""

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[Any] | None = None,
    ) -> Any:
        essence = super().build(body=body, extra_fields=extra_fields)
        spec = essence.get("spec") if isinstance(essence, dict) else None
        if isinstance(spec, dict):
            for field in ID_FIELDS:
                if isinstance(spec.get(field), list):
                    spec[field] = erasures.ids_digest((str(i) for i in spec[field]), DIGEST_DOMAIN)
        return essence


class QuietProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's progress annotations without the last exception's message (an exception
    raised deep in a library may quote data); the operator's log keeps the error."""

    def store(
        self,
        *,
        key: Any,
        record: Any,
        body: kopf.Body,
        patch: kopf.Patch,
    ) -> None:
        record = {k: v for k, v in dict(record).items() if k != "message"}
        super().store(key=key, record=record, body=body, patch=patch)  # type: ignore[arg-type]


class _NoTraceback(logging.Formatter):
    """The message only: a traceback never becomes an Event."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # A silent watch stall must not hang the operator: the server ends each watch, and
    # the client gives up on a connection that says nothing.
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 30
    # kopf's own log lines become Events only from WARNING up (no per-tick successes)
    settings.posting.level = logging.WARNING
    settings.persistence.progress_storage = QuietProgressStorage(prefix="lethe.dev")
    settings.persistence.diffbase_storage = PrivateDiffBaseStorage(prefix="lethe.dev")
    for handler in logging.getLogger("kopf.objects").handlers:
        if type(handler).__name__ == "K8sPoster":
            handler.setFormatter(_NoTraceback())
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _condition_changes(
    old: list[dict[str, Any]], new: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conditions whose status is new or changed (the transitions to report)."""
    before = {c.get("type"): c.get("status") for c in old}
    return [c for c in new if before.get(c.get("type")) != c.get("status")]


def report_transitions(events: _Events, old: dict[str, Any], new: dict[str, Any]) -> None:
    """One Event per condition of a ShardedModel that changed status in this tick."""
    for c in _condition_changes(old.get("conditions") or [], new.get("conditions") or []):
        bad = (c["type"] == "Ready" and c["status"] == "False") or (
            c["type"] == "Degraded" and c["status"] == "True"
        )
        text = f"{c['type']}={c['status']}" + (f": {c['message']}" if c.get("message") else "")
        post = events.warning if bad else events.info
        post(str(c.get("reason") or c["type"]), text[:1000])


@kopf.daemon(GROUP, VERSION, MODELS, cancellation_timeout=10.0)
async def model_loop(
    name: str, namespace: str, stopped: kopf.DaemonStopped, logger: logging.Logger, **_: Any
) -> None:
    """A ShardedModel's control loop: one reconcile at a time, each time it is woken
    (``wakeup``: a request arrived, a Ray job ended) or the fallback interval passed."""
    event = wakeup.register(namespace, name)
    try:
        while not stopped:
            again = False
            try:
                again = await asyncio.to_thread(reconcile_once, namespace, name)
            except Exception as e:  # noqa: BLE001 - the next round retries
                logger.warning("reconcile failed (%s); retrying", type(e).__name__)
            if not again:
                await wakeup.sleep(event)
    finally:
        wakeup.unregister(namespace, name)


def reconcile_once(namespace: str, name: str) -> bool:
    """One step of the model's state machine on a fresh read of it; its status changes
    are written with a merge patch (fields gone are set to null). True when the next
    step is due at once: a batch was closed (the next one may be waiting; a batch
    formed is taken as far as it goes in the tick that forms it)."""
    t0 = time.time()
    body = get_model(namespace, name)
    if body is None:
        return False
    events = _Events(body)
    old = json.loads(json.dumps(dict(body.get("status") or {})))
    status = control.reconcile_model(dict(body), events)
    report_transitions(events, old, status)
    patch = {key: None for key in set(old) - set(status)}
    patch.update({k: v for k, v in status.items() if old.get(k) != v})
    if patch:
        patch_model_status(namespace, name, patch)
    batch_before = (old.get("activeBatch") or {}).get("id")
    batch_after = (status.get("activeBatch") or {}).get("id")
    log.debug("reconciled in %.3f s (batch %s -> %s)", time.time() - t0, batch_before, batch_after)
    return batch_before is not None and batch_before != batch_after


@kopf.on.create(GROUP, VERSION, REQUESTS)
@kopf.on.resume(GROUP, VERSION, REQUESTS)
def request_created(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    try:
        status = erasures.accept_request(dict(body), _Events(body))
    except erasures.NotReady as e:
        raise kopf.TemporaryError(str(e), delay=10) from None
    for key, value in status.items():
        patch.status[key] = value
    # (the model's loop is woken by ``request_changed`` once this status is written)


@kopf.on.event(GROUP, VERSION, REQUESTS)
def request_changed(body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002
    """Wake the namespace's models once a request's quarantine is in its status (a
    batch is formed from what the status says, so waking them earlier, when
    ``request_created`` returns, would find nothing to batch)."""
    status = body.get("status") or {}
    if type in ("ADDED", "MODIFIED") and status.get("phase") == "Quarantined":
        if not status.get("batchId"):
            wakeup.wake(body["metadata"]["namespace"])


def rayjob_ended(body: kopf.Body, **_: Any) -> None:
    """Wake the model a KubeRay RayJob of Lethe's belongs to when the job has ended
    (``kuberay.job_status``: the same reading the model's loop makes of it)."""
    meta = body.get("metadata") or {}
    model = (meta.get("labels") or {}).get(kuberay.MODEL_LABEL)
    if model and kuberay.job_status("", body).done:
        log.info("RayJob %s ended: waking model %s", meta.get("name"), model)
        wakeup.wake(meta.get("namespace", ""), model)


if kuberay.watch_enabled():  # RBAC to watch RayJobs (chart: rbac.rayJobs)
    kopf.on.event(kuberay.GROUP, kuberay.VERSION, kuberay.PLURAL, labels=kuberay.MANAGED_BY)(
        rayjob_ended
    )


@kopf.on.delete(GROUP, VERSION, REQUESTS)
def request_deleted(body: kopf.Body, **_: Any) -> None:
    """The finalizer: a request deleted before its batch is cancelled; one in a named
    batch waits for the batch's plan, then goes (its rows are erased all the same)."""
    try:
        erasures.forget_request(dict(body), _Events(body))
    except erasures.BatchNotPlanned as e:
        raise kopf.TemporaryError(str(e), delay=WAIT_FOR_PLAN) from None
    wakeup.wake(body["metadata"]["namespace"])
