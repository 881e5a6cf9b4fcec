"""The operator's Kubernetes client: one per loaded configuration, shared by every call."""

from __future__ import annotations

import threading
from typing import Any

from kubernetes import client as k8s

_clients: dict[tuple[Any, ...], k8s.ApiClient] = {}
_clients_lock = threading.Lock()


def api_client() -> k8s.ApiClient:
    """The Kubernetes client of the loaded configuration, one per configuration and
    shared by every call (its connection pool is thread-safe): a client made per call
    opened a new TLS connection and loaded the system's CA certificates (about 30 ms)
    for each of a reconcile's API calls, over a third of the reconcile."""
    conf = k8s.Configuration.get_default_copy()
    key = (conf.host, repr(conf.api_key), conf.cert_file, conf.key_file, conf.ssl_ca_cert)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = k8s.ApiClient(conf)
        return _clients[key]


def custom_objects() -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(api_client())


def core_v1() -> k8s.CoreV1Api:
    return k8s.CoreV1Api(api_client())
