"""Thin kopf handlers: translate between the API and ``control``."""

from __future__ import annotations

from typing import Any

import kopf
from kubernetes import client as k8s

from lethe_operator import control
from lethe_operator.control import GROUP, MODELS, REQUESTS, VERSION

TICK = 2.0  # seconds between steps of a model's batch state machine


class _Events:
    """Kubernetes Events on one object (messages carry counts, never subject ids)."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def info(self, reason: str, message: str) -> None:
        kopf.info(self.body, reason=reason, message=message)

    def warning(self, reason: str, message: str) -> None:
        kopf.warn(self.body, reason=reason, message=message)


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
    status = control.accept_request(dict(body), _Events(body))
    for key, value in status.items():
        patch.status[key] = value


@kopf.timer(GROUP, VERSION, REQUESTS, interval=30.0, idle=5.0)
def request_ttl(body: kopf.Body, **_: Any) -> None:
    """Delete finished requests after the model's TTL (the certificate stays in S3)."""
    st = body.get("status") or {}
    if st.get("phase") not in control.FINISHED:
        return
    ttl = 86400
    try:
        model = k8s.CustomObjectsApi().get_namespaced_custom_object(
            GROUP, VERSION, body["metadata"]["namespace"], MODELS, body["spec"]["modelRef"]["name"]
        )
        ttl = int(model["spec"].get("erasurePolicy", {}).get("ttlSecondsAfterFinished", ttl))
    except k8s.exceptions.ApiException:
        pass
    if control.expired(dict(body), ttl):
        k8s.CustomObjectsApi().delete_namespaced_custom_object(
            GROUP, VERSION, body["metadata"]["namespace"], REQUESTS, body["metadata"]["name"]
        )
