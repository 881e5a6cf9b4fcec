"""Thin kopf handlers: translate between the API and ``control`` / ``erasures``."""

from __future__ import annotations

from typing import Any

import kopf

from lethe_operator import control, erasures
from lethe_operator.context import GROUP, MODELS, REQUESTS, VERSION

TICK = 2.0  # seconds between steps of a model's batch state machine
WAIT_FOR_PLAN = 2.0  # seconds a deleted request waits before looking for its batch's plan


class _Events:
    """Kubernetes Events on one object (messages carry counts, never subject ids)."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def info(self, reason: str, message: str) -> None:
        kopf.info(self.body, reason=reason, message=message)

    def warning(self, reason: str, message: str) -> None:
        kopf.warn(self.body, reason=reason, message=message)

    def about(self, body: dict[str, Any]) -> _Events:
        return _Events(body)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # A silent watch stall must not hang the operator: the server ends each watch, and
    # the client gives up on a connection that says nothing.
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 30
    settings.posting.level = 20  # INFO events
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="lethe.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="lethe.dev")
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


@kopf.timer(GROUP, VERSION, MODELS, interval=TICK, sharp=False)
def model_tick(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    status = control.reconcile_model(dict(body), _Events(body))
    old = dict(body.get("status") or {})
    for key in set(old) - set(status):
        patch.status[key] = None
    for key, value in status.items():
        if old.get(key) != value:
            patch.status[key] = value


@kopf.on.create(GROUP, VERSION, REQUESTS)
@kopf.on.resume(GROUP, VERSION, REQUESTS)
def request_created(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    try:
        status = erasures.accept_request(dict(body), _Events(body))
    except erasures.NotReady as e:
        raise kopf.TemporaryError(str(e), delay=10) from None
    for key, value in status.items():
        patch.status[key] = value


@kopf.on.delete(GROUP, VERSION, REQUESTS)
def request_deleted(body: kopf.Body, **_: Any) -> None:
    """The finalizer: a request deleted before its batch is cancelled; one in a named
    batch waits for the batch's plan, then goes (its rows are erased all the same)."""
    try:
        erasures.forget_request(dict(body), _Events(body))
    except erasures.BatchNotPlanned as e:
        raise kopf.TemporaryError(str(e), delay=WAIT_FOR_PLAN) from None
